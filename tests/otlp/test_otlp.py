"""What a real OTLP receiver gets from an application run under ``opentelemetry-instrument``.

Everything is checked as received and decoded by rotel (see conftest.py), not as
the SDK holds it: Resource, scope, names, units, instrument kinds, temporality,
bucket boundaries, attribute keys and wire types, and exact values for traffic
the workload made. Then the exporter's trouble case: the receiver is down when
the application starts.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List

import pytest

from otel_ebpf_flows._telemetry import DURATION_BUCKETS, HANDSHAKE_BUCKETS, RTT_BUCKETS
from otel_ebpf_flows.version import __version__

from .conftest import (
    Collection,
    Receiver,
    collections,
    our_metrics,
    plain,
    reading,
    select,
    series_key,
    total,
    value,
)

SCOPE = "otel_ebpf_flows"
PROTOCOLS = ["grpc", "http/protobuf"]

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
WSCALE = "ebpf_flows.tcp.window_scaling.disabled"
OVERFLOWS = "ebpf_flows.tcp.listen.overflows"
EVENTS_LOST = "ebpf_flows.probe.events.lost"
EVICTIONS = "ebpf_flows.probe.map.evictions"

# The contract (CONTRACT.md): name -> (instrument, unit, extra attribute keys)
CONTRACT: Dict[str, Any] = {
    ATTEMPTS: ("counter", "{connection}", {"error.type"}),
    HANDSHAKE: ("histogram", "s", set()),
    RETRANSMITS: ("counter", "{segment}", set()),
    RTT: ("histogram", "s", set()),
    IO: ("counter", "By", {"network.io.direction"}),
    RESETS: ("counter", "{segment}", {"network.io.direction"}),
    CLOSES: ("counter", "{connection}", {"ebpf_flows.tcp.close.reason"}),
    DURATION: ("histogram", "s", set()),
    ACTIVE: ("updowncounter", "{connection}", set()),
    ZERO_WINDOW: ("counter", "{event}", {"network.io.direction"}),
    WSCALE: ("counter", "{connection}", set()),
    OVERFLOWS: ("counter", "{connection}", set()),
    EVENTS_LOST: ("counter", "{event}", set()),
    EVICTIONS: ("counter", "{entry}", set()),
}
BUCKETS = {HANDSHAKE: list(HANDSHAKE_BUCKETS), RTT: list(RTT_BUCKETS), DURATION: list(DURATION_BUCKETS)}
ENUMS = {
    "error.type": {"refused", "timed_out", "reset", "host_unreachable", "net_unreachable", "_OTHER"},
    "network.io.direction": {"transmit", "receive"},
    "ebpf_flows.tcp.close.reason": {"normal", "reset_sent", "reset_received", "timeout", "_OTHER"},
}
CUMULATIVE = "AGGREGATION_TEMPORALITY_CUMULATIVE"


def service_name(kind: str, protocol: str) -> str:
    return f"otlp-e2e-{kind}-{protocol.replace('/', '-')}-{uuid.uuid4().hex[:8]}"


def settled(done_unix_nano: int, exporter_port: int, exporter_seen: bool = False):
    """Complete once two consecutive collections taken after the workload's traffic settled
    agree on every series but the exporter's own (its connection to the receiver lives on and
    counts on); with ``exporter_seen``, once that connection shows too.

    One collection is not enough: the library refreshes its kernel sample from the first
    callback of a collection with a bounded wait, so on a slow host that callback (attempts)
    can report an older sample than the callbacks after it in the same collection.
    """

    def done(batches: List[Dict[str, Any]]) -> bool:
        by_time = collections(our_metrics(batches, SCOPE))
        times = sorted(t for t in by_time if t >= done_unix_nano)
        if len(times) < 2:
            return False
        before, last = (by_time[t] for t in times[-2:])
        if stable_view(before, exporter_port) != stable_view(last, exporter_port):
            return False
        return not exporter_seen or bool(select(last, ATTEMPTS, network__peer__port=exporter_port))

    return done


def stable_view(collection: Collection, exporter_port: int) -> Dict[Any, Any]:
    return {(name, key): reading(p) for name, series in collection.items() for key, p in series.items()
            if plain(p).get("network.peer.port") != exporter_port}


def last_collection(batches: List[Dict[str, Any]]) -> Collection:
    by_time = collections(our_metrics(batches, SCOPE))
    return by_time[max(by_time)]


def check_shape(batches: List[Dict[str, Any]], service: str) -> None:
    """Resource, scope, and every metric and point against the contract, as received."""
    for batch in batches:
        resource = batch["resource"]
        assert resource["service.name"] == ["str", service]  # from OTEL_SERVICE_NAME, the app's Resource
        assert resource["telemetry.sdk.language"] == ["str", "python"]
    metrics = our_metrics(batches, SCOPE)
    assert metrics, "nothing from the otel_ebpf_flows scope was received"
    for m in metrics:
        name = m["name"]
        assert m["scope_version"] == __version__
        assert name in CONTRACT, f"{name} is not a contract metric"
        kind, unit, extra = CONTRACT[name]
        assert m["unit"] == unit, f"{name}: unit {m['unit']!r}"
        if kind == "histogram":
            assert m["type"] == "Histogram", name
            assert m["temporality"] == CUMULATIVE, name
        else:
            assert m["type"] == "Sum", name
            assert m["temporality"] == CUMULATIVE, name
            assert m["is_monotonic"] is (kind == "counter"), name
        for p in m["points"]:
            check_point(name, kind, extra, p)


def check_point(name: str, kind: str, extra: set, p: Dict[str, Any]) -> None:
    attrs = p["attributes"]
    if name in (EVENTS_LOST, EVICTIONS):
        assert set(attrs) == {"ebpf_flows.probe.name"} and attrs["ebpf_flows.probe.name"][0] == "str"
    elif name == OVERFLOWS:
        assert set(attrs) == {"network.local.port"} and attrs["network.local.port"][0] == "int"
    else:
        assert attrs["network.transport"] == ["str", "tcp"], (name, attrs)
        assert attrs["network.type"] == ["str", "ipv4"], (name, attrs)
        assert attrs["network.peer.address"] == ["str", "127.0.0.1"], (name, attrs)
        role = attrs["ebpf_flows.tcp.role"]
        assert role[0] == "str" and role[1] in ("client", "server"), (name, attrs)
        port_key = "network.peer.port" if role[1] == "client" else "network.local.port"
        assert attrs[port_key][0] == "int", (name, attrs)  # an int on the wire, not a string
        common = {"network.transport", "network.type", "network.peer.address", "ebpf_flows.tcp.role", port_key}
        assert common <= set(attrs) <= common | extra, (name, sorted(attrs))
        for key in extra & set(attrs):
            assert attrs[key][0] == "str" and attrs[key][1] in ENUMS[key], (name, attrs)
    if kind == "histogram":
        assert p["explicit_bounds"] == BUCKETS[name], name
        assert len(p["bucket_counts"]) == len(BUCKETS[name]) + 1
        assert sum(p["bucket_counts"]) == p["count"] > 0
        assert 0 <= p["min"] <= p["max"] and p["sum"] >= 0
    else:
        assert p["value"][0] == "int", (name, p["value"])
        if kind == "counter":
            assert p["value"][1] >= 0


def check_cumulative(batches: List[Dict[str, Any]]) -> None:
    """Each series keeps its start time, and no counter ever goes down between exports."""
    history: Dict[Any, List[Dict[str, Any]]] = {}
    for m in our_metrics(batches, SCOPE):
        for p in m["points"]:
            history.setdefault((m["name"], series_key(p)), []).append(p)
    for (name, key), points in history.items():
        points.sort(key=lambda p: p["time_unix_nano"])
        assert len({p["start_time_unix_nano"] for p in points}) == 1, (name, key)
        kind = CONTRACT[name][0]
        if kind == "counter":
            values = [value(p) for p in points]
            assert values == sorted(values), (name, key, values)
        elif kind == "histogram":
            counts = [p["count"] for p in points]
            assert counts == sorted(counts), (name, key, counts)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_metrics_as_received(receiver: Receiver, start_workload, protocol: str) -> None:
    service = service_name("traffic", protocol)
    workload = start_workload("traffic", service, protocol, receiver.endpoint(protocol))
    workload.ready()
    r = workload.result()
    # the exporter connects at its first export; a collection after that one shows it
    settled_batches = receiver.wait_for(
        service, settled(r["done_unix_nano"], receiver.port(protocol), exporter_seen=True))
    final = last_collection(settled_batches)
    assert workload.finish() == 0, workload.errors()
    batches = receiver.batches(service)  # now with the export at shutdown too
    check_shape(batches, service)
    check_cumulative(batches)

    port, refused_port, n, payload = r["server_port"], r["refused_port"], r["normal"], r["payload"]
    client = dict(ebpf_flows__tcp__role="client", network__peer__port=port)
    server = dict(ebpf_flows__tcp__role="server", network__local__port=port)

    # only this process's connections: its server, the refused port, and its exporter's receiver
    assert {plain(p).get("network.peer.port") for s in final.values() for p in s.values()} - {None} \
        <= {port, refused_port, receiver.port(protocol)}
    assert {plain(p).get("network.local.port") for s in final.values() for p in s.values()} - {None} == {port}

    # attempts: n normal + the linger one, each seen from both ends; one refused
    ok = select(final, ATTEMPTS, **client)
    assert len(ok) == 1 and "error.type" not in plain(ok[0]) and value(ok[0]) == n + 1
    assert total(final, ATTEMPTS, **server) == n + 1
    assert total(final, ATTEMPTS, network__peer__port=refused_port, error__type="refused") == 1
    assert total(final, ATTEMPTS, error__type="refused") == 1
    exporter = select(final, ATTEMPTS, network__peer__port=receiver.port(protocol))  # the exporter's own
    assert exporter and all("error.type" not in plain(p) for p in exporter)

    # payload bytes, both ways on both ends
    for side in (client, server):
        assert total(final, IO, network__io__direction="transmit", **side) == payload
        assert total(final, IO, network__io__direction="receive", **side) == payload

    # the SO_LINGER 0 close: one RST sent by the client, received by the server; the refused
    # connect's RST is received too
    assert total(final, RESETS, network__io__direction="transmit", **client) == 1
    assert total(final, RESETS, network__io__direction="receive", **client) == 0
    assert total(final, RESETS, network__io__direction="receive", **server) == 1
    assert total(final, RESETS, network__io__direction="transmit", **server) == 0
    assert total(final, RESETS, network__io__direction="receive", network__peer__port=refused_port) == 1

    assert total(final, CLOSES, ebpf_flows__tcp__close__reason="normal", **client) == n
    assert total(final, CLOSES, ebpf_flows__tcp__close__reason="reset_sent", **client) == 1
    assert total(final, CLOSES, ebpf_flows__tcp__close__reason="normal", **server) == n
    assert total(final, CLOSES, ebpf_flows__tcp__close__reason="reset_received", **server) == 1
    assert total(final, CLOSES, **client) + total(final, CLOSES, **server) == 2 * (n + 1)
    assert total(final, ACTIVE, **client) == 0 and total(final, ACTIVE, **server) == 0
    assert total(final, RETRANSMITS, **client) + total(final, RETRANSMITS, **server) == 0  # loopback

    for side in (client, server):
        (handshake,) = select(final, HANDSHAKE, **side)
        assert handshake["count"] == n + 1 and handshake["max"] < 1.0
        (duration,) = select(final, DURATION, **side)
        assert duration["count"] == n + 1 and duration["max"] < 30.0
    (rtt,) = select(final, RTT, **client)
    assert rtt["count"] >= n + 1 and 0 < rtt["max"] < 1.0  # at least one sample per connection

    # the numbers are complete
    assert all(value(p) == 0 for name in (EVENTS_LOST, EVICTIONS) for p in final.get(name, {}).values())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_receiver_down_at_start_then_up(receiver_down: Receiver, start_workload, protocol: str) -> None:
    """Exporter trouble: nothing listens when the application starts; the receiver comes up
    during its request loop. The loop is not slowed, and telemetry resumes, complete."""
    receiver = receiver_down
    service = service_name("down", protocol)
    workload = start_workload("loop", service, protocol, receiver.endpoint(protocol))
    workload.ready()
    time.sleep(1.5)  # a few export intervals (0.5 s) fail against the closed port
    receiver.start()
    r = workload.result()

    # The application's loop ran at its own pace throughout. An application held up by the
    # exporter would wait at each failed export (every 0.5 s, then backoffs of 1 s, 2 s, ...): many
    # slow round trips. One slow outlier is allowed: a loaded host alone stalls a loopback round
    # trip by up to a SYN retransmission timeout (1 s) now and then, with the library off too.
    latencies = sorted(r["latencies"])
    assert latencies[-2] < 0.25 and latencies[-1] < 2.5, r["latencies"]
    assert r["elapsed"] < r["nominal"] + 3.0, r

    # telemetry resumed while the application runs (periodic export, not only at exit), and is
    # complete: counters are cumulative, so what the receiver missed is not lost
    batches = receiver.wait_for(service, settled(r["done_unix_nano"], receiver.port(protocol)), timeout=30)
    check_shape(batches, service)
    check_cumulative(batches)
    final = last_collection(batches)
    port, count = r["server_port"], r["count"]
    assert total(final, ATTEMPTS, ebpf_flows__tcp__role="client", network__peer__port=port) == count
    assert total(final, ATTEMPTS, ebpf_flows__tcp__role="server", network__local__port=port) == count
    assert total(final, IO, network__io__direction="transmit", network__peer__port=port) == r["payload"]
    assert total(final, CLOSES, ebpf_flows__tcp__close__reason="normal", network__peer__port=port) == count
    # and the library counted its own exporter's refused connects while the receiver was down
    assert total(final, ATTEMPTS, network__peer__port=receiver.port(protocol), error__type="refused") >= 1

    assert workload.finish() == 0, workload.errors()
