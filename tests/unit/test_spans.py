"""Span enrichment's matching, attributes and SDK hook, on a real SDK TracerProvider.

The kernel side is scripted here (which thread used which connection, and the kernel's
per-connection records); tests/kernel/test_spans.py checks the same against the kernel.
"""

from __future__ import annotations

import threading
import time
from typing import Dict, List, Tuple

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_ebpf_flows import _spans
from otel_ebpf_flows._source import FlowEvent, FlowKey, Role
from otel_ebpf_flows._spans import SpanEnrichment, peer_of

CLIENT = FlowKey(role=Role.CLIENT, address="192.0.2.10", port=443, family="ipv4")
OTHER = FlowKey(role=Role.CLIENT, address="192.0.2.20", port=8080, family="ipv4")
SERVER = FlowKey(role=Role.SERVER, address="198.51.100.7", port=8000, family="ipv4")


class ScriptedKernel:
    """Per thread, the connections it used (conn_id, last use, srtt_us); records to deliver."""

    def __init__(self) -> None:
        self.threads: Dict[int, List[Tuple[int, int, int]]] = {}
        self.pending: List[FlowEvent] = []
        self.deliver = lambda e: None
        self.drains = 0

    def drain_conn_events(self) -> None:
        self.drains += 1
        pending, self.pending = self.pending, []
        for e in pending:
            self.deliver(e)

    def thread_connections(self, tid: int) -> List[Tuple[int, int, int]]:
        return list(self.threads.get(tid, []))

    def use(self, conn_id: int, srtt_us: int = 1000, tid: int = 0) -> None:
        tid = tid or threading.get_native_id()
        slots = [s for s in self.threads.get(tid, []) if s[0] != conn_id]
        self.threads[tid] = slots + [(conn_id, time.monotonic_ns(), srtt_us)]


def event(kind: str, conn_id: int, key: FlowKey = CLIENT, **kw) -> FlowEvent:
    fields = dict(kind=kind, key=key, ts_ns=time.monotonic_ns(), duration_s=0.0, srtt_s=None, conn_id=conn_id)
    fields.update(kw)
    return FlowEvent(**fields)


@pytest.fixture
def rig():
    kernel = ScriptedKernel()
    spans = SpanEnrichment(kernel, capacity=100, max_events=4, handshake_threshold=0.5, rtt_threshold=0.25)
    kernel.deliver = spans.on_conn_event
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert _spans.attach(provider, spans)
    yield kernel, spans, provider, exporter
    _spans.detach(spans)


def finished(exporter: InMemorySpanExporter) -> Dict[str, dict]:
    return {s.name: dict(s.attributes) for s in exporter.get_finished_spans()}


def test_a_span_gets_its_threads_connection_and_the_events_during_it(rig):
    kernel, spans, provider, exporter = rig
    tracer = provider.get_tracer("t")
    kernel.pending.append(event("conn", 1, duration_s=0.002, peer_port=443))
    kernel.drain_conn_events()
    kernel.use(1)
    kernel.pending.append(event("retransmit", 1, count=2))  # before the span: not its own
    with tracer.start_as_current_span("GET", kind=trace.SpanKind.CLIENT,
                                      attributes={"server.address": "192.0.2.10", "server.port": 443}):
        kernel.use(1, srtt_us=3000)
        kernel.pending.append(event("retransmit", 1, count=3))
        kernel.pending.append(event("reset", 1, direction="receive", count=1))
    span = exporter.get_finished_spans()[0]
    a = dict(span.attributes)
    assert a["ebpf_flows.tcp.retransmits"] == 3
    assert a["ebpf_flows.tcp.rtt"] == 0.003
    assert a["ebpf_flows.tcp.connection.reused"] is True
    assert "ebpf_flows.tcp.handshake.duration" not in a
    assert a["ebpf_flows.tcp.degraded"] is True
    assert [e.name for e in span.events] == ["ebpf_flows.tcp.retransmit", "ebpf_flows.tcp.reset"]
    assert dict(span.events[0].attributes) == {
        "network.peer.address": "192.0.2.10", "network.peer.port": 443, "ebpf_flows.tcp.segments": 3}
    assert span.start_time <= span.events[0].timestamp <= span.end_time
    # the span's own attributes are kept, and the live span was not touched
    assert a["server.address"] == "192.0.2.10"


def test_a_span_that_connects_gets_the_handshake_and_is_not_reused(rig):
    kernel, _spans_, provider, exporter = rig
    with provider.get_tracer("t").start_as_current_span("connect"):
        # established 0.7 s after the SYN, which this span sent
        kernel.pending.append(event("conn", 2, ts_ns=time.monotonic_ns() + 700_000_000, duration_s=0.7,
                                    peer_port=443))
        kernel.use(2)
    a = finished(exporter)["connect"]
    assert a["ebpf_flows.tcp.handshake.duration"] == 0.7
    assert a["ebpf_flows.tcp.connection.reused"] is False
    assert a["ebpf_flows.tcp.degraded"] is True  # 0.7 s >= the 0.5 s threshold
    assert a["ebpf_flows.tcp.retransmits"] == 0


def test_rtt_above_the_threshold_is_degraded_and_below_is_not(rig):
    kernel, _s, provider, exporter = rig
    kernel.pending.append(event("conn", 3, peer_port=443))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("slow"):
        kernel.use(3, srtt_us=300_000)
    with tracer.start_as_current_span("fast"):
        kernel.use(3, srtt_us=1_000)
    spans = finished(exporter)
    assert spans["slow"]["ebpf_flows.tcp.degraded"] is True
    assert spans["fast"]["ebpf_flows.tcp.degraded"] is False


def test_a_span_that_used_no_connection_is_left_alone(rig):
    _kernel, _s, provider, exporter = rig
    with provider.get_tracer("t").start_as_current_span("compute"):
        pass
    assert not any(k.startswith("ebpf_flows") for k in finished(exporter)["compute"])


def test_spans_on_one_thread_are_told_apart_by_peer(rig):
    """asyncio: two requests interleave on one thread; each gets its own peer's connection."""
    kernel, _s, provider, exporter = rig
    kernel.pending += [event("conn", 10, peer_port=443), event("conn", 11, key=OTHER, peer_port=8080)]
    tracer = provider.get_tracer("t")
    a = tracer.start_span("to-a", kind=trace.SpanKind.CLIENT, attributes={"url.full": "https://192.0.2.10/x"})
    b = tracer.start_span("to-b", kind=trace.SpanKind.CLIENT,
                          attributes={"http.url": "http://192.0.2.20:8080/y"})
    kernel.use(10)
    kernel.use(11)
    kernel.pending += [event("retransmit", 11, key=OTHER, count=5)]
    a.end()
    b.end()
    spans = finished(exporter)
    assert spans["to-a"]["ebpf_flows.tcp.retransmits"] == 0
    assert spans["to-b"]["ebpf_flows.tcp.retransmits"] == 5


def test_a_hostname_matches_the_connection_its_thread_made_to_that_port(rig):
    kernel, _s, provider, exporter = rig
    kernel.pending += [event("conn", 20, peer_port=443), event("conn", 21, key=OTHER, peer_port=8080)]
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("api", kind=trace.SpanKind.CLIENT,
                                      attributes={"server.address": "api.example", "server.port": 443}):
        kernel.use(20)
        kernel.use(21)  # another peer used on the same thread during the span
        kernel.pending.append(event("retransmit", 21, key=OTHER, count=1))
    assert finished(exporter)["api"]["ebpf_flows.tcp.retransmits"] == 0
    # learned: a span on a thread that did not do the I/O finds it by the name
    other_thread = threading.Thread(target=lambda: None)
    other_thread.start()
    other_thread.join()
    assert spans_learned(rig) == {"192.0.2.10"}


def spans_learned(rig) -> set:
    _kernel, spans, _p, _e = rig
    return spans.enricher._learned("api.example")


def test_a_server_span_gets_the_accepted_connection_of_its_client_port(rig):
    kernel, _s, provider, exporter = rig
    kernel.pending += [event("conn", 30, key=SERVER, peer_port=50001, duration_s=0.001),
                       event("conn", 31, key=SERVER, peer_port=50002)]
    tracer = provider.get_tracer("t")
    for name in ("first", "second"):
        with tracer.start_as_current_span(name, kind=trace.SpanKind.SERVER, attributes={
                "client.address": "198.51.100.7", "client.port": 50001, "server.port": 8000}):
            kernel.use(30)
            kernel.use(31)
    spans = finished(exporter)
    assert spans["first"]["ebpf_flows.tcp.connection.reused"] is False
    assert spans["first"]["ebpf_flows.tcp.handshake.duration"] == 0.001
    assert spans["second"]["ebpf_flows.tcp.connection.reused"] is True
    assert "ebpf_flows.tcp.handshake.duration" not in spans["second"]


def test_span_events_are_capped_and_the_rest_counted(rig):
    kernel, _s, provider, exporter = rig
    kernel.pending.append(event("conn", 40, peer_port=443))
    with provider.get_tracer("t").start_as_current_span("lossy"):
        kernel.use(40)
        kernel.pending += [event("retransmit", 40, count=1) for _ in range(7)]
    span = exporter.get_finished_spans()[0]
    assert len(span.events) == 4
    assert span.attributes["ebpf_flows.tcp.retransmits"] == 7
    assert span.attributes["ebpf_flows.tcp.events.dropped"] == 3


def test_the_hook_covers_processors_added_later_and_is_removed_on_detach(rig):
    kernel, spans, provider, exporter = rig
    late = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(late))
    kernel.pending.append(event("conn", 50, peer_port=443))
    with provider.get_tracer("t").start_as_current_span("s"):
        kernel.use(50)
    assert late.get_finished_spans()[0].attributes["ebpf_flows.tcp.retransmits"] == 0
    processor = provider._active_span_processor
    _spans.detach(spans)
    assert "on_end" not in vars(processor) and "on_start" not in vars(processor)
    with provider.get_tracer("t").start_as_current_span("after"):
        kernel.use(50)
    assert "ebpf_flows.tcp.retransmits" not in late.get_finished_spans()[-1].attributes


def test_a_failing_kernel_read_never_reaches_the_application(rig, caplog):
    kernel, _s, provider, exporter = rig

    def broken(_tid):
        raise OSError("map gone")

    kernel.thread_connections = broken
    with provider.get_tracer("t").start_as_current_span("s"):
        pass
    with provider.get_tracer("t").start_as_current_span("s2"):
        pass
    assert [s.name for s in exporter.get_finished_spans()] == ["s", "s2"]
    assert len([r for r in caplog.records if "enriching a span failed" in r.message]) == 1


def test_a_non_sdk_provider_is_not_hooked():
    assert _spans.attach(trace.NoOpTracerProvider(), None) is False  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "attributes", "expected"), [
    (trace.SpanKind.CLIENT, {"server.address": "db", "server.port": 5432}, ("db", 5432, None)),
    (trace.SpanKind.CLIENT, {"net.peer.name": "::ffff:10.0.0.1", "net.peer.port": "80"}, ("10.0.0.1", 80, None)),
    (trace.SpanKind.CLIENT, {"url.full": "https://[2001:db8::1]/p"}, ("2001:db8::1", 443, None)),
    (trace.SpanKind.SERVER, {"net.peer.ip": "10.1.2.3", "net.peer.port": 5555, "net.host.port": 80},
     ("10.1.2.3", 5555, 80)),
    (trace.SpanKind.INTERNAL, {"http.route": "/x"}, None),
])
def test_the_peer_a_span_names(kind, attributes, expected):
    spec = peer_of(kind, attributes)
    assert (None if spec is None else (spec.address, spec.port, spec.local_port)) == expected


def test_the_enriched_copy_is_the_span_plus_the_enrichment_and_the_span_is_untouched():
    provider = TracerProvider()
    tracer = provider.get_tracer("t")
    span = tracer.start_span("GET", kind=trace.SpanKind.CLIENT, attributes={"server.port": 443})
    span.add_event("sent", {"n": 1}, timestamp=5)
    span.end()
    assert _spans._copies_by_dict(type(span))  # the SDK's span takes the fast copy
    enrichment = _spans.Enrichment({"ebpf_flows.tcp.retransmits": 2},
                                   [("ebpf_flows.tcp.retransmit", 100, {"ebpf_flows.tcp.segments": 2})], 0)
    out = _spans.enriched_copy(span, enrichment, 1000)
    assert out is not span and type(out) is type(span)
    assert dict(out.attributes) == {"server.port": 443, "ebpf_flows.tcp.retransmits": 2}
    assert [(e.name, e.timestamp, dict(e.attributes)) for e in out.events] == [
        ("sent", 5, {"n": 1}), ("ebpf_flows.tcp.retransmit", 1100, {"ebpf_flows.tcp.segments": 2})]
    assert (out.name, out.context, out.kind, out.start_time, out.end_time, out.resource) == (
        span.name, span.context, span.kind, span.start_time, span.end_time, span.resource)
    assert dict(span.attributes) == {"server.port": 443} and len(span.events) == 1


def test_an_object_with_slots_or_its_own_copy_is_copied_by_copy_copy():
    class Slotted:
        __slots__ = ("a",)

    class OwnCopy:
        def __copy__(self) -> OwnCopy:
            return self

    assert not _spans._copies_by_dict(Slotted)
    assert not _spans._copies_by_dict(OwnCopy)


def test_the_enriched_copy_keeps_the_span_limits():
    from opentelemetry.sdk.trace import SpanLimits

    provider = TracerProvider(span_limits=SpanLimits(max_span_attributes=3, max_span_attribute_length=4))
    span = provider.get_tracer("t").start_span(
        "GET", attributes={"a": "abcdefgh", "b": 1, "c": 2, "d": 3})  # "a" is dropped: 3 at most
    span.end()
    assert dict(span.attributes) == {"b": 1, "c": 2, "d": 3} and span.dropped_attributes == 1
    ours = {"ebpf_flows.tcp.retransmits": 2, "ebpf_flows.tcp.degraded": True}
    out = _spans.enriched_copy(span, _spans.Enrichment(ours, [], 0), 0)
    # ours are added as the SDK would: the oldest make room, and are counted dropped
    assert dict(out.attributes) == {"d": 3, **ours}
    assert out.dropped_attributes == 3
    assert out._attributes.max_value_len == 4  # the span's own limit, kept
    with pytest.raises(TypeError):
        out._attributes["x"] = 1
    assert dict(span.attributes) == {"b": 1, "c": 2, "d": 3} and span.dropped_attributes == 1


@pytest.mark.parametrize("maxlen", [None, 0, 1, 3, 5, 128])
def test_our_attributes_are_set_as_the_sdk_would_set_them(maxlen):
    """Ours (bools, ints, floats) skip the SDK's cleaning, which keeps such values unchanged: the
    result is the SDK's own, order, drops and limits included, with a key of ours already set."""
    from opentelemetry.attributes import BoundedAttributes

    old = BoundedAttributes(maxlen=maxlen, attributes={"a": "abc", "ebpf_flows.tcp.reused": False, "b": 2.5},
                            immutable=True, max_value_len=2)
    ours = {"ebpf_flows.tcp.retransmits": 3, "ebpf_flows.tcp.rtt": 0.001, "ebpf_flows.tcp.reused": True,
            "ebpf_flows.tcp.degraded": False}
    sdk = BoundedAttributes(maxlen=maxlen, immutable=False, max_value_len=2)
    sdk._dict = dict(old._dict)
    sdk.dropped = old.dropped
    sdk._set_items(ours)
    out = _spans._merged_attributes(old, ours, BoundedAttributes)
    assert list(out.items()) == list(sdk.items())
    assert (out.dropped, out.maxlen, out.max_value_len) == (sdk.dropped, maxlen, 2)
    with pytest.raises(TypeError):
        out["x"] = 1
    assert dict(old) == {k: v for k, v in {"a": "ab", "ebpf_flows.tcp.reused": False, "b": 2.5}.items()
                         if k in old}  # untouched


def test_a_value_of_another_type_goes_through_the_sdk_cleaning():
    from opentelemetry.attributes import BoundedAttributes

    old = BoundedAttributes(maxlen=None, attributes={"a": 1}, immutable=True, max_value_len=3)
    out = _spans._merged_attributes(old, {"s": "abcdef", "n": 2}, BoundedAttributes)
    assert dict(out) == {"a": 1, "s": "abc", "n": 2}


def test_merged_attributes_of_a_plain_mapping_go_through_the_sdk_cleaning():
    from opentelemetry.attributes import BoundedAttributes

    out = _spans._merged_attributes({"a": [1, 2], "b": "x"}, {"ebpf_flows.tcp.retransmits": 1}, BoundedAttributes)
    assert dict(out) == {"a": (1, 2), "b": "x", "ebpf_flows.tcp.retransmits": 1}
    assert out.dropped == 0


class GatedKernel(ScriptedKernel):
    """A kernel side that is told whether any span is open (KernelSource.spans_open)."""

    def __init__(self) -> None:
        super().__init__()
        self.told: List[bool] = []

    def spans_open(self, is_open: bool) -> None:
        self.told.append(is_open)


def test_the_kernel_is_told_as_the_first_span_starts_and_the_last_one_ends():
    kernel = GatedKernel()
    spans = SpanEnrichment(kernel, capacity=100, max_events=4, handshake_threshold=0.5, rtt_threshold=0.25)
    assert kernel.told == [False]  # none open yet: the kernel makes no span records
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    assert _spans.attach(provider, spans)
    try:
        tracer = provider.get_tracer("t")
        with tracer.start_as_current_span("outer"):
            assert kernel.told == [False, True]
            with tracer.start_as_current_span("inner"):
                pass
            other = tracer.start_span("not ended with the others")
            assert kernel.told == [False, True]  # still one open all along
        assert kernel.told == [False, True]  # "not ended with the others" is still open
        other.end()
        assert kernel.told == [False, True, False]
        with tracer.start_as_current_span("again"):
            assert kernel.told == [False, True, False, True]
        assert kernel.told == [False, True, False, True, False]
    finally:
        _spans.detach(spans)


def test_a_span_the_registry_never_saw_start_tells_the_kernel_nothing():
    kernel = GatedKernel()
    registry = _spans.SpanRegistry(kernel.spans_open)
    registry.started(1, span_id=10, trace_id=1, sampled=True, start_ns=1)
    assert registry.ended(99, end_ns=2) is None  # started before instrument(), say
    assert kernel.told == [False, True]  # span 10 still open
    registry.ended(10, end_ns=3)
    assert kernel.told == [False, True, False]


def test_spans_a_thread_has_too_many_of_to_remember_still_keep_the_kernel_told_open(monkeypatch):
    # the per-thread deque forgets a busy thread's oldest spans; the kernel must not be told
    # none is open while one of those is
    kernel = GatedKernel()
    registry = _spans.SpanRegistry(kernel.spans_open)
    registry.started(1, span_id=1, trace_id=1, sampled=True, start_ns=1)  # a long-lived root span
    for i in range(2, _spans.SPANS_PER_THREAD + 10):
        registry.started(1, span_id=i, trace_id=1, sampled=True, start_ns=i)
        registry.ended(i, end_ns=i)
    assert kernel.told == [False, True]
    registry.ended(1, end_ns=1000)
    assert kernel.told == [False, True, False]


def test_past_the_limit_of_spans_never_ended_the_kernel_is_told_open_for_good(monkeypatch):
    monkeypatch.setattr(_spans, "LIVE_SPANS_MAX", 3)
    kernel = GatedKernel()
    registry = _spans.SpanRegistry(kernel.spans_open)
    for i in range(1, 6):
        registry.started(1, span_id=i, trace_id=1, sampled=True, start_ns=i)
    for i in range(1, 6):
        registry.ended(i, end_ns=10)
    assert kernel.told == [False, True]  # never told none is open again


def test_a_spans_attributes_are_read_in_place_from_the_sdk_and_copied_from_anything_else():
    provider = TracerProvider()
    attrs = {"server.address": "192.0.2.1", "server.port": 8080}
    span = provider.get_tracer("t").start_span("op", kind=trace.SpanKind.CLIENT, attributes=attrs)
    inner = _spans._attributes_of(span)
    assert inner == attrs and inner is span._attributes._dict  # the SDK's dict, no copy
    span.end()

    class Other:
        kind = trace.SpanKind.CLIENT
        attributes = {"server.address": "192.0.2.1", "server.port": 8080}

    other = _spans._attributes_of(Other())
    assert other == attrs and other is not Other.attributes
    assert peer_of(span.kind, inner) == peer_of(Other.kind, other) == _spans.PeerSpec("192.0.2.1", 8080)
