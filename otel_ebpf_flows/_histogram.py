"""Histogram points into the OpenTelemetry SDK at a fraction of ``Histogram.record()``'s cost.

The reader thread records two or three histogram points for every connection
that ends (handshake, duration, RTT). On SDK 1.45 one ``Histogram.record()``
with the contract's five attributes costs ~8 µs, most of it spent cleaning and
hashing the same attribute dict again for every point; at 1,000 connections/s
that alone is ~2.5 % of a core, all of it holding the GIL the application
needs. The SDK has no public way to hand it points in bulk or with their
attributes prepared.

:class:`HistogramRecorder` does, per point, what the SDK's
``MeasurementConsumer`` → ``MetricReaderStorage`` → ``_ViewInstrumentMatch``
chain does, but with each attribute set's cleaning, View attribute filtering
and aggregation key worked out once and kept: the exemplar filter is asked as
before, and each reader's aggregation (whatever the user's Views and
temporality chose: explicit buckets, base-2 exponential, drop) takes the point
through its own ``aggregate()``. It relies on SDK internals, so it is used only
where

- the instrument is the SDK's histogram and every internal it touches is
  there, with the shape it expects; and
- a self-check passes once per process: on a throw-away MeterProvider (a
  cumulative and a delta reader), points recorded through both paths into the
  same instrument and attribute sets come out as one point per set, with the
  exact count, sum, min, max and bucket counts, across two collections.

Otherwise it calls ``Histogram.record()``. Everything that could fail on an
SDK of another shape is done before a point reaches any aggregation
(:meth:`HistogramRecorder._prepare`), so such an error sends that point, and
every later one, through ``Histogram.record()``: never a point lost or doubled.
Only an aggregation's own ``aggregate()`` raising (which the SDK would raise
into ``Histogram.record()``'s caller too) can leave a point with some readers
and not others; that is logged as a warning and the fast path is dropped. An
instrument of the API's proxy meter (created before the SDK's MeterProvider was
set) goes through the proxy until the proxy has its real instrument, then that one
is used as above.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from time import time_ns
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import Histogram

_log = logging.getLogger("otel_ebpf_flows")

#: Attribute sets remembered per instrument (the aggregator's own series cache is
#: bounded alike); past it the memory starts again.
MAX_PREPARED = 4096

#: A point's context when no span is named: never the reader thread's current one.
NO_SPAN = trace.set_span_in_context(trace.INVALID_SPAN)
_checked: Optional[bool] = None
_check_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _check_lock
    _check_lock = threading.Lock()  # a thread mid-check in the parent does not exist here


os.register_at_fork(after_in_child=_after_fork_in_child)


def _internals() -> Optional[Tuple[type, type, Callable[[Any], Any]]]:
    """The SDK classes and functions the fast path needs, or None where this SDK lacks them."""
    try:
        from opentelemetry.sdk.metrics._internal import _view_instrument_match as vim_module
        from opentelemetry.sdk.metrics._internal.instrument import _Histogram
        from opentelemetry.sdk.metrics._internal.measurement import Measurement
    except ImportError:
        return None
    hash_attributes = getattr(vim_module, "_hash_attributes", None)
    vim_class = getattr(vim_module, "_ViewInstrumentMatch", None)
    if hash_attributes is None or vim_class is None:
        return None
    for name in ("_get_or_create_aggregation", "consume_measurement"):
        if not callable(getattr(vim_class, name, None)):
            return None
    return _Histogram, Measurement, hash_attributes


class HistogramRecorder:
    """``record(value, attributes, context)`` for one SDK histogram; no context: no span (NO_SPAN).

    ``attributes`` must be a dict the caller never changes after its first use
    (the aggregator's series dicts): what was prepared for it is found again by
    identity.
    """

    def __init__(self, instrument: Histogram, bounds: Sequence[float] = ()) -> None:
        self.instrument = instrument
        #: the explicit bucket bounds advised for it: what :meth:`add_buckets` counts take
        self.bounds = tuple(float(b) for b in bounds)
        # can_add_buckets()'s answer for the reader storages it was worked out for
        self._buckets_for: Any = None
        self._buckets_ok = False
        # record() runs on the reader thread, add_buckets() and offer_exemplar() on collecting
        # threads (never an application's: see Pipeline._on_conn): one at a time
        # (fork: the pipeline holds both out of the recorder while a fork happens, see quiesce)
        self._lock = threading.Lock()
        self._fast = False
        self._consumer: Any = None
        self._is_enabled: Callable[[], bool] = lambda: False
        self._spanless_unsampled = False
        self._should_sample: Callable[[float, int, Dict[str, Any], Context], bool] = lambda *_: False
        self._storages: Any = None
        self._measurement: Any = None
        self._hash: Any = None
        # id(attributes) -> (attributes, [(view match, aggregation key, its attributes)]),
        # for the reader storages in _storages
        self._prepared: Dict[int, Tuple[Dict[str, Any], List[Tuple[Any, Any, Dict[str, Any]]]]] = {}
        # the API's proxy (created before the SDK's MeterProvider was set): bound once it has
        # its real instrument
        self._proxy: Any = None
        self._bind(instrument)

    def _bind(self, instrument: Histogram) -> None:
        internals = _internals()
        if internals is None:
            return
        histogram_class, self._measurement, self._hash = internals
        if type(instrument) is not histogram_class:  # a proxy, a no-op, another SDK
            if hasattr(instrument, "_real_instrument"):
                self._proxy = instrument
            return
        consumer = getattr(instrument, "_measurement_consumer", None)
        config: Any = getattr(consumer, "_sdk_config", None)
        if (
            not isinstance(getattr(consumer, "_reader_storages", None), Mapping)
            or not callable(getattr(getattr(config, "exemplar_filter", None), "should_sample", None))
            or not callable(getattr(instrument, "_is_enabled", None))
        ):
            return
        self._consumer = consumer
        self._is_enabled = instrument._is_enabled  # type: ignore[attr-defined]
        self._should_sample = config.exemplar_filter.should_sample
        # the SDK's filters whose answer for a point with no span is known: no exemplar
        self._spanless_unsampled = _spanless_unsampled(config.exemplar_filter)
        self._fast = True

    @property
    def fast(self) -> bool:
        """Whether points skip ``Histogram.record()`` (see the module's docstring)."""
        return self._fast and _self_check()

    def _rebind(self) -> None:
        if self._proxy is not None and self._proxy._real_instrument is not None:
            real, self._proxy = self._proxy._real_instrument, None
            self.instrument = real
            self._bind(real)

    def can_add_buckets(self) -> bool:
        """Whether :meth:`add_buckets` can take bucket counts for this histogram now: the fast
        path is on, no point of it could get an exemplar without a span (the SDK's trace-based
        or always-off filter), and every reader's aggregation of it is explicit buckets with
        :attr:`bounds` (or a View that drops it)."""
        with self._lock:
            return self._can_add_buckets()

    def _can_add_buckets(self) -> bool:
        self._rebind()
        if not (self.bounds and self._fast and self._spanless_unsampled and _self_check()):
            return False
        storages = self._consumer._reader_storages
        if storages is not self._buckets_for:
            ok = True
            try:
                for storage in storages.values():
                    for match in storage._get_or_init_view_instrument_match(self.instrument):
                        ok = ok and _takes_buckets(match._aggregation, self.bounds)
            except Exception:
                _log.debug("cannot tell the aggregations of %s", getattr(self.instrument, "name", "?"),
                           exc_info=True)
                ok = False
            self._buckets_for, self._buckets_ok = storages, ok
        return self._buckets_ok

    def add_buckets(self, attributes: Dict[str, Any], counts: Sequence[int], total: float,
                    low: Optional[float], high: Optional[float]) -> bool:
        """Add ``sum(counts)`` points at once: ``counts[i]`` in bucket i of :attr:`bounds`, their
        sum ``total``, smallest ``low``, largest ``high``; each reader's aggregation ends as if
        each point had been recorded. ``low``/``high`` None (unknown): an aggregation's own
        extremes stand, and one that has none takes the edges of the outermost buckets counted.
        False (nothing added): :meth:`can_add_buckets` is not true (any more), or the SDK would
        clean the attributes into something else."""
        with self._lock:
            return self._can_add_buckets() and self._add(attributes, counts, total, low, high)

    def _add(self, attributes: Dict[str, Any], counts: Sequence[int], total: float, low: Optional[float],
             high: Optional[float]) -> bool:
        try:  # nothing reaches an aggregation in here
            matches = self._prepare(attributes)
            if matches is None or len(counts) != len(self.bounds) + 1:
                return False
            for match, _key, _attrs in matches:  # a reader added since can_add_buckets() said yes
                if not _takes_buckets(match._aggregation, self.bounds):
                    self._buckets_for, self._buckets_ok = None, False
                    return False
            if not self._is_enabled():
                return True  # a disabled meter takes no points
        except Exception:
            _log.debug("histogram bucket counts unavailable; using points", exc_info=True)
            self._buckets_for, self._buckets_ok = None, False
            return False
        for match, key, attrs in matches:
            with match._lock:
                aggregation = match._get_or_create_aggregation(key, attrs)
                if match._reset_on_collect:  # a delta collection swaps it out: add under the lock
                    _add_buckets(aggregation, counts, total, low, high)
                    continue
            _add_buckets(aggregation, counts, total, low, high)
        return True

    def offer_exemplar(self, value: float, attributes: Dict[str, Any], context: Context, when: int) -> None:
        """What ``aggregate()`` does with a point's exemplar, without counting the point: for a
        point :meth:`add_buckets` has counted, whose value, time (``when``, ns since the epoch)
        and span are known from elsewhere. The exemplar filter is asked as for a recorded
        point; each reader's aggregation of ``attributes`` is offered it, where it has one (a
        series the point's count never reached, a delta interval already collected, takes
        none). Nothing happens where :meth:`can_add_buckets` is not true (the point is then
        a record, which takes its own exemplar)."""
        with self._lock:
            if self._can_add_buckets():
                self._offer(value, attributes, context, when)

    def _offer(self, value: float, attributes: Dict[str, Any], context: Context, when: int) -> None:
        try:  # nothing reaches an aggregation in here
            matches = self._prepare(attributes)
            if matches is None or not 0 <= value < math.inf or not self._is_enabled():
                return
            if not self._should_sample(value, when, attributes, context):
                return
            measurement = self._measurement(value, when, self.instrument, context, None)
            object.__setattr__(measurement, "attributes", attributes)
            _explicit, drop = _explicit_and_drop()
        except Exception:
            _log.debug("histogram exemplar unavailable", exc_info=True)
            return
        for match, key, _attrs in matches:
            with match._lock:  # a delta collection swaps the aggregations out under it
                aggregation = match._attributes_aggregation.get(key)
                if aggregation is not None and type(aggregation) is not drop:
                    aggregation._sample_exemplar(measurement, True)

    def record(self, value: float, attributes: Dict[str, Any], context: Optional[Context] = None) -> None:
        with self._lock:  # the reader's points and a collection's bucket counts share the caches
            self._record_point(value, attributes, context)

    def _record_point(self, value: float, attributes: Dict[str, Any], context: Optional[Context]) -> None:
        self._rebind()
        if self._fast and (_checked if _checked is not None else _self_check()):
            try:
                if self._record(value, attributes, context):
                    return
            except Exception:  # from an aggregate(): the point may have reached some readers
                self._fast = False
                _log.warning("histogram %s: the fast path failed, Histogram.record() from now on (this point "
                             "may be missing from some readers)", getattr(self.instrument, "name", "?"),
                             exc_info=True)
                return
        else:
            self._fast = False
        self.instrument.record(value, attributes, context=NO_SPAN if context is None else context)

    def _record(self, value: float, attributes: Dict[str, Any], context: Optional[Context]) -> bool:
        """The fast path; False: the point was not recorded, for ``Histogram.record()`` to do."""
        try:  # nothing reaches an aggregation in here
            matches = self._prepare(attributes)
            if matches is None or not 0 <= value < math.inf or not self._is_enabled():
                return False  # the SDK's own path warns (negative, NaN, infinite), or skips a disabled meter
            now = time_ns()
            if context is None:
                context = NO_SPAN
                sample = False if self._spanless_unsampled else self._should_sample(value, now, attributes, context)
            else:
                sample = self._should_sample(value, now, attributes, context)
            measurement = self._measurement(value, now, self.instrument, context, None)
            object.__setattr__(measurement, "attributes", attributes)  # checked once in _prepare
        except Exception:
            _log.debug("histogram fast path unavailable; using Histogram.record()", exc_info=True)
            self._fast = False
            return False
        for match, key, attrs in matches:
            if match._reset_on_collect:
                # a delta collection swaps the aggregations out: hold its lock throughout
                with match._lock:
                    match._get_or_create_aggregation(key, attrs).aggregate(measurement, sample)
                continue
            aggregation = match._attributes_aggregation.get(key)
            if aggregation is None:
                with match._lock:
                    aggregation = match._get_or_create_aggregation(key, attrs)
            aggregation.aggregate(measurement, sample)
        return True

    def _prepare(self, attributes: Dict[str, Any]) -> Optional[List[Tuple[Any, Any, Dict[str, Any]]]]:
        """Every (view match, aggregation key, attributes) a point with ``attributes`` goes to.

        Everything that could fail is done here, before any aggregation sees the
        point. None: attributes the SDK would clean into something else (let it).
        """
        storages = self._consumer._reader_storages
        if storages is not self._storages:  # a reader was added or removed
            self._prepared.clear()
            self._storages = storages
        entry = self._prepared.get(id(attributes))
        if entry is not None and entry[0] is attributes:
            return entry[1]
        for key, value in attributes.items():
            if not key or not isinstance(key, str) or not isinstance(value, (str, bool, int, float)):
                return None
        matches: List[Tuple[Any, Any, Dict[str, Any]]] = []
        for storage in storages.values():
            for match in storage._get_or_init_view_instrument_match(self.instrument):
                keys = match._view._attribute_keys
                attrs = dict(attributes) if keys is None else {k: v for k, v in attributes.items() if k in keys}
                matches.append((match, self._hash(attrs), attrs))
                # fail here, not after a first aggregation took the point
                if (not isinstance(match._attributes_aggregation, dict)
                        or not isinstance(match._reset_on_collect, bool)
                        or not hasattr(match._lock, "__enter__")):
                    raise TypeError(f"unexpected _ViewInstrumentMatch: {match!r}")
        if len(self._prepared) >= MAX_PREPARED:
            self._prepared.clear()
        self._prepared[id(attributes)] = (attributes, matches)
        return matches


def _explicit_and_drop() -> Tuple[Optional[type], Optional[type]]:
    try:
        from opentelemetry.sdk.metrics._internal.aggregation import (
            _DropAggregation,
            _ExplicitBucketHistogramAggregation,
        )
    except ImportError:
        return None, None
    return _ExplicitBucketHistogramAggregation, _DropAggregation


def _takes_buckets(aggregation: Any, bounds: Tuple[float, ...]) -> bool:
    """Whether ``aggregation`` (a View match's prototype, or an attribute set's own) is one
    :func:`_add_buckets` can add counts of ``bounds``' buckets to."""
    explicit, drop = _explicit_and_drop()
    if explicit is None:
        return False
    if type(aggregation) is drop:
        return True
    if type(aggregation) is not explicit:
        return False
    return (
        tuple(getattr(aggregation, "_boundaries", ())) == bounds
        and all(hasattr(aggregation, name) for name in ("_value", "_sum", "_min", "_max", "_record_min_max"))
        and hasattr(getattr(aggregation, "_lock", None), "__enter__")
        and callable(getattr(aggregation, "_get_empty_bucket_counts", None))
        and callable(getattr(aggregation, "_sample_exemplar", None))
    )


def _add_buckets(aggregation: Any, counts: Sequence[int], total: float, low: Optional[float],
                 high: Optional[float]) -> None:
    """What ``aggregate()`` of each of the points would leave (SDK 1.45's explicit buckets),
    without exemplars (a point that may have one gets it from HistogramRecorder.offer_exemplar)."""
    _explicit, drop = _explicit_and_drop()
    if type(aggregation) is drop:
        return
    with aggregation._lock:
        if aggregation._value is None:
            aggregation._value = aggregation._get_empty_bucket_counts()
        aggregation._sum += total
        if aggregation._record_min_max and any(counts):
            if low is None or high is None:
                edge_low, edge_high = _edges(aggregation._boundaries, counts)
                low = edge_low if low is None else low
                high = edge_high if high is None else high
                # unknown extremes: the aggregation's own stand where it has them
                if math.isfinite(aggregation._min):
                    low = aggregation._min
                if math.isfinite(aggregation._max):
                    high = aggregation._max
            aggregation._min = min(aggregation._min, low)
            aggregation._max = max(aggregation._max, high)
        value = aggregation._value
        for i, count in enumerate(counts):
            if count:
                value[i] += count


def _edges(bounds: Sequence[float], counts: Sequence[int]) -> Tuple[float, float]:
    """The outermost edges of the buckets counted: the best known extremes of their values
    (the last bucket, above every bound, has no upper edge: its lower one)."""
    used = [i for i, c in enumerate(counts) if c]
    low = float(bounds[used[0] - 1]) if used[0] else 0.0
    high = float(bounds[min(used[-1], len(bounds) - 1)])
    return low, high


def _spanless_unsampled(exemplar_filter: Any) -> bool:
    """Whether ``exemplar_filter`` never samples a point recorded with an empty Context."""
    try:
        from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, TraceBasedExemplarFilter
    except ImportError:
        return False
    return type(exemplar_filter) in (AlwaysOffExemplarFilter, TraceBasedExemplarFilter)


def _self_check() -> bool:
    """Once per process: does the fast path give exactly what ``Histogram.record()`` gives?"""
    global _checked
    if _checked is not None:
        return _checked
    with _check_lock:
        if _checked is None:
            try:
                from ._libbpf import yield_gil

                _checked = _compare(yield_gil)
            except Exception:
                _log.debug("histogram fast path self-check failed", exc_info=True)
                _checked = False
            if not _checked:
                _log.debug("histogram points go through Histogram.record() (the SDK's internals differ)")
    return _checked


def _compare(pause: Callable[[], None] = lambda: None) -> bool:
    """The self-check; ``pause()`` between its steps (the reader: let the application have the GIL,
    so the check, ~3 ms in all, never holds it for more than one step)."""
    from opentelemetry.sdk.metrics import Histogram as SdkHistogram
    from opentelemetry.sdk.metrics import MeterProvider, TraceBasedExemplarFilter
    from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader

    bounds = [0.001, 0.01, 0.1]
    cumulative = InMemoryMetricReader()
    delta = InMemoryMetricReader(preferred_temporality={SdkHistogram: AggregationTemporality.DELTA})
    # the filter the library's own use needs (the environment's may differ): exemplars compared too
    provider = MeterProvider(metric_readers=[cumulative, delta], shutdown_on_exit=False,
                             exemplar_filter=TraceBasedExemplarFilter())
    pause()
    try:
        histogram = provider.get_meter("otel_ebpf_flows.self_check").create_histogram(
            "self_check", unit="s", explicit_bucket_boundaries_advisory=bounds
        )
        recorder = HistogramRecorder(histogram, bounds)
        if not recorder._fast:
            return False
        for storage in recorder._consumer._reader_storages.values():
            for match in storage._get_or_init_view_instrument_match(histogram):
                if not _takes_buckets(match._aggregation, recorder.bounds):
                    return False
        sets: List[Dict[str, Any]] = [
            {"network.peer.address": "192.0.2.1", "network.peer.port": 80, "ebpf_flows.tcp.role": "client"},
            {"network.peer.address": "192.0.2.2", "network.local.port": 8080, "ebpf_flows.tcp.role": "server"}]
        # (attribute set, values, how): the fast path, Histogram.record(), or bucket counts
        # (several values at once), all into the same aggregations, over two collections; a
        # value with a span (its index in `spans`) has an exemplar: the SDK's own, or offered
        # (offer_exemplar) for the last of bucket counts
        rounds = [[(0, [0.0005], "fast", None), (0, [0.02], "sdk", 0), (1, [0.2], "fast", None),
                   (1, [0.001, 0.03], "buckets", 1)],
                  [(0, [0.005], "sdk", None), (1, [0.0001], "fast", 2), (0, [0.1, 0.0002, 0.25], "buckets", 3),
                   (1, [0.05], "sdk", None), (1, [0.3], "fast", None)]]
        spans = [trace.set_span_in_context(trace.NonRecordingSpan(trace.SpanContext(
            0x5E1F, 0xC4EC0 + i, is_remote=False, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))))
            for i in range(4)]
        everything: List[List[float]] = [[], []]
        taken: Dict[Tuple[Tuple[str, Any], ...], List[Tuple[float, int]]] = {}  # this round's
        for points in rounds:
            now: List[List[float]] = [[], []]
            taken = {}
            for index, values, how, span in points:
                context = spans[span] if span is not None else None
                if how == "fast":
                    recorder._record(values[0], sets[index], context)
                elif how == "sdk":
                    histogram.record(values[0], sets[index], context=context or NO_SPAN)
                else:
                    counts = _summary(values, bounds)[4]
                    if not recorder._add(sets[index], counts, sum(values), min(values), max(values)):
                        return False
                    if context is not None:
                        recorder._offer(values[-1], sets[index], context, time_ns())
                if span is not None:
                    taken.setdefault(tuple(sorted(sets[index].items())), []).append((values[-1], 0xC4EC0 + span))
                now[index].extend(values)
                everything[index].extend(values)
            # exemplars are those offered since the last collection, with either temporality
            for reader, by_set in ((cumulative, everything), (delta, now)):
                pause()
                expected = {tuple(sorted(s.items())): _summary(v, bounds) + (sorted(taken.get(
                    tuple(sorted(s.items())), [])),) for s, v in zip(sets, by_set) if v}
                if not _same(_points(reader), expected):
                    return False
        return True
    finally:
        pause()
        provider.shutdown()


def _points(reader: Any) -> Dict[Tuple[Tuple[str, Any], ...], Tuple[Any, ...]]:
    data = reader.get_metrics_data()
    points: Dict[Tuple[Tuple[str, Any], ...], Tuple[Any, ...]] = {}
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    key = tuple(sorted(dict(point.attributes or {}).items()))
                    if key in points:  # two points for one attribute set: the keys differ
                        return {}
                    points[key] = (point.count, point.sum, point.min, point.max,
                                   tuple(point.bucket_counts),
                                   sorted((e.value, e.span_id) for e in point.exemplars or ()))
    return points


def _same(got: Dict[Any, Tuple[Any, ...]], expected: Dict[Any, Tuple[Any, ...]]) -> bool:
    """Equal points; sums to float rounding (a sum of bucket counts' points adds in another order)."""
    if got.keys() != expected.keys():
        return False
    for key, want in expected.items():
        have = got[key]
        if have[:1] + have[2:] != want[:1] + want[2:] or not math.isclose(have[1], want[1], rel_tol=1e-9):
            return False
    return True


def _summary(values: List[float], bounds: List[float]) -> Tuple[Any, ...]:
    buckets = [0] * (len(bounds) + 1)
    for value in values:
        buckets[sum(1 for b in bounds if value > b)] += 1
    return (len(values), sum(values), min(values), max(values), tuple(buckets))
