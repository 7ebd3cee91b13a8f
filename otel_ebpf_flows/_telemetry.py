"""How kernel data becomes OpenTelemetry metrics.

:class:`Aggregator` turns a :class:`~otel_ebpf_flows._source.Source`'s cumulative
per-peer counters into monotonic per-series totals (a counter never goes down,
whatever the kernel's maps do) and applies the per-metric peer cap, folding
peers past it into ``network.peer.address=_OTHER``. :class:`Instruments` owns the
contract's instruments on the application's meter; observable callbacks are
short generators over the aggregator's last snapshot, and histograms are
recorded by the one reader thread of :class:`Pipeline`.
"""

from __future__ import annotations

import collections
import logging
import operator
import os
import sys
import threading
import time
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Set,
    Tuple,
    runtime_checkable,
)

from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from . import _libbpf
from ._histogram import HistogramRecorder
from ._records import (
    HIST_DURATION,
    HIST_HANDSHAKE,
    HIST_MODE_CLOSE,
    HIST_MODE_HANDSHAKE,
    HIST_RTT,
    ConnRecord,
    HistDelta,
    MetricRecord,
)
from ._source import CLOSE_REASONS, CONN_EVENT_KINDS, CONNECT_ERRORS, Counters, FlowEvent, FlowKey, Role, Snapshot, Source
from ._spans import SpanEnrichment, detach

_log = logging.getLogger("otel_ebpf_flows")

OTHER = "_OTHER"

# Metric names (the public contract).
ATTEMPTS = "ebpf_flows.tcp.connection.attempts"
HANDSHAKE = "ebpf_flows.tcp.handshake.duration"
RETRANSMITS = "ebpf_flows.tcp.retransmits"
RTT = "ebpf_flows.tcp.rtt"
IO = "ebpf_flows.tcp.io"
RESETS = "ebpf_flows.tcp.resets"
CLOSES = "ebpf_flows.tcp.connection.closes"
DURATION = "ebpf_flows.tcp.connection.duration"
ACTIVE = "ebpf_flows.tcp.connections.active"
ZERO_WINDOW = "ebpf_flows.tcp.zero_window.events"
WSCALE_DISABLED = "ebpf_flows.tcp.window_scaling.disabled"
LISTEN_OVERFLOWS = "ebpf_flows.tcp.listen.overflows"
EVENTS_LOST = "ebpf_flows.probe.events.lost"
MAP_EVICTIONS = "ebpf_flows.probe.map.evictions"

# Attribute keys.
NETWORK_TRANSPORT = "network.transport"
NETWORK_TYPE = "network.type"
PEER_ADDRESS = "network.peer.address"
PEER_PORT = "network.peer.port"
LOCAL_PORT = "network.local.port"
ROLE = "ebpf_flows.tcp.role"
ERROR_TYPE = "error.type"
DIRECTION = "network.io.direction"
CLOSE_REASON = "ebpf_flows.tcp.close.reason"
PROBE_NAME = "ebpf_flows.probe.name"

# Bucket advice: sub-millisecond for loopback/datacenter, and brackets around the
# 1 s / 3 s / 7 s SYN retransmission marks.
HANDSHAKE_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 0.9, 1.1, 2.0, 2.9, 3.1, 5.0, 6.9, 7.1, 15.0, 31.0,
)
RTT_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)
DURATION_BUCKETS = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)

# counter metric -> [(counter field, extra attributes)]; a dict field is split by its keys
_FIELDS: Dict[str, List[Tuple[str, Tuple[Tuple[str, str], ...]]]] = {
    ATTEMPTS: [("attempts_ok", ())]
    + [(f"attempts_failed.{e}", ((ERROR_TYPE, e),)) for e in CONNECT_ERRORS],
    RETRANSMITS: [("retransmits", ())],
    IO: [("bytes_transmitted", ((DIRECTION, "transmit"),)), ("bytes_received", ((DIRECTION, "receive"),))],
    RESETS: [("resets_sent", ((DIRECTION, "transmit"),)), ("resets_received", ((DIRECTION, "receive"),))],
    CLOSES: [(f"closes.{r}", ((CLOSE_REASON, r),)) for r in CLOSE_REASONS],
    ZERO_WINDOW: [
        ("zero_window_receive", ((DIRECTION, "receive"),)),
        ("zero_window_transmit", ((DIRECTION, "transmit"),)),
    ],
    WSCALE_DISABLED: [("window_scaling_disabled", ())],
    LISTEN_OVERFLOWS: [("listen_overflows", ())],
}

Attrs = FrozenSet[Tuple[str, Any]]
#: Histogram attribute sets kept built (3 histograms x the kernel's flow keys).
SERIES_CACHE_SIZE = 16384


# Every counter field of _FIELDS as one flat vector: the plain fields, then the
# attempts_failed and the closes entries. _PATHS[i] = (metric, index in _FIELDS[metric]).
_PLAIN_FIELDS = [(metric, j, path) for metric, fields in _FIELDS.items()
                 for j, (path, _) in enumerate(fields) if "." not in path]
_FAILED_FIELDS = [(ATTEMPTS, j, path) for j, (path, _) in enumerate(_FIELDS[ATTEMPTS]) if "." in path]
_CLOSES_FIELDS = [(CLOSES, j, path) for j, (path, _) in enumerate(_FIELDS[CLOSES])]
_PATHS: List[Tuple[str, int]] = [(m, j) for m, j, _ in _PLAIN_FIELDS + _FAILED_FIELDS + _CLOSES_FIELDS]
_get_plain = operator.attrgetter(*(path for _, _, path in _PLAIN_FIELDS))
_get_failed = operator.itemgetter(*(path.partition(".")[2] for _, _, path in _FAILED_FIELDS))
_get_closes = operator.itemgetter(*(path.partition(".")[2] for _, _, path in _CLOSES_FIELDS))
#: Changed flow keys the aggregator takes between two GIL hand-overs (a few µs each).
KEYS_PER_YIELD = 128
#: Points a metric callback hands the SDK between two GIL hand-overs.
ROWS_PER_YIELD = 64


def _values(counters: Counters) -> Tuple[int, ...]:
    """Every counter of _PATHS, in its order."""
    return (_get_plain(counters) + _get_failed(counters.attempts_failed)  # type: ignore[no-any-return]
            + _get_closes(counters.closes))


class PeerTable:
    """The first ``cap`` distinct peers of one metric keep their address."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._admitted: Set[str] = set()
        self._lock = threading.Lock()

    def address(self, address: str) -> str:
        with self._lock:
            if address in self._admitted:
                return address
            if len(self._admitted) < self._cap:
                self._admitted.add(address)
                return address
            return OTHER


def series_attributes(key: FlowKey, address: str) -> Dict[str, Any]:
    """The contract's common attributes for a flow key whose address was capped to ``address``."""
    attrs: Dict[str, Any] = {NETWORK_TRANSPORT: "tcp", ROLE: key.role.value, PEER_ADDRESS: address}
    if key.family:
        attrs[NETWORK_TYPE] = key.family
    if key.address is None:  # the kernel's overflow series: no port is known
        return attrs
    if key.role is Role.CLIENT:
        attrs[PEER_PORT] = key.port
    else:
        attrs[LOCAL_PORT] = key.port
    return attrs


class Aggregator:
    """Monotonic per-series totals from cumulative per-key kernel counters."""

    def __init__(self, max_peers: int, marker: Optional[Mapping[str, str]] = None) -> None:
        # attributes on every point (sock_diag mode: ebpf_flows.source=sock_diag)
        self._marker: Dict[str, str] = dict(marker or {})
        self._peers: Dict[str, PeerTable] = {}
        self._max_peers = max_peers
        # key -> (the last Counters taken, their _values, the series each _PATHS entry's
        # growth goes to (then the ACTIVE series), built on first growth)
        self._last: Dict[FlowKey, Tuple[Counters, Tuple[int, ...], List[Optional[Attrs]]]] = {}
        self._totals: Dict[str, Dict[Attrs, int]] = {name: {} for name in _FIELDS}
        self._active: Dict[Attrs, int] = {}
        self._probes: Dict[str, Dict[str, int]] = {EVENTS_LOST: {}, MAP_EVICTIONS: {}}
        self._lock = threading.Lock()
        # (metric, key) -> its attributes, for histogram records: a peer admitted
        # stays admitted and one folded into _OTHER stays folded, so they never change.
        self._series: Dict[Tuple[str, FlowKey], Dict[str, Any]] = {}

    def peers(self, metric: str) -> PeerTable:
        table = self._peers.get(metric)
        if table is None:
            table = self._peers.setdefault(metric, PeerTable(self._max_peers))
        return table

    def attributes(self, metric: str, key: FlowKey) -> Dict[str, Any]:
        if metric == LISTEN_OVERFLOWS:
            return {LOCAL_PORT: key.port, **self._marker}
        address = OTHER if key.address is None else self.peers(metric).address(key.address)
        return {**series_attributes(key, address), **self._marker}

    def series(self, metric: str, key: FlowKey) -> Dict[str, Any]:
        """:meth:`attributes`, built once per (metric, key): callers must not change it."""
        attrs = self._series.get((metric, key))
        if attrs is None:
            if len(self._series) >= SERIES_CACHE_SIZE:
                self._series.clear()
            attrs = self._series[(metric, key)] = self.attributes(metric, key)
        return attrs

    def update(self, snapshot: Snapshot) -> None:
        """Take a source's counters: only keys whose Counters object changed, and of those only
        the fields whose value changed, cost anything; the GIL is given up every
        ``KEYS_PER_YIELD`` changed keys (a collection may run this with thousands)."""
        with self._lock:
            changed = 0
            for key, now in snapshot.counters.items():
                last = self._last.get(key)
                if last is not None and last[0] is now:  # the source handed the same object back
                    continue
                changed += 1
                if not changed % KEYS_PER_YIELD:
                    _libbpf.yield_gil()  # let the application's threads have the GIL
                vector = _values(now)
                if last is None:
                    before: Optional[Tuple[int, ...]] = None
                    series: List[Optional[Attrs]] = [None] * (len(_PATHS) + 1)
                else:
                    before, series = last[1], last[2]
                self._last[key] = (now, vector, series)
                listener = key.address == ""
                for i, value in enumerate(vector):
                    prev = None if before is None else before[i]
                    if prev == value:
                        continue
                    metric, j = _PATHS[i]
                    if listener != (metric == LISTEN_OVERFLOWS):
                        continue
                    delta = _delta(value, prev)
                    if delta:
                        attrs = series[i]
                        if attrs is None:  # first growth: the peer is admitted under the cap, or folded
                            base = self.attributes(metric, key)
                            base.update(_FIELDS[metric][j][1])
                            attrs = series[i] = frozenset(base.items())
                        totals = self._totals[metric]
                        totals[attrs] = totals.get(attrs, 0) + delta
                if not listener:
                    old = None if last is None else last[0]
                    d_est = _delta(now.established, None if old is None else old.established)
                    d_closed = _delta(now.closed, None if old is None else old.closed)
                    if d_est or d_closed:
                        attrs = series[-1]
                        if attrs is None:
                            attrs = series[-1] = frozenset(self.attributes(ACTIVE, key).items())
                        self._active[attrs] = self._active.get(attrs, 0) + d_est - d_closed
            for metric, values in ((EVENTS_LOST, snapshot.probes.events_lost),
                                   (MAP_EVICTIONS, snapshot.probes.map_evictions)):
                seen = self._probes[metric]
                for name, value in values.items():
                    seen[name] = max(seen.get(name, 0), int(value))

    def all_observations(self) -> Dict[str, List[Tuple[int, Dict[str, Any]]]]:
        """Every metric's rows, from one consistent state."""
        with self._lock:
            return {m: self._rows(m) for m in (*_FIELDS, ACTIVE, EVENTS_LOST, MAP_EVICTIONS)}

    def _rows(self, metric: str) -> List[Tuple[int, Dict[str, Any]]]:
        # called with self._lock held
        if metric == ACTIVE:
            return [(v, dict(s)) for s, v in self._active.items()]
        if metric in self._probes:
            return [(v, {PROBE_NAME: n, **self._marker}) for n, v in sorted(self._probes[metric].items())]
        return [(v, dict(s)) for s, v in self._totals[metric].items()]


def _delta(now: int, before: Optional[int]) -> int:
    """Growth of a kernel counter; a counter that restarted lower grew by its value."""
    if before is None or now < before:
        return now
    return now - before


class Instruments:
    """The contract's instruments on one meter, created once per meter and reused."""

    def __init__(self, meter: Meter, current: Callable[[], Optional[Pipeline]]) -> None:
        self._current = current
        # the reader's points skip most of Histogram.record()'s per-point work where the SDK allows
        self.handshake = HistogramRecorder(meter.create_histogram(
            HANDSHAKE, unit="s",
            description="TCP connection establishment time: SYN sent -> ESTABLISHED (client), "
            "SYN received -> ESTABLISHED (server)",
            explicit_bucket_boundaries_advisory=list(HANDSHAKE_BUCKETS),
        ), HANDSHAKE_BUCKETS)
        self.rtt = HistogramRecorder(meter.create_histogram(
            RTT, unit="s", description="Smoothed round-trip time of TCP connections",
            explicit_bucket_boundaries_advisory=list(RTT_BUCKETS),
        ), RTT_BUCKETS)
        self.duration = HistogramRecorder(meter.create_histogram(
            DURATION, unit="s", description="Lifetime of closed TCP connections (ESTABLISHED -> CLOSE)",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        ), DURATION_BUCKETS)
        # the kernel's histogram ids (tcp_flows.h enum hist_id) -> (recorder, metric)
        self._kernel_hists = {HIST_HANDSHAKE: (self.handshake, HANDSHAKE), HIST_DURATION: (self.duration, DURATION),
                              HIST_RTT: (self.rtt, RTT)}
        #: each kernel histogram's bucket bounds (see kernel_histograms)
        self.kernel_bounds = {hist: recorder.bounds for hist, (recorder, _) in self._kernel_hists.items()}
        self._approximated = False
        counters = [
            (ATTEMPTS, "{connection}", "TCP connection attempts (client) and completed handshakes (server)"),
            (RETRANSMITS, "{segment}", "TCP segments retransmitted, SYN and SYN-ACK included"),
            (IO, "By", "TCP payload bytes acknowledged by the peer (transmit) or received (receive)"),
            (RESETS, "{segment}", "TCP RST segments sent (transmit) and received (receive)"),
            (CLOSES, "{connection}", "Closed TCP connections by close reason"),
            (ZERO_WINDOW, "{event}", "TCP zero-window advertisements: by the peer (receive) or by us (transmit)"),
            (WSCALE_DISABLED, "{connection}", "Established TCP connections without window scaling"),
            (LISTEN_OVERFLOWS, "{connection}", "Connection requests dropped because a listen queue was full"),
            (EVENTS_LOST, "{event}", "Kernel events that could not be handed to user space"),
            (MAP_EVICTIONS, "{entry}", "Kernel map entries that could not be kept apart"),
        ]
        self._first = counters[0][0]  # its callback runs first in every collection
        for name, unit, description in counters:
            meter.create_observable_counter(name, [self._callback(name)], unit=unit, description=description)
        meter.create_observable_up_down_counter(
            ACTIVE, [self._callback(ACTIVE)], unit="{connection}", description="TCP connections established now"
        )

    def _callback(self, metric: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_options: CallbackOptions) -> Iterator[Observation]:
            pipeline = self._current()
            if pipeline is None:
                return
            try:
                rows = pipeline.observations(metric, first=metric == self._first)
            except Exception:  # a callback never raises into the SDK's export thread
                _log.debug("collecting %s failed", metric, exc_info=True)
                return
            for n, (value, attrs) in enumerate(rows, 1):
                yield Observation(value, attrs)
                if not n % ROWS_PER_YIELD:
                    # the SDK spends ~10 µs on each point, holding the GIL: let the
                    # application's threads have it now and then
                    _libbpf.yield_gil()

        return callback

    def kernel_histograms(self) -> int:
        """The ``HIST_MODE_*`` records the kernel may aggregate itself: those whose every
        histogram can take bucket counts in every reader (see HistogramRecorder.can_add_buckets)."""
        mode = 0
        if self.handshake.can_add_buckets():
            mode |= HIST_MODE_HANDSHAKE
        if self.duration.can_add_buckets() and self.rtt.can_add_buckets():
            mode |= HIST_MODE_CLOSE
        return mode

    def add_histograms(self, aggregator: Aggregator, deltas: Iterable[HistDelta]) -> None:
        """The kernel-aggregated histograms' growth into the SDK's aggregations."""
        for hist, key, counts, total, low, high in deltas:
            recorder, metric = self._kernel_hists[hist]
            attributes = aggregator.series(metric, key)
            try:
                if recorder.add_buckets(attributes, counts, total, low, high):
                    continue
            except Exception:  # from an aggregation: the counts may have reached some readers
                _log.warning("otel-ebpf-flows: %s: adding the kernel's bucket counts failed; recording "
                             "them as points", metric, exc_info=True)
            self._approximate(recorder, attributes, counts, low, high)

    def _approximate(self, recorder: HistogramRecorder, attributes: Dict[str, Any], counts: Sequence[int],
                     low: Optional[float], high: Optional[float]) -> None:
        """Bucket counts a reader can no longer take as such (one was added with other buckets
        since the kernel took them on): a point per count, in the middle of what is known of
        its bucket (the kernel switches to records at the reader's next sample)."""
        if not self._approximated:
            self._approximated = True
            _log.warning("otel-ebpf-flows: %s: a metric reader's aggregation changed; points the kernel "
                         "had aggregated are recorded at their buckets' middles (records from now on)",
                         getattr(recorder.instrument, "name", "?"))
        bounds = recorder.bounds
        for i, count in enumerate(counts):
            if not count:
                continue
            lower = bounds[i - 1] if i else 0.0
            upper = bounds[i] if i < len(bounds) else bounds[-1]
            if low is not None:
                lower = max(lower, low)
                upper = max(upper, low)
            if high is not None:
                upper = min(upper, high) if i < len(bounds) else high
                lower = min(lower, high)
            for _ in range(count):
                recorder.record((lower + upper) / 2, attributes)

    def handshake_exemplar(self, aggregator: Aggregator, value: float, key: FlowKey, context: Context,
                           when: int) -> None:
        """The exemplar of a handshake point the kernel aggregated (and the SDK has counted):
        ``value`` of ``key``'s series, recorded at ``when`` (ns since the epoch) during the span
        of ``context`` (the one that connected, found from the CONN span record)."""
        self.handshake.offer_exemplar(value, aggregator.series(HANDSHAKE, key), context, when)

    def record(self, aggregator: Aggregator, event: FlowEvent,
               exemplar: Callable[[int, int, FlowKey], Optional[Context]] = lambda tid, ts, key: None) -> None:
        """Record a record's histogram points; ``exemplar(tid, ts, key)`` names the span current then."""
        self.record_metric(aggregator, (event.kind, event.key, event.ts_ns, event.duration_s, event.srtt_s,
                                        event.tid), exemplar)

    def record_metric(self, aggregator: Aggregator, record: MetricRecord,
                      exemplar: Optional[Callable[[int, int, FlowKey], Optional[Context]]] = None) -> None:
        """:meth:`record` for a ``(kind, key, ts_ns, duration_s, srtt_s, tid)`` tuple."""
        kind, key, ts_ns, duration_s, srtt_s, tid = record
        if kind == "handshake":
            # the span that connected: current on the connecting thread at SYN time
            ctx = exemplar(tid, ts_ns - int(duration_s * 1e9), key) if exemplar is not None else None
            self.handshake.record(duration_s, aggregator.series(HANDSHAKE, key), ctx)
        elif kind == "close":
            self.duration.record(duration_s, aggregator.series(DURATION, key))
            if srtt_s is not None:
                self.rtt.record(srtt_s, aggregator.series(RTT, key))
        elif kind == "rtt" and srtt_s is not None:
            # the span current on the thread that last used the connection
            ctx = exemplar(tid, ts_ns, key) if exemplar is not None else None
            self.rtt.record(srtt_s, aggregator.series(RTT, key), ctx)


@runtime_checkable
class TakesMetricRecords(Protocol):
    """A source that can hand histogram records on as tuples (see KernelSource.on_metric)."""

    on_metric: Optional[Callable[[MetricRecord], None]]


@runtime_checkable
class TakesConnRecords(Protocol):
    """A source that can hand span records on as tuples (see KernelSource.on_conn)."""

    on_conn: Optional[Callable[[ConnRecord], None]]
    conn_exemplars: bool


@runtime_checkable
class ReadsNow(Protocol):
    """A source whose counters can be read cheaply from any thread (KernelSource).

    ``scan()`` is the periodic pass (the reader thread's; may take tens of ms, mostly
    without the GIL); ``read()`` the counters now, without one. A collection then
    reads instead of waiting for a pass.
    """

    def scan(self) -> None: ...

    def read(self) -> Snapshot: ...


@runtime_checkable
class AggregatesHistograms(Protocol):
    """A source that can aggregate histogram records itself (KernelSource: the hists map)."""

    def aggregate_histograms(self, mode: int, bounds: Mapping[int, Sequence[float]]) -> int: ...

    def read_histograms(self) -> List[HistDelta]: ...


def wake_fds_of(source: Any) -> List[int]:
    """The fds a source turns readable when it wants reading before the next poll
    (``wake_fds()``: KernelSource's rings); none for a source without."""
    wake_fds: Callable[[], List[int]] = getattr(source, "wake_fds", list)
    return list(wake_fds())


class _Waker:
    """A file descriptor that :meth:`wake` makes readable and :meth:`clear` not: an eventfd,
    or a pipe where Python has no ``os.eventfd`` (3.9). Once closed, :meth:`wake` writes
    nothing: the fd number may be the application's by then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        if hasattr(os, "eventfd"):
            self.fd = self._write_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            self.fd, self._write_fd = os.pipe()
            for fd in (self.fd, self._write_fd):
                os.set_blocking(fd, False)

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._write_fd, _ONE)
            except OSError:  # full: readable anyway
                pass

    def clear(self) -> None:
        try:
            os.read(self.fd, 4096)
        except OSError:  # not woken (EAGAIN)
            pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in {self.fd, self._write_fd}:
                try:
                    os.close(fd)
                except OSError:
                    pass


#: After the ring woke the reader, it is left out of the next wait for this long: a woken
#: ring stays readable while records keep coming, and the reader should read batches, not
#: spin on each record. Loss would need 3/4 of the ring filled in this time.
RING_REWAIT_S = 0.005

#: Handshake exemplars waiting for the next collection, at most.
EXEMPLARS_PENDING = 1024
_ONE = (1).to_bytes(8, sys.byteorder)  # an eventfd takes an 8-byte count


class Pipeline:
    """The reader thread: drains the source's events, samples it, feeds the aggregator."""

    FRESH_S = 0.2

    def __init__(self, source: Source, instruments: Instruments, max_peers: int,
                 poll_interval: float, sample_interval: float,
                 spans: Optional[SpanEnrichment] = None,
                 attach_spans: Optional[Callable[[], bool]] = None,
                 marker: Optional[Mapping[str, str]] = None) -> None:
        self.source = source
        #: the span side (None: span enrichment off)
        self.spans = spans
        # called by the reader until it returns True (a global tracer provider set late)
        self._attach_spans = attach_spans
        self.aggregator = Aggregator(max_peers, marker)
        self._instruments = instruments
        self._poll_interval = poll_interval
        self._sample_interval = sample_interval
        self._stop = threading.Event()
        self._wanted = threading.Event()
        # A source with wake_fds (KernelSource: its rings, each readable when a burst
        # fills a quarter of it) is slept on with a fd that want() makes readable, so
        # neither a filling ring nor a collection waits out the poll interval.
        self._waker: Optional[_Waker] = None
        self._ring_woke = False  # the last wait ended because the ring was readable
        # Held by the reader while it touches the source, the aggregator or the
        # SDK's instruments, and by fork() (see quiesce): a child never inherits
        # one of those mid-operation.
        self._work = threading.Lock()
        self._sampled = threading.Condition()
        self._sampled_at = 0.0
        # Samples numbered as they start; _sample_done is the number of the last
        # one finished. refresh() waits for a sample that started after it
        # asked, not for one that looks recent when it gets the GIL back.
        self._sample_started = 0
        self._sample_done = 0
        # One view per collection: every callback of a collection reads the same
        # rows, so an export never mixes two kernel samples.
        self._pin_lock = threading.Lock()
        self._pinned: Dict[str, List[Tuple[int, Dict[str, Any]]]] = {}
        self._pinned_at = -1.0
        self._thread: Optional[threading.Thread] = None
        self._errors = 0
        # A source read and the aggregator update it feeds are one step, so the
        # aggregator never takes an older read after a newer one (a counter that
        # seemed to go down would count as restarted); held by close() too.
        self._update_lock = threading.Lock()
        self._reads_now = isinstance(source, ReadsNow)
        # histograms the source aggregates itself (see _kernel_histograms): asked for so far
        self._hist_source = source if isinstance(source, AggregatesHistograms) and self._reads_now else None
        self._hist_mode: Optional[int] = None
        self._hist_failed = False
        self._hist_errors = 0
        self._hist_lock = threading.Lock()  # the reader's and collections' questions, one at a time
        # (value, key, context, time) of handshake points the kernel counted whose connecting span
        # was sampled: added at the next collection (the newest EXEMPLARS_PENDING; a reservoir keeps
        # one per bucket anyway)
        self._exemplars: Deque[Tuple[float, FlowKey, Context, int]] = collections.deque(maxlen=EXEMPLARS_PENDING)
        self._stopped = False
        self._quiesced = False

    def start(self) -> None:
        if isinstance(self.source, TakesMetricRecords):  # KernelSource: histogram records skip the FlowEvent
            self.source.on_metric = self._on_metric
            if self.spans is not None and isinstance(self.source, TakesConnRecords):  # span records too
                self.source.on_conn = self._on_conn
                # a handshake point the kernel aggregated: its exemplar from the CONN record
                self.source.conn_exemplars = True
        self.source.start(self._on_event)
        try:
            self._sample()
        except BaseException:  # never leave probes attached that nothing will read or close
            self.source.close()
            raise
        if self._ring_fds():
            try:
                self._waker = _Waker()
            except OSError:  # out of fds: sleep the poll interval out, as a source without a ring
                _log.debug("the reader reads the ring every poll interval only", exc_info=True)
        self._thread = threading.Thread(target=self._run, name="otel-ebpf-flows-reader", daemon=True)
        self._thread.start()

    def _ring_fds(self) -> List[int]:
        return wake_fds_of(self.source)

    def _want(self) -> None:
        """Wake the reader now (a collection wants a sample; stop)."""
        self._wanted.set()
        waker = self._waker
        if waker is not None:
            waker.wake()

    def _sleep(self) -> None:
        """Until the poll interval passes, want() is called, or the kernel wants a ring read."""
        waker = self._waker
        ring_fds = self._ring_fds() if waker is not None else []  # none once the source is closed
        if waker is None or not ring_fds:
            self._wanted.wait(self._poll_interval)
            return
        if self._wanted.is_set():
            return
        timeout = self._poll_interval
        if self._ring_woke:  # it may still be readable: a short wait without the rings first
            self._ring_woke = False
            if _libbpf.wait_readable([waker.fd], RING_REWAIT_S):
                waker.clear()
                return
            timeout -= RING_REWAIT_S
        ready = _libbpf.wait_readable([*ring_fds, waker.fd], timeout)
        self._ring_woke = any(fd in ready for fd in ring_fds)
        if waker.fd in ready:
            waker.clear()

    def discard(self) -> None:
        """Free what the pipeline holds itself (the source is the caller's): a forked child's copy."""
        waker, self._waker = self._waker, None
        if waker is not None:
            waker.close()

    def _on_event(self, event: FlowEvent) -> None:
        if event.kind in CONN_EVENT_KINDS:
            if self.spans is not None:
                self.spans.on_conn_event(event)
            return
        spans = self.spans
        if spans is None:
            self._instruments.record(self.aggregator, event)
        else:
            self._instruments.record(self.aggregator, event, spans.registry.exemplar_context)

    def _on_conn(self, record: ConnRecord) -> None:
        """A span record (any thread that drains the ring, application threads at span end
        too): into the span table; a CONN record whose handshake point the kernel aggregated
        gives that point's exemplar, if a sampled span connected. The exemplar waits for the
        next collection, which adds it once the point's count is in (the reader's and the
        collections' work only: no application thread holds an SDK or recorder lock, so none
        can be inherited held by a forked child)."""
        spans = self.spans
        if spans is None:
            return
        spans.table.add_record(record)
        if record[11] and record[5] > 0:
            _, _, key, _, ts_ns, duration_s, _, _, _, _, tid, _ = record
            ctx = spans.registry.exemplar_context(tid, ts_ns - int(duration_s * 1e9), key)
            if ctx is not None:
                self._exemplars.append((duration_s, key, ctx, time.time_ns()))

    def _harvest_histograms(self, source: AggregatesHistograms) -> None:
        """What the kernel's histograms gained into the SDK's aggregations, then the exemplars of
        those points (the span records so far drained first: the records of what is read next)."""
        drain = getattr(source, "drain_conn_events", None)
        if self.spans is not None and drain is not None:
            drain()
        self._instruments.add_histograms(self.aggregator, source.read_histograms())
        self._add_exemplars()

    def _add_exemplars(self) -> None:
        """The pending handshake exemplars into the SDK's aggregations (after their counts)."""
        pending = self._exemplars
        while pending:
            try:
                value, key, ctx, when = pending.popleft()
            except IndexError:
                return
            self._instruments.handshake_exemplar(self.aggregator, value, key, ctx, when)

    def _on_metric(self, record: MetricRecord) -> None:
        spans = self.spans
        self._instruments.record_metric(self.aggregator, record,
                                        None if spans is None else spans.registry.exemplar_context)

    def _sample(self) -> None:
        with self._sampled:
            self._wanted.clear()
            self._sample_started += 1
            number = self._sample_started
        if self._reads_now:
            self.source.scan()  # type: ignore[attr-defined]
            self._read_now()
        else:
            snapshot = self.source.sample()
            with self._update_lock:
                self.aggregator.update(snapshot)
        with self._sampled:
            self._sampled_at = time.monotonic()
            self._sample_done = number
            self._sampled.notify_all()

    def _run(self) -> None:
        try:
            with self._work:
                if not self._kernel_histograms():  # bounds written first, the mode once they are seen
                    self._stop.wait(0.01)
                    self._kernel_histograms()
        except Exception:
            _log.debug("the kernel's histograms are left to the next sample", exc_info=True)
        while not self._stop.is_set():
            try:
                # Sleep with no lock held; records are never woken for (the kernel
                # wakes no one per record, only when a burst fills the ring).
                self._sleep()
                with self._work:
                    if self._stop.is_set():
                        break
                    # a collection waiting for a sample goes before the records
                    # (the sample consumes the ring buffer itself)
                    if self._wanted.is_set() or time.monotonic() - self._sampled_at >= self._sample_interval:
                        self._sample()
                        if self.spans is not None:
                            self.spans.prune()
                    self.source.poll(0)
                    if self._attach_spans is not None and self._attach_spans():
                        self._attach_spans = None
                self._errors = 0
            except Exception:
                self._errors += 1
                if self._errors == 1:
                    _log.warning("reading kernel TCP data failed; retrying", exc_info=True)
                self._stop.wait(min(5.0, self._poll_interval * 2 ** min(self._errors, 6)))

    def _kernel_histograms(self) -> bool:
        """Let the source aggregate the histograms every reader can take as bucket counts, or
        stop it where one no longer can (asked at every sample and collection: a proxy meter's
        instruments become real later, a reader may be added). True: as asked (False: the
        source held some back for now, see KernelSource.aggregate_histograms)."""
        source = self._hist_source
        if source is None or self._hist_failed:
            return True
        with self._hist_lock:
            mode = self._instruments.kernel_histograms()
            if mode == self._hist_mode:
                return True
            try:
                on = source.aggregate_histograms(mode, self._instruments.kernel_bounds)
            except Exception:  # records, as before; what the kernel aggregated so far is still read
                _log.warning("otel-ebpf-flows: the kernel cannot aggregate histograms here; every point "
                             "is handed over as a record", exc_info=True)
                self._hist_failed = True
                return True
            self._hist_mode = mode if on == mode else None  # held back: asked again next time
            return on == mode

    def _read_now(self) -> None:
        """The source's counters now into the aggregator (a :class:`ReadsNow` source), and the
        histograms it aggregated into the SDK's."""
        with self._update_lock:
            if self._stopped:
                return
            self.aggregator.update(self.source.read())  # type: ignore[attr-defined]
            if self._hist_source is not None:
                try:  # the counters above are this collection's whatever happens here
                    if self._thread is not None:  # not within instrument(): the first answer takes ms
                        self._kernel_histograms()
                    self._harvest_histograms(self._hist_source)
                except Exception:
                    self._hist_errors += 1
                    if self._hist_errors == 1:
                        _log.warning("otel-ebpf-flows: reading the kernel's histograms failed; retrying at "
                                     "the next collection", exc_info=True)

    def observations(self, metric: str, first: bool = False) -> List[Tuple[int, Dict[str, Any]]]:
        """Rows of ``metric`` from the view pinned for the current collection.

        The SDK calls observable callbacks in registration order, so ``first``
        (the first instrument's callback) starts a collection: it brings the
        aggregator up to date and pins its state. The collection's other
        callbacks read that same state, so an export never mixes two samples.
        A :class:`ReadsNow` source is read right here (a batch read of the
        counter maps, well under a millisecond): no collection waits for the
        reader's socket pass, whose RTT samples and live connections' bytes
        arrive with the pass. Any other source: a bounded wait for a fresh sample.
        """
        with self._pin_lock:
            if first or time.monotonic() - self._pinned_at >= self.FRESH_S:
                if self._reads_now and self._thread is not None:
                    self._read_now()
                else:
                    self.refresh()
                self._pinned = self.aggregator.all_observations()
                self._pinned_at = time.monotonic()
            return self._pinned.get(metric, [])

    def refresh(self, timeout: float = 2.0) -> None:
        """Unless a sample finished less than FRESH_S ago, wait (at most ``timeout``) for one
        that starts after this call (a whole pass: for tests, a final export, and collections
        of a source that cannot be read from another thread)."""
        thread = self._thread
        if thread is None or not thread.is_alive() or threading.current_thread() is thread:
            return
        with self._sampled:
            if time.monotonic() - self._sampled_at < self.FRESH_S:
                return
            wanted = self._sample_started + 1  # the next sample to start begins after this call
            self._want()
            deadline = time.monotonic() + timeout
            while self._sample_done < wanted:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._sampled.wait(left)

    def quiesce(self) -> None:
        """Wait until the reader is between iterations, and any collection's read is done,
        and hold them there (before fork)."""
        self._work.acquire()
        self._update_lock.acquire()
        self._quiesced = True

    def resume(self) -> None:
        """Undo :meth:`quiesce` (after fork, in the parent and in the child)."""
        if self._quiesced:
            self._quiesced = False
            self._update_lock.release()
        if self._work.locked():
            self._work.release()

    def stop(self) -> None:
        if self.spans is not None:
            self.spans.enabled = False
            detach(self.spans)
        self._stop.set()
        self._want()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
            if thread.is_alive():  # never free kernel objects under a running reader
                _log.warning("the otel-ebpf-flows reader thread did not stop; leaving its probes attached")
                return
        with self._update_lock:  # nor under a collection's read
            if self._hist_source is not None:  # what the kernel aggregated since, for the final export
                try:
                    self._harvest_histograms(self._hist_source)
                except Exception:
                    _log.debug("reading the kernel's histograms at stop failed", exc_info=True)
            self._stopped = True
        self.source.close()
        self.discard()
