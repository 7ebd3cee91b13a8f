"""``otel-ebpf-flows agent``: one privileged daemon that observes the host's services.

Most services do not run with CAP_BPF. The agent does (root, or CAP_BPF +
CAP_PERFMON, plus CAP_SYS_PTRACE to read other users' /proc/PID/environ and fds)
and, for each process it observes, exports the contract's metrics over OTLP under
that process's own Resource.

Which processes
    Every ``scan_interval`` seconds it reads /proc. A process qualifies if its
    environment declares a service (``OTEL_SERVICE_NAME``, or ``service.name`` in
    ``OTEL_RESOURCE_ATTRIBUTES``) -- unless ``--no-declared`` -- or it matches a
    selector: ``--pid``, ``--cgroup`` (a path prefix of a line of /proc/PID/cgroup)
    or ``--name`` (its comm or executable's base name). The agent never observes
    itself, nor a process that holds BPF programs of its own (an in-process
    instrumentation with privilege counts itself: observing it too would count
    twice). A pid is identified with its start time, so a recycled pid is a new
    process.

Its Resource
    From the process's environment, parsed as the OpenTelemetry SDK parses its own
    (``OTEL_RESOURCE_ATTRIBUTES`` percent-decoded, ``OTEL_SERVICE_NAME`` wins over
    its ``service.name``; ``unknown_service:<comm>`` when neither names one), plus
    ``process.pid``, ``host.name`` (the agent's host) and ``container.id`` (from
    /proc/PID/cgroup: Docker, containerd/CRI, CRI-O, Podman naming).

Per process
    a :class:`~otel_ebpf_flows._kernel.KernelSource` for its pid, a reader
    :class:`~otel_ebpf_flows._telemetry.Pipeline`, and an SDK ``MeterProvider``
    whose ``PeriodicExportingMetricReader`` exports through an ``OTLPMetricExporter``
    configured by the agent's standard ``OTEL_EXPORTER_OTLP_*`` /
    ``OTEL_METRIC_EXPORT_INTERVAL`` variables (``OTEL_EXPORTER_OTLP_METRICS_PROTOCOL``
    or ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf``, the default, or ``grpc``).
    When the process exits its provider collects and exports once more and shuts
    down, in a thread of its own, so a slow exporter never holds up discovery.
    Cost: one BPF object per observed process, so every TCP event on the host runs
    each object's programs (a few hundred ns each); a single object keyed by tgid
    is the planned follow-up.

Span service
    A Unix stream socket (``--socket``, default ``/run/otel-ebpf-flows/agent.sock``,
    in a directory of mode 0755; the socket is mode 0660, owned by root and by
    ``--socket-group``, so only root and that group's members may connect). A
    client's process is what SO_PEERCRED says; it is served only its own process's
    connection records and thread slots, from a span-mode KernelSource started for
    it on its first HELLO and closed when its last connection goes, and only if the
    agent observes it (it qualifies as above; its HELLO makes the agent look at it at
    once). Protocol: :mod:`._agent_protocol`.

Restarts
    Counters are cumulative from the agent's start: after an agent restart every
    series starts again at 0 with a new ``start_time_unix_nano``, which cumulative
    backends (Prometheus ``rate()``, the collector's ``cumulativetodelta``) treat
    as a counter reset, never as a decrease. Connections open across the restart
    are adopted again and count from then on. See docs/agent.md.
"""

from __future__ import annotations

import collections
import grp
import logging
import os
import re
import signal
import socket
import struct
import threading
import time
import urllib.parse
from typing import Any, Callable, Deque, Dict, FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple

import attrs

from . import _agent_protocol as proto
from ._config import DEFAULT_AGENT_SOCKET, Config, load_config
from ._kernel import KernelSource, check_environment, own_socket_inodes
from ._records import HistDelta
from ._source import CONN_EVENT_KINDS, FlowEvent, ProbeStats, Snapshot, Source
from ._telemetry import AggregatesHistograms, Instruments, Pipeline, ReadsNow, wake_fds_of
from .exceptions import ConfigurationError, EbpfFlowsError
from .version import __version__

_log = logging.getLogger("otel_ebpf_flows")

SCOPE_NAME = "otel_ebpf_flows"
OTEL_SERVICE_NAME = "OTEL_SERVICE_NAME"
OTEL_RESOURCE_ATTRIBUTES = "OTEL_RESOURCE_ATTRIBUTES"
#: Records kept per span client between two of its DRAIN requests; older ones are dropped and counted.
CLIENT_QUEUE = 16384
MAX_CLIENTS = 1024
NOT_OBSERVED = ("the agent does not observe this process: declare its service (OTEL_SERVICE_NAME, or service.name "
                "in OTEL_RESOURCE_ATTRIBUTES) or name it with the agent's --pid/--cgroup/--name")
SOCKET_MODE = 0o660

# -- /proc --------------------------------------------------------------------------------


def _stat_field(pid: int, field: int) -> Optional[int]:
    """Numeric field ``field`` (1-based, as in proc(5)) of /proc/PID/stat; None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        # fields after the command name, which may hold spaces and parentheses, start at 3
        return int(data[data.rindex(b")") + 2:].split()[field - 3])
    except (OSError, ValueError, IndexError):
        return None


def proc_starttime(pid: int) -> Optional[int]:
    """Field 22 of /proc/PID/stat (clock ticks since boot): with the pid, names a process."""
    return _stat_field(pid, 22)


def read_environ(pid: int) -> Dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def process_names(pid: int) -> Tuple[str, str]:
    """(comm, base name of the executable); "" where unreadable."""
    comm = _read_text(f"/proc/{pid}/comm").strip()
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        exe = ""
    return comm, exe


def parent_pid(pid: int) -> Optional[int]:
    return _stat_field(pid, 4)


def loads_own_probes(pid: int) -> bool:
    """Whether the process holds BPF programs (an in-process instrumentation with privilege)."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:bpf-prog":
                return True
        except OSError:
            continue
    return False


# -- Resource -------------------------------------------------------------------------------


def parse_resource_attributes(text: str) -> Dict[str, str]:
    """``OTEL_RESOURCE_ATTRIBUTES`` as the SDK's OTELResourceDetector reads it: comma-separated
    ``key=value``, both stripped, the value percent-decoded; an item without ``=`` is skipped."""
    out: Dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            continue
        out[key.strip()] = urllib.parse.unquote(value.strip())
    return out


def declared_service(environ: Mapping[str, str]) -> Optional[str]:
    """The service.name a process's environment declares, or None."""
    name = environ.get(OTEL_SERVICE_NAME, "")
    if name:
        return name
    return parse_resource_attributes(environ.get(OTEL_RESOURCE_ATTRIBUTES, "")).get("service.name") or None


# The last 64-hex-digit id in a cgroup path: /docker/ID, docker-ID.scope, cri-containerd-ID.scope,
# crio-ID.scope, libpod-ID.scope, /kubepods/.../podUID/ID (cgroupfs driver).
_CONTAINER_ID = re.compile(r"(?:^|[/:.-])([0-9a-f]{64})(?:\.scope)?(?=/|$)")


def container_id(cgroup_text: str) -> Optional[str]:
    """The container id in /proc/PID/cgroup, or None for a process outside a container."""
    for line in cgroup_text.splitlines():
        _hier, _, path = line.partition(":")
        _controllers, _, path = path.partition(":")
        found = None
        for m in _CONTAINER_ID.finditer(path):
            if "conmon" not in path[max(0, m.start() - 12):m.start()]:
                found = m.group(1)
        if found:
            return found
    return None


def build_resource_attributes(pid: int, environ: Mapping[str, str], cgroup_text: str, host_name: str,
                              comm: str) -> Dict[str, Any]:
    attributes: Dict[str, Any] = dict(parse_resource_attributes(environ.get(OTEL_RESOURCE_ATTRIBUTES, "")))
    if environ.get(OTEL_SERVICE_NAME):
        attributes["service.name"] = environ[OTEL_SERVICE_NAME]
    if not attributes.get("service.name"):
        attributes["service.name"] = f"unknown_service:{comm}" if comm else "unknown_service"
    attributes["process.pid"] = pid
    if host_name:
        attributes["host.name"] = host_name
    cid = container_id(cgroup_text)
    if cid:
        attributes["container.id"] = cid
    return attributes


# -- which processes ---------------------------------------------------------------------------


@attrs.frozen
class Selector:
    """Which processes the agent observes (see the module docstring)."""

    declared: bool = True
    pids: Tuple[int, ...] = ()
    cgroups: Tuple[str, ...] = ()
    names: Tuple[str, ...] = ()

    def matches(self, pid: int, environ: Mapping[str, str], cgroup_text: str, comm: str, exe: str) -> bool:
        if pid in self.pids:
            return True
        if self.names and (comm in self.names or exe in self.names):
            return True
        if self.cgroups:
            paths = [line.split(":", 2)[2] for line in cgroup_text.splitlines() if line.count(":") >= 2]
            if any(p == c or p.startswith(c.rstrip("/") + "/") for p in paths for c in self.cgroups):
                return True
        return self.declared and declared_service(environ) is not None


# -- export ------------------------------------------------------------------------------------


def make_exporter(environ: Mapping[str, str]) -> Any:
    """An OTLPMetricExporter for the protocol the standard variables ask for (it reads the rest)."""
    protocol = (environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip()
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter  # type: ignore[assignment]
        else:
            raise ConfigurationError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported by the agent: "
                                     "use grpc or http/protobuf")
    except ImportError as exc:
        raise ConfigurationError(f"the agent exports over OTLP and needs opentelemetry-exporter-otlp ({exc}): "
                                 "pip install 'otel-ebpf-flows[agent]'") from None
    return OTLPMetricExporter()


#: The probe name under which lost span-enrichment records are counted (as in-process).
CONN_EVENTS_PROBE = "tcp_flows.conn_events"


class ObservedSource:
    """One process's metrics source, whose self-telemetry also counts the span-enrichment records
    the agent could not hand to that process (``span_lost``, cumulative): in-process the same
    losses are ``ebpf_flows.probe.events.lost{ebpf_flows.probe.name=tcp_flows.conn_events}``."""

    def __init__(self, kernel: Source, span_lost: Callable[[], int]) -> None:
        self.kernel = kernel
        self._span_lost = span_lost

    def start(self, on_event: Callable[[FlowEvent], None]) -> None:
        self.kernel.start(on_event)

    def poll(self, timeout_s: float) -> None:
        self.kernel.poll(timeout_s)

    def wake_fds(self) -> List[int]:
        return wake_fds_of(self.kernel)

    def sample(self) -> Snapshot:
        return self._with_span_lost(self.kernel.sample())

    def _with_span_lost(self, snapshot: Snapshot) -> Snapshot:
        lost = dict(snapshot.probes.events_lost)
        lost[CONN_EVENTS_PROBE] = lost.get(CONN_EVENTS_PROBE, 0) + self._span_lost()
        return Snapshot(snapshot.counters, ProbeStats(lost, snapshot.probes.map_evictions))

    def close(self) -> None:
        self.kernel.close()


class ObservedReadsNow(ObservedSource):
    """An :class:`ObservedSource` over a :class:`ReadsNow` kernel source: the agent's
    collections read the counter maps then, not wait for the reader's socket pass."""

    def scan(self) -> None:
        self.kernel.scan()  # type: ignore[attr-defined]

    def read(self) -> Snapshot:
        return self._with_span_lost(self.kernel.read())  # type: ignore[attr-defined]


class ObservedKernel(ObservedReadsNow):
    """An :class:`ObservedReadsNow` whose kernel source aggregates histograms itself
    (KernelSource's hists map): the agent's pipeline asks it to, as in-process."""

    def aggregate_histograms(self, mode: int, bounds: Mapping[int, Sequence[float]]) -> int:
        return self.kernel.aggregate_histograms(mode, bounds)  # type: ignore[attr-defined, no-any-return]

    def read_histograms(self) -> List[HistDelta]:
        return self.kernel.read_histograms()  # type: ignore[attr-defined, no-any-return]


def observed(kernel: Source, span_lost: Callable[[], int]) -> ObservedSource:
    """The source an agent pipeline reads: ``kernel`` plus the span records the agent lost."""
    if isinstance(kernel, ReadsNow):
        return (ObservedKernel if isinstance(kernel, AggregatesHistograms) else ObservedReadsNow)(kernel, span_lost)
    return ObservedSource(kernel, span_lost)


@attrs.define
class Observed:
    """One observed process: its probes, reader and MeterProvider."""

    pid: int
    starttime: int
    attributes: Dict[str, Any]
    provider: Any = None
    pipeline: Optional[Pipeline] = None
    kernel: Optional[KernelSource] = None

    def start(self, config: Config, exporter_factory: Callable[[], Any],
              inherited: Optional[FrozenSet[int]] = None, span_lost: Callable[[], int] = lambda: 0) -> None:
        """``inherited``: sockets other processes hold too (a pre-fork server's listener and what a
        worker inherited): not adopted, listeners shared in claim mode (see KernelSource)."""
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource

        reader = PeriodicExportingMetricReader(exporter_factory())
        provider = MeterProvider(metric_readers=[reader], resource=Resource(self.attributes))
        instruments = Instruments(provider.get_meter(SCOPE_NAME, __version__), lambda: self.pipeline)
        self.kernel = KernelSource(config, pid=self.pid, inherited=inherited)
        pipeline = Pipeline(observed(self.kernel, span_lost), instruments, config.max_peers,
                            config.poll_interval, config.sample_interval)
        try:
            pipeline.start()
        except BaseException:
            provider.shutdown()
            raise
        self.provider, self.pipeline = provider, pipeline

    def stop(self) -> None:
        """Final collection and export, then free the probes (may take an export timeout)."""
        try:
            if self.pipeline is not None:
                self.pipeline.refresh(timeout=5.0)
            if self.provider is not None:
                self.provider.shutdown()
        except Exception:
            _log.warning("otel-ebpf-flows agent: the final export for pid %d failed", self.pid, exc_info=True)
        finally:
            if self.pipeline is not None:
                self.pipeline.stop()


# -- span service ----------------------------------------------------------------------------------


class SpanFeed:
    """A span-mode KernelSource for one process, and a bounded record queue per client connection."""

    def __init__(self, pid: int, starttime: int, config: Config) -> None:
        self.pid = pid
        self.starttime = starttime
        self.source = KernelSource(config, pid=pid, span_mode=True)
        self._lock = threading.Lock()
        self._queues: Dict[int, Deque[FlowEvent]] = {}
        self._lost: Dict[int, int] = {}
        self.dropped = 0  # records any client queue had to drop, cumulative

    def add_client(self, client: int) -> None:
        with self._lock:
            self._queues[client] = collections.deque(maxlen=CLIENT_QUEUE)
            self._lost[client] = 0

    def remove_client(self, client: int) -> int:
        """Forget a client; how many remain."""
        with self._lock:
            self._queues.pop(client, None)
            self._lost.pop(client, None)
            return len(self._queues)

    def on_event(self, event: FlowEvent) -> None:
        if event.kind not in CONN_EVENT_KINDS:
            return  # the metric records are the metrics pipeline's
        with self._lock:
            for client, queue in self._queues.items():
                if len(queue) == queue.maxlen:
                    self._lost[client] += 1
                    self.dropped += 1
                queue.append(event)

    def lost_total(self) -> int:
        """Records lost for this process: by the kernel (ring buffer full) and by a client queue."""
        try:
            kernel = int(self.source.probe_stats().events_lost.get(CONN_EVENTS_PROBE, 0))
        except EbpfFlowsError:  # closed meanwhile
            kernel = 0
        return kernel + self.dropped

    def take(self, client: int) -> Tuple[List[FlowEvent], int]:
        self.source.drain_conn_events()
        with self._lock:
            queue = self._queues.get(client)
            if queue is None:
                return [], 0
            events = list(queue)
            queue.clear()
            lost, self._lost[client] = self._lost[client], 0
        return events, lost


def same_pid_namespace(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino == os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return False


def host_tid(pid: int, tid: int) -> Optional[int]:
    """Thread ``tid`` of process ``pid``, given as that process sees it, as the agent sees it; None if
    ``pid`` has no such thread."""
    if tid <= 0:
        return None
    if same_pid_namespace(pid):
        return tid if os.path.isdir(f"/proc/{pid}/task/{tid}") else None
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        for line in _read_text(f"/proc/{pid}/task/{task}/status").splitlines():
            if line.startswith("NSpid:"):
                ids = line.split()[1:]
                if ids and ids[-1] == str(tid):
                    return int(ids[0])
    return None


class SpanServer:
    """The agent's Unix socket: per connection, the peer's own process's span data only."""

    def __init__(self, path: str, group: Optional[str], config: Config,
                 on_hello: Callable[[int, int], bool] = lambda pid, starttime: True) -> None:
        self.path = path
        self.group = group
        self._config = config
        self._on_hello = on_hello
        self._lock = threading.Lock()
        self._feeds: Dict[Tuple[int, int], SpanFeed] = {}
        self._closed_lost: Dict[Tuple[int, int], int] = {}  # what closed feeds lost, per process
        self._clients: Dict[int, socket.socket] = {}
        self._next_client = 0
        self._stop = threading.Event()
        self._sock: Optional[socket.socket] = None
        self._threads: List[threading.Thread] = []

    def start(self) -> None:
        gid = -1
        if self.group is not None:
            try:
                gid = int(self.group) if self.group.isdigit() else grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise ConfigurationError(f"--socket-group {self.group!r}: no such group") from None
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)  # a previous agent's
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # no moment at which anyone else may connect
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chown(self.path, 0 if os.geteuid() == 0 else -1, gid)
        os.chmod(self.path, SOCKET_MODE)
        sock.listen(64)
        sock.settimeout(0.5)
        self._sock = sock
        for target, name in ((self._accept_loop, "otel-ebpf-flows-agent-accept"),
                             (self._poll_loop, "otel-ebpf-flows-agent-spans")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5.0)
        with self._lock:
            clients = list(self._clients.values())
            feeds = list(self._feeds.values())
            self._feeds.clear()
        for c in clients:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for feed in feeds:
            feed.source.close()
        if self._sock is not None:
            self._sock.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            conn.settimeout(None)
            with self._lock:
                if len(self._clients) >= MAX_CLIENTS:
                    refuse = True
                else:
                    refuse = False
                    self._next_client += 1
                    client = self._next_client
                    self._clients[client] = conn
            if refuse:
                _send(conn, proto.ERROR, {"error": f"the agent serves at most {MAX_CLIENTS} connections"})
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(client, conn), name="otel-ebpf-flows-agent-client",
                             daemon=True).start()

    def _poll_loop(self) -> None:
        """Keep every feed's rings drained (records wait in the client queues)."""
        while not self._stop.wait(self._config.poll_interval):
            with self._lock:
                feeds = list(self._feeds.values())
            for feed in feeds:
                try:
                    feed.source.poll(0)
                except Exception:
                    _log.debug("otel-ebpf-flows agent: polling the span feed of pid %d failed", feed.pid,
                               exc_info=True)

    def _feed(self, pid: int, starttime: int, client: int) -> SpanFeed:
        with self._lock:
            feed = self._feeds.get((pid, starttime))
            if feed is not None:
                feed.add_client(client)
                return feed
            feed = SpanFeed(pid, starttime, self._config)
            feed.add_client(client)
            # started under the lock: a second client of the same process waits for this one
            feed.source.start(feed.on_event)
            self._feeds[(pid, starttime)] = feed
            return feed

    def _release(self, feed: Optional[SpanFeed], client: int) -> None:
        with self._lock:
            self._clients.pop(client, None)
            if feed is None or feed.remove_client(client):
                return
            key = (feed.pid, feed.starttime)
            if self._feeds.get(key) is feed:
                del self._feeds[key]
            self._closed_lost[key] = self._closed_lost.get(key, 0) + feed.lost_total()
        feed.source.close()

    def span_lost(self, pid: int, starttime: int) -> int:
        """Span records lost for one process so far (cumulative, over its feeds)."""
        with self._lock:
            feed = self._feeds.get((pid, starttime))
            closed = self._closed_lost.get((pid, starttime), 0)
        return closed + (feed.lost_total() if feed is not None else 0)

    def forget(self, pid: int) -> None:
        with self._lock:
            for key in [k for k in self._closed_lost if k[0] == pid]:
                del self._closed_lost[key]

    def _serve(self, client: int, conn: socket.socket) -> None:
        feed: Optional[SpanFeed] = None
        try:
            raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", raw)
            starttime = proc_starttime(pid) if pid > 0 else None
            if starttime is None:
                _send(conn, proto.ERROR, {"error": "the agent cannot see the connecting process (another pid "
                                                   "namespace without hostPID?)"})
                return
            while not self._stop.is_set():
                try:
                    kind, payload = proto.read_frame(conn)
                except EOFError:
                    return
                if proc_starttime(pid) != starttime:
                    _send(conn, proto.ERROR, {"error": "the process that connected is gone"})
                    return
                if kind not in proto.REQUESTS:
                    _send(conn, proto.ERROR, {"error": f"frame type {kind:#x} is not a request"})
                    return
                if kind == proto.HELLO:
                    if feed is None:
                        if not self._on_hello(pid, starttime):
                            _send(conn, proto.ERROR, {"error": NOT_OBSERVED})
                            return
                        feed = self._feed(pid, starttime, client)
                        _log.info("otel-ebpf-flows agent: span client for pid %d (uid %d)", pid, uid)
                    _send(conn, proto.WELCOME, {"pid": pid, "tracks_threads": feed.source.tracks_threads})
                elif feed is None:
                    _send(conn, proto.ERROR, {"error": "say HELLO first"})
                elif kind == proto.DRAIN:
                    events, lost = feed.take(client)
                    _send(conn, proto.EVENTS, {"events": [proto.encode_event(e) for e in events], "lost": lost})
                elif kind == proto.THREADS:
                    tid = payload.get("tid")
                    slots: List[Tuple[int, int, int]] = []
                    if isinstance(tid, int) and not isinstance(tid, bool):
                        own = host_tid(pid, tid)  # a thread of the peer's own process, else nothing
                        if own is not None:
                            slots = feed.source.thread_connections(own)
                    _send(conn, proto.SLOTS, {"slots": [list(s) for s in slots]})
        except proto.ProtocolError as exc:
            _send(conn, proto.ERROR, {"error": str(exc)})
        except EbpfFlowsError as exc:
            _log.warning("otel-ebpf-flows agent: cannot serve span data to a client: %s", exc)
            _send(conn, proto.ERROR, {"error": str(exc)})
        except OSError:
            pass
        except Exception:
            _log.warning("otel-ebpf-flows agent: a span client failed", exc_info=True)
        finally:
            self._release(feed, client)
            _close(conn)


def _close(conn: socket.socket) -> None:
    """Close so that a reply already sent is read, not reset: a peer that sent bytes we did not
    read would otherwise get ECONNRESET before our last frame."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(0.2)
        for _ in range(16):  # at most 1 MiB, 0.2 s per read
            if not conn.recv(1 << 16):
                break
    except OSError:
        pass
    conn.close()


def _send(conn: socket.socket, kind: int, payload: Dict[str, Any]) -> None:
    try:
        conn.sendall(proto.encode_frame(kind, payload))
    except OSError:
        pass


# -- the daemon ----------------------------------------------------------------------------------


class Agent:
    """Discovery, one Observed per qualifying process, and the span service."""

    def __init__(self, selector: Selector, config: Optional[Config] = None, scan_interval: float = 5.0,
                 socket_path: Optional[str] = DEFAULT_AGENT_SOCKET, socket_group: Optional[str] = None,
                 environ: Optional[Mapping[str, str]] = None) -> None:
        self.selector = selector
        self.config = config or Config()
        self.scan_interval = scan_interval
        self.environ = dict(os.environ if environ is None else environ)
        self.host_name = socket.gethostname()
        self.observed: Dict[int, Observed] = {}
        self._lock = threading.Lock()
        # (pid, starttime) that did not qualify -> its comm then (an exec, e.g. `env X=Y cmd`, changes
        # both the environment and the comm, not the start time: then it is looked at again)
        self._skipped: Dict[Tuple[int, int], str] = {}
        self._failed: Set[Tuple[int, int]] = set()
        self._retiring: List[threading.Thread] = []
        self._stop = threading.Event()
        self.server = None if socket_path is None else SpanServer(
            socket_path, socket_group, self.config, on_hello=self._observe_client)

    def _exporter(self) -> Any:
        return make_exporter(self.environ)

    def start(self) -> None:
        check_environment()
        make_exporter(self.environ)  # a configuration error stops the agent at once
        if self.server is not None:
            self.server.start()
            if self.server.group is None:
                _log.warning("otel-ebpf-flows agent: %s is mode 0660 root:root, so only root may ask for span "
                             "data; give --socket-group GROUP for unprivileged services", self.server.path)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:
                _log.warning("otel-ebpf-flows agent: a scan of /proc failed", exc_info=True)
            self._stop.wait(self.scan_interval)

    def request_stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.stop()
        with self._lock:
            observed = list(self.observed.values())
            self.observed.clear()
        for obs in observed:
            self._retire(obs)
        for t in self._retiring:
            t.join(timeout=30.0)

    # -- discovery ------------------------------------------------------------------------------

    def scan(self) -> None:
        try:
            pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
        except OSError:
            return
        alive: Set[int] = set()
        for pid in pids:
            starttime = proc_starttime(pid)
            if starttime is None:
                continue
            alive.add(pid)
            with self._lock:
                obs = self.observed.get(pid)
            if obs is not None and obs.starttime == starttime:
                if loads_own_probes(pid):  # instrumented itself, with privilege, since it was observed
                    _log.info("otel-ebpf-flows agent: pid %d now loads its own probes (in-process mode): no longer "
                              "observed, so nothing is counted twice", pid)
                    self._forget(pid)
                    self._skipped[(pid, starttime)] = _read_text(f"/proc/{pid}/comm").strip()
                continue
            if obs is not None:  # the pid was recycled
                self._forget(pid)
            self._consider(pid, starttime, requested=False)
        self._skipped = {k: v for k, v in list(self._skipped.items()) if k[0] in alive}
        with self._lock:
            gone = [pid for pid in self.observed if pid not in alive]
        for pid in gone:
            self._forget(pid)
        self._retiring = [t for t in self._retiring if t.is_alive()]

    def _observe_client(self, pid: int, starttime: int) -> bool:
        """A span client's HELLO: observe its process now, before it makes traffic; False if the
        agent does not observe it (it gets no span service either)."""
        return self._consider(pid, starttime, requested=True)

    def _consider(self, pid: int, starttime: int, requested: bool) -> bool:
        """Observe the process if it qualifies; whether it is observed."""
        key = (pid, starttime)
        if pid == os.getpid() or key in self._failed:
            return False
        if key in self._skipped and not requested:
            if _read_text(f"/proc/{pid}/comm").strip() == self._skipped[key]:
                return False
        environ = read_environ(pid)
        cgroup_text = _read_text(f"/proc/{pid}/cgroup")
        comm, exe = process_names(pid)
        if not self.selector.matches(pid, environ, cgroup_text, comm, exe):
            self._skipped[key] = comm
            return False
        if loads_own_probes(pid):
            if key not in self._skipped:
                _log.info("otel-ebpf-flows agent: pid %d (%s) loads its own probes (in-process mode): not observed, "
                          "so nothing is counted twice", pid, comm)
            self._skipped[key] = comm
            return False
        with self._lock:
            current = self.observed.get(pid)
            if current is not None and current.starttime == starttime:
                return True
            attributes = build_resource_attributes(pid, environ, cgroup_text, self.host_name, comm)
            obs = Observed(pid, starttime, attributes)
            try:
                obs.start(self.config, self._exporter, self._share_sockets(pid), self._span_lost(pid, starttime))
            except EbpfFlowsError as exc:
                self._failed.add(key)
                _log.warning("otel-ebpf-flows agent: cannot observe pid %d (%s): %s", pid, comm, exc)
                return False
            except Exception:
                self._failed.add(key)
                _log.warning("otel-ebpf-flows agent: cannot observe pid %d (%s)", pid, comm, exc_info=True)
                return False
            self.observed[pid] = obs
        _log.info("otel-ebpf-flows agent: observing pid %d (service.name=%s)", pid, attributes["service.name"])
        return True

    def _span_lost(self, pid: int, starttime: int) -> Callable[[], int]:
        server = self.server
        return (lambda: 0) if server is None else (lambda: server.span_lost(pid, starttime))

    def _share_sockets(self, pid: int) -> Optional[FrozenSet[int]]:
        """Sockets ``pid`` holds with its parent or an observed process (called with the lock held).

        A pre-fork server's workers hold the listener their parent opened: every process holding
        it would count each accepted connection. So the observed holders switch to claim mode
        (a connection counts for the process that reads or writes it) before the new process's
        probes start, and the new process adopts neither the shared listener outside claim mode
        nor the other shared sockets (their first holder counts them).
        """
        mine = set(own_socket_inodes(pid))
        if not mine:
            return None
        holders = {p: set(own_socket_inodes(p)) & mine for p in self.observed if p != pid}
        ppid = parent_pid(pid)
        if ppid and ppid not in holders and ppid != os.getpid():
            holders[ppid] = set(own_socket_inodes(ppid)) & mine
        shared = frozenset(i for held in holders.values() for i in held)
        for p, held in holders.items():
            obs = self.observed.get(p)
            if not held or obs is None or obs.pipeline is None or obs.kernel is None:
                continue
            source = obs.kernel
            if source.claiming:
                continue
            obs.pipeline.quiesce()
            try:
                if source.has_listeners():
                    source.enable_claim()
            except EbpfFlowsError as exc:
                _log.warning("otel-ebpf-flows agent: cannot share the listeners of pid %d: %s", p, exc)
            finally:
                obs.pipeline.resume()
        return shared or None

    def _forget(self, pid: int) -> None:
        with self._lock:
            obs = self.observed.pop(pid, None)
        self._skipped = {k: v for k, v in list(self._skipped.items()) if k[0] != pid}
        self._failed = {k for k in self._failed if k[0] != pid}
        if self.server is not None:
            self.server.forget(pid)
        if obs is not None:
            _log.info("otel-ebpf-flows agent: pid %d (service.name=%s) exited: final export",
                      pid, obs.attributes["service.name"])
            self._retire(obs)

    def _retire(self, obs: Observed) -> None:
        t = threading.Thread(target=obs.stop, name=f"otel-ebpf-flows-agent-retire-{obs.pid}", daemon=True)
        t.start()
        self._retiring.append(t)


def run_agent(selector: Selector, scan_interval: float, socket_path: Optional[str],
              socket_group: Optional[str]) -> int:
    """The ``agent`` command: run until SIGTERM/SIGINT; 0 on a clean stop, 1 if it cannot start."""
    try:
        config = load_config({})
        agent = Agent(selector, config, scan_interval, socket_path, socket_group)
        agent.start()
    except (EbpfFlowsError, OSError) as exc:
        _log.error("otel-ebpf-flows agent cannot start: %s", exc)
        return 1

    def stop(_signum: int, _frame: Any) -> None:
        agent.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _log.info("otel-ebpf-flows agent %s: scanning /proc every %g s%s", __version__, scan_interval,
              "" if socket_path is None else f"; span service on {socket_path}")
    try:
        agent.run()
    finally:
        agent.shutdown()
    _log.info("otel-ebpf-flows agent stopped")
    return 0

