"""Span enrichment: the kernel's TCP story of each span, in what is exported.

How a span finds its connections
    The kernel remembers, per thread, the connections the thread sent or
    received on and when (``threads`` map, fed by ``sock:sock_send_length`` /
    ``sock:sock_recv_length``). When a span ends, its connections are the ones
    its thread used during the span; if the span names its peer
    (``server.address``/``server.port``, ``network.peer.*``, the older
    ``net.peer.*``, or ``client.*`` on a server span), only those of the
    thread's connections that go to that peer. A span whose thread used none
    (the I/O ran on another thread) gets the connections to its peer that were
    open during it. Asyncio runs many spans on one thread: they are told apart
    by peer; concurrent spans to the same peer over different connections of a
    pool cannot be told apart and each gets all of them (documented).

How the attributes reach the exporter
    The SDK makes a span read-only before any processor's ``on_end`` runs, so a
    processor cannot add to it. Instead, :class:`ProcessorHook` wraps the
    ``on_end`` of the tracer provider's active (multi) span processor -- the
    object every span of every tracer of that provider calls -- and hands the
    exporting processors an enriched copy of the finished span. Kernel records
    are drained from the ring buffer at that moment, so everything the kernel
    saw before the span ended is in what is exported. This works for the global
    provider set up by ``opentelemetry-instrument`` and for one set up by hand,
    including processors added after ``instrument()``.
"""

from __future__ import annotations

import collections
import copy
import functools
import ipaddress
import logging
import os
import threading
import time
import urllib.parse
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Set, Tuple

import attrs
from opentelemetry import trace
from opentelemetry.context import Context

from ._records import ConnRecord
from ._source import CONN_EVENT_KINDS, FlowEvent, FlowKey, Role

_log = logging.getLogger("otel_ebpf_flows")

# Span attributes and events (the public contract).
ATTR_RETRANSMITS = "ebpf_flows.tcp.retransmits"
ATTR_RTT = "ebpf_flows.tcp.rtt"
ATTR_HANDSHAKE = "ebpf_flows.tcp.handshake.duration"
ATTR_REUSED = "ebpf_flows.tcp.connection.reused"
ATTR_DEGRADED = "ebpf_flows.tcp.degraded"
ATTR_EVENTS_DROPPED = "ebpf_flows.tcp.events.dropped"
EVENT_NAMES = {
    "retransmit": "ebpf_flows.tcp.retransmit",
    "reset": "ebpf_flows.tcp.reset",
    "zero_window": "ebpf_flows.tcp.zero_window",
}

# Where a span names its peer, most specific first.
_CLIENT_PEER_ADDRESS = ("network.peer.address", "server.address", "net.peer.name", "net.peer.ip")
_CLIENT_PEER_PORT = ("network.peer.port", "server.port", "net.peer.port")
_SERVER_PEER_ADDRESS = ("network.peer.address", "client.address", "net.peer.ip", "net.sock.peer.addr")
_SERVER_PEER_PORT = ("network.peer.port", "client.port", "net.peer.port", "net.sock.peer.port")
_SERVER_LOCAL_PORT = ("server.port", "net.host.port", "network.local.port")
_URL = ("url.full", "http.url")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


#: How long a closed connection's events are kept for spans still running.
GONE_RETENTION_NS = 60 * 1_000_000_000
#: Kernel events kept per connection for spans that end later.
EVENTS_PER_CONNECTION = 256
#: Spans remembered per thread for exemplars.
SPANS_PER_THREAD = 64
#: Spans started and not ended that the registry keeps count of for the kernel (spans_idle); past
#: this many (spans an application never ends), the kernel is told one is open, for good.
LIVE_SPANS_MAX = 65536


def _ip(text: Any) -> Optional[str]:
    """The normalised text of an IP address literal, or None for a hostname."""
    if not isinstance(text, str):
        return None
    return _ip_text(text)


@functools.lru_cache(maxsize=4096)
def _ip_text(text: str) -> Optional[str]:
    # cached: every span's end parses its peer, and the same few peers recur
    try:
        addr = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _port(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and 0 < value < 65536:
        return value
    if isinstance(value, str) and value.isdigit() and 0 < int(value) < 65536:
        return int(value)
    return None


def _plain(attributes: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """A span's attributes as a dict: the SDK's mappings answer ``.get()`` of a missing
    key by raising and catching KeyError, and peer_of asks for a dozen keys."""
    return dict(attributes) if attributes else {}


def _attributes_of(span: Any) -> Mapping[str, Any]:
    """A span's attributes to look keys up in: the SDK span's own dict, read in place (no
    copy through its read-only view and locked mapping: half of peer_of()'s time, twice per
    span); otherwise a plain copy."""
    inner = getattr(getattr(span, "_attributes", None), "_dict", None)
    if type(inner) is dict:
        return inner
    return _plain(span.attributes)


def _first(attributes: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for k in keys:
        v = attributes.get(k)
        if v not in (None, ""):
            return v
    return None


@attrs.define
class Conn:
    """What user space knows of one connection (by the kernel's conn_id)."""

    conn_id: int
    role: Role
    peer_address: Optional[str]
    peer_port: int  # the peer's actual port
    port: int  # client: the peer's (service) port; server: our listening port
    opened_ns: int = 0  # SYN sent (client) / received (server), CLOCK_MONOTONIC; 0 unknown
    handshake_s: Optional[float] = None
    established: bool = False
    adopted: bool = False
    gone_ns: Optional[int] = None
    srtt_s: Optional[float] = None
    spans: int = 0  # server: spans already enriched with it (keep-alive reuse)
    # (ts_ns, kind, direction, count), at most EVENTS_PER_CONNECTION: a deque from the first
    # event on (most connections have none, and a deque per connection was a quarter of the
    # reader's time under churn)
    events: Sequence[Tuple[int, str, Optional[str], int]] = ()


@attrs.frozen
class PeerSpec:
    address: Optional[str]  # an IP literal or a hostname
    port: Optional[int]
    local_port: Optional[int] = None  # server spans

    @property
    def is_ip(self) -> bool:
        return self.address is not None and _ip(self.address) is not None


def peer_of(kind: Optional[trace.SpanKind], attributes: Mapping[str, Any]) -> Optional[PeerSpec]:
    """The peer a span names, by the semantic conventions its instrumentation follows."""
    if kind is trace.SpanKind.SERVER:
        address = _first(attributes, _SERVER_PEER_ADDRESS)
        port = _port(_first(attributes, _SERVER_PEER_PORT))
        local = _port(_first(attributes, _SERVER_LOCAL_PORT))
        if address is None and port is None:
            return None
        return PeerSpec(_ip(address) or None, port, local)
    address = _first(attributes, _CLIENT_PEER_ADDRESS)
    port = _port(_first(attributes, _CLIENT_PEER_PORT))
    if address is None and port is None:
        url = _first(attributes, _URL)
        if not isinstance(url, str):
            return None
        try:  # e.g. httpx's client spans carry only the URL
            parts = urllib.parse.urlsplit(url)
            address, port = parts.hostname, parts.port or _DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            return None
        if address is None:
            return None
    if not isinstance(address, str):
        address = None
    return PeerSpec(_ip(address) or address, port)


class ConnTable:
    """Connections of this process and their recent kernel events (thread-safe)."""

    def __init__(self, capacity: int) -> None:
        self._lock = threading.Lock()
        self._conns: collections.OrderedDict[int, Conn] = collections.OrderedDict()
        self._capacity = capacity
        self.evicted = 0

    def add(self, event: FlowEvent) -> None:
        if event.conn_id == 0 or event.kind not in CONN_EVENT_KINDS:
            return
        self.add_record((event.kind, event.conn_id, event.key, event.peer_port, event.ts_ns, event.duration_s,
                         event.srtt_s, event.direction, event.count, event.adopted, event.tid, False))

    def add_record(self, record: ConnRecord) -> None:
        """:meth:`add` for a span record decoded as a tuple (the conn_events ring's hot path)."""
        kind, conn_id, key, peer_port, ts_ns, duration_s, srtt_s, direction, count, adopted, _, _ = record
        with self._lock:
            conn = self._conns.get(conn_id)
            if conn is None:
                conn = Conn(
                    conn_id=conn_id, role=key.role, peer_address=key.address,
                    peer_port=peer_port, port=key.port, opened_ns=ts_ns,
                )
                self._conns[conn_id] = conn
                self._trim()
            if srtt_s is not None:
                conn.srtt_s = srtt_s
            if kind == "conn":
                conn.established = True
                conn.adopted = adopted
                if duration_s > 0:
                    conn.handshake_s = duration_s
                    conn.opened_ns = ts_ns - int(duration_s * 1e9)
                elif not adopted:
                    conn.opened_ns = ts_ns
                else:
                    conn.opened_ns = 0  # opened before instrument(): some time before now
            elif kind == "gone":
                conn.gone_ns = ts_ns
            else:
                events = conn.events
                if not isinstance(events, collections.deque):
                    events = conn.events = collections.deque(maxlen=EVENTS_PER_CONNECTION)
                events.append((ts_ns, kind, direction, count))

    def _trim(self) -> None:
        while len(self._conns) > self._capacity:
            # the oldest closed connection first, else the oldest
            victim = next((cid for cid, c in self._conns.items() if c.gone_ns is not None), None)
            if victim is None:
                victim = next(iter(self._conns))
            del self._conns[victim]
            self.evicted += 1

    def prune(self, now_ns: int) -> None:
        with self._lock:
            stale = [cid for cid, c in self._conns.items()
                     if c.gone_ns is not None and now_ns - c.gone_ns > GONE_RETENTION_NS]
            for cid in stale:
                del self._conns[cid]

    def get(self, conn_id: int) -> Optional[Conn]:
        with self._lock:
            return self._conns.get(conn_id)

    def open_during(self, start_ns: int, end_ns: int) -> List[Conn]:
        with self._lock:
            return [c for c in self._conns.values()
                    if c.opened_ns <= end_ns and (c.gone_ns is None or c.gone_ns >= start_ns)]

    def __len__(self) -> int:
        return len(self._conns)


@attrs.define
class _Started:
    span_id: int
    trace_id: int
    sampled: bool
    start_ns: int  # CLOCK_MONOTONIC
    peer: Optional[PeerSpec] = None  # the peer it names at start
    end_ns: Optional[int] = None


def _names_peer(spec: Optional[PeerSpec], key: FlowKey) -> bool:
    """Whether a client span's peer could be the connection of ``key``."""
    if spec is None or key.role is not Role.CLIENT:
        return False
    if spec.port is not None and spec.port != key.port:
        return False
    ip = _ip(spec.address) if spec.address else None
    return ip is None or ip == key.address


class SpanRegistry:
    """Which span was current on which thread when (for exemplars and span threads).

    ``gate``, if given, is told whether any span is open: with True as the first one starts,
    with False as the last one ends (under the registry's lock, so in that order).
    """

    def __init__(self, gate: Optional[Callable[[bool], None]] = None) -> None:
        self._lock = threading.Lock()
        self._by_thread: collections.OrderedDict[int, Deque[_Started]] = collections.OrderedDict()
        self._open: Dict[int, Tuple[int, _Started]] = {}  # span_id -> (tid, entry)
        self._gate = gate
        # every span started and not ended (_open forgets the oldest of a busy thread's)
        self._live: Set[int] = set()
        if gate is not None:
            gate(False)

    def started(self, tid: int, span_id: int, trace_id: int, sampled: bool, start_ns: int,
                peer: Optional[PeerSpec] = None) -> None:
        entry = _Started(span_id, trace_id, sampled, start_ns, peer)
        with self._lock:
            gate = self._gate
            if gate is not None:
                if not self._live:
                    gate(True)
                self._live.add(span_id)
                if len(self._live) > LIVE_SPANS_MAX:  # spans that never end: stop telling
                    self._gate = None
                    self._live.clear()
            spans = self._by_thread.get(tid)
            if spans is None:
                spans = self._by_thread[tid] = collections.deque(maxlen=SPANS_PER_THREAD)
                while len(self._by_thread) > 4096:
                    self._by_thread.popitem(last=False)
            else:
                self._by_thread.move_to_end(tid)
            if len(spans) == spans.maxlen:
                self._open.pop(spans[0].span_id, None)
            spans.append(entry)
            self._open[span_id] = (tid, entry)

    def ended(self, span_id: int, end_ns: int) -> Optional[Tuple[int, int]]:
        """Mark a span ended; its (thread, start) if it was seen starting."""
        with self._lock:
            found = self._open.pop(span_id, None)
            if self._gate is not None and span_id in self._live:
                self._live.discard(span_id)
                if not self._live:
                    self._gate(False)
        if found is None:
            return None
        tid, entry = found
        entry.end_ns = end_ns
        return tid, entry.start_ns

    def current(self, tid: int, ts_ns: int, key: Optional[FlowKey] = None) -> Optional[_Started]:
        """The innermost span on thread ``tid`` at ``ts_ns``; of several (asyncio), the
        latest started that names ``key``'s peer, if one does."""
        fallback = None
        with self._lock:
            spans = self._by_thread.get(tid)
            if not spans:
                return None
            for entry in reversed(spans):
                if entry.start_ns <= ts_ns and (entry.end_ns is None or ts_ns <= entry.end_ns):
                    if key is None or _names_peer(entry.peer, key):
                        return entry
                    if fallback is None:
                        fallback = entry
        return fallback

    def exemplar_context(self, tid: int, ts_ns: int, key: Optional[FlowKey] = None) -> Optional[Context]:
        """A context whose current span is the sampled span on ``tid`` at ``ts_ns``."""
        if not tid:
            return None
        entry = self.current(tid, ts_ns, key)
        if entry is None or not entry.sampled:
            return None
        ctx = trace.SpanContext(entry.trace_id, entry.span_id, is_remote=False,
                                trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
        return trace.set_span_in_context(trace.NonRecordingSpan(ctx))


class ConnectionSource(Protocol):
    """What the enricher needs from the kernel side (KernelSource implements it)."""

    def drain_conn_events(self) -> None:
        """Deliver every pending span-enrichment record now."""

    def thread_connections(self, tid: int) -> List[Tuple[int, int, int]]:
        """(conn_id, last use CLOCK_MONOTONIC ns, srtt_us) of the connections ``tid`` used lately."""


@attrs.frozen
class Enrichment:
    attributes: Dict[str, Any]
    events: List[Tuple[str, int, Dict[str, Any]]]  # (name, CLOCK_MONOTONIC ns, attributes)
    dropped: int


class Enricher:
    """Computes a finished span's TCP attributes and events."""

    def __init__(self, source: ConnectionSource, table: ConnTable, registry: SpanRegistry,
                 max_events: int, handshake_threshold: float, rtt_threshold: float) -> None:
        self._source = source
        self._table = table
        self._registry = registry
        self._max_events = max_events
        self._handshake_threshold = handshake_threshold
        self._rtt_threshold = rtt_threshold
        self._names_lock = threading.Lock()
        # hostname -> the peer addresses this process actually connected to for it
        self._names: collections.OrderedDict[str, Set[str]] = collections.OrderedDict()

    # -- matching -------------------------------------------------------------------

    def _learned(self, host: str) -> Optional[Set[str]]:
        with self._names_lock:
            return self._names.get(host.lower())

    def _learn(self, host: str, addresses: Iterable[str]) -> None:
        with self._names_lock:
            known = self._names.setdefault(host.lower(), set())
            known.update(addresses)
            self._names.move_to_end(host.lower())
            while len(self._names) > 1024:
                self._names.popitem(last=False)

    @staticmethod
    def _port_ok(conn: Conn, spec: PeerSpec) -> bool:
        if conn.role is Role.SERVER:
            return (spec.port is None or conn.peer_port == spec.port) and (
                spec.local_port is None or conn.port == spec.local_port)
        return spec.port is None or conn.port == spec.port

    def _match(self, candidates: List[Conn], spec: PeerSpec, from_thread: bool) -> List[Conn]:
        by_port = [c for c in candidates if self._port_ok(c, spec)]
        if spec.address is None:
            return by_port if spec.port is not None or spec.local_port is not None else candidates
        ip = _ip(spec.address)
        if ip is not None:
            return [c for c in by_port if c.peer_address == ip]
        known = self._learned(spec.address)
        if known:
            hits = [c for c in by_port if c.peer_address in known]
            if hits or not from_thread:
                return hits
        elif not from_thread:
            return []
        # A hostname not (or not yet) seen: this thread's connections to that port
        # during the span are the ones the name resolved to.
        addresses = {c.peer_address for c in by_port if c.peer_address}
        if by_port and len(addresses) == 1:
            self._learn(spec.address, addresses)
        return by_port

    def connections(self, tids: Iterable[int], start_ns: int, end_ns: int, spec: Optional[PeerSpec],
                    role: Optional[Role] = None) -> Tuple[List[Conn], Dict[int, Tuple[int, float]]]:
        """The span's connections, and per conn_id (last use, srtt) on the span's thread."""
        used: Dict[int, Tuple[int, float]] = {}
        for tid in tids:
            for conn_id, last_ns, srtt_us in self._source.thread_connections(tid):
                if conn_id and last_ns >= start_ns:
                    prev = used.get(conn_id)
                    if prev is None or last_ns > prev[0]:
                        used[conn_id] = (last_ns, srtt_us / 1e6)
        thread_conns = [c for c in (self._table.get(cid) for cid in used) if c is not None]
        if spec is None:
            return thread_conns, used
        # A span that names a peer is about connections of its own side: a SERVER span
        # about accepted ones, any other about the ones this process opened.
        thread_conns = [c for c in thread_conns if c.role is role]
        matched = self._match(thread_conns, spec, from_thread=True)
        if matched:
            return matched, used
        # The I/O ran on another thread: the connections to the peer open during the span.
        others = [c for c in self._table.open_during(start_ns, end_ns) if c.role is role]
        return self._match(others, spec, from_thread=False), used

    # -- attributes -------------------------------------------------------------------

    def enrich(self, tids: Iterable[int], start_ns: int, end_ns: int,
               spec: Optional[PeerSpec], is_server: bool) -> Optional[Enrichment]:
        self._source.drain_conn_events()
        conns, used = self.connections(tids, start_ns, end_ns, spec, Role.SERVER if is_server else Role.CLIENT)
        if not conns:
            return None
        retransmits = resets = zero_windows = 0
        events: List[Tuple[str, int, Dict[str, Any]]] = []
        for conn in conns:
            peer = {"network.peer.address": conn.peer_address or "",
                    "network.peer.port": conn.port if conn.role is Role.CLIENT else conn.peer_port}
            for ts, kind, direction, count in list(conn.events):
                if not start_ns <= ts <= end_ns:
                    continue
                event_attributes = dict(peer)
                if kind == "retransmit":
                    retransmits += count
                    event_attributes["ebpf_flows.tcp.segments"] = count
                elif kind == "reset":
                    resets += count
                    event_attributes["network.io.direction"] = direction or ""
                else:
                    zero_windows += count
                    event_attributes["network.io.direction"] = direction or ""
                events.append((EVENT_NAMES[kind], ts, event_attributes))
        events.sort(key=lambda e: e[1])
        dropped = max(0, len(events) - self._max_events)
        events = events[: self._max_events]

        # The span's connection for RTT: the one its thread used last.
        latest = max(conns, key=lambda c: used.get(c.conn_id, (0, 0.0))[0])
        rtt = used.get(latest.conn_id, (0, 0.0))[1] or latest.srtt_s
        attributes: Dict[str, Any] = {ATTR_RETRANSMITS: retransmits}
        if rtt:
            attributes[ATTR_RTT] = rtt
        handshake: Optional[float] = None
        if is_server:
            first_use = [c for c in conns if c.role is Role.SERVER and c.spans == 0]
            if first_use and first_use[0].handshake_s is not None:
                handshake = first_use[0].handshake_s
            attributes[ATTR_REUSED] = not first_use
            for c in conns:
                c.spans += 1
        else:
            opened = [c for c in conns if not c.adopted and c.opened_ns >= start_ns]
            for c in opened:
                if c.handshake_s is not None:
                    handshake = c.handshake_s
                    break
            attributes[ATTR_REUSED] = any(c.adopted or c.opened_ns < start_ns for c in conns)
        if handshake is not None:
            attributes[ATTR_HANDSHAKE] = handshake
        attributes[ATTR_DEGRADED] = bool(
            retransmits or resets or zero_windows
            or (handshake is not None and handshake >= self._handshake_threshold)
            or (rtt is not None and rtt >= self._rtt_threshold)
        )
        if dropped:
            attributes[ATTR_EVENTS_DROPPED] = dropped
        return Enrichment(attributes, events, dropped)


@functools.cache
def _sdk_types() -> Tuple[Any, Any, Any]:
    """The SDK's Event and BoundedList, and the API's BoundedAttributes, imported once."""
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk.trace import Event
    from opentelemetry.sdk.util import BoundedList

    return Event, BoundedList, BoundedAttributes


@functools.cache
def _copies_by_dict(cls: Any) -> bool:
    """Whether copy.copy() of a ``cls`` is a new object with the same ``__dict__`` (the SDK's spans)."""
    plain: Any = object
    return (getattr(cls, "__copy__", None) is None
            and getattr(cls, "__reduce_ex__", None) is plain.__reduce_ex__
            and getattr(cls, "__reduce__", None) is plain.__reduce__
            and "__dict__" in dir(cls)
            and all(not c.__dict__.get("__slots__") for c in cls.__mro__))


#: Attribute value types the SDK's cleaning keeps unchanged (what span enrichment adds).
_CLEAN = (bool, int, float)


def _merged_attributes(old: Any, ours: Dict[str, Any], bounded: Any) -> Any:
    """The span's attributes with ours added, as the SDK's limits would keep them.

    The span's own values were cleaned when they were set: copied as they are
    (cleaning them again was a fifth of ``span.end()``). Ours are bools, ints and
    floats, which cleaning keeps as they are: each is set as the SDK's own setter
    does once a value is clean (the oldest dropped and counted when full), on the
    new object before anyone else can see it.
    """
    maxlen = getattr(old, "maxlen", None)
    try:
        if type(old) is bounded and type(getattr(old, "_dict", None)) is dict and hasattr(old, "_set_items"):
            new: Any = bounded(maxlen=maxlen, immutable=False, max_value_len=old.max_value_len)
            new._dict = dict(old._dict)
            new.dropped = old.dropped
            set_clean = getattr(new, "_setitem_locked", None)
            if set_clean is not None and maxlen != 0 and all(type(v) in _CLEAN for v in ours.values()):
                for key, value in ours.items():
                    set_clean(key, value)
            else:
                new._set_items(ours)
            new._immutable = True
            return new
        merged: Dict[str, Any] = dict(old or {})
        merged.update(ours)
        new = bounded(maxlen=maxlen, attributes=merged, immutable=True)
        new.dropped += getattr(old, "dropped", 0)
        return new
    except Exception:  # pragma: no cover - an SDK whose BoundedAttributes differs
        merged = dict(old or {})
        merged.update(ours)
        return merged


def enriched_copy(span: Any, enrichment: Enrichment, mono_to_wall_ns: int) -> Any:
    """A copy of the finished ``ReadableSpan`` with the enrichment added."""
    Event, BoundedList, BoundedAttributes = _sdk_types()  # noqa: N806

    cls: Any = type(span)
    if _copies_by_dict(cls):
        out = object.__new__(cls)  # what copy.copy() does for such an object, without its dispatch
        out.__dict__.update(span.__dict__)
    else:
        out = copy.copy(span)
    out._attributes = _merged_attributes(span._attributes, enrichment.attributes, BoundedAttributes)

    old_events = span._events
    maxlen = getattr(old_events, "maxlen", None)
    events: Any = BoundedList(maxlen) if maxlen is not None else []
    for e in old_events or ():
        events.append(e)
    for name, ts, attributes in enrichment.events:
        events.append(Event(name, attributes=attributes, timestamp=ts + mono_to_wall_ns))
    if isinstance(events, BoundedList) and isinstance(old_events, BoundedList):
        events.dropped += old_events.dropped
    out._events = events
    return out


class SpanEnrichment:
    """The span side of one pipeline: conn records in, enriched spans out."""

    def __init__(self, source: ConnectionSource, capacity: int, max_events: int,
                 handshake_threshold: float, rtt_threshold: float) -> None:
        self.pid = os.getpid()
        self.table = ConnTable(capacity)
        # the kernel makes span records only while a span is open, if it can be told
        self.registry = SpanRegistry(getattr(source, "spans_open", None))
        self.enricher = Enricher(source, self.table, self.registry, max_events,
                                 handshake_threshold, rtt_threshold)
        self.enabled = True
        self._errors = 0

    def on_conn_event(self, event: FlowEvent) -> None:
        self.table.add(event)

    def prune(self) -> None:
        self.table.prune(time.monotonic_ns())

    # -- processor hooks ---------------------------------------------------------------

    def on_start(self, span: Any) -> None:
        if not self.enabled or os.getpid() != self.pid:
            return
        ctx = span.get_span_context()
        if ctx is None:
            return
        self.registry.started(threading.get_native_id(), ctx.span_id, ctx.trace_id,
                              ctx.trace_flags.sampled, time.monotonic_ns(),
                              peer_of(span.kind, _attributes_of(span)))

    def on_end(self, span: Any) -> Any:
        if not self.enabled or os.getpid() != self.pid:
            return span
        try:
            return self._on_end(span)
        except Exception:
            self._errors += 1
            if self._errors == 1:
                _log.warning("otel-ebpf-flows: enriching a span failed; spans are exported "
                             "unenriched where this recurs", exc_info=True)
            return span

    def _on_end(self, span: Any) -> Any:
        ctx = span.get_span_context()
        if ctx is None or span.start_time is None or span.end_time is None:
            return span
        now_mono = time.monotonic_ns()
        offset = time.time_ns() - now_mono  # wall clock = monotonic + offset
        end_ns = span.end_time - offset
        tids = {threading.get_native_id()}
        seen = self.registry.ended(ctx.span_id, end_ns)
        if seen is not None:
            tids.add(seen[0])
            start_ns = seen[1]
        else:
            start_ns = span.start_time - offset
        if end_ns > now_mono:  # an end time in the future: the kernel has not got there
            end_ns = now_mono
        spec = peer_of(span.kind, _attributes_of(span))
        enrichment = self.enricher.enrich(tids, start_ns, end_ns, spec,
                                          span.kind is trace.SpanKind.SERVER)
        if enrichment is None:
            return span
        return enriched_copy(span, enrichment, offset)


class ProcessorHook:
    """Wraps ``on_start``/``on_end`` of one SDK span processor object, in place.

    The wrappers are instance attributes, so every span of every tracer that
    calls this processor goes through them; uninstalling removes them. Which
    :class:`SpanEnrichment` they feed can be swapped (after fork, re-instrument).
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.target: Optional[SpanEnrichment] = None
        original_start: Callable[..., None] = processor.on_start
        original_end: Callable[[Any], None] = processor.on_end

        def on_start(span: Any, parent_context: Optional[Context] = None) -> None:
            original_start(span, parent_context=parent_context)
            target = self.target
            if target is not None:
                try:
                    target.on_start(span)
                except Exception:  # never raise into the application
                    pass

        def on_end(span: Any) -> None:
            target = self.target
            if target is not None:
                span = target.on_end(span)
            original_end(span)

        self._on_start = on_start
        self._on_end = on_end
        processor.on_start = on_start
        processor.on_end = on_end

    def installed(self) -> bool:
        d = getattr(self.processor, "__dict__", {})
        return d.get("on_start") is self._on_start and d.get("on_end") is self._on_end

    def uninstall(self) -> None:
        self.target = None
        d = getattr(self.processor, "__dict__", {})
        # Someone wrapped ours since: leave theirs in place, ours passes through.
        if d.get("on_end") is self._on_end:
            del self.processor.on_end
        if d.get("on_start") is self._on_start:
            del self.processor.on_start


_hooks_lock = threading.Lock()
_hooks: Dict[int, ProcessorHook] = {}


def active_processor(provider: Any) -> Optional[Any]:
    """The span processor every span of an SDK ``TracerProvider`` calls, or None."""
    processor = getattr(provider, "_active_span_processor", None)
    if processor is None or not callable(getattr(processor, "on_end", None)):
        return None
    return processor


def attach(provider: Any, target: SpanEnrichment) -> bool:
    """Route ``provider``'s finished spans through ``target``; False if it is not an SDK provider."""
    processor = active_processor(provider)
    if processor is None:
        return False
    with _hooks_lock:
        hook = _hooks.get(id(processor))
        if hook is None or hook.processor is not processor or not hook.installed():
            hook = ProcessorHook(processor)
            _hooks[id(processor)] = hook
        hook.target = target
    return True


def after_fork_in_child() -> None:
    """A lock another thread held at fork() is held forever in the child: start afresh."""
    global _hooks_lock
    _hooks_lock = threading.Lock()


def detach(target: SpanEnrichment) -> None:
    """Stop routing spans to ``target`` and unwrap every processor it was on."""
    with _hooks_lock:
        for key, hook in list(_hooks.items()):
            if hook.target is target or hook.target is None:
                hook.uninstall()
                del _hooks[key]
