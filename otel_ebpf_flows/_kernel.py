"""The real :class:`~otel_ebpf_flows._source.Source`: the shipped CO-RE object on this kernel.

:func:`check_environment` says, before anything is loaded, what is missing and
how to fix it. :class:`KernelSource` loads ``tcp_flows.bpf.o`` for one process
(tp_btf programs, raw_tp where tp_btf is refused), attaches it, adopts the
process's existing sockets, and reads what the kernel aggregated. With
``host_wide=True`` it counts every process's connections (``otel-ebpf-flows
watch``) and adopts the sockets every process holds.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import re
import struct
import sys
import threading
import time
from typing import Any, Callable, Collection, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

import attrs

from . import _libbpf, _records
from ._config import Config
from ._source import Counters, FlowEvent, FlowKey, ProbeStats, Snapshot
from .exceptions import BpfError, EbpfFlowsError, UnsupportedEnvironment

_log = logging.getLogger("otel_ebpf_flows")

OBJECT_NAME = "tcp_flows.bpf.o"
BPF_DIR = os.path.join(os.path.dirname(__file__), "bpf")
VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

# Programs by hook; each has a tp_btf_ and a raw_tp_ variant in the object.
HOOKS = (
    "set_state",
    "destroy_sock",
    "retransmit_skb",
    "retransmit_synack",
    "send_reset",
    "receive_reset",
    "probe",
)
# One program per send/receive tracepoint (kernel 6.3+) serves both span
# enrichment (which thread used which connection), attached at start, and
# claim mode (a listener shared with other processes after fork: the first
# process to read or write an accepted socket owns it), attached on demand.
IO_HOOKS = ("send_length", "recv_length")
# tp_btf programs that use the bpf_rdonly_cast kfunc (Linux 6.2+) for the TCP
# header and the listener's accept queue; each has a `_nocast` copy that
# probe-reads those fields instead, loaded where the kernel refuses the first.
CAST_HOOKS = ("set_state", "probe")
IO_TRACEPOINTS = ("sock_send_length", "sock_recv_length")
# Drops charged to a listener that were no overflow (listen.overflows): the
# skb:kfree_skb tracepoint with its receiving socket (4 arguments, Linux 6.11+);
# one tp_btf program, no raw_tp or nested copy (a skipped run counts a drop as an
# overflow, as kernels without it do).
DROP_PROGRAM = "tp_btf_kfree_skb"
# The tracepoints whose arguments (in vmlinux BTF) choose the programs to load.
ARITY_TRACEPOINTS = ("tcp_retransmit_skb", "kfree_skb") + IO_TRACEPOINTS
# Each of NESTED_HOOKS also has a "_nested" copy that handles the
# events the kernel skipped for the main program while it was interrupted on
# the same CPU (see tcp_flows.h); what neither handled is counted as lost.
# Not probe (every received segment): what it keeps is re-read from each
# segment, so one it was skipped for is caught up at the next.
NESTED_HOOKS = tuple(hook for hook in HOOKS if hook != "probe")
NESTED_SUFFIX = "_nested"
# Where the kernel allows it (tp_btf), the nested copy is instead a program of a
# few instructions that tail-calls the main program through a one-slot program
# array (tp_btf_<hook>_jump, jump_<hook>): a start verifies each hook's code once.
JUMP_SUFFIX = "_jump"
ITERATOR = "sample_sockets"
# The inode of the initial pid namespace (include/linux/proc_ns.h): the same on every kernel.
PROC_PID_INIT_INO = 0xEFFFFFFC
CONTROL_SEEDING = 0
CONTROL_CLAIM = 1
CONTROL_SPANS = 2
HIST_SECTION = ".data.hists"  # hist_mode, hist_gen, hist_bounds, spans_idle: written while the programs run
_IDLE, _BUSY = struct.pack("=I", 1), struct.pack("=I", 0)  # spans_idle's values
MAX_SEEDS = 4096  # the seeds map's size in tcp_flows.bpf.c
TCP_LISTEN_HEX = "0A"
MAX_HOST_SEEDS = 1 << 20  # host-wide: the seeds map is resized to fit every socket, up to this
#: Loads retried when the verifier gave up on a pending signal (EAGAIN: the process was being
#: stopped, by a ptrace-based profiler or debugger; libbpf already retries each program a few
#: times), and the pause before each.
LOAD_RETRIES = 2
LOAD_RETRY_PAUSE_S = 0.05
# Reading side: how held-back RTT samples are handed on (see KernelSource.poll).
MIN_SAMPLES_PER_POLL = 256
# struct thread_conns (every slot) as one layout
_THREAD_SLOTS = struct.Struct("=" + _records.THREAD_SLOT.format.lstrip("=") * _records.THREAD_SLOTS)

# The sweep (see KernelSource._sweep) reads the socks map this many entries at a time.
SWEEP_CHUNK = 1024
# A connection request's SYN-ACK retransmit count (the synacks map) is dropped this long after
# its latest retransmit: the request is gone by then (default tcp_synack_retries: about 63 s).
# tcp_flows.bpf.c's SYNACK_LIFE_NS.
SYNACK_LIFE_NS = 180 * 1_000_000_000


class _JumpsRefused(BpfError):
    """The kernel would not take a main program into its hook's program array (see JUMP_SUFFIX)."""


def _field_struct(mirror: type, names: Tuple[str, ...]) -> struct.Struct:
    """A native-order Struct over a whole ``mirror`` record that unpacks only ``names``."""
    fields = [(getattr(mirror, name).offset, getattr(mirror, name).size) for name in names]
    if fields != sorted(fields):
        raise ValueError(f"{names} are not in {mirror.__name__}'s order")
    codes = {1: "B", 2: "H", 4: "I", 8: "Q"}
    fmt, at = "=", 0
    for offset, size in fields:
        fmt += f"{offset - at}x{codes[size]}" if offset > at else codes[size]
        at = offset + size
    total = ctypes.sizeof(mirror)
    return struct.Struct(fmt + (f"{total - at}x" if total > at else ""))


# of a raw sock_state, what the sweep tests: flags, established_ns, netns, seen_ns
_SWEEP_FIELDS = _field_struct(_records.CSockState, ("flags", "established_ns", "netns", "seen_ns"))
_SOCK_STATE_SIZE = ctypes.sizeof(_records.CSockState)
_FLOW_KEY_SIZE = ctypes.sizeof(_records.CFlowKey)  # a sock_state begins with its flow key
_FLOW_COUNTERS_SIZE = ctypes.sizeof(_records.CFlowCounters)
_HIST_VALUE_SIZE = ctypes.sizeof(_records.CHistValue)
_HIST_SET_SIZE = ctypes.sizeof(_records.CHistSet)
_U32_MASK = (1 << 32) - 1
# what read_histograms() remembers of one histogram of a hists entry: (raw bytes, bucket counts, sum)
_HistSeen = Tuple[bytes, Tuple[int, ...], int]
# the hists map: as many peers as flows, up to this many (a peer's entry is ~550 bytes)
MAX_HIST_PEERS = 16384
_U64_MASK = (1 << 64) - 1
_U64_KEY = struct.Struct("=Q")
_U32_KEY = struct.Struct("=I")


def _array_u64(array: _libbpf.Map) -> Dict[int, int]:
    """Every entry of an array map of u64 (index -> value), in one batch lookup where the kernel has them."""
    out: Dict[int, int] = {}
    for keys, values in array.batches(ctypes.c_uint32, ctypes.c_uint64):
        out.update(zip((k for (k,) in _U32_KEY.iter_unpack(keys)), (v for (v,) in _U64_KEY.iter_unpack(values))))
    return out


def unseen_sockets(keys: bytes, values: bytes, netns: int, since: int) -> List[Tuple[int, bytes]]:
    """(socket pointer, raw flow key) of the socks entries in a raw batch that the sweep finds gone.

    ``keys``/``values``: n u64 socket pointers and n raw ``sock_state`` records. Gone:
    established, not closed, not a listener nor pending a claim, in namespace ``netns``,
    established before ``since`` and not visited by the iterator since then.
    """
    skip = _records.SF_CLOSED | _records.SF_LISTENER | _records.SF_PENDING
    established = _records.SF_ESTABLISHED
    size = _SOCK_STATE_SIZE
    out = []
    for i, (flags, established_ns, sock_netns, seen_ns) in enumerate(_SWEEP_FIELDS.iter_unpack(values)):
        if (flags & established and not flags & skip and sock_netns == netns
                and established_ns < since and seen_ns < since):
            at = i * size
            out.append((_U64_KEY.unpack_from(keys, i * 8)[0], values[at : at + _FLOW_KEY_SIZE]))
    return out


def _int(key: Union[int, ctypes.c_uint64]) -> int:
    """A u64 map key as read: an int from a batch read, a c_uint64 otherwise."""
    return key if isinstance(key, int) else int(key.value)


def object_path(name: str = OBJECT_NAME) -> str:
    return os.path.join(BPF_DIR, name)


def verify_object(name: str = OBJECT_NAME) -> str:
    """Path of a shipped object whose SHA-256 matches the shipped SHA256SUMS."""
    path = object_path(name)
    sums_path = os.path.join(BPF_DIR, "SHA256SUMS")
    try:
        with open(sums_path, encoding="ascii") as f:
            sums: Dict[str, str] = {}
            for line in f:
                if line.strip():
                    digest_text, file_name = line.split()
                    sums[file_name] = digest_text
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError as exc:
        raise UnsupportedEnvironment(
            f"the packaged BPF object is missing ({exc}); reinstall otel-ebpf-flows"
        ) from exc
    if sums.get(name) != digest:
        raise UnsupportedEnvironment(
            f"{path} does not match its SHA-256 in SHA256SUMS; reinstall otel-ebpf-flows"
        )
    return path


def effective_capabilities() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def has_privilege() -> bool:
    caps = effective_capabilities()
    if caps & (1 << CAP_SYS_ADMIN):
        return True
    return bool(caps & (1 << CAP_BPF)) and bool(caps & (1 << CAP_PERFMON))


def check_environment() -> None:
    """Raise :class:`UnsupportedEnvironment` naming the first thing missing, and the fix."""
    if not sys.platform.startswith("linux"):
        raise UnsupportedEnvironment(
            f"eBPF needs Linux; this is {sys.platform}. Kernel TCP telemetry is off."
        )
    if not os.path.exists(VMLINUX_BTF):
        raise UnsupportedEnvironment(
            f"the kernel exposes no BTF ({VMLINUX_BTF} is missing); use a kernel built with "
            "CONFIG_DEBUG_INFO_BTF=y (most distributions since 2020)"
        )
    if not has_privilege():
        dropped = (" (this process is uid 0, but its capabilities were dropped: a container's "
                   "securityContext, systemd's CapabilityBoundingSet or setpriv)") if os.geteuid() == 0 else ""
        raise UnsupportedEnvironment(
            f"loading eBPF programs needs root or CAP_BPF and CAP_PERFMON{dropped}; grant them, e.g. "
            "`setcap cap_bpf,cap_perfmon+ep $(readlink -f $(which python3))`, or securityContext "
            "capabilities [BPF, PERFMON] in Kubernetes"
        )
    _libbpf.load_library()


def own_socket_inodes(pid: Optional[int] = None) -> List[int]:
    """Inodes of the sockets a process holds (its file descriptors)."""
    fd_dir = f"/proc/{pid or 'self'}/fd"
    inodes = []
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return []
    for name in names:
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        m = re.match(r"socket:\[(\d+)\]$", target)
        if m:
            inodes.append(int(m.group(1)))
    return inodes


def listening_socket_inodes() -> FrozenSet[int]:
    """Inodes of the listening TCP sockets of this network namespace (/proc/net/tcp, tcp6)."""
    out = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path, encoding="ascii") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == TCP_LISTEN_HEX:
                        out.add(int(fields[9]))
        except (OSError, ValueError):
            continue
    return frozenset(out)


def all_socket_inodes() -> List[int]:
    """Inodes of the sockets every process holds (those whose /proc/PID/fd can be read)."""
    inodes = set()
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    for pid in pids:
        inodes.update(own_socket_inodes(pid))
    return sorted(inodes)


class KernelSource:
    """Loads and reads the tcp_flows programs for one process (default: this one).

    ``inherited``: the socket inodes a forked child got from its parent. The
    parent's instrumentation goes on counting those connections, so the child
    does not adopt them; it adopts inherited listeners in claim mode (see
    :meth:`enable_claim`), where it counts only the connections it accepts.

    ``defer_spans=True`` (with ``span_mode``): span enrichment's kernel side --
    the span records of the conn_events ring and the send/receive programs
    that note which thread used which connection -- stays off until
    :meth:`enable_spans` (a tracer provider was hooked), so an application
    without one does not pay for span records on every connection.

    ``host_wide=True`` counts the connections of every process on the host instead
    (``pid`` must then be None). Sockets that existed at start are adopted only in
    this process's network namespace (the socket iterator walks that one), and
    listeners there are found as well, so connections later accepted on them count.
    """

    #: Program variants in the order they are tried.
    VARIANTS = ("tp_btf", "raw_tp")

    def __init__(self, config: Optional[Config] = None, pid: Optional[int] = None,
                 variants: Tuple[str, ...] = VARIANTS, span_mode: bool = False,
                 inherited: Optional[Collection[int]] = None, host_wide: bool = False,
                 parents: Collection[int] = (), defer_spans: bool = False) -> None:
        if host_wide and pid:
            raise ValueError("a host-wide KernelSource observes every process: pass no pid")
        self._config = config or Config()
        self._pid = pid or os.getpid()
        self._host_wide = host_wide
        self._max_seeds = MAX_SEEDS
        self._variants = variants
        self._span_mode = span_mode
        # span records wanted (now, or from start); see enable_spans
        self._spans_wanted = span_mode and not defer_spans
        self._io_attached = False  # the send/receive programs (spans or claims)
        self._has_io = False  # the kernel has sock:sock_send_length/sock_recv_length
        self._inherited = None if inherited is None else frozenset(inherited)
        self._parents = list(parents)[:MAX_SEEDS]  # see server_sockets_counted
        #: Whether this kernel has the claim hooks (sock_recv_length, sock_send_length).
        self.can_claim = False
        #: Whether claim mode is on (accepted sockets count once this process uses them).
        self.claiming = False
        self._obj: Optional[_libbpf.BpfObject] = None
        self._ring: Optional[_libbpf.RingBuffer] = None
        # Span enrichment: read by the reader thread and by application threads
        # ending spans; the lock also keeps close() from freeing them under a reader.
        self._conn_lock = threading.Lock()
        self._conn_ring: Optional[_libbpf.RingBuffer] = None
        self._threads: Optional[_libbpf.Map] = None
        self._thread_key = ctypes.c_uint32()
        self._thread_value = ctypes.create_string_buffer(ctypes.sizeof(_records.CThreadConns))
        self.tracks_threads = False
        # Whether a span is open (spans_open()): the kernel's spans_idle, written by application
        # threads as the first span starts and the last ends; the lock orders their writes with
        # the one that sets the kernel side up.
        self._gate_lock = threading.Lock()
        self._gate: Optional[Tuple[Any, int]] = None  # (the mapped memory, the global's offset)
        self._spans_idle = False
        self._on_event: Callable[[FlowEvent], None] = lambda e: None
        #: Where histogram records go without becoming a FlowEvent (the reader's
        #: hot path; set before start). None: they go to on_event like the rest.
        self.on_metric: Optional[Callable[[_records.MetricRecord], None]] = None
        #: Where span records go without becoming a FlowEvent (span enrichment's
        #: table; set before start). None: they go to on_event like the rest.
        self.on_conn: Optional[Callable[[_records.ConnRecord], None]] = None
        #: set by a reader whose ``on_conn`` takes the exemplar of a handshake point the kernel
        #: aggregated from its CONN record (hist_in_kernel): the kernel then aggregates
        #: handshake points with span enrichment on too; otherwise they stay records (exemplars)
        self.conn_exemplars = False
        self._decode_errors = 0
        # RTT samples of the last iterator pass not yet handed on (see poll)
        self._sampled = b""
        self._sampled_at = 0
        self._polls_per_half_sample = max(1, int(self._config.sample_interval / 2 / self._config.poll_interval))
        # flows map entries by raw key: (raw value, decoded counters), to decode only what changed
        self._flows_seen: Dict[bytes, Tuple[bytes, FlowKey, Counters]] = {}
        self.variant = ""
        self.attached: List[str] = []
        self._main_programs: List[str] = []  # in HOOKS order
        # Sockets found gone without their CLOSE ever reaching the probes (see _sweep):
        # counted as closes with reason _OTHER, per key, and in self-telemetry.
        self._swept: Dict[FlowKey, int] = {}
        self._passes: List[int] = []  # CLOCK_MONOTONIC ns at the start of the last two iterator passes
        # read() runs on collecting threads while the reader scans: this guards what both
        # touch (_flows_seen, _swept) and keeps close() from freeing the maps under a read
        self._read_lock = threading.Lock()
        self._netns = 0
        # Kernel-aggregated histograms (see aggregate_histograms): the HIST_MODE_* bits on,
        # the bounds written, the generation of extremes being written, and each hists
        # entry's (bucket counts, sum) as last read, by raw key
        self._hist_mode = 0
        self._hist_bounds: Dict[int, Tuple[float, ...]] = {}
        self._kernel_bounds = (_records.CHistBounds * _records.HIST_MAX)()
        self._hist_gen = 0
        self._hists_seen: Dict[bytes, _HistSeen] = {}

    # -- Source ----------------------------------------------------------------

    def start(self, on_event: Callable[[FlowEvent], None]) -> None:
        check_environment()
        self._on_event = on_event
        path = verify_object()
        _libbpf.prefetch_tracepoint_arities(ARITY_TRACEPOINTS)  # overlaps the object's open
        if self._host_wide:  # room for every socket now open (and some that open meanwhile)
            self._max_seeds = max(MAX_SEEDS, min(MAX_HOST_SEEDS, 2 * len(all_socket_inodes())))
        err: Optional[BpfError] = None
        attempts = [(v, cast) for v in self._variants for cast in ((True, False) if v == "tp_btf" else (False,))]
        interrupted = 0
        jumps = True
        while attempts:
            variant, cast = attempts[0]
            try:
                self._open(path, variant, cast, jumps=jumps)
                break
            except _JumpsRefused as exc:  # the same programs again, with full nested copies
                _log.debug("nested copies that jump to their main program: %s", exc)
                self.close()
                jumps = False
                continue
            except BpfError as exc:
                _log.debug("loading the %s programs%s failed: %s", variant, "" if cast else " (no casts)", exc)
                self.close()
                err = exc
            if err.errno == errno.EAGAIN:  # the verifier gave up on a pending signal: not the variant's fault
                interrupted += 1
                if interrupted > LOAD_RETRIES:
                    stopped = BpfError(
                        f"the kernel's verifier was interrupted {interrupted} times while loading "
                        f"{os.path.basename(path)} (EAGAIN: a signal was pending each time): something "
                        "keeps stopping this process, such as a profiler or debugger attached with ptrace "
                        "(py-spy record without --nonblocking); start it after instrument(), or run py-spy "
                        "with --nonblocking")
                    stopped.errno = errno.EAGAIN
                    raise stopped from None
                time.sleep(LOAD_RETRY_PAUSE_S)
                continue
            attempts.pop(0)
        else:
            assert err is not None
            raise err
        try:
            if self._span_mode:
                obj = self._require()
                with self._conn_lock:
                    self._conn_ring = obj.ring_buffer("conn_events", self._on_conn_record)
                    self._threads = obj.map("threads", hold_gil=True)  # looked up at span end
                if self._spans_wanted:  # before adoption: adopted sockets are span records too
                    self._spans_on()
            if self._parents:
                parents = self._require().map("parents")
                for skp in self._parents:
                    parents.update(ctypes.c_uint64(skp), ctypes.c_uint8(1))
            if self._inherited is not None and self._inherited & listening_socket_inodes():
                self.enable_claim()
            self._seed_existing_sockets()
            self._ring = self._obj.ring_buffer("events", self._on_metric_record)  # type: ignore[union-attr]
        except BaseException:
            self.close()
            raise

    def wake_fds(self) -> List[int]:
        """File descriptors that turn readable when the kernel wants a ring read before the
        next poll (the events ring, or the span records', is a quarter full), for the reader
        to sleep on; none once closed."""
        rings = (self._ring, self._conn_ring)
        return [fd for fd in (r.epoll_fd for r in rings if r is not None) if fd is not None]

    def poll(self, timeout_s: float) -> None:
        # Records are submitted without a wakeup (only a filling buffer wakes
        # us), so poll() mostly just sleeps; consume() then reads what is there.
        if self._ring is not None:
            self._ring.wait(timeout_s)
            self._ring.consume()
        self.drain_conn_events()
        self._deliver_sampled()

    def _deliver_sampled(self) -> None:
        """Hand on a share of the RTT samples of the last socket-iterator pass.

        A pass over N live connections yields up to N samples at once; each costs
        the reader a histogram record (~20 µs in the SDK). Delivered all at once
        they would hold the GIL, and any collection waiting for the pass, for
        N x 20 µs; instead each poll takes a share that finishes the backlog
        within half a sample interval, giving the GIL up every
        ``_libbpf.RECORDS_PER_YIELD`` records.
        """
        pending = self._sampled
        if self._sampled_at >= len(pending):
            return
        left = (len(pending) - self._sampled_at) // _records.EVENT_SIZE
        budget = max(MIN_SAMPLES_PER_POLL, -(-left // self._polls_per_half_sample))
        start = self._sampled_at
        end = min(len(pending), start + budget * _records.EVENT_SIZE)
        self._sampled_at = end
        if end >= len(pending):
            self._sampled, self._sampled_at = b"", 0
        self._deliver_records(memoryview(pending)[start:end])

    def _deliver_records(self, data: memoryview) -> None:
        size = _records.EVENT_SIZE
        for n, offset in enumerate(range(0, len(data), size)):
            if n and not n % _libbpf.RECORDS_PER_YIELD:
                _libbpf.yield_gil()  # let the application's threads have the GIL
            self._on_metric_record(bytes(data[offset : offset + size]))

    def after_fork_in_child(self) -> None:
        """Only the forking thread exists in the child: a lock another thread held stays held."""
        self._conn_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._gate_lock = threading.Lock()

    def spans_open(self, is_open: bool) -> None:
        """Tell the kernel whether any span is open in this process (span enrichment's registry
        calls this as the first span starts and the last one ends, on the application's thread).

        While none is, the kernel makes no span records and keeps no thread slots (none could
        be for a span); a connection established meanwhile has its record sent at its first use
        or event once one is. One write to mapped memory, no system call; never raises.
        """
        with self._gate_lock:
            self._spans_idle = not is_open
            self._write_gate()

    def _write_gate(self) -> None:
        """What the registry last said into the kernel's spans_idle, if mapped (gate lock held)."""
        gate = self._gate
        if gate is not None:
            try:
                gate[0][gate[1]:gate[1] + 4] = _IDLE if self._spans_idle else _BUSY
            except (ValueError, OSError):  # unmapped by close() meanwhile
                self._gate = None

    def _gate_on(self, obj: _libbpf.BpfObject) -> None:
        """Map the kernel's spans_idle and write what the registry last said into it."""
        try:
            memory, offset, width = obj.live_global(HIST_SECTION, "spans_idle")
        except BpfError as exc:  # an object or kernel without it: records whether or not a span is open
            _log.debug("otel-ebpf-flows: span records are made with no span open (%s)", exc)
            return
        if width != 4:
            return
        with self._gate_lock:
            self._gate = (memory, offset)
            self._write_gate()

    def enable_spans(self) -> None:
        """Turn span enrichment's kernel side on (a tracer provider is hooked). Idempotent.

        Before :meth:`start` it only takes note. Once started, connections
        established meanwhile are handed on as span records from the socks map,
        as the kernel would have done, so spans on them are enriched too.
        """
        if not self._span_mode or self._spans_wanted:
            return
        self._spans_wanted = True
        if self._obj is None:
            return  # start() turns it on
        if self._hist_mode & _records.HIST_MODE_HANDSHAKE and not self.conn_exemplars:
            self.aggregate_histograms(self._hist_mode, self._hist_bounds)  # handshake points carry exemplars now
        try:
            self._spans_on()
        except BpfError as exc:
            _log.warning("otel-ebpf-flows: span enrichment's kernel side could not be turned on (%s); "
                         "spans find their connections by peer only, if at all", exc)
            return
        for data in self._established_records():
            self._on_conn_record(data)

    def _spans_on(self) -> None:
        obj = self._require()
        self._gate_on(obj)
        obj.map("control").update(ctypes.c_uint32(CONTROL_SPANS), ctypes.c_uint32(1))
        if self._has_io:
            self._attach_io()
            self.tracks_threads = True

    def _attach_io(self) -> None:
        if self._io_attached:
            return
        obj = self._require()
        for hook in IO_HOOKS:
            name = f"{self.variant}_{hook}"
            obj.attach(name)
            self.attached.append(name)
        self._io_attached = True

    def _established_records(self) -> List[bytes]:
        """A conn record (as conn_event() writes it) per connection the socks map holds established."""
        out = []
        skip = _records.SF_PENDING | _records.SF_LISTENER | _records.SF_CLOSED
        event = _records.CFlowEvent()
        for _skp, st in self._require().map("socks").items(ctypes.c_uint64, _records.CSockState):
            if not st.flags & _records.SF_ESTABLISHED or st.flags & skip:
                continue
            event.key = st.key
            event.kind = _records.FLOW_EVENT_CONN
            # a handshake the probes saw: as at ESTABLISHED; otherwise adopted (opened before)
            event.reason = 0 if st.handshake_ns else 1
            event.peer_port, event.srtt_us, event.tid = st.peer_port, st.srtt_us, st.tid
            event.ts_ns, event.duration_ns, event.conn_id = st.established_ns, st.handshake_ns, st.conn_id
            out.append(bytes(event))
        return out

    def aggregate_histograms(self, mode: int, bounds: Mapping[int, Sequence[float]]) -> int:
        """Which histogram records (``HIST_MODE_*`` bits) the kernel aggregates into the hists
        map instead of handing them over (see :meth:`read_histograms`); returns the bits now on.

        ``bounds``: each histogram's bucket bounds in seconds (the SDK aggregation's); a
        histogram without them stays with records. Bounds are written at the first call that
        asks for their histogram, and its bit goes on at a later call (ask again). While span
        enrichment is on, a handshake point's exemplar names the span that connected: the
        kernel aggregates handshakes then only if :attr:`conn_exemplars` (the reader takes
        the exemplar from the CONN span record), else they stay records.
        ``HIST_MODE_AUDIT``: records as well (reconciliation).
        """
        obj = self._require()
        needs = {_records.HIST_MODE_HANDSHAKE: (_records.HIST_HANDSHAKE,),
                 _records.HIST_MODE_CLOSE: (_records.HIST_DURATION, _records.HIST_RTT)}
        if self._spans_wanted and not self.conn_exemplars:
            mode &= ~_records.HIST_MODE_HANDSHAKE
        with self._read_lock:
            for bit, hists in needs.items():
                if not mode & bit:
                    continue
                for hist in hists:
                    wanted = tuple(bounds.get(hist, ()))
                    # the kernel searches bounds in order (hist_add): others stay with the SDK
                    if not wanted or len(wanted) > _records.HIST_BOUNDS_MAX or list(wanted) != sorted(wanted):
                        mode &= ~bit
                        continue
                    known = self._hist_bounds.get(hist)
                    if known is None:  # written once, before any program uses them
                        kernel = self._kernel_bounds[hist]
                        converted = _records.kernel_bounds(wanted, _records.HIST_SCALE[hist])
                        for i in range(_records.HIST_BOUNDS_MAX):  # unused: above every value
                            kernel.bound[i] = converted[i] if i < len(converted) else _records.HIST_NO_BOUND
                        obj.write_live_global(HIST_SECTION, "hist_bounds", bytes(self._kernel_bounds))
                        self._hist_bounds[hist] = wanted
                        # the mode only in a later call: nothing orders the two stores for a
                        # program on another CPU (on x86 they are seen in order; elsewhere not)
                        mode &= ~bit
                    elif known != wanted:  # the kernel's buckets are those of its first use
                        mode &= ~bit
            if mode != self._hist_mode:
                obj.write_live_global(HIST_SECTION, "hist_mode", _U32_KEY.pack(mode))
                self._hist_mode = mode
        return mode

    def read_histograms(self) -> List[_records.HistDelta]:
        """What each kernel-aggregated histogram gained since the last call: bucket counts, sum,
        and the smallest and largest value since then (None where unknown), in seconds; entries
        that gained nothing are left out.

        Counts and sums are exact: a read that catches a value half written (its count, not yet
        its sum) has the rest in the next read. The extremes are kept per generation: this
        moves the kernel to the next one, then reads the last and the new one; a value whose
        extremes the read misses (written between the read's copy of its count and of its
        extremes, or by a program that read the generation before the switch) has None here.
        """
        obj = self._require()
        out: List[_records.HistDelta] = []
        with self._read_lock:
            if not self._hist_mode and not self._hists_seen and not self._hist_gen:
                return out  # never on: nothing in the map
            gen = self._hist_gen
            self._hist_gen = (gen + 1) & _U32_MASK
            obj.write_live_global(HIST_SECTION, "hist_gen", _U32_KEY.pack(self._hist_gen))
            tags = (gen + 1, gen + 2)  # the kernel tags a generation g with g + 1
            seen = self._hists_seen
            read: Dict[bytes, _HistSeen] = {}  # taken into `seen` once every entry is read
            ks, ss, vs = _records.KEY_SIZE, _HIST_SET_SIZE, _HIST_VALUE_SIZE
            for keys, values in obj.map("hists", hold_gil=True).batches(_records.CFlowKey, _records.CHistSet):
                for i in range(len(keys) // ks):
                    kb = keys[i * ks : (i + 1) * ks]
                    for hist in range(_records.HIST_MAX):
                        at = i * ss + hist * vs
                        name = kb + bytes((hist,))
                        vb = values[at : at + vs]
                        last = seen.get(name)
                        if last is not None and last[0] == vb:
                            continue  # unchanged: nothing to unpack
                        delta = self._hist_delta(kb, hist, vb, last, tags)
                        if delta is None:
                            continue
                        state, record = delta
                        read[name] = state
                        if record is not None:
                            out.append(record)
            seen.update(read)  # a read that failed half-way leaves every delta to the next one
        return out

    def _hist_delta(self, kb: bytes, hist: int, vb: bytes, last: Optional[_HistSeen],
                    tags: Tuple[int, int]) -> Optional[Tuple[_HistSeen, Optional[_records.HistDelta]]]:
        """One histogram of a hists entry against its last read: (what to remember of it, its
        delta or None); None for an entry that cannot be decoded."""
        fields = _records.HIST_VALUE.unpack(vb)
        total, ext, buckets = fields[0], fields[1:7], fields[7:]
        state = (vb, buckets, total)
        if last is None and not any(buckets) and not total:
            return state, None  # a histogram of the peer not used yet, or a reserved overflow key
        before, before_total = (last[1], last[2]) if last is not None else ((0,) * len(buckets), 0)
        counts = [(b - a) & _U32_MASK for a, b in zip(before, buckets)]
        grown = (total - before_total) & _U64_MASK
        if not any(counts) and not grown:
            return state, None
        try:
            key = _records.decode_key_bytes(kb)
            scale = _records.HIST_SCALE[hist]
            n = len(self._hist_bounds[hist]) + 1
        except (_records.RecordError, KeyError) as exc:
            self._malformed(_records.RecordError(f"histogram entry: {exc!r}"))
            return None
        if any(counts[n:]):
            self._malformed(_records.RecordError(f"histogram {hist}: a count past its {n} buckets"))
            return state, None
        low: Optional[float] = None
        high: Optional[float] = None
        extremes = [(lo, hi) for tag, lo, hi in (ext[0:3], ext[3:6]) if tag in tags]
        if extremes and any(counts):
            low, high = min(e[0] for e in extremes) / scale, max(e[1] for e in extremes) / scale
        return state, (hist, key, tuple(counts[:n]), grown / scale, low, high)

    def drain_conn_events(self) -> None:
        """Deliver every pending span-enrichment record (any thread; never blocks on I/O)."""
        with self._conn_lock:
            if self._conn_ring is not None:
                self._conn_ring.consume()

    def thread_connections(self, tid: int) -> List[Tuple[int, int, int]]:
        """(conn_id, last use in CLOCK_MONOTONIC ns, srtt_us) of the connections thread ``tid`` used lately."""
        with self._conn_lock:  # one key and value buffer, reused under the lock
            key, value = self._thread_key, self._thread_value
            key.value = tid
            if self._threads is None or not self._threads.lookup(key, value):
                return []
            raw = value.raw
        # the slots' fields in one unpack: conn_id, last_ns, srtt_us, pad, conn_id, ...
        fields = _THREAD_SLOTS.unpack(raw)
        return [(fields[i], fields[i + 1], fields[i + 2]) for i in range(0, len(fields), 4) if fields[i]]

    def sample(self) -> Snapshot:
        """A socket-iterator pass (see :meth:`scan`), then the counters (see :meth:`read`)."""
        self.scan()
        return self.read()

    def scan(self) -> None:
        """The periodic pass over the namespace's sockets, run by the reader thread.

        The iterator (in the kernel, without the GIL) folds live connections'
        bytes and listeners' drops into the counters and writes an RTT sample
        for each connection due one; those are handed on by the following
        polls (see :meth:`_deliver_sampled`). Then tracked sockets gone without
        their close are swept (see :meth:`_sweep`), and the records in the ring
        so far are delivered, so the counters read next match the histograms.
        """
        obj = self._require()
        started = time.monotonic_ns()  # the clock of bpf_ktime_get_ns
        data = obj.run_iterator(ITERATOR)
        if len(data) % _records.EVENT_SIZE:
            raise _records.RecordError(f"{len(data)} bytes is not a whole number of flow events")
        if data:
            # what a previous pass left undelivered goes first (older samples)
            self._sampled = self._sampled[self._sampled_at:] + data
            self._sampled_at = 0
        self._sweep(started)
        self._prune_synacks(started)
        if self._ring is not None:
            self._ring.consume()

    def read(self) -> Snapshot:
        """Counters and self-telemetry now: batch reads of the counter maps, no socket pass.

        Its syscalls (a batch lookup per 256 flows, a few lookups) keep the GIL: a
        collection then takes the GIL once, not once per syscall from busy threads.

        Cheap (well under a millisecond for a few hundred flows) and safe from any
        thread while the reader runs: a collection calls it instead of waiting for
        a pass. Counters the kernel keeps as events happen (attempts, closes,
        retransmits, resets, zero windows, established/closed) are exact now; the
        bytes of connections still open and listeners' drops are as of the last
        :meth:`scan` (and exact at close).
        """
        with self._read_lock:
            return Snapshot(counters=self._read_counters(), probes=self._read_probe_stats())

    def close(self) -> None:
        self._ring = None
        self._sampled, self._sampled_at = b"", 0
        with self._conn_lock:
            self._conn_ring = None
            self._threads = None
        with self._gate_lock:
            self._gate = None
        with self._read_lock:
            if self._obj is not None:
                self._obj.close()
                self._obj = None
        self.attached = []
        self.claiming = False
        self._io_attached = False
        self.tracks_threads = False

    def probe_stats(self) -> ProbeStats:
        """Self-telemetry now, without sampling the sockets."""
        return self._read_probe_stats()

    def server_sockets_counted(self) -> List[int]:
        """Accepted sockets already counted as this process's (a forked child never takes them on)."""
        obj = self._require()
        out = []
        skip = _records.SF_PENDING | _records.SF_LISTENER | _records.SF_CLOSED
        for skp, st in obj.map("socks").items(ctypes.c_uint64, _records.CSockState):
            if st.key.role == _records.FLOW_ROLE_SERVER and st.flags & _records.SF_ESTABLISHED and not st.flags & skip:
                out.append(_int(skp))
        return out

    def has_listeners(self) -> bool:
        """Whether this process has a listening socket the probes know of."""
        obj = self._require()
        # listener_key (netns, port: 8 bytes) -> the listening sock
        return any(True for _ in obj.map("listeners").items(ctypes.c_uint64, ctypes.c_uint64))

    def enable_claim(self) -> bool:
        """Count a socket accepted on one of our listeners only once this process uses it.

        Called when a listener becomes shared with another process (after
        fork): any of them may accept a given connection, and only the one
        that then reads or writes it counts it. Idempotent; False (and one
        warning) where the kernel lacks the hooks, and nothing changes.
        """
        if self.claiming:
            return True
        obj = self._require()
        if not self.can_claim:
            _log.warning(
                "otel-ebpf-flows: a listening socket is shared with another process (fork) and this "
                "kernel lacks the sock:sock_recv_length/sock_send_length tracepoints (Linux 6.3+) that "
                "tell which process accepts a connection; connections accepted on it are counted by "
                "the process that created the listener only. Fix: a 6.3+ kernel, or open listeners "
                "in each worker")
            return False
        obj.map("control").update(ctypes.c_uint32(CONTROL_CLAIM), ctypes.c_uint32(1))
        self._attach_io()  # unless span enrichment attached them already
        self.claiming = True
        return True

    # -- internals ---------------------------------------------------------------

    def _require(self) -> _libbpf.BpfObject:
        if self._obj is None:
            raise EbpfFlowsError("the kernel source is not started")
        return self._obj

    def _open(self, path: str, variant: str, cast: bool = False, jumps: bool = True) -> None:
        cfg = self._config
        obj = _libbpf.BpfObject(path)
        self._obj = obj
        try:  # the namespace whose socket table the iterator walks (see _sweep)
            self._netns = os.stat("/proc/self/ns/net").st_ino
        except OSError:
            self._netns = 0
        st = os.stat("/proc/self/ns/pid")
        obj.set_globals(
            ".rodata",
            {
                "target_tgid": 0 if self._host_wide else self._pid,  # 0: every process
                "pidns_dev": st.st_dev,
                "pidns_ino": st.st_ino,
                # threads by the ids the application knows, in a container's pid namespace
                "ns_tids": 0 if st.st_ino == PROC_PID_INIT_INO else 1,
                "wakeup_bytes": cfg.ring_buffer_bytes // 4,
                "rtt_sample_ns": int(cfg.sample_interval * 1e9) - 50_000_000,
                "span_mode": 1 if self._span_mode else 0,
            },
        )
        obj.map("socks").set_max_entries(cfg.max_connections)
        obj.map("flows").set_max_entries(cfg.max_flows + 2)  # + the two overflow keys
        # a peer's three histograms, as many peers as flows up to MAX_HIST_PEERS (+ the overflow keys)
        obj.map("hists").set_max_entries(min(cfg.max_flows, MAX_HIST_PEERS) + 2)
        obj.map("events").set_max_entries(cfg.ring_buffer_bytes)
        obj.map("conn_events").set_max_entries(cfg.ring_buffer_bytes if self._span_mode else 4096)
        if not self._span_mode:
            obj.map("threads").set_max_entries(1)
        if self._max_seeds != MAX_SEEDS:
            obj.map("seeds").set_max_entries(self._max_seeds)
            obj.map("preexisting").set_max_entries(self._max_seeds)
        arity = _libbpf.vmlinux_tracepoint_arities(ARITY_TRACEPOINTS)  # parsed once per process
        retransmit_has_err = arity["tcp_retransmit_skb"] == 3
        has_io = all(arity[tp] is not None for tp in IO_TRACEPOINTS)
        self._has_io = has_io
        if self._span_mode and not has_io:
            _log.info("otel-ebpf-flows: this kernel has no sock:sock_send_length tracepoint (6.3+): "
                      "spans find their connections by peer only")
        can_claim = has_io
        has_drops = variant == "tp_btf" and arity["kfree_skb"] == 4
        obj.set_autoload(DROP_PROGRAM, has_drops)
        for kind in ("tp_btf", "raw_tp"):
            for hook in HOOKS:
                obj.set_autoload(f"{kind}_{hook}", kind == variant)
            if kind == "tp_btf":
                for hook in CAST_HOOKS:
                    obj.set_autoload(f"{kind}_{hook}", kind == variant and cast)
                    obj.set_autoload(f"{kind}_{hook}_nocast", kind == variant and not cast)
            obj.set_autoload(f"{kind}_retransmit_skb_err", kind == variant and retransmit_has_err)
            if kind == variant and retransmit_has_err:
                obj.set_autoload(f"{kind}_retransmit_skb", False)
            for hook in IO_HOOKS:  # loaded for claim mode as well, attached on demand
                obj.set_autoload(f"{kind}_{hook}", kind == variant and has_io)
            # the nested copies: jumping ones (tp_btf), else full ones built as their main programs
            jump_copies = kind == variant and kind == "tp_btf" and jumps
            full = kind == variant and not jump_copies
            for hook in NESTED_HOOKS:
                obj.set_autoload(f"{kind}_{hook}{NESTED_SUFFIX}", full)
                if kind == "tp_btf":
                    obj.set_autoload(f"{kind}_{hook}{JUMP_SUFFIX}", jump_copies)
            if kind == "tp_btf":  # with casts, or the _nocast copies
                for hook in CAST_HOOKS:
                    if hook in NESTED_HOOKS:
                        obj.set_autoload(f"{kind}_{hook}{NESTED_SUFFIX}", full and cast)
                        obj.set_autoload(f"{kind}_{hook}_nocast{NESTED_SUFFIX}", full and not cast)
            obj.set_autoload(f"{kind}_retransmit_skb_err{NESTED_SUFFIX}", full and retransmit_has_err)
            if full and retransmit_has_err:
                obj.set_autoload(f"{kind}_retransmit_skb{NESTED_SUFFIX}", False)
        jumping = variant == "tp_btf" and jumps
        obj.load()
        flows = obj.map("flows")
        for role in (_records.FLOW_ROLE_CLIENT, _records.FLOW_ROLE_SERVER):
            flows.update(_records.overflow_key(role), _records.CFlowCounters(), _libbpf.BPF_NOEXIST)
            obj.map("hists").update(_records.overflow_key(role), _records.CHistSet(), _libbpf.BPF_NOEXIST)
        attached = []
        nested = []
        for hook in HOOKS:
            name = f"{variant}_{hook}"
            if hook == "retransmit_skb" and retransmit_has_err:
                name += "_err"
            if variant == "tp_btf" and hook in CAST_HOOKS and not cast:
                name += "_nocast"
            if hook in NESTED_HOOKS and jumping:  # before anything is attached: refused, loaded again
                try:
                    obj.map(f"jump_{hook}").update(ctypes.c_uint32(0), ctypes.c_uint32(obj.program_fd(name)))
                except BpfError as exc:
                    raise _JumpsRefused(f"{name} as a tail-call target: {exc}", exc.errno or 0) from exc
                nested.append(f"{variant}_{hook}{JUMP_SUFFIX}")
            elif hook in NESTED_HOOKS:  # a copy built the same way
                nested.append(name + NESTED_SUFFIX)
            attached.append(name)
        for name in attached:
            obj.attach(name)
        self._main_programs = list(attached)
        for name in nested:
            obj.attach(name)
            attached.append(name)
        if has_drops:
            obj.attach(DROP_PROGRAM)
            attached.append(DROP_PROGRAM)
        self.variant = variant
        self.attached = attached
        self.can_claim = can_claim

    def _seed_existing_sockets(self) -> None:
        """Adopt the sockets this process (host-wide: every process) already had when the probes attached."""
        obj = self._require()
        if self._host_wide:
            inodes = all_socket_inodes()
        else:
            inodes = own_socket_inodes(self._pid if self._pid != os.getpid() else None)
        if self._inherited is not None:
            # A forked child: what it inherited stays counted by its parent,
            # but for listeners, which claim mode makes safe to share.
            shared = self._inherited & listening_socket_inodes() if self.claiming else frozenset()
            inodes = [i for i in inodes if i not in self._inherited or i in shared]
        if not inodes:
            return
        limit = self._max_seeds
        if len(inodes) > limit:
            _log.warning(
                "otel-ebpf-flows: %s %d sockets; only %d of those opened before the probes "
                "attached are adopted (the rest are not observed until reopened)",
                "processes hold" if self._host_wide else "this process holds", len(inodes), limit,
            )
        seeds = obj.map("seeds")
        one = ctypes.c_uint8(1)
        for ino in inodes[:limit]:
            seeds.update(ctypes.c_uint64(ino), one)
        control = obj.map("control")
        control.update(ctypes.c_uint32(CONTROL_SEEDING), ctypes.c_uint32(1))
        try:  # the pass also samples sockets already tracked: keep those samples
            for event in _records.decode_events(obj.run_iterator(ITERATOR)):
                self._on_event(event)
        finally:
            control.update(ctypes.c_uint32(CONTROL_SEEDING), ctypes.c_uint32(0))
            for ino in inodes[:limit]:
                seeds.delete(ctypes.c_uint64(ino))

    def _sweep(self, started: int) -> None:
        """Count and forget tracked sockets that are gone though their CLOSE never reached the probes.

        A connection's close is normally counted by the kernel programs. Rarely the
        kernel does not run them for a socket's last transitions (see docs/metrics.md,
        ``tcp_flows.unseen_close``): its entry would stay in the socks map, the
        connection counted as active for ever. An established socket that is not
        closed is in its namespace's socket table, which the iterator walks on every
        pass; one it visited in neither of the last two passes, though it was
        established before both began, is gone.

        Run by the reader after each pass, never by a collection. The socks map is
        read in raw batches of ``SWEEP_CHUNK`` entries, only the four fields the test
        needs unpacked (about 0.1 µs an entry), and the GIL given up between batches.
        """
        self._passes = (self._passes + [started])[-2:]
        if len(self._passes) < 2 or not self._netns:
            return
        since = self._passes[0]
        netns = self._netns
        socks = self._require().map("socks")
        gone: List[Tuple[int, bytes]] = []
        for n, (keys, values) in enumerate(socks.batches(ctypes.c_uint64, _records.CSockState, SWEEP_CHUNK)):
            if n:
                _libbpf.yield_gil()  # let the application's threads have the GIL
            gone += unseen_sockets(keys, values, netns, since)
        if not gone:
            return
        with self._read_lock:  # read() adds what is swept to the counters
            if self._obj is None:
                return
            flows, scratch = self._obj.map("flows"), _records.CFlowCounters()
            entry = _records.CSockState()
            for skp_value, raw_key in gone:
                # Read again just before the delete: since the batch, the socket's memory may
                # have gone to a new socket, whose birth replaced the entry (the probes settle
                # an old life's entry themselves then): that one is not to be deleted.
                if not socks.lookup(ctypes.c_uint64(skp_value), entry) or not unseen_sockets(
                        _U64_KEY.pack(skp_value), bytes(entry), netns, since):
                    continue
                socks.delete(ctypes.c_uint64(skp_value))
                raw = _records.CFlowKey.from_buffer_copy(raw_key)
                # the flows keys of the last read, else one lookup: not in the map, the kernel
                # counted it under its role's overflow key
                if raw_key not in self._flows_seen and not flows.lookup(raw, scratch):
                    raw = _records.overflow_key(raw.role)
                try:
                    key = _records.decode_key(raw)
                except _records.RecordError:
                    continue
                self._swept[key] = self._swept.get(key, 0) + 1

    def _prune_synacks(self, now_ns: int) -> None:
        """Forget the SYN-ACK retransmit counts of connection requests that are gone.

        The kernel keeps, per request, the SYN-ACK retransmits it counted until the
        request's socket is established (then it compares them with the socket's own
        count). A request that never completes leaves its entry: dropped here once its
        latest retransmit is ``SYNACK_LIFE_NS`` old. Usually the map is empty: one syscall.
        """
        synacks = self._require().map("synacks")
        old = []
        for keys, values in synacks.batches(_records.CSynackKey, _records.CSynackCount):
            ks, vs = ctypes.sizeof(_records.CSynackKey), ctypes.sizeof(_records.CSynackCount)
            for i in range(len(keys) // ks):
                (last_ns,) = struct.unpack_from("=Q", values, i * vs)
                if now_ns - last_ns > SYNACK_LIFE_NS:
                    old.append(keys[i * ks : (i + 1) * ks])
        for raw in old:
            synacks.delete(_records.CSynackKey.from_buffer_copy(raw))

    def _on_record(self, data: bytes) -> None:
        try:
            event = _records.decode_event(data)
        except _records.RecordError as exc:
            self._malformed(exc)
            return
        self._on_event(event)

    def _on_conn_record(self, data: bytes) -> None:
        """A record of the conn_events ring: span records skip the FlowEvent."""
        self._on_typed_record(data, self.on_conn, _records.decode_conn)

    def _on_metric_record(self, data: bytes) -> None:
        """A record of the events ring or the iterator: histogram records skip the FlowEvent."""
        self._on_typed_record(data, self.on_metric, _records.decode_metric)

    def _on_typed_record(self, data: bytes, sink: Optional[Callable[[Any], None]],
                         decode: Callable[[bytes], Optional[Any]]) -> None:
        """``decode``'s tuple to ``sink``; a kind it does not take (None), or no sink, as a FlowEvent."""
        if sink is None:
            self._on_record(data)
            return
        try:
            record = decode(data)
        except _records.RecordError as exc:
            self._malformed(exc)
            return
        if record is None:
            self._on_record(data)
        else:
            sink(record)

    def _malformed(self, exc: Exception) -> None:
        self._decode_errors += 1
        if self._decode_errors == 1:
            _log.warning("ignoring a malformed kernel record (%s); counted in "
                         "ebpf_flows.probe.events.lost", exc)

    def _read_counters(self) -> Dict[FlowKey, Counters]:
        """Every flow's counters; only entries whose bytes changed since the last read are decoded
        (an unchanged entry is the same :class:`Counters` object as last time)."""
        obj = self._require()
        out = {}
        seen = self._flows_seen
        now: Dict[bytes, Tuple[bytes, FlowKey, Counters]] = {}
        ks, vs = _FLOW_KEY_SIZE, _FLOW_COUNTERS_SIZE
        for keys, values in obj.map("flows", hold_gil=True).batches(_records.CFlowKey, _records.CFlowCounters):
            for i in range(len(keys) // ks):
                kb, vb = keys[i * ks : (i + 1) * ks], values[i * vs : (i + 1) * vs]
                last = seen.get(kb)
                if last is not None and last[0] == vb:
                    now[kb] = last
                    out[last[1]] = last[2]
                    continue
                try:
                    key = _records.decode_key_bytes(kb)
                except _records.RecordError as exc:
                    self._decode_errors += 1
                    _log.debug("ignoring a malformed flow key: %s", exc)
                    continue
                counters = _records.decode_counters(_records.CFlowCounters.from_buffer_copy(vb))
                now[kb] = (vb, key, counters)
                out[key] = counters
        self._flows_seen = now
        for key, n in self._swept.items():
            c = out.get(key, Counters())
            out[key] = attrs.evolve(c, closed=c.closed + n, closes={**c.closes, "_OTHER": c.closes["_OTHER"] + n})
        return out

    def _skipped(self) -> int:
        """Tracepoint events the kernel ran neither a main program nor its nested copy for."""
        if not self._main_programs:
            return 0
        obj = self._require()
        rescued = _array_u64(obj.map("rescued", hold_gil=True))
        total = 0
        for i, name in enumerate(self._main_programs):  # HOOKS order: enum hook_id
            try:
                misses = obj.recursion_misses(name, hold_gil=True)
            except BpfError:
                misses = 0
            total += max(0, misses - rescued.get(i, 0))
        if DROP_PROGRAM in self.attached:  # no nested copy: a drop it skipped may count as an overflow
            try:
                total += obj.recursion_misses(DROP_PROGRAM, hold_gil=True)
            except BpfError:
                pass
        return total

    def _read_probe_stats(self) -> ProbeStats:
        stats = self._require().map("stats", hold_gil=True)
        vals = []
        for i in range(_records.STAT_MAX):
            v = ctypes.c_uint64()
            stats.lookup(ctypes.c_uint32(i), v)
            vals.append(v.value)
        return ProbeStats(
            events_lost={
                "tcp_flows.events": vals[_records.STAT_EVENTS_LOST],
                "tcp_flows.syn_wait": vals[_records.STAT_SYN_WAIT_MISSED],
                "tcp_flows.conn_events": vals[_records.STAT_CONN_EVENTS_LOST],
                "tcp_flows.decode": self._decode_errors,
                "tcp_flows.unseen_close": sum(self._swept.values()) + vals[_records.STAT_CLOSE_UNSEEN],
                "tcp_flows.skipped": self._skipped(),
                "tcp_flows.unseen_retransmit": vals[_records.STAT_RETRANS_UNSEEN],
                "tcp_flows.unseen_handshake": vals[_records.STAT_HANDSHAKE_UNSEEN],
            },
            map_evictions={
                "tcp_flows.socks": vals[_records.STAT_SOCKS_FULL],
                "tcp_flows.flows": vals[_records.STAT_FLOWS_FOLDED],
                "tcp_flows.listeners": vals[_records.STAT_LISTENERS_FULL],
                "tcp_flows.synacks": vals[_records.STAT_SYNACKS_FULL],
                "tcp_flows.hists": vals[_records.STAT_HISTS_FOLDED],
            },
        )

