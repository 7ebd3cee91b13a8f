"""The histogram fast path gives exactly what ``Histogram.record()`` gives, whatever the user configured.

Each case builds two identical MeterProviders: one is fed through the SDK's public
``Histogram.record()``, the other through :class:`HistogramRecorder`, with the same
points (several attribute sets, values across the buckets, collections in between).
Every exported data point must be equal, timestamps aside.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics._internal.exemplar import AlwaysOnExemplarFilter
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import (
    DropAggregation,
    ExplicitBucketHistogramAggregation,
    ExponentialBucketHistogramAggregation,
    View,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from otel_ebpf_flows import _histogram
from otel_ebpf_flows._histogram import NO_SPAN, HistogramRecorder

BOUNDS = [0.0001, 0.001, 0.01, 0.1, 1.0]
SETS = [
    {"network.transport": "tcp", "network.type": "ipv4", "network.peer.address": "192.0.2.1",
     "ebpf_flows.tcp.role": "client", "network.peer.port": 443},
    {"network.transport": "tcp", "network.type": "ipv6", "network.peer.address": "2001:db8::1",
     "ebpf_flows.tcp.role": "server", "network.local.port": 8080},
    {"network.transport": "tcp", "network.type": "ipv4", "network.peer.address": "_OTHER",
     "ebpf_flows.tcp.role": "client"},
]
DELTA = {SdkHistogram: AggregationTemporality.DELTA}


def sampled_context(n: int) -> Context:
    span = NonRecordingSpan(SpanContext(trace_id=0x1000 + n, span_id=0x2000 + n, is_remote=False,
                                        trace_flags=TraceFlags(TraceFlags.SAMPLED)))
    return trace.set_span_in_context(span, Context())


def points(reader: InMemoryMetricReader) -> List[Tuple[str, Any]]:
    """Every data point as comparable values: timestamps and exemplar times left out."""
    out: List[Tuple[str, Any]] = []
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    fields = {k: v for k, v in vars(point).items()
                              if k not in ("start_time_unix_nano", "time_unix_nano", "exemplars")}
                    for k, v in fields.items():
                        if hasattr(v, "bucket_counts"):  # exponential buckets
                            fields[k] = (v.offset, tuple(v.bucket_counts))
                        elif isinstance(v, list):
                            fields[k] = tuple(v)
                    fields["attributes"] = tuple(sorted(dict(point.attributes or {}).items()))
                    exemplars = tuple(sorted(
                        (e.value, e.trace_id, e.span_id, tuple(sorted(dict(e.filtered_attributes or {}).items())))
                        for e in getattr(point, "exemplars", ()) or ()
                    ))
                    out.append((metric.name, tuple(sorted(fields.items())), exemplars))
    return sorted(out, key=repr)


Case = Dict[str, Any]

CASES: Dict[str, Case] = {
    "cumulative": {},
    "delta": {"temporality": DELTA},
    "a cumulative and a delta reader": {"readers": 2},
    "a view keeping some attributes": {"views": [View(instrument_name="h", attribute_keys={"ebpf_flows.tcp.role"})]},
    "a view with base-2 exponential buckets": {
        "views": [View(instrument_name="h", aggregation=ExponentialBucketHistogramAggregation(max_size=20))]},
    "a view with other buckets, delta": {
        "temporality": DELTA,
        "views": [View(instrument_name="h", aggregation=ExplicitBucketHistogramAggregation([0.005, 0.5]))]},
    "a view dropping the metric": {"views": [View(instrument_name="h", aggregation=DropAggregation())]},
    "two views, one renamed": {"views": [View(instrument_name="h"),
                                         View(instrument_name="h", name="h.by_role",
                                              attribute_keys={"ebpf_flows.tcp.role"})]},
    "a cardinality limit of 2, delta": {
        "temporality": DELTA, "views": [View(instrument_name="h", aggregation_cardinality_limit=2)]},
    "a cardinality limit of 2, cumulative": {"views": [View(instrument_name="h", aggregation_cardinality_limit=2)]},
    "exemplars of sampled spans": {"exemplars": True},
}


def provider_for(case: Case) -> Tuple[MeterProvider, List[InMemoryMetricReader]]:
    readers = [InMemoryMetricReader(preferred_temporality=case.get("temporality"))]
    if case.get("readers") == 2:
        readers.append(InMemoryMetricReader(preferred_temporality=DELTA))
    extra: Dict[str, Any] = {}
    if case.get("exemplars"):
        extra["exemplar_filter"] = AlwaysOnExemplarFilter()
    provider = MeterProvider(metric_readers=readers, views=case.get("views", ()), shutdown_on_exit=False, **extra)
    return provider, readers


def workload(seed: int) -> List[List[Tuple[int, float, Optional[int]]]]:
    """Rounds of (attribute set, value, exemplar context number) between collections."""
    rng = random.Random(seed)
    return [[(rng.randrange(len(SETS)), rng.choice([0.0, 0.00005, 0.0003, 0.004, 0.05, 0.7, 3.0,
                                                    rng.random() * 2]), rng.choice([None, rng.randrange(4)]))
             for _ in range(rng.randrange(1, 30))] for _ in range(4)]


def run(case: Case, record: Callable[[Any], Callable[[float, Dict[str, Any], Optional[Context]], None]],
        rounds: List[List[Tuple[int, float, Optional[int]]]]) -> List[List[Tuple[str, Any]]]:
    provider, readers = provider_for(case)
    try:
        histogram = provider.get_meter("m").create_histogram("h", unit="s", explicit_bucket_boundaries_advisory=BOUNDS)
        rec = record(histogram)
        sets = [dict(s) for s in SETS]  # one object per set, as the aggregator hands them out
        exported = []
        for points_ in rounds:
            for index, value, ctx in points_:
                rec(value, sets[index], None if ctx is None else sampled_context(ctx))
            exported.extend(points(r) for r in readers)
        return exported
    finally:
        provider.shutdown()


def public(histogram: Any) -> Callable[[float, Dict[str, Any], Optional[Context]], None]:
    # no span: a context that names none, as the library passes when it has none to link
    return lambda value, attrs, ctx: histogram.record(value, attrs, context=NO_SPAN if ctx is None else ctx)


def fast(histogram: Any) -> Callable[[float, Dict[str, Any], Optional[Context]], None]:
    recorder = HistogramRecorder(histogram)
    assert recorder.fast, "the fast path is off on this SDK: points cost a whole Histogram.record() each"

    def record(value: float, attrs: Dict[str, Any], ctx: Optional[Context]) -> None:
        recorder.record(value, attrs, ctx)
        assert recorder.fast  # it never fell back

    return record


@pytest.mark.parametrize("name", list(CASES))
def test_the_fast_path_exports_what_histogram_record_exports(name: str) -> None:
    case = CASES[name]
    for seed in range(3):
        rounds = workload(seed)
        expected = run(case, public, rounds)
        assert any(expected) or name == "a view dropping the metric"
        assert run(case, fast, rounds) == expected, f"{name}, seed {seed}"


def test_points_through_both_paths_meet_in_one_aggregation() -> None:
    provider, (reader,) = provider_for({})
    histogram = provider.get_meter("m").create_histogram("h", unit="s", explicit_bucket_boundaries_advisory=BOUNDS)
    recorder = HistogramRecorder(histogram)
    attrs = dict(SETS[0])
    recorder.record(0.002, attrs, Context())
    histogram.record(0.5, dict(SETS[0]), context=Context())
    recorder.record(0.00002, attrs, Context())
    (point,) = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
    assert (point.count, point.sum, point.min, point.max) == (3, pytest.approx(0.50202), 0.00002, 0.5)
    assert list(point.bucket_counts) == [1, 0, 1, 0, 1, 0]
    provider.shutdown()


def test_values_the_sdk_rejects_are_left_to_it(caplog: pytest.LogCaptureFixture) -> None:
    provider, (reader,) = provider_for({})
    histogram = provider.get_meter("m").create_histogram("h", unit="s")
    recorder = HistogramRecorder(histogram)
    recorder.record(-1.0, dict(SETS[0]), Context())
    recorder.record(float("nan"), dict(SETS[0]), Context())
    recorder.record(0.1, {"ok": "yes", "odd": object()}, Context())  # the SDK makes the value a string
    (point,) = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
    assert point.count == 1 and "ok" in point.attributes
    assert "non-negative" in caplog.text and "not finite" in caplog.text
    provider.shutdown()


def test_a_histogram_that_is_not_the_sdks_is_recorded_through_its_own_record() -> None:
    histogram = NoOpMeterProvider().get_meter("m").create_histogram("h")
    recorder = HistogramRecorder(histogram)
    assert not recorder.fast
    recorder.record(0.1, dict(SETS[0]), Context())  # no error


def test_when_the_self_check_fails_every_point_goes_through_histogram_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_histogram, "_checked", False)
    provider, (reader,) = provider_for({})
    histogram = provider.get_meter("m").create_histogram("h", unit="s")
    calls: List[float] = []
    real = histogram.record
    monkeypatch.setattr(histogram, "record", lambda value, *a, **k: (calls.append(value), real(value, *a, **k)))
    recorder = HistogramRecorder(histogram)
    assert not recorder.fast
    for value in (0.1, 0.2):
        recorder.record(value, dict(SETS[0]), Context())
    assert calls == [0.1, 0.2]
    (point,) = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
    assert point.count == 2
    provider.shutdown()


def test_the_self_check_fails_where_the_fast_path_would_split_a_series(monkeypatch: pytest.MonkeyPatch) -> None:
    """A future SDK whose aggregation key is not the one computed here: the check must catch it."""
    internals = _histogram._internals()
    assert internals is not None
    cls, measurement, _ = internals
    monkeypatch.setattr(_histogram, "_internals", lambda: (cls, measurement, lambda attrs: ("other", repr(attrs))))
    assert _histogram._compare() is False


def test_prepared_attribute_sets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_histogram, "MAX_PREPARED", 4)
    provider, (reader,) = provider_for({})
    histogram = provider.get_meter("m").create_histogram("h", unit="s")
    recorder = HistogramRecorder(histogram)
    for n in range(10):
        recorder.record(0.1, {"network.peer.address": f"192.0.2.{n}"}, Context())
        assert len(recorder._prepared) <= 4
    assert len(reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics[0].data.data_points) == 10
    provider.shutdown()


def test_no_point_is_lost_to_delta_collections_running_alongside() -> None:
    """A delta collection swaps a series' aggregation out while points keep coming."""
    import sys
    import threading

    interval = sys.getswitchinterval()
    provider, (reader,) = provider_for({"temporality": DELTA})
    histogram = provider.get_meter("m").create_histogram("h", unit="s")
    recorder = HistogramRecorder(histogram)
    attrs = dict(SETS[0])
    total = 30_000
    done = threading.Event()
    collected = 0

    def record() -> None:
        for _ in range(total):
            recorder.record(0.001, attrs, Context())
        done.set()

    def counts() -> int:
        data = reader.get_metrics_data()
        if data is None or not data.resource_metrics:
            return 0
        return sum(p.count for m in data.resource_metrics[0].scope_metrics[0].metrics for p in m.data.data_points)

    sys.setswitchinterval(1e-6)  # hand the GIL over as often as possible
    try:
        thread = threading.Thread(target=record)
        thread.start()
        while not done.is_set():
            collected += counts()
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    collected += counts()
    provider.shutdown()
    assert recorder.fast
    assert collected == total


def test_a_proxy_histogram_takes_the_fast_path_once_the_sdk_provider_is_set() -> None:
    from opentelemetry.metrics._internal import _ProxyMeter

    meter = _ProxyMeter("m")  # what get_meter() hands out before set_meter_provider()
    histogram = meter.create_histogram("h", unit="s")
    recorder = HistogramRecorder(histogram)
    assert not recorder.fast
    recorder.record(0.1, dict(SETS[0]))  # no provider yet: dropped, as the proxy drops it
    provider, (reader,) = provider_for({})
    meter.on_set_meter_provider(provider)
    attrs = dict(SETS[0])
    recorder.record(0.2, attrs)
    recorder.record(0.3, attrs)
    assert recorder.fast
    (point,) = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
    assert (point.count, point.sum) == (2, pytest.approx(0.5))
    provider.shutdown()
