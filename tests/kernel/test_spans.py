"""Span enrichment reconciled with the kernel: per request, the span's retransmits equal the
change of TCP_INFO tcpi_total_retrans on the request's own connection.

Each scenario (tests/kernel/span_scenarios.py) runs in a private network namespace with
random loss made by nft, exports spans through a BatchSpanProcessor on the global
TracerProvider, and records per request the kernel's own count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Dict, List
from urllib.parse import urlsplit

import pytest

from tests.kernel.conftest import ROOT

RETRANSMITS = "ebpf_flows.tcp.retransmits"
RTT = "ebpf_flows.tcp.rtt"
HANDSHAKE = "ebpf_flows.tcp.handshake.duration"
REUSED = "ebpf_flows.tcp.connection.reused"
DEGRADED = "ebpf_flows.tcp.degraded"
DROPPED = "ebpf_flows.tcp.events.dropped"


@pytest.fixture
def span_scenario(kernel_ok: None) -> Any:
    def run(name: str, pid_namespace: bool = False) -> Dict[str, Any]:
        # a pid namespace of its own, as in a container: threads have other ids there than the kernel's
        unshare = ["unshare", "--net"] + (["--pid", "--fork", "--mount-proc"] if pid_namespace else [])
        proc = subprocess.run(
            unshare + [sys.executable, "-m", "tests.kernel.span_scenarios", name],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        if proc.returncode != 0:
            raise AssertionError(f"scenario {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run


def reconcile(r: Dict[str, Any], min_retransmits: int = 5) -> Dict[str, Dict[str, Any]]:
    """The contract's accuracy bar, per request span; returns the spans by id."""
    spans = {s["span_id"]: s for s in r["spans"]}
    requests = r["requests"]
    assert requests and all(q["span_id"] in spans for q in requests), "a request's span was not exported"
    kernel_total = sum(q["delta"] for q in requests)
    assert kernel_total >= min_retransmits, f"the lossy path made only {kernel_total} retransmits: no test"
    exact = spurious = 0
    misses = []
    for q in requests:
        attrs = spans[q["span_id"]]["attrs"]
        got = attrs.get(RETRANSMITS)
        if got == q["delta"]:
            exact += 1
        else:
            misses.append((q, {k: v for k, v in attrs.items() if k.startswith("ebpf_flows")}))
        if got and not q["delta"]:
            spurious += 1
    n = len(requests)
    assert exact >= 0.95 * n, f"{exact}/{n} spans exact; kernel total {kernel_total}; misses {misses[:5]}"
    assert spurious <= 0.02 * n, f"{spurious}/{n} spans credited with retransmits they did not have: {misses[:5]}"
    for q in requests:
        span = spans[q["span_id"]]
        attrs = span["attrs"]
        assert isinstance(attrs.get(RTT), float) and 0 < attrs[RTT] < 5, attrs
        # degraded whenever the kernel retransmitted for the request
        if attrs.get(RETRANSMITS):
            assert attrs[DEGRADED] is True, attrs
        # one span event per retransmit record, at the kernel's time, inside the span
        events = [e for e in span["events"] if e["name"] == "ebpf_flows.tcp.retransmit"]
        assert all(span["start"] <= e["ts"] <= span["end"] for e in span["events"]), span
        if not attrs.get(DROPPED):
            assert sum(e["attrs"]["ebpf_flows.tcp.segments"] for e in events) == attrs.get(RETRANSMITS, 0)
        else:
            assert len(span["events"]) == 16
    return spans


def client_handshakes(r: Dict[str, Any], spans: Dict[str, Dict[str, Any]]) -> None:
    """Spans that opened their connection carry the handshake; the others say reused."""
    for q in r["requests"]:
        attrs = spans[q["span_id"]]["attrs"]
        if q["opened"]:
            assert attrs[REUSED] is False, attrs
            assert isinstance(attrs.get(HANDSHAKE), float) and attrs[HANDSHAKE] > 0, attrs
        else:
            assert attrs[REUSED] is True, attrs
            assert HANDSHAKE not in attrs, attrs


def exemplars(r: Dict[str, Any], metric: str) -> List[Dict[str, Any]]:
    return [dict(e, point=p["attrs"]) for p in r["metrics"] if p["name"] == metric for e in p["exemplars"]]


def exemplars_point_at_spans(r: Dict[str, Any], spans: Dict[str, Dict[str, Any]]) -> None:
    """Each handshake exemplar names the span that connected: the handshake points were counted
    in the kernel, each exemplar taken from the connection's CONN span record."""
    assert r["hist_mode"] & 1, r["hist_mode"]  # HIST_MODE_HANDSHAKE: no handshake records
    opened = {q["span_id"] for q in r["requests"] if q.get("opened")}
    hs = exemplars(r, "ebpf_flows.tcp.handshake.duration")
    assert hs, "no handshake.duration exemplar"
    for e in hs:
        assert e["span_id"] in opened, f"handshake exemplar {e} is not a span that connected"
        span = spans[e["span_id"]]
        assert e["trace_id"] == span["trace_id"]
        assert e["value"] == pytest.approx(span["attrs"][HANDSHAKE], abs=1e-9)
    for e in exemplars(r, "ebpf_flows.tcp.rtt"):
        assert e["span_id"] in spans and e["trace_id"] == spans[e["span_id"]]["trace_id"], e


def test_threads_with_persistent_connections_over_loss(span_scenario):
    r = span_scenario("keepalive_loss")
    spans = reconcile(r)
    client_handshakes(r, spans)
    exemplars_point_at_spans(r, spans)


def test_threads_in_a_pid_namespace_of_their_own(span_scenario):
    """A containerised service: its threads' ids in its pid namespace are not the kernel's, and
    spans are matched (and exemplars attributed) by the ids the application sees."""
    r = span_scenario("keepalive_loss", pid_namespace=True)
    spans = reconcile(r)
    client_handshakes(r, spans)
    exemplars_point_at_spans(r, spans)


def test_a_tracer_provider_set_after_instrument(span_scenario):
    """No span records and no send/receive programs before a tracer provider exists; once one
    is set, spans on connections opened before it are enriched to the same bar."""
    r = span_scenario("late_tracer_provider")
    assert r["before"] == {"tracks_threads": False, "conn_table": 0, "io_programs": []}
    assert r["after"]["tracks_threads"] is True
    assert sorted(r["after"]["io_programs"]) == ["tp_btf_recv_length", "tp_btf_send_length"]
    assert r["after"]["conn_table"] >= 4  # the four connections opened before, from the socks map
    spans = reconcile(r)
    for q in r["requests"]:  # every connection predates every span
        assert spans[q["span_id"]]["attrs"][REUSED] is True
    lost = {p["attrs"]["ebpf_flows.probe.name"]: p["value"] for p in r["probes"]
            if p["name"] == "ebpf_flows.probe.events.lost"}
    assert lost["tcp_flows.conn_events"] == 0


def test_connections_opened_while_no_span_is_open_enrich_the_spans_that_use_them(span_scenario):
    """While no span is open in the process the kernel makes no span records (their cost is
    only paid with spans to enrich); a connection opened then has its record sent at its first
    use in a span, and spans on it reconcile with the kernel as on any other."""
    r = span_scenario("connections_before_any_span")
    assert r["idle_retransmits"] > 0, "no retransmit before the spans: no test of their records"
    assert r["idle_kinds"] == {}, r["idle_kinds"]  # nothing, though the connections had retransmits
    n = r["connections"]
    assert r["kinds"]["conn"] == n and r["kinds"]["gone"] == n, r["kinds"]  # each once, no duplicate
    spans = reconcile(r)
    for q in r["requests"]:  # every connection predates every span
        assert spans[q["span_id"]]["attrs"][REUSED] is True
        assert HANDSHAKE not in spans[q["span_id"]]["attrs"]
    lost = {p["attrs"]["ebpf_flows.probe.name"]: p["value"] for p in r["probes"]}
    assert lost["tcp_flows.conn_events"] == 0


def test_requests_keepalive_session(span_scenario):
    r = span_scenario("requests_session")
    spans = reconcile(r)
    client_handshakes(r, spans)
    exemplars_point_at_spans(r, spans)
    assert all(spans[q["span_id"]]["kind"] == "CLIENT" for q in r["requests"])


def test_httpx_async_clients_interleaved_on_one_event_loop(span_scenario):
    r = span_scenario("httpx_async")
    spans = reconcile(r)
    client_handshakes(r, spans)
    exemplars_point_at_spans(r, spans)
    # spans of the two peers interleave on one thread: each handshake exemplar is the span
    # that opened the connection to the point's own peer
    for e in exemplars(r, "ebpf_flows.tcp.handshake.duration"):
        url = spans[e["span_id"]]["attrs"]["http.url"]
        assert urlsplit(url).port == e["point"]["network.peer.port"], (e, url)


def test_wsgi_server_spans(span_scenario):
    r = span_scenario("wsgi_server")
    spans = reconcile(r)
    server = [spans[q["span_id"]] for q in r["requests"]]
    assert all(s["kind"] == "SERVER" for s in server)
    # wsgiref serves one request per connection: each span is its connection's first,
    # and carries the SYN wait of its handshake (a few can be unknown: counted in events.lost)
    assert all(s["attrs"][REUSED] is False for s in server)
    with_handshake = [s for s in server if HANDSHAKE in s["attrs"]]
    assert len(with_handshake) >= 0.9 * len(server)
