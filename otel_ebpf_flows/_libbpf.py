"""The one boundary with the system libbpf (>= 1.0), through ctypes.

Nothing else in the package touches ctypes or libbpf: this module declares the
signatures it uses, turns libbpf's NULL/negative-errno results into
:class:`~otel_ebpf_flows.exceptions.BpfError`, owns object, link and ring-buffer
lifetimes, and routes libbpf's own log into :mod:`logging`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import select
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from .exceptions import BpfError, UnsupportedEnvironment

_log = logging.getLogger("otel_ebpf_flows.libbpf")

_c_void_p = ctypes.c_void_p
_c_int = ctypes.c_int
_c_char_p = ctypes.c_char_p
_c_size_t = ctypes.c_size_t
_c_u32 = ctypes.c_uint32

BTF_KIND_PTR = 2
BTF_KIND_TYPEDEF = 8
BTF_KIND_FUNC_PROTO = 13
BTF_KIND_DATASEC = 15

BPF_ANY = 0
#: Records handed on between two moments the consumer gives the GIL up.
RECORDS_PER_YIELD = 32
#: Records a consumer holds copied out of the ring and not yet handed on, past which it stops
#: taking more at its yields (64-byte records: 4 MiB); the ring then holds what comes next.
RECORDS_PENDING_MAX = 65536
BPF_NOEXIST = 1

_PRINT_FN = ctypes.CFUNCTYPE(_c_int, _c_int, _c_char_p, _c_void_p)
_SAMPLE_FN = ctypes.CFUNCTYPE(_c_int, _c_void_p, _c_void_p, _c_size_t)

_LIBBPF_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", _c_u32), ("info", _c_u32), ("size_or_type", _c_u32)]


class _BtfVarSecinfo(ctypes.Structure):
    _fields_ = [("type", _c_u32), ("offset", _c_u32), ("size", _c_u32)]


class _BtfParam(ctypes.Structure):
    _fields_ = [("name_off", _c_u32), ("type", _c_u32)]


_SIGNATURES: Dict[str, Tuple[object, List[object]]] = {
    "libbpf_major_version": (_c_u32, []),
    "libbpf_minor_version": (_c_u32, []),
    "libbpf_set_print": (_c_void_p, [_c_void_p]),
    "bpf_object__open_file": (_c_void_p, [_c_char_p, _c_void_p]),
    "bpf_object__load": (_c_int, [_c_void_p]),
    "bpf_object__close": (None, [_c_void_p]),
    "bpf_object__btf": (_c_void_p, [_c_void_p]),
    "bpf_object__find_map_by_name": (_c_void_p, [_c_void_p, _c_char_p]),
    "bpf_object__find_program_by_name": (_c_void_p, [_c_void_p, _c_char_p]),
    "bpf_map__set_max_entries": (_c_int, [_c_void_p, _c_u32]),
    "bpf_map__fd": (_c_int, [_c_void_p]),
    "bpf_map__initial_value": (_c_void_p, [_c_void_p, ctypes.POINTER(_c_size_t)]),
    "bpf_program__set_autoload": (_c_int, [_c_void_p, ctypes.c_bool]),
    "bpf_program__attach": (_c_void_p, [_c_void_p]),
    "bpf_program__attach_iter": (_c_void_p, [_c_void_p, _c_void_p]),
    "bpf_program__fd": (_c_int, [_c_void_p]),
    "bpf_link__fd": (_c_int, [_c_void_p]),
    "bpf_obj_get_info_by_fd": (_c_int, [_c_int, _c_void_p, ctypes.POINTER(_c_u32)]),
    "bpf_link__destroy": (_c_int, [_c_void_p]),
    "bpf_iter_create": (_c_int, [_c_int]),
    "bpf_map_lookup_elem": (_c_int, [_c_int, _c_void_p, _c_void_p]),
    "bpf_map_update_elem": (_c_int, [_c_int, _c_void_p, _c_void_p, ctypes.c_uint64]),
    "bpf_map_delete_elem": (_c_int, [_c_int, _c_void_p]),
    "bpf_map_get_next_key": (_c_int, [_c_int, _c_void_p, _c_void_p]),
    "bpf_map_lookup_batch": (
        _c_int,
        [_c_int, _c_void_p, _c_void_p, _c_void_p, _c_void_p, ctypes.POINTER(_c_u32), _c_void_p],
    ),
    "ring_buffer__new": (_c_void_p, [_c_int, _c_void_p, _c_void_p, _c_void_p]),
    "ring_buffer__poll": (_c_int, [_c_void_p, _c_int]),
    "ring_buffer__consume": (_c_int, [_c_void_p]),
    "ring_buffer__free": (None, [_c_void_p]),
    "ring_buffer__epoll_fd": (_c_int, [_c_void_p]),
    "btf__load_vmlinux_btf": (_c_void_p, []),
    "btf__free": (None, [_c_void_p]),
    "btf__find_by_name_kind": (_c_int, [_c_void_p, _c_char_p, _c_u32]),
    "btf__type_by_id": (ctypes.POINTER(_BtfType), [_c_void_p, _c_u32]),
    "btf__name_by_offset": (_c_char_p, [_c_void_p, _c_u32]),
}

# struct bpf_prog_info (uapi/linux/bpf.h): its size up to and including the
# recursion_misses field (Linux 5.12+), and that field's offset
_PROG_INFO_SIZE = 216
_PROG_INFO_RECURSION_MISSES = 208

_lib: Optional[ctypes.CDLL] = None
_lib_lock = threading.Lock()
# ring_buffer__consume() called with the GIL held: it never blocks, and each
# record's callback then runs without handing the GIL to the application and
# taking it back (through CDLL, every record cost two GIL hand-offs).
_consume_gil: Any = None
# Map reads with the GIL held (see Map's hold_gil): a map lookup never blocks, and
# through CDLL each short syscall costs a GIL hand-off; taking the GIL back from a
# busy thread can wait for the interpreter's 5 ms switch interval (a collection's
# few reads; the thread-slot lookup at a span's end, on the application's thread).
_lib_gil: Any = None
_GIL_HELD = ("bpf_map_lookup_batch", "bpf_map_lookup_elem", "bpf_obj_get_info_by_fd")
_print_cb = None  # keeps the ctypes callback alive for the process's lifetime


_vsnprintf: Any = None  # libc's, resolved on the first libbpf log line

#: How long a thread with more Python work to do steps off the GIL (see yield_gil).
YIELD_S = 0.00005


def wait_readable(fds: List[int], timeout_s: float) -> List[int]:
    """Which of ``fds`` turned readable within ``timeout_s``, waited for without the GIL
    (poll(2), not select(): any fd number, however many the application has open)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    try:
        return [fd for fd, _ in poller.poll(max(0, int(timeout_s * 1000)))]
    except InterruptedError:
        return []


def yield_gil() -> None:
    """Let another thread that wants the GIL have it, then carry on.

    ``time.sleep(0)`` releases the GIL but takes it straight back, usually before a
    waiting thread has woken up (a voluntary release does not hand over), so the
    waiter still waits for the 5 ms switch interval; a sleep of a few tens of µs
    lets it take the GIL.
    """
    time.sleep(YIELD_S)


def _format_libbpf(fmt: bytes, args: int) -> str:
    global _vsnprintf
    if _vsnprintf is None:
        fn = ctypes.CDLL(None).vsnprintf
        fn.argtypes = [_c_char_p, _c_size_t, _c_char_p, _c_void_p]
        _vsnprintf = fn
    buf = ctypes.create_string_buffer(1024)
    _vsnprintf(buf, len(buf), fmt, args)
    return buf.value.decode("utf-8", "replace").rstrip()


def _on_libbpf_print(level: int, fmt: bytes, args: int) -> int:
    try:
        pylevel = _LIBBPF_LEVELS.get(level, logging.DEBUG)
        if _log.isEnabledFor(pylevel):
            _log.log(pylevel, "%s", _format_libbpf(fmt, args))
    except Exception:  # pragma: no cover - a log line must never break libbpf
        pass
    return 0


def load_library() -> ctypes.CDLL:
    """The system libbpf, with every signature declared; raises if absent or < 1.0."""
    global _lib, _print_cb
    with _lib_lock:
        if _lib is not None:
            return _lib
        # libbpf.so.1 first: its soname promises 1.x, and dlopen() finds it without
        # find_library(), which runs `ldconfig -p` in a subprocess (a few ms)
        lib = None
        try:
            lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError:
            name = ctypes.util.find_library("bpf")
            for candidate in ([name] if name else []) + ["libbpf.so"]:
                try:
                    lib = ctypes.CDLL(candidate, use_errno=True)
                    break
                except OSError:
                    continue
        if lib is None:
            raise UnsupportedEnvironment(
                "the system libbpf was not found; install libbpf 1.0 or newer "
                "(Debian/Ubuntu: apt-get install libbpf1; Fedora/RHEL: dnf install libbpf)"
            )
        if not hasattr(lib, "libbpf_major_version") or not hasattr(lib, "ring_buffer__consume"):
            raise UnsupportedEnvironment(
                "the system libbpf is older than 1.0; install libbpf 1.0 or newer"
            )
        for func, (restype, argtypes) in _SIGNATURES.items():
            try:
                fn = getattr(lib, func)
            except AttributeError as exc:
                raise UnsupportedEnvironment(
                    f"the system libbpf lacks {func}(); install libbpf 1.0 or newer"
                ) from exc
            fn.restype = restype
            fn.argtypes = argtypes
        if lib.libbpf_major_version() < 1:
            raise UnsupportedEnvironment(
                f"the system libbpf is {lib.libbpf_major_version()}.{lib.libbpf_minor_version()}; "
                "install libbpf 1.0 or newer"
            )
        _print_cb = _PRINT_FN(_on_libbpf_print)
        lib.libbpf_set_print(ctypes.cast(_print_cb, _c_void_p))
        global _consume_gil, _lib_gil
        lib_gil = ctypes.PyDLL(lib._name, handle=lib._handle, use_errno=True)
        _consume_gil = lib_gil.ring_buffer__consume
        _consume_gil.restype = _c_int
        _consume_gil.argtypes = [_c_void_p]
        for name in _GIL_HELD:
            fn, held = getattr(lib, name), getattr(lib_gil, name)
            held.restype, held.argtypes = fn.restype, fn.argtypes
        _lib_gil = lib_gil
        _lib = lib
        return lib


def libbpf_version() -> str:
    lib = load_library()
    return f"{lib.libbpf_major_version()}.{lib.libbpf_minor_version()}"


def _err(what: str, code: Optional[int] = None) -> BpfError:
    code = abs(code) if code else ctypes.get_errno()
    return BpfError(what, code)


def _btf_types(lib: ctypes.CDLL, btf: int, type_id: int) -> Tuple[_BtfType, int]:
    ptr = lib.btf__type_by_id(btf, type_id)
    if not ptr:
        raise BpfError(f"BTF type {type_id} not found", errno.ENOENT)
    return ptr.contents, ctypes.addressof(ptr.contents)


# Answers of vmlinux_tracepoint_arities(), kept for the process's lifetime: the
# running kernel's BTF never changes, and parsing it costs 15-30 ms.
_arities: Dict[str, Optional[int]] = {}
_arities_lock = threading.Lock()


def _tracepoint_arity(lib: ctypes.CDLL, btf: int, name: str) -> Optional[int]:
    tid = lib.btf__find_by_name_kind(btf, f"btf_trace_{name}".encode(), BTF_KIND_TYPEDEF)
    if tid < 0:
        return None
    t, _ = _btf_types(lib, btf, tid)
    ptr, _ = _btf_types(lib, btf, t.size_or_type)
    if (ptr.info >> 24) & 0x1F != BTF_KIND_PTR:
        return None
    proto, _ = _btf_types(lib, btf, ptr.size_or_type)
    if (proto.info >> 24) & 0x1F != BTF_KIND_FUNC_PROTO:
        return None
    return int(proto.info & 0xFFFF) - 1  # the first parameter is the tracepoint's void *


def vmlinux_tracepoint_arities(names: Iterable[str]) -> Dict[str, Optional[int]]:
    """Number of arguments of each tracepoint in the running kernel's BTF (None: no such tracepoint).

    vmlinux BTF is parsed once for all the names not asked before in this process.
    """
    lib = load_library()
    wanted = tuple(names)
    with _arities_lock:
        missing = [name for name in wanted if name not in _arities]
        if missing:
            btf = lib.btf__load_vmlinux_btf()
            if not btf:
                return {name: _arities.get(name) for name in wanted}  # not kept: maybe transient
            try:
                for name in missing:
                    _arities[name] = _tracepoint_arity(lib, btf, name)
            finally:
                lib.btf__free(btf)
        return {name: _arities[name] for name in wanted}


def prefetch_tracepoint_arities(names: Iterable[str]) -> None:
    """Start parsing vmlinux BTF for :func:`vmlinux_tracepoint_arities` on a short-lived thread.

    The parse (15-30 ms, in libbpf: the GIL is released) then overlaps the caller's
    own start-up work; a later :func:`vmlinux_tracepoint_arities` waits for it on
    the lock rather than parsing again.
    """
    wanted = tuple(names)
    if all(name in _arities for name in wanted):
        return

    def parse() -> None:
        try:
            vmlinux_tracepoint_arities(wanted)
        except Exception:  # pragma: no cover - the caller's own call reports it
            pass

    threading.Thread(target=parse, name="otel-ebpf-flows-btf", daemon=True).start()


def _reset_arities_lock() -> None:
    """In a forked child: the parent's parsing thread, which may have held the lock, is gone."""
    global _arities_lock
    _arities_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_arities_lock)


def vmlinux_tracepoint_arity(name: str) -> Optional[int]:
    """Number of arguments of a tracepoint in the running kernel's BTF, or None."""
    return vmlinux_tracepoint_arities((name,))[name]


class Link:
    """An attached program; detached by :meth:`destroy`."""

    def __init__(self, lib: ctypes.CDLL, ptr: int, name: str) -> None:
        self._lib = lib
        self._ptr: Optional[int] = ptr
        self.name = name

    @property
    def fd(self) -> int:
        if self._ptr is None:
            raise BpfError(f"link {self.name} is destroyed", errno.EBADF)
        return int(self._lib.bpf_link__fd(self._ptr))

    def destroy(self) -> None:
        if self._ptr is not None:
            self._lib.bpf_link__destroy(self._ptr)
            self._ptr = None


class Map:
    """A map of a loaded object, read and written by fixed-size keys and values.

    ``hold_gil``: lookups keep the GIL through the syscall (a few µs each), for a
    thread that must not queue for the GIL once per syscall while others are busy.
    """

    def __init__(self, lib: ctypes.CDLL, ptr: int, name: str, hold_gil: bool = False) -> None:
        self._lib = lib
        self._read = _lib_gil if hold_gil and _lib_gil is not None else lib
        self._ptr = ptr
        self.name = name
        self._batch_ok = True
        self._fd = -1

    @property
    def fd(self) -> int:
        if self._fd < 0:  # a map has an fd once its object is loaded, the same one until closed
            self._fd = int(self._lib.bpf_map__fd(self._ptr))
        return self._fd

    def set_max_entries(self, n: int) -> None:
        rc = self._lib.bpf_map__set_max_entries(self._ptr, n)
        if rc:
            raise _err(f"cannot size map {self.name} to {n} entries", rc)

    def lookup(self, key: ctypes._CData, value: ctypes._CData) -> bool:
        rc = self._read.bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(value))
        if rc == 0:
            return True
        if ctypes.get_errno() == errno.ENOENT:
            return False
        raise _err(f"lookup in map {self.name}")

    def update(self, key: ctypes._CData, value: ctypes._CData, flags: int = BPF_ANY) -> None:
        rc = self._lib.bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), flags)
        if rc:
            raise _err(f"update of map {self.name}")

    def delete(self, key: ctypes._CData) -> None:
        rc = self._lib.bpf_map_delete_elem(self.fd, ctypes.byref(key))
        if rc and ctypes.get_errno() != errno.ENOENT:
            raise _err(f"delete from map {self.name}")

    def items(self, key_type: Any, value_type: Any, chunk: int = 256) -> Iterator[Tuple[Any, Any]]:
        """Every entry, with batch lookups where the kernel has them."""
        if self._batch_ok:
            try:
                yield from self._items_batch(key_type, value_type, chunk)
                return
            except BpfError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._batch_ok = False
        key = key_type()
        next_key = key_type()
        prev = None
        while True:
            rc = self._lib.bpf_map_get_next_key(self.fd, prev, ctypes.byref(next_key))
            if rc:
                if ctypes.get_errno() == errno.ENOENT:
                    return
                raise _err(f"iteration of map {self.name}")
            ctypes.memmove(ctypes.byref(key), ctypes.byref(next_key), ctypes.sizeof(key_type))
            value = value_type()
            if self.lookup(key, value):
                out_key = key_type()
                ctypes.memmove(ctypes.byref(out_key), ctypes.byref(key), ctypes.sizeof(key_type))
                yield out_key, value
            prev = ctypes.byref(key)

    def batches(self, key_type: Any, value_type: Any, chunk: int = 256) -> Iterator[Tuple[bytes, bytes]]:
        """Every entry as raw bytes, up to ``chunk`` at a time: (keys, values), each n x the type's size.

        One batch lookup per chunk where the kernel has them, and no Python object per
        entry: a caller can unpack just the fields it needs (``struct.iter_unpack``).
        """
        if self._batch_ok:
            try:
                yield from self._raw_batches(key_type, value_type, chunk)
                return
            except BpfError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._batch_ok = False
        keys: List[bytes] = []
        values: List[bytes] = []
        for key, value in self.items(key_type, value_type):
            keys.append(bytes(key))
            values.append(bytes(value))
            if len(keys) == chunk:
                yield b"".join(keys), b"".join(values)
                keys.clear()
                values.clear()
        if keys:
            yield b"".join(keys), b"".join(values)

    def _raw_batches(self, key_type: Any, value_type: Any, chunk: int) -> Iterator[Tuple[bytes, bytes]]:
        key_size, value_size = ctypes.sizeof(key_type), ctypes.sizeof(value_type)
        keys = ctypes.create_string_buffer(key_size * chunk)
        values = ctypes.create_string_buffer(value_size * chunk)
        for n in self._lookup_batches(self._read, keys, values, chunk):
            yield ctypes.string_at(keys, n * key_size), ctypes.string_at(values, n * value_size)

    def _items_batch(self, key_type: Any, value_type: Any, chunk: int) -> Iterator[Tuple[Any, Any]]:
        keys = (key_type * chunk)()
        values = (value_type * chunk)()
        for n in self._lookup_batches(self._lib, keys, values, chunk):
            for i in range(n):
                yield keys[i], values[i]

    def _lookup_batches(self, lib: Any, keys: Any, values: Any, chunk: int) -> Iterator[int]:
        """bpf_map_lookup_batch() over the whole map into ``keys``/``values``: yields each batch's count.

        The buffers are refilled for the next batch once the caller has taken this one.
        """
        in_batch = ctypes.c_uint64(0)
        out_batch = ctypes.c_uint64(0)
        first = True
        while True:
            count = _c_u32(chunk)
            rc = lib.bpf_map_lookup_batch(
                self.fd,
                None if first else ctypes.byref(in_batch),
                ctypes.byref(out_batch),
                keys,
                values,
                ctypes.byref(count),
                None,
            )
            err = ctypes.get_errno() if rc else 0
            if rc and err != errno.ENOENT:
                raise _err(f"batch lookup in map {self.name}", err)
            if count.value:
                yield count.value
            if rc:  # ENOENT: that was the last batch
                return
            in_batch.value = out_batch.value
            first = False


class RingBuffer:
    """libbpf's ring-buffer consumer; ``on_record`` gets each record's bytes.

    Records are copied out by libbpf's callback while the GIL stays held, then
    handed to ``on_record`` once libbpf has returned (a batch per call).
    """

    def __init__(self, lib: ctypes.CDLL, map_fd: int, on_record: Callable[[bytes], None]) -> None:
        self._lib = lib
        self._on_record = on_record
        batch: List[bytes] = []
        self._batch = batch
        append = batch.append
        string_at = ctypes.string_at

        def _sample(_ctx: int, data: int, size: int) -> int:
            append(string_at(data, size))
            return 0

        self._cb = _SAMPLE_FN(_sample)
        ptr = lib.ring_buffer__new(map_fd, ctypes.cast(self._cb, _c_void_p), None, None)
        if not ptr:
            raise _err("cannot create the ring-buffer consumer")
        self._ptr: Optional[int] = ptr
        self._epoll_fd = int(lib.ring_buffer__epoll_fd(ptr))

    @property
    def epoll_fd(self) -> Optional[int]:
        """Readable once the kernel wakes the consumer (a burst filled part of the ring), and then
        for as long as a check finds records in it (level-triggered)."""
        return self._epoll_fd if self._ptr is not None else None

    def wait(self, timeout_s: float) -> bool:
        """Wait, without the GIL, until the kernel wakes the consumer or ``timeout_s`` passes."""
        if self._ptr is None or timeout_s <= 0:
            return False
        return bool(wait_readable([self._epoll_fd], timeout_s))

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for the kernel's wakeup, then consume."""
        self.wait(timeout_ms / 1000)
        return self.consume()

    def consume(self) -> int:
        """Hand every record now in the ring to ``on_record``; how many there were.

        The records are copied out of the ring first (one libbpf call, the GIL held), then
        handed on, the GIL given up every ``RECORDS_PER_YIELD``. The kernel goes on writing
        meanwhile, and a thread waiting for the GIL among busy application threads can take
        milliseconds to get it back: at each yield, what the ring holds by then is copied out
        too (up to ``RECORDS_PENDING_MAX`` pending), so that a burst handed on slowly does not
        fill the ring behind it.
        """
        if self._ptr is None:
            return 0
        rc = int(_consume_gil(self._ptr))
        batch = self._batch
        records = batch[:]
        batch.clear()
        on_record = self._on_record
        n = 0
        while n < len(records):
            if n and not n % RECORDS_PER_YIELD:
                time.sleep(0)  # let the application's threads have the GIL
                if self._ptr is not None and len(records) - n < RECORDS_PENDING_MAX:
                    more = int(_consume_gil(self._ptr))
                    if more < 0 and rc >= 0:
                        rc = more
                    records += batch
                    batch.clear()
            try:
                on_record(records[n])
            except Exception:  # one bad record never stops the others
                _log.exception("dropping a kernel record that could not be handled")
            n += 1
        if rc < 0 and -rc != errno.EINTR:
            raise _err("ring-buffer consume", rc)
        return n

    def free(self) -> None:
        if self._ptr is not None:
            self._lib.ring_buffer__free(self._ptr)
            self._ptr = None


class BpfObject:
    """An opened (then loaded) BPF object file, and everything created from it."""

    def __init__(self, path: str) -> None:
        self._lib = load_library()
        ptr = self._lib.bpf_object__open_file(os.fsencode(path), None)
        if not ptr:
            raise _err(f"cannot open BPF object {path}")
        self._ptr: Optional[int] = ptr
        self._links: List[Link] = []
        self._rings: List[RingBuffer] = []
        self._live: Dict[str, mmap.mmap] = {}  # writable data sections mapped shared (write_live_global)
        self._layouts: Dict[str, Dict[str, Tuple[int, int]]] = {}  # see _section_vars
        self.path = path

    # -- before load --------------------------------------------------------------

    def _section_vars(self, section: str) -> Dict[str, Tuple[int, int]]:
        """Each global of ``section``: (offset, size), from the BTF (read once per section)."""
        layout = self._layouts.get(section)
        if layout is None:
            layout = self._layouts[section] = self._read_section_vars(section)
        return layout

    def _read_section_vars(self, section: str) -> Dict[str, Tuple[int, int]]:
        lib = self._lib
        btf = lib.bpf_object__btf(self._ptr)
        if not btf:
            raise BpfError(f"{self.path} carries no BTF", errno.ENOENT)
        sid = lib.btf__find_by_name_kind(btf, section.encode(), BTF_KIND_DATASEC)
        if sid < 0:
            raise BpfError(f"{self.path} has no {section} section", errno.ENOENT)
        sec, addr = _btf_types(lib, btf, sid)
        out: Dict[str, Tuple[int, int]] = {}
        infos = (_BtfVarSecinfo * (sec.info & 0xFFFF)).from_address(addr + ctypes.sizeof(_BtfType))
        for info in infos:
            var, _ = _btf_types(lib, btf, info.type)
            name = lib.btf__name_by_offset(btf, var.name_off).decode()
            out[name] = (info.offset, info.size)
        return out

    def _section_data(self, section: str) -> Tuple[int, int]:
        m = self._map_ptr(section)
        size = _c_size_t(0)
        data = self._lib.bpf_map__initial_value(m, ctypes.byref(size))
        if not data:
            raise BpfError(f"no data for section {section}", errno.ENOENT)
        return data, size.value

    def set_globals(self, section: str, values: Dict[str, int]) -> None:
        """Write integer globals (``const volatile`` ones in .rodata before load)."""
        layout = self._section_vars(section)
        data, size = self._section_data(section)
        for name, value in values.items():
            if name not in layout:
                raise BpfError(f"{self.path} has no global {name} in {section}", errno.ENOENT)
            offset, width = layout[name]
            if offset + width > size:
                raise BpfError(f"global {name} lies outside {section}", errno.EINVAL)
            ctypes.memmove(data + offset, int(value).to_bytes(width, "little"), width)

    def write_live_global(self, section: str, name: str, value: bytes) -> None:
        """Write a global of a writable data section while the programs run: its bytes, whole,
        straight into the kernel map's memory (mapped shared once per section; libbpf's own
        copy of the section is only the initial value)."""
        memory, offset, width = self.live_global(section, name)
        if len(value) != width:
            raise BpfError(f"global {name} is {width} bytes at {offset}, not {len(value)}", errno.EINVAL)
        memory[offset:offset + width] = value

    def live_global(self, section: str, name: str) -> Tuple[mmap.mmap, int, int]:
        """Where a global of a writable data section lives while the programs run: the kernel
        map's memory (mapped shared once per section, unmapped by :meth:`close`), the global's
        offset in it and its width."""
        layout = self._section_vars(section)
        if name not in layout:
            raise BpfError(f"{self.path} has no global {name} in {section}", errno.ENOENT)
        offset, width = layout[name]
        memory = self._live.get(section)
        if memory is None:
            m = self._map_ptr(section)
            size = _c_size_t(0)
            if not self._lib.bpf_map__initial_value(m, ctypes.byref(size)):
                raise BpfError(f"no data for section {section}", errno.ENOENT)
            length = -(-size.value // mmap.PAGESIZE) * mmap.PAGESIZE
            try:
                memory = mmap.mmap(self.map(section).fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:  # a kernel without mmapable arrays (before 5.5)
                raise BpfError(f"cannot map {section}: {exc}", exc.errno or errno.EINVAL) from exc
            self._live[section] = memory
        if offset + width > len(memory):
            raise BpfError(f"global {name} lies outside {section}", errno.EINVAL)
        return memory, offset, width

    def get_global(self, section: str, name: str) -> int:
        """An integer global's value now, read from the kernel's map of ``section`` (after load)."""
        layout = self._section_vars(section)
        if name not in layout:
            raise BpfError(f"{self.path} has no global {name} in {section}", errno.ENOENT)
        offset, width = layout[name]
        _, size = self._section_data(section)
        value = ctypes.create_string_buffer(size)
        if not self.map(section).lookup(ctypes.c_uint32(0), value):
            raise BpfError(f"cannot read {section}", errno.ENOENT)
        return int.from_bytes(value.raw[offset:offset + width], "little")

    def _map_ptr(self, name: str) -> int:
        ptr = self._lib.bpf_object__find_map_by_name(self._ptr, name.encode())
        if not ptr:
            raise BpfError(f"{self.path} has no map {name}", errno.ENOENT)
        return int(ptr)

    def map(self, name: str, hold_gil: bool = False) -> Map:
        return Map(self._lib, self._map_ptr(name), name, hold_gil)

    def _prog_ptr(self, name: str) -> int:
        ptr = self._lib.bpf_object__find_program_by_name(self._ptr, name.encode())
        if not ptr:
            raise BpfError(f"{self.path} has no program {name}", errno.ENOENT)
        return int(ptr)

    def set_autoload(self, name: str, autoload: bool) -> None:
        rc = self._lib.bpf_program__set_autoload(self._prog_ptr(name), autoload)
        if rc:
            raise _err(f"cannot set autoload of {name}", rc)

    def load(self) -> None:
        rc = self._lib.bpf_object__load(self._ptr)
        if rc:
            raise _err(f"the kernel refused to load {os.path.basename(self.path)}", rc)

    # -- after load ---------------------------------------------------------------

    def attach(self, name: str) -> Link:
        ptr = self._lib.bpf_program__attach(self._prog_ptr(name))
        if not ptr:
            raise _err(f"cannot attach {name}")
        link = Link(self._lib, ptr, name)
        self._links.append(link)
        return link

    def program_fd(self, name: str) -> int:
        """The file descriptor of a loaded program (the object keeps it open)."""
        fd = self._lib.bpf_program__fd(self._prog_ptr(name))
        if fd < 0:
            raise _err(f"{name} is not loaded", fd)
        return int(fd)

    def recursion_misses(self, name: str, hold_gil: bool = False) -> int:
        """How often the kernel skipped a loaded program because it was already running on that CPU."""
        fd = self.program_fd(name)
        info = (ctypes.c_uint8 * _PROG_INFO_SIZE)()
        size = _c_u32(_PROG_INFO_SIZE)
        get_info = (_lib_gil if hold_gil and _lib_gil is not None else self._lib).bpf_obj_get_info_by_fd
        rc = get_info(fd, info, ctypes.byref(size))
        if rc:
            raise _err(f"cannot read the information of {name}", rc)
        if size.value < _PROG_INFO_RECURSION_MISSES + 8:
            return 0  # a kernel older than 5.12 neither counts nor skips this way
        return int.from_bytes(bytes(info[_PROG_INFO_RECURSION_MISSES:_PROG_INFO_RECURSION_MISSES + 8]), "little")

    def run_iterator(self, name: str) -> bytes:
        """Run an iterator program once and return everything it wrote."""
        ptr = self._lib.bpf_program__attach_iter(self._prog_ptr(name), None)
        if not ptr:
            raise _err(f"cannot attach iterator {name}")
        link = Link(self._lib, ptr, name)
        try:
            fd = self._lib.bpf_iter_create(link.fd)
            if fd < 0:
                raise _err(f"cannot create iterator {name}", fd)
            chunks = []
            try:
                while True:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            finally:
                os.close(fd)
            return b"".join(chunks)
        finally:
            link.destroy()

    def ring_buffer(self, map_name: str, on_record: Callable[[bytes], None]) -> RingBuffer:
        rb = RingBuffer(self._lib, self.map(map_name).fd, on_record)
        self._rings.append(rb)
        return rb

    def close(self) -> None:
        """Detach every link, free every ring buffer, close the object (maps, programs)."""
        for rb in self._rings:
            rb.free()
        self._rings.clear()
        for memory in self._live.values():
            memory.close()
        self._live.clear()
        for link in reversed(self._links):
            link.destroy()
        self._links.clear()
        if self._ptr is not None:
            self._lib.bpf_object__close(self._ptr)
            self._ptr = None
