"""The reader's hot path: histogram records decoded without a FlowEvent, flow keys decoded once,
attribute sets built once; each must give exactly what the general path gives."""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any, Dict, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_ebpf_flows import _records, _spans, _telemetry
from otel_ebpf_flows._records import RecordError, decode_event, decode_key, decode_key_bytes, decode_metric
from otel_ebpf_flows._source import CONN_EVENT_KINDS, Counters, FlowKey, ProbeStats, Role, Snapshot

from .test_records import CLIENT, SERVER, V4, V6, mapped, plausible_events, raw_event, raw_key


@settings(max_examples=300, deadline=None)
@given(plausible_events())
def test_decode_metric_agrees_with_decode_event(data):
    try:
        event = decode_event(data)
    except RecordError:
        # decode_metric checks only what a histogram record needs; when it accepts a
        # record decode_event rejects, that record is of a span kind (None) or it
        # raises as well
        try:
            assert decode_metric(data) is None
        except RecordError:
            pass
        return
    record = decode_metric(data)
    if event.kind not in ("handshake", "close", "rtt"):
        assert record is None
        return
    assert record == (event.kind, event.key, event.ts_ns, event.duration_s, event.srtt_s, event.tid)


def test_decode_metric_rejects_what_decode_event_rejects_for_histogram_kinds():
    with pytest.raises(RecordError):
        decode_metric(b"\0" * (_records.EVENT_SIZE - 1))
    with pytest.raises(RecordError):
        decode_metric(raw_event(kind=_records.FLOW_EVENT_CLOSE, reason=_records.CLOSE_MAX))
    with pytest.raises(RecordError):
        decode_metric(raw_event(kind=_records.FLOW_EVENT_RTT, key=raw_key(mapped("192.0.2.1"), 443, V4, 9)))


@settings(max_examples=300, deadline=None)
@given(plausible_events())
def test_decode_conn_agrees_with_decode_event(data):
    """A span record decodes to FlowEvent's fields, and is rejected exactly when decode_event
    rejects it; other kinds are None."""
    try:
        event = decode_event(data)
    except RecordError:
        try:
            record = _records.decode_conn(data)
        except RecordError:
            return
        assert record is None  # not a span kind: decode_event's rejection is not decode_conn's business
        return
    record = _records.decode_conn(data)
    if event.kind not in CONN_EVENT_KINDS:
        assert record is None
        return
    raw_reason = _records.EVENT.unpack(data)[2]
    assert record == (event.kind, event.conn_id, event.key, event.peer_port, event.ts_ns, event.duration_s,
                      event.srtt_s, event.direction, event.count, event.adopted, event.tid,
                      event.kind == "conn" and raw_reason == _records.CONN_HIST_IN_KERNEL)


def test_the_span_table_holds_the_same_from_records_and_from_events():
    """ConnTable.add_record (the ring's hot path) and ConnTable.add (FlowEvents) agree."""
    key = FlowKey(role=Role.CLIENT, address="192.0.2.10", port=443, family="ipv4")
    by_event, by_record = _spans.ConnTable(10), _spans.ConnTable(10)
    raws = [raw_event(kind=_records.FLOW_EVENT_CONN, conn_id=3, key=raw_key(mapped("192.0.2.10"), 443, V4, CLIENT),
                      ts_ns=5_000_000, duration_ns=1_500_000, srtt_us=250, peer_port=443),
            raw_event(kind=_records.FLOW_EVENT_RETRANSMIT, conn_id=3, key=raw_key(mapped("192.0.2.10"), 443, V4, CLIENT),
                      ts_ns=6_000_000, duration_ns=2, srtt_us=300, peer_port=443),
            raw_event(kind=_records.FLOW_EVENT_RESET, conn_id=3, key=raw_key(mapped("192.0.2.10"), 443, V4, CLIENT),
                      ts_ns=7_000_000, reason=_records.FLOW_DIR_RECEIVE, peer_port=443),
            raw_event(kind=_records.FLOW_EVENT_GONE, conn_id=3, key=raw_key(mapped("192.0.2.10"), 443, V4, CLIENT),
                      ts_ns=8_000_000, peer_port=443)]
    for data in raws:
        by_event.add(decode_event(data))
        record = _records.decode_conn(data)
        assert record is not None
        by_record.add_record(record)
    a, b = by_event.get(3), by_record.get(3)
    assert a is not None and a == b
    assert (a.peer_address, a.port, a.handshake_s, a.opened_ns, a.gone_ns, a.srtt_s) == (
        key.address, 443, 0.0015, 3_500_000, 8_000_000, 0.0003)
    assert list(a.events) == [(6_000_000, "retransmit", None, 2), (7_000_000, "reset", "receive", 1)]


def test_a_key_is_decoded_once_and_a_bad_one_never_cached(monkeypatch):
    monkeypatch.setattr(_records, "_key_cache", {})
    raw = bytes(raw_key(mapped("198.51.100.7"), 8443, V4, CLIENT))
    first = decode_key_bytes(raw)
    assert first == FlowKey(role=Role.CLIENT, address="198.51.100.7", port=8443, family="ipv4")
    assert decode_key_bytes(raw) is first
    assert decode_key(raw_key(mapped("198.51.100.7"), 8443, V4, CLIENT)) is first
    bad = bytes(raw_key(mapped("198.51.100.7"), 8443, V4, 7))
    for _ in range(2):
        with pytest.raises(RecordError):
            decode_key_bytes(bad)
    assert bad not in _records._key_cache


def test_the_key_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(_records, "_key_cache", {})
    monkeypatch.setattr(_records, "KEY_CACHE_SIZE", 4)
    keys = [bytes(raw_key(bytes(15) + bytes([i + 1]), 80, V6, SERVER)) for i in range(10)]
    decoded = [decode_key_bytes(k) for k in keys]
    assert len(_records._key_cache) <= 4
    # what was dropped decodes again to the same value
    assert [decode_key_bytes(k) for k in keys] == decoded


def test_cached_series_are_the_attributes_and_keep_the_peer_cap():
    aggregator = _telemetry.Aggregator(max_peers=2)
    keys = [FlowKey(role=Role.CLIENT, address=f"192.0.2.{i}", port=443, family="ipv4") for i in range(1, 5)]
    for metric in (_telemetry.HANDSHAKE, _telemetry.RTT, _telemetry.DURATION):
        got = [aggregator.series(metric, k) for k in keys]
        assert [a[_telemetry.PEER_ADDRESS] for a in got] == ["192.0.2.1", "192.0.2.2", "_OTHER", "_OTHER"]
        assert got == [aggregator.attributes(metric, k) for k in keys]
        assert aggregator.series(metric, keys[0]) is got[0]  # built once


class _Sink:
    """Collects histogram points of a real SDK provider."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.instruments = _telemetry.Instruments(self.provider.get_meter("t"), lambda: None)
        self.aggregator = _telemetry.Aggregator(max_peers=200)

    def points(self) -> Dict[Tuple[str, frozenset], Tuple[int, float, List[int]]]:
        out: Dict[Tuple[str, frozenset], Tuple[int, float, List[int]]] = {}
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for p in m.data.data_points:
                        out[(m.name, frozenset(p.attributes.items()))] = (p.count, p.sum, list(p.bucket_counts))
        return out


def test_tuple_records_export_what_flow_events_export():
    records = [
        raw_event(kind=_records.FLOW_EVENT_HANDSHAKE, duration_ns=1_500_000, ts_ns=10**9, tid=5),
        raw_event(kind=_records.FLOW_EVENT_CLOSE, reason=1, duration_ns=3 * 10**9, srtt_us=250),
        raw_event(kind=_records.FLOW_EVENT_CLOSE, duration_ns=10**6, srtt_us=0),  # no RTT yet
        raw_event(kind=_records.FLOW_EVENT_RTT, srtt_us=42, tid=9, ts_ns=2 * 10**9),
        raw_event(key=raw_key(bytes(15) + b"\x01", 8080, V6, SERVER), kind=_records.FLOW_EVENT_HANDSHAKE,
                  duration_ns=80_000),
    ]
    by_event, by_tuple = _Sink(), _Sink()
    seen: List[Tuple[int, int]] = []

    def exemplar(tid: int, ts: int, key: Any) -> None:
        seen.append((tid, ts))
        return None

    for data in records:
        by_event.instruments.record(by_event.aggregator, decode_event(data), exemplar)
    asked = list(seen)
    seen.clear()
    for data in records:
        record = decode_metric(data)
        assert record is not None
        by_tuple.instruments.record_metric(by_tuple.aggregator, record, exemplar)
    assert seen == asked  # the same spans are asked for (the handshake's SYN time, the RTT's)
    points = by_tuple.points()
    assert points == by_event.points()
    assert {name for name, _ in points} == {_telemetry.HANDSHAKE, _telemetry.DURATION, _telemetry.RTT}
    assert sum(c for (name, _), (c, _s, _b) in points.items() if name == _telemetry.RTT) == 2


@settings(max_examples=200, deadline=None)
@given(st.tuples(st.binary(min_size=16, max_size=16), *(st.integers(0, 2**b - 1) for b in (16, 8, 8, 8, 8, 16, 32, 32,
                                                                                        64, 64, 64))))
def test_the_precompiled_layouts_read_what_the_ctypes_mirrors_write(fields):
    # the mirrors are checked against the object's BTF (test_records); the layouts against the mirrors
    addr, port, family, role, kind, reason, peer_port, srtt_us, tid, ts_ns, duration_ns, conn_id = fields
    event = _records.CFlowEvent()
    ctypes.memmove(event.key.addr, addr, 16)
    event.key.port, event.key.family, event.key.role = port, family, role
    event.kind, event.reason, event.peer_port, event.srtt_us, event.tid = kind, reason, peer_port, srtt_us, tid
    event.ts_ns, event.duration_ns, event.conn_id = ts_ns, duration_ns, conn_id
    assert _records.EVENT.size == _records.EVENT_SIZE == ctypes.sizeof(_records.CFlowEvent)
    assert _records.EVENT.unpack(bytes(event)) == (
        bytes(event.key), kind, reason, peer_port, srtt_us, tid, ts_ns, duration_ns, conn_id)
    assert _records._KEY.unpack(bytes(event.key)) == (addr, port, family, role)
    conns = _records.CThreadConns()
    conns.slot[_records.THREAD_SLOTS - 1].conn_id = conn_id
    conns.slot[_records.THREAD_SLOTS - 1].last_ns = ts_ns
    conns.slot[_records.THREAD_SLOTS - 1].srtt_us = srtt_us
    slots = list(_records.THREAD_SLOT.iter_unpack(bytes(conns)))
    assert len(slots) == _records.THREAD_SLOTS
    assert slots[-1][:3] == (conn_id, ts_ns, srtt_us)


class _GatedSource:
    """A source whose samples, once gated, each wait for a permit; a sample returns the state it
    found on entry."""

    def __init__(self) -> None:
        self.snapshot = Snapshot(counters={}, probes=ProbeStats())
        self.gated = False
        self.permits = threading.Semaphore(0)
        self.entered = threading.Event()

    def start(self, on_event: Any) -> None:
        pass

    def poll(self, timeout_s: float) -> None:
        pass

    def sample(self) -> Snapshot:
        taken = self.snapshot
        self.entered.set()
        if self.gated:
            assert self.permits.acquire(timeout=10)
        return taken

    def close(self) -> None:
        pass


def test_a_collection_waits_for_a_sample_that_started_after_it_asked():
    source = _GatedSource()
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    instruments = _telemetry.Instruments(provider.get_meter("t"), lambda: None)
    pipeline = _telemetry.Pipeline(source, instruments, max_peers=200, poll_interval=0.005, sample_interval=60)
    pipeline.start()
    seen: List[int] = []
    try:
        time.sleep(pipeline.FRESH_S + 0.05)  # the start's sample is no longer fresh
        # a sample starts and reads the kernel's state ...
        source.gated = True
        source.entered.clear()
        pipeline._wanted.set()
        assert source.entered.wait(5)
        # ... then the traffic a collection must see happens, and a collection asks
        key = FlowKey(role=Role.CLIENT, address="192.0.2.9", port=443, family="ipv4")
        source.snapshot = Snapshot(counters={key: Counters(attempts_ok=5, established=5)}, probes=ProbeStats())

        def collect() -> None:
            pipeline.refresh(timeout=20)
            rows = pipeline.aggregator.all_observations()[_telemetry.ATTEMPTS]
            seen.append(sum(value for value, _ in rows))

        collector = threading.Thread(target=collect)
        collector.start()
        deadline = time.monotonic() + 5
        while not pipeline._wanted.is_set():  # the collection has asked
            assert time.monotonic() < deadline
            time.sleep(0.001)
        source.permits.release()  # the sample in progress ends, with the older state
        collector.join(2)  # a collection content with that sample would be done by now
        source.permits.release()  # the next sample, begun after the collection asked
        collector.join(20)
        assert seen == [5]
    finally:
        source.gated = False
        for _ in range(4):
            source.permits.release()
        pipeline.stop()
        provider.shutdown()
