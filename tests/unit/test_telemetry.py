"""Names, units, instrument types, attributes, cardinality and monotonicity of the exported metrics.

A scripted FakeSource drives the real Pipeline and Instruments on a real OTel SDK
MeterProvider; expected values are written out from CONTRACT.md, not taken from
the code under test.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any, Dict, List, Optional

import pytest
from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ExponentialHistogram,
    Histogram,
    Sum,
)
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View

import otel_ebpf_flows
from otel_ebpf_flows import _instrumentor, _telemetry
from otel_ebpf_flows._source import Counters, FlowEvent, FlowKey, ProbeStats, Role, Snapshot

from .conftest import collect
from .fakes import FakeSource, wait_until

# -- the contract, written out ------------------------------------------------------------------

COUNTERS = {
    "ebpf_flows.tcp.connection.attempts": "{connection}",
    "ebpf_flows.tcp.retransmits": "{segment}",
    "ebpf_flows.tcp.io": "By",
    "ebpf_flows.tcp.resets": "{segment}",
    "ebpf_flows.tcp.connection.closes": "{connection}",
    "ebpf_flows.tcp.zero_window.events": "{event}",
    "ebpf_flows.tcp.window_scaling.disabled": "{connection}",
    "ebpf_flows.tcp.listen.overflows": "{connection}",
}
SELF_COUNTERS = {
    "ebpf_flows.probe.events.lost": "{event}",
    "ebpf_flows.probe.map.evictions": "{entry}",
}
UP_DOWN = {"ebpf_flows.tcp.connections.active": "{connection}"}
HISTOGRAMS = {
    "ebpf_flows.tcp.handshake.duration": "s",
    "ebpf_flows.tcp.rtt": "s",
    "ebpf_flows.tcp.connection.duration": "s",
}
ALL_METRICS = {**COUNTERS, **SELF_COUNTERS, **UP_DOWN, **HISTOGRAMS}
# the TCP metrics whose points carry the common attributes
PEER_METRICS = sorted(set(ALL_METRICS) - set(SELF_COUNTERS) - {"ebpf_flows.tcp.listen.overflows"})

ERROR_TYPES = {"refused", "timed_out", "reset", "host_unreachable", "net_unreachable", "_OTHER"}
CLOSE_REASONS = {"normal", "reset_sent", "reset_received", "timeout", "_OTHER"}
# metric -> the one extra attribute key its points carry (attempts: error.type on failures only)
EXTRA_KEY = {
    "ebpf_flows.tcp.io": "network.io.direction",
    "ebpf_flows.tcp.resets": "network.io.direction",
    "ebpf_flows.tcp.zero_window.events": "network.io.direction",
    "ebpf_flows.tcp.connection.closes": "ebpf_flows.tcp.close.reason",
}
CLIENT_KEYS = {
    "network.transport",
    "network.type",
    "network.peer.address",
    "ebpf_flows.tcp.role",
    "network.peer.port",
}
SERVER_KEYS = {
    "network.transport",
    "network.type",
    "network.peer.address",
    "ebpf_flows.tcp.role",
    "network.local.port",
}

CLIENT4 = FlowKey(role=Role.CLIENT, address="192.0.2.10", port=443, family="ipv4")
SERVER6 = FlowKey(role=Role.SERVER, address="2001:db8::7", port=8080, family="ipv6")
LISTENER = FlowKey(role=Role.SERVER, address="", port=8080, family="")
OVERFLOW_CLIENT = FlowKey(role=Role.CLIENT, address=None, port=0, family="")


def counters(
    failed: Optional[Dict[str, int]] = None, closes: Optional[Dict[str, int]] = None, **fields: int
) -> Counters:
    all_failed = {e: 0 for e in ERROR_TYPES}
    all_failed.update(failed or {})
    all_closes = {r: 0 for r in CLOSE_REASONS}
    all_closes.update(closes or {})
    return Counters(attempts_failed=all_failed, closes=all_closes, **fields)


FULL_CLIENT = counters(
    attempts_ok=7,
    failed={
        "refused": 1,
        "timed_out": 2,
        "reset": 3,
        "host_unreachable": 4,
        "net_unreachable": 5,
        "_OTHER": 6,
    },
    established=7,
    closed=5,
    closes={"normal": 1, "reset_sent": 1, "reset_received": 1, "timeout": 1, "_OTHER": 1},
    retransmits=11,
    bytes_transmitted=1000,
    bytes_received=2000,
    resets_sent=3,
    resets_received=4,
    zero_window_receive=5,
    zero_window_transmit=6,
    window_scaling_disabled=2,
)
FULL_SERVER = counters(
    attempts_ok=9,
    established=9,
    closed=4,
    closes={"normal": 4},
    retransmits=13,
    bytes_transmitted=300,
    bytes_received=400,
    resets_sent=1,
    resets_received=2,
    zero_window_receive=1,
    zero_window_transmit=1,
    window_scaling_disabled=1,
)
PROBES = ProbeStats(events_lost={"tcp_flows.events": 2}, map_evictions={"tcp_flows.socks": 1})


def handshake(key: FlowKey, seconds: float) -> FlowEvent:
    return FlowEvent(kind="handshake", key=key, ts_ns=1, duration_s=seconds, srtt_s=None)


def close(key: FlowKey, seconds: float, srtt: Any = None, reason: str = "normal") -> FlowEvent:
    return FlowEvent(kind="close", key=key, ts_ns=2, duration_s=seconds, srtt_s=srtt, close_reason=reason)


def rtt(key: FlowKey, srtt: Any) -> FlowEvent:
    return FlowEvent(kind="rtt", key=key, ts_ns=3, duration_s=0.0, srtt_s=srtt)


def full_traffic(harness) -> None:
    harness.source.set_snapshot(
        {CLIENT4: FULL_CLIENT, SERVER6: FULL_SERVER, LISTENER: counters(listen_overflows=3)}, PROBES
    )
    harness.source.emit(
        handshake(CLIENT4, 0.002),
        handshake(SERVER6, 0.0004),
        close(CLIENT4, 12.0, srtt=0.003),
        rtt(SERVER6, 0.0001),
    )


# -- names, units, instrument types -------------------------------------------------------------


def test_every_contract_metric_has_its_unit_and_instrument_type(run_pipeline):
    harness = run_pipeline()
    full_traffic(harness)
    exported = harness.collect()

    assert set(exported.metrics) == set(ALL_METRICS)
    for name, unit in ALL_METRICS.items():
        assert exported.metrics[name].unit == unit, name
        assert exported.metrics[name].description, name
    for name in {**COUNTERS, **SELF_COUNTERS}:
        data = exported.metrics[name].data
        assert isinstance(data, Sum) and data.is_monotonic, name
        assert data.aggregation_temporality is AggregationTemporality.CUMULATIVE, name
    for name in UP_DOWN:
        data = exported.metrics[name].data
        assert isinstance(data, Sum) and not data.is_monotonic, name
    for name in HISTOGRAMS:
        assert isinstance(exported.metrics[name].data, Histogram), name


def test_module_constants_are_the_contract_names():
    names = {
        value
        for key, value in vars(_telemetry).items()
        if key.isupper()
        and isinstance(value, str)
        and value.startswith("ebpf_flows.")
        and value.count(".") >= 2
        and not value.endswith((".role", ".name", ".reason"))
    }
    assert names == set(ALL_METRICS)


# -- attributes ---------------------------------------------------------------------------------


def _role_points(exported, name: str, role: str) -> List[Any]:
    return [p for p in exported.points(name) if p.attributes.get("ebpf_flows.tcp.role") == role]


def test_client_and_server_points_carry_exactly_the_contract_attributes(run_pipeline):
    harness = run_pipeline()
    full_traffic(harness)
    exported = harness.collect()

    for name in PEER_METRICS:
        points = exported.points(name)
        assert points, name
        for point in points:
            attrs = dict(point.attributes)
            role = attrs["ebpf_flows.tcp.role"]
            base = CLIENT_KEYS if role == "client" else SERVER_KEYS
            extra = set(attrs) - base
            if name in EXTRA_KEY:
                assert extra == {EXTRA_KEY[name]}, (name, attrs)
            elif name == "ebpf_flows.tcp.connection.attempts":
                assert extra <= {"error.type"}, (name, attrs)
            else:
                assert extra == set(), (name, attrs)
            assert set(attrs) >= base, (name, attrs)
            assert attrs["network.transport"] == "tcp"
            assert type(attrs["network.peer.address"]) is str
            if role == "client":
                assert (attrs["network.peer.address"], attrs["network.type"]) == ("192.0.2.10", "ipv4")
                assert type(attrs["network.peer.port"]) is int and attrs["network.peer.port"] == 443
                assert "network.local.port" not in attrs
            else:
                assert role == "server"
                assert (attrs["network.peer.address"], attrs["network.type"]) == ("2001:db8::7", "ipv6")
                assert type(attrs["network.local.port"]) is int and attrs["network.local.port"] == 8080
                assert "network.peer.port" not in attrs


def _by(exported, name: str, role: str, key: str) -> Dict[Any, Any]:
    """extra attribute value -> point value for one role's points of a Sum metric."""
    return {p.attributes.get(key): p.value for p in _role_points(exported, name, role)}


def test_attempts_error_type_only_on_failures_with_the_contract_values(run_pipeline):
    harness = run_pipeline()
    full_traffic(harness)
    exported = harness.collect()

    client = _by(exported, "ebpf_flows.tcp.connection.attempts", "client", "error.type")
    assert client == {
        None: 7,
        "refused": 1,
        "timed_out": 2,
        "reset": 3,
        "host_unreachable": 4,
        "net_unreachable": 5,
        "_OTHER": 6,
    }
    assert set(client) - {None} == ERROR_TYPES
    server = _by(exported, "ebpf_flows.tcp.connection.attempts", "server", "error.type")
    assert server == {None: 9}


def test_direction_and_close_reason_values(run_pipeline):
    harness = run_pipeline()
    full_traffic(harness)
    exported = harness.collect()
    direction = "network.io.direction"

    assert _by(exported, "ebpf_flows.tcp.io", "client", direction) == {"transmit": 1000, "receive": 2000}
    assert _by(exported, "ebpf_flows.tcp.io", "server", direction) == {"transmit": 300, "receive": 400}
    assert _by(exported, "ebpf_flows.tcp.resets", "client", direction) == {"transmit": 3, "receive": 4}
    assert _by(exported, "ebpf_flows.tcp.zero_window.events", "client", direction) == {
        "receive": 5,
        "transmit": 6,
    }
    reason = "ebpf_flows.tcp.close.reason"
    closes = _by(exported, "ebpf_flows.tcp.connection.closes", "client", reason)
    assert closes == {r: 1 for r in CLOSE_REASONS}
    assert _by(exported, "ebpf_flows.tcp.connection.closes", "server", reason) == {"normal": 4}
    assert _by(exported, "ebpf_flows.tcp.retransmits", "client", None) == {None: 11}
    assert _by(exported, "ebpf_flows.tcp.window_scaling.disabled", "server", None) == {None: 1}


def test_listen_overflows_carry_only_the_local_port(run_pipeline):
    harness = run_pipeline()
    full_traffic(harness)
    exported = harness.collect()

    points = exported.points("ebpf_flows.tcp.listen.overflows")
    assert [(dict(p.attributes), p.value) for p in points] == [({"network.local.port": 8080}, 3)]
    assert type(points[0].attributes["network.local.port"]) is int


def test_self_telemetry_carries_only_the_probe_name(run_pipeline):
    harness = run_pipeline()
    full_traffic(harness)
    exported = harness.collect()

    assert exported.values("ebpf_flows.probe.events.lost") == {
        frozenset({("ebpf_flows.probe.name", "tcp_flows.events")}): 2
    }
    assert exported.values("ebpf_flows.probe.map.evictions") == {
        frozenset({("ebpf_flows.probe.name", "tcp_flows.socks")}): 1
    }


def test_self_telemetry_never_goes_down(run_pipeline):
    harness = run_pipeline()
    harness.source.set_snapshot({}, ProbeStats(events_lost={"p": 5}, map_evictions={"q": 2}))
    assert harness.collect().values("ebpf_flows.probe.events.lost") == {
        frozenset({("ebpf_flows.probe.name", "p")}): 5
    }
    harness.source.set_snapshot({}, ProbeStats(events_lost={"p": 1}, map_evictions={}))
    exported = harness.collect()
    assert exported.values("ebpf_flows.probe.events.lost") == {frozenset({("ebpf_flows.probe.name", "p")}): 5}
    assert exported.values("ebpf_flows.probe.map.evictions") == {
        frozenset({("ebpf_flows.probe.name", "q")}): 2
    }


@pytest.mark.parametrize(
    ("address", "family"),
    [("198.51.100.4", "ipv4"), ("2001:db8::1", "ipv6"), ("::1", "ipv6"), ("127.0.0.1", "ipv4")],
)
def test_network_type_follows_the_key_family(run_pipeline, address, family):
    harness = run_pipeline()
    key = FlowKey(role=Role.CLIENT, address=address, port=5432, family=family)
    harness.source.set_snapshot({key: counters(attempts_ok=1, established=1, retransmits=1)})
    harness.source.emit(handshake(key, 0.001), rtt(key, 0.0002), close(key, 1.0))
    exported = harness.collect()

    names = [
        "ebpf_flows.tcp.connection.attempts",
        "ebpf_flows.tcp.retransmits",
        "ebpf_flows.tcp.connections.active",
        *HISTOGRAMS,
    ]
    for name in names:
        points = exported.points(name)
        assert [(p.attributes["network.type"], p.attributes["network.peer.address"]) for p in points] == [
            (family, address)
        ], name


def test_points_carry_the_providers_resource_and_the_package_scope(run_pipeline, make_provider, monkeypatch):
    # the instrumentor's own wiring, with the kernel source replaced by the fake
    sources: List[FakeSource] = []

    def fake_kernel_source(config, **_kw):
        sources.append(FakeSource())
        return sources[-1]

    monkeypatch.setattr(_instrumentor, "KernelSource", fake_kernel_source)
    provider, reader = make_provider()
    instrumentor = otel_ebpf_flows.EbpfFlowsInstrumentor()
    instrumentor.instrument(meter_provider=provider, poll_interval=0.01, sample_interval=0.1)
    try:
        assert instrumentor.pipeline is not None and instrumentor.pipeline.source is sources[0]
        sources[0].set_snapshot({CLIENT4: FULL_CLIENT}, PROBES)
        sources[0].emit(handshake(CLIENT4, 0.01))
        exported = collect(reader)
    finally:
        instrumentor.uninstrument()
    assert sources[0].closed

    assert exported.metrics
    for name in exported.metrics:
        assert exported.resources[name].attributes["service.name"] == "unit"
        assert exported.scopes[name].name == "otel_ebpf_flows"
        assert exported.scopes[name].version == otel_ebpf_flows.__version__


def test_instruments_follow_a_new_meter_provider(make_provider, monkeypatch):
    """Instrumenting again on another provider exports there, even when its meter reuses a freed id."""
    monkeypatch.setattr(_instrumentor, "KernelSource", lambda config, **_kw: FakeSource())
    monkeypatch.setattr(_instrumentor, "id", lambda _obj: 1, raising=False)  # every meter: the same id
    instrumentor = otel_ebpf_flows.EbpfFlowsInstrumentor()
    for _ in range(3):
        provider, reader = make_provider()
        instrumentor.instrument(meter_provider=provider, poll_interval=0.01, sample_interval=0.1)
        try:
            assert instrumentor.pipeline is not None
            instrumentor.pipeline.source.set_snapshot({CLIENT4: counters(retransmits=1)})
            exported = collect(reader)
        finally:
            instrumentor.uninstrument()
        assert list(exported.values("ebpf_flows.tcp.retransmits").values()) == [1]


# -- cardinality --------------------------------------------------------------------------------


def test_peer_cap_folds_extra_peers_into_other_and_keeps_totals(run_pipeline):
    harness = run_pipeline(max_peers=3)
    keys = [FlowKey(role=Role.CLIENT, address=f"192.0.2.{i}", port=443, family="ipv4") for i in range(1, 6)]
    snapshot = {
        key: counters(
            attempts_ok=i,
            established=i,
            closed=1,
            closes={"normal": 1},
            retransmits=10 * i,
            bytes_transmitted=100 * i,
            bytes_received=1000 * i,
        )
        for i, key in enumerate(keys, start=1)
    }
    harness.source.set_snapshot(snapshot)
    harness.source.emit(
        *[handshake(k, 0.001 * i) for i, k in enumerate(keys, start=1)],
        *[rtt(k, 0.0001 * i) for i, k in enumerate(keys, start=1)],
    )
    exported = harness.collect()

    inputs = {k.address for k in keys}
    expected_totals = {
        "ebpf_flows.tcp.connection.attempts": 15,
        "ebpf_flows.tcp.retransmits": 150,
        "ebpf_flows.tcp.io": 1500 + 15000,
        "ebpf_flows.tcp.connection.closes": 5,
        "ebpf_flows.tcp.connections.active": 15 - 5,
    }
    for name, total in expected_totals.items():
        points = exported.points(name)
        addresses = {p.attributes["network.peer.address"] for p in points}
        assert "_OTHER" in addresses, name
        assert len(addresses - {"_OTHER"}) == 3 and addresses - {"_OTHER"} <= inputs, name
        assert sum(p.value for p in points) == total, name
    for name, total in (("ebpf_flows.tcp.handshake.duration", 0.015), ("ebpf_flows.tcp.rtt", 0.0015)):
        points = exported.points(name)
        addresses = {p.attributes["network.peer.address"] for p in points}
        assert "_OTHER" in addresses and len(addresses - {"_OTHER"}) == 3, name
        assert sum(p.count for p in points) == 5, name
        assert sum(p.sum for p in points) == pytest.approx(total), name

    # an admitted peer keeps its address, a folded one stays folded
    harness.source.set_snapshot(
        {
            **snapshot,
            keys[0]: counters(
                retransmits=10 + 1,
                attempts_ok=1,
                established=1,
                closed=1,
                closes={"normal": 1},
                bytes_transmitted=100,
                bytes_received=1000,
            ),
        }
    )
    again = harness.collect()
    assert {p.attributes["network.peer.address"] for p in again.points("ebpf_flows.tcp.retransmits")} == {
        p.attributes["network.peer.address"] for p in exported.points("ebpf_flows.tcp.retransmits")
    }
    assert sum(p.value for p in again.points("ebpf_flows.tcp.retransmits")) == 151


# -- counters never go down ---------------------------------------------------------------------


def _retransmits(harness) -> Dict[frozenset, int]:
    return harness.collect().values("ebpf_flows.tcp.retransmits")


def test_counters_never_go_down_when_kernel_entries_drop_or_vanish(run_pipeline):
    harness = run_pipeline()
    series = frozenset(
        {
            ("network.transport", "tcp"),
            ("network.type", "ipv4"),
            ("ebpf_flows.tcp.role", "client"),
            ("network.peer.address", "192.0.2.10"),
            ("network.peer.port", 443),
        }
    )
    seen: List[int] = []

    harness.source.set_snapshot({CLIENT4: counters(retransmits=10)})
    seen.append(_retransmits(harness)[series])
    assert seen[-1] == 10
    # evicted and recreated lower: what it counted since is growth
    harness.source.set_snapshot({CLIENT4: counters(retransmits=3)})
    seen.append(_retransmits(harness)[series])
    assert seen[-1] == 13
    # gone from the map: the series stays at its total
    harness.source.set_snapshot({})
    seen.append(_retransmits(harness)[series])
    assert seen[-1] == 13
    harness.source.set_snapshot({CLIENT4: counters(retransmits=1)})
    seen.append(_retransmits(harness)[series])
    harness.source.set_snapshot({CLIENT4: counters(retransmits=4)})
    seen.append(_retransmits(harness)[series])
    assert seen[-1] >= 14
    assert seen == sorted(seen)


def test_kernel_overflow_key_is_exported_as_other(run_pipeline):
    harness = run_pipeline()
    harness.source.set_snapshot({OVERFLOW_CLIENT: counters(retransmits=7, bytes_transmitted=5)})
    exported = harness.collect()

    points = exported.points("ebpf_flows.tcp.retransmits")
    assert [(dict(p.attributes), p.value) for p in points] == [
        ({"network.transport": "tcp", "ebpf_flows.tcp.role": "client", "network.peer.address": "_OTHER"}, 7)
    ]
    assert [dict(p.attributes) for p in exported.points("ebpf_flows.tcp.io")] == [
        {
            "network.transport": "tcp",
            "ebpf_flows.tcp.role": "client",
            "network.peer.address": "_OTHER",
            "network.io.direction": "transmit",
        }
    ]
    # the overflow key restarting lower never makes its series go down either
    harness.source.set_snapshot({OVERFLOW_CLIENT: counters(retransmits=2)})
    assert [p.value for p in harness.collect().points("ebpf_flows.tcp.retransmits")] == [9]


def test_connections_active_is_established_minus_closed(run_pipeline):
    harness = run_pipeline()
    other = FlowKey(role=Role.CLIENT, address="192.0.2.99", port=443, family="ipv4")

    def active() -> Dict[str, int]:
        return {
            p.attributes["network.peer.address"]: p.value
            for p in harness.collect().points("ebpf_flows.tcp.connections.active")
        }

    harness.source.set_snapshot(
        {CLIENT4: counters(attempts_ok=5, established=5), other: counters(attempts_ok=1, established=1)}
    )
    assert active() == {"192.0.2.10": 5, "192.0.2.99": 1}
    harness.source.set_snapshot(
        {
            CLIENT4: counters(attempts_ok=5, established=5, closed=3, closes={"normal": 3}),
            other: counters(attempts_ok=1, established=1),
        }
    )
    assert active() == {"192.0.2.10": 2, "192.0.2.99": 1}
    harness.source.set_snapshot(
        {
            CLIENT4: counters(attempts_ok=6, established=6, closed=6, closes={"normal": 6}),
            other: counters(attempts_ok=1, established=1, closed=1, closes={"timeout": 1}),
        }
    )
    assert active() == {"192.0.2.10": 0, "192.0.2.99": 0}

    # server side: adopted connections count as established too
    server = counters(attempts_ok=2, established=3, closed=1, closes={"normal": 1})
    harness.source.set_snapshot({SERVER6: server})
    points = harness.collect().points("ebpf_flows.tcp.connections.active")
    assert {p.attributes["network.peer.address"]: p.value for p in points}["2001:db8::7"] == 2
    (server_point,) = [p for p in points if p.attributes["ebpf_flows.tcp.role"] == "server"]
    assert set(server_point.attributes) == SERVER_KEYS


# -- histograms ---------------------------------------------------------------------------------


def _expected_buckets(bounds, values) -> List[int]:
    counts = [0] * (len(bounds) + 1)
    for value in values:
        counts[bisect.bisect_left(bounds, value)] += 1
    return counts


def test_histograms_record_events_with_the_advised_buckets(run_pipeline):
    harness = run_pipeline()
    handshakes = [0.00004, 0.0002, 0.0015, 1.05, 3.0]
    closes = [(0.5, 0.0003), (75.0, None), (4000.0, 0.02)]
    rtts = [0.000012, 0.00009, 0.3, 3.0]
    harness.source.emit(
        *[handshake(CLIENT4, s) for s in handshakes],
        *[close(CLIENT4, d, srtt=r) for d, r in closes],
        *[rtt(CLIENT4, r) for r in rtts],
        rtt(CLIENT4, None),  # no sample yet: nothing recorded
        handshake(SERVER6, 0.25),
    )
    exported = harness.collect()

    expected = {
        "ebpf_flows.tcp.handshake.duration": (_telemetry.HANDSHAKE_BUCKETS, handshakes),
        "ebpf_flows.tcp.connection.duration": (_telemetry.DURATION_BUCKETS, [d for d, _ in closes]),
        "ebpf_flows.tcp.rtt": (_telemetry.RTT_BUCKETS, rtts + [r for _, r in closes if r is not None]),
    }
    for name, (bounds, values) in expected.items():
        (point,) = _role_points(exported, name, "client")
        assert tuple(point.explicit_bounds) == tuple(bounds), name
        assert point.count == len(values), name
        assert point.sum == pytest.approx(sum(values)), name
        assert list(point.bucket_counts) == _expected_buckets(bounds, values), name
        assert point.min == pytest.approx(min(values)) and point.max == pytest.approx(max(values)), name
    (server_point,) = _role_points(exported, "ebpf_flows.tcp.handshake.duration", "server")
    assert (server_point.count, server_point.sum) == (1, 0.25)
    assert set(server_point.attributes) == SERVER_KEYS


def test_advised_buckets_are_sorted_and_cover_the_syn_retry_marks():
    for bounds in (_telemetry.HANDSHAKE_BUCKETS, _telemetry.RTT_BUCKETS, _telemetry.DURATION_BUCKETS):
        assert list(bounds) == sorted(set(bounds))
    assert _telemetry.RTT_BUCKETS[0] < 0.001 and _telemetry.HANDSHAKE_BUCKETS[0] < 0.001
    for mark in (1.0, 3.0, 7.0):  # a SYN retransmitted n times lands between two boundaries around its mark
        i = bisect.bisect_left(_telemetry.HANDSHAKE_BUCKETS, mark)
        assert _telemetry.HANDSHAKE_BUCKETS[i - 1] < mark < _telemetry.HANDSHAKE_BUCKETS[i]


def test_a_users_view_still_wins_over_the_bucket_advice(run_pipeline):
    view = View(instrument_name="ebpf_flows.tcp.rtt", aggregation=ExponentialBucketHistogramAggregation())
    harness = run_pipeline(views=[view])
    harness.source.emit(rtt(CLIENT4, 0.0002), rtt(CLIENT4, 0.004), handshake(CLIENT4, 0.01))
    exported = harness.collect()

    assert isinstance(exported.metrics["ebpf_flows.tcp.rtt"].data, ExponentialHistogram)
    (point,) = exported.points("ebpf_flows.tcp.rtt")
    assert point.count == 2 and point.sum == pytest.approx(0.0042)
    assert set(point.attributes) == CLIENT_KEYS
    # the other histograms keep the advice
    (hs,) = exported.points("ebpf_flows.tcp.handshake.duration")
    assert tuple(hs.explicit_bounds) == _telemetry.HANDSHAKE_BUCKETS


def test_a_readers_exponential_histogram_preference_still_wins(run_pipeline):
    harness = run_pipeline(
        preferred_aggregation={HistogramInstrument: ExponentialBucketHistogramAggregation()}
    )
    harness.source.emit(rtt(CLIENT4, 0.0002), handshake(CLIENT4, 0.01), close(CLIENT4, 2.0))
    exported = harness.collect()

    for name in HISTOGRAMS:
        assert isinstance(exported.metrics[name].data, ExponentialHistogram), name


# -- failures never reach the SDK ---------------------------------------------------------------


def _sdk_errors(caplog) -> List[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("opentelemetry") and r.levelno >= logging.WARNING]


def test_a_failing_source_is_logged_once_and_retried(run_pipeline, caplog):
    caplog.set_level(logging.DEBUG)
    harness = run_pipeline()
    harness.source.set_snapshot({CLIENT4: counters(retransmits=2)})
    assert sum(harness.collect().values("ebpf_flows.tcp.retransmits").values()) == 2

    harness.source.snapshot = Snapshot(counters={CLIENT4: counters(retransmits=5)}, probes=ProbeStats())
    harness.source.fail_samples = 3
    during = harness.collect()  # never raises; the last good state is exported
    assert sum(during.values("ebpf_flows.tcp.retransmits").values()) in (2, 5)
    wait_until(lambda: harness.source.failed_samples == 3)
    harness.source.wait_samples(2)
    after = harness.collect()
    assert sum(after.values("ebpf_flows.tcp.retransmits").values()) == 5

    warnings = [r for r in caplog.records if r.name == "otel_ebpf_flows" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "retrying" in warnings[0].getMessage()
    assert warnings[0].exc_info is not None and isinstance(warnings[0].exc_info[1], OSError)
    assert _sdk_errors(caplog) == []
    assert harness.pipeline._thread is not None and harness.pipeline._thread.is_alive()


def test_callbacks_swallow_errors_of_the_pipeline(run_pipeline, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    harness = run_pipeline()
    harness.source.set_snapshot({CLIENT4: counters(retransmits=2)})

    def broken(*_args, **_kwargs):
        raise RuntimeError("scripted aggregator failure")

    monkeypatch.setattr(harness.pipeline.aggregator, "all_observations", broken)
    exported = harness.collect()
    assert "ebpf_flows.tcp.retransmits" not in exported.metrics
    assert _sdk_errors(caplog) == []
    assert any(
        "collecting" in r.getMessage() and r.exc_info for r in caplog.records if r.name == "otel_ebpf_flows"
    )


def test_a_source_failing_its_first_sample_is_closed(make_provider):
    provider, _reader = make_provider()
    source = FakeSource()
    source.fail_first_sample = True
    instruments = _telemetry.Instruments(provider.get_meter("otel_ebpf_flows"), lambda: None)
    pipeline = _telemetry.Pipeline(source, instruments, 200, 0.005, 0.01)
    with pytest.raises(OSError, match="scripted"):
        pipeline.start()
    assert source.started and source.closed  # nothing stays attached after a failed start


def test_stop_stops_the_reader_and_closes_the_source(run_pipeline):
    harness = run_pipeline()
    thread = harness.pipeline._thread
    assert thread is not None and thread.is_alive()
    harness.pipeline.stop()
    assert not thread.is_alive()
    assert harness.source.closed
