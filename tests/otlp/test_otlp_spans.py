"""Enriched spans and exemplars as a real OTLP receiver gets them.

An application run under ``opentelemetry-instrument`` and configured only by
OTEL_* variables (tests/otlp/span_workload.py) makes HTTP requests with
``requests`` on a keep-alive Session to an uninstrumented server in another
process, over a loopback path with random loss, and exports spans and metrics
over OTLP (gRPC, then HTTP/protobuf) to rotel. Checked as rotel decoded them:
the CLIENT spans' ``ebpf_flows.tcp.*`` attributes with their wire types, their
retransmit counts against the kernel's own per-request count (TCP_INFO), their
retransmit events, their Resource, and the handshake histogram's exemplar.

Where it all runs: the test enters a private network namespace of its own (this
test's thread only, restored afterwards; see ``private_netns``), brings its
loopback up at an Ethernet MTU without GSO so that a request is many segments,
and drops a random share of the segments to and from the HTTP server's port
with nftables. The receiver, the server and the workload are started from there,
so they all live in that namespace: the workload exports to the receiver on the
namespace's 127.0.0.1 (a path without loss), and nothing touches the host's
network.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
import uuid
from typing import Any, Callable, Iterator, List

import pytest

from .conftest import ROOT, Receiver, Workload

PROTOCOLS = ["grpc", "http/protobuf"]
HTTP_PORT = 5580
ROUNDS = 40
SIZE = 20000
LOSS_PERCENT = 5

RETRANSMITS = "ebpf_flows.tcp.retransmits"
RTT = "ebpf_flows.tcp.rtt"
HANDSHAKE = "ebpf_flows.tcp.handshake.duration"
REUSED = "ebpf_flows.tcp.connection.reused"
DEGRADED = "ebpf_flows.tcp.degraded"
DROPPED = "ebpf_flows.tcp.events.dropped"
RETRANSMIT_EVENT = "ebpf_flows.tcp.retransmit"
CLIENT = "SPAN_KIND_CLIENT"
DEGRADED_RTT_S = 0.25  # the default thresholds (docs/span-enrichment.md)
DEGRADED_HANDSHAKE_S = 0.5
CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def private_netns() -> Iterator[None]:
    """Run the calling thread in a new network namespace until the block ends.

    A network namespace belongs to a thread, so only this thread moves (pytest runs
    fixtures and the test on it) and the processes it starts meanwhile are born in the
    namespace. Restored with setns(2) on the way out, whatever happened.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    home_id = os.readlink("/proc/thread-self/ns/net")
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back to the test's network namespace: {os.strerror(err)}")
            assert os.readlink("/proc/thread-self/ns/net") == home_id, "not back in the test's namespace"
    finally:
        os.close(home)


def run(*cmd: str, stdin: str = "") -> None:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")


def lossy_loopback(port: int, percent: int) -> None:
    """This namespace's loopback up at an Ethernet MTU, one segment per packet (no GSO), and
    ``percent`` % of the segments to and from ``port`` dropped on input (lost, not send errors)."""
    run("ip", "link", "set", "lo", "up", "mtu", "1500", "gso_max_segs", "1")
    run("nft", "-f", "-", stdin="\n".join([
        "add table inet loss",
        "add chain inet loss input { type filter hook input priority 0; }",
        f"add rule inet loss input tcp dport {port} numgen random mod 100 < {percent} counter drop",
        f"add rule inet loss input tcp sport {port} numgen random mod 100 < {percent} counter drop",
    ]) + "\n")


@pytest.fixture
def lossy_receiver(otlp_ok: None, tmp_path: Any) -> Iterator[Receiver]:
    """A running receiver in a private network namespace whose path to HTTP_PORT loses
    LOSS_PERCENT % of segments, with an uninstrumented HTTP echo server on HTTP_PORT; the test
    runs in that namespace too."""
    for tool in ("ip", "nft"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"the OTLP span tests need {tool}: CI must run them")
            pytest.skip(f"the OTLP span tests need {tool} on PATH")
    with private_netns():
        lossy_loopback(HTTP_PORT, LOSS_PERCENT)
        receiver = Receiver(str(tmp_path))
        server = None
        try:
            receiver.start()
            # an uninstrumented process: plain python, the environment without OTEL_* or the
            # auto-instrumentation's PYTHONPATH
            env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PYTHONPATH"))}
            server = subprocess.Popen([sys.executable, "-m", "tests.kernel.http_peer", "server", str(HTTP_PORT)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
            assert server.stdout is not None
            if server.stdout.readline().strip() != "ready":
                raise RuntimeError("the HTTP echo server did not start")
            yield receiver
        finally:
            if server is not None:
                server.kill()
                server.wait(10)
                if server.stdout is not None:
                    server.stdout.close()
            receiver.stop()


def value(attr: List[Any]) -> Any:
    return attr[1]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_enriched_spans_and_exemplars_as_received(lossy_receiver: Receiver, start_workload: Callable[..., Workload],
                                                  protocol: str) -> None:
    receiver = lossy_receiver
    service = f"otlp-spans-{protocol.replace('/', '-')}-{uuid.uuid4().hex[:8]}"
    workload = start_workload(
        "requests", service, protocol, receiver.endpoint(protocol),
        module="tests.otlp.span_workload", args=(str(HTTP_PORT), str(ROUNDS), str(SIZE)),
        otel_env={"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_SCHEDULE_DELAY": "200"},
    )
    workload.ready()
    r = workload.result(timeout=120)
    assert workload.finish() == 0, workload.errors()  # the SDK's shutdown exports what is left
    requests = r["requests"]
    ids = {q["span_id"] for q in requests}
    assert len(ids) == ROUNDS, "the workload saw a span id twice"

    received = receiver.wait_for_spans(service, lambda spans: ids <= {s["span_id"] for s in spans})
    spans = {s["span_id"]: s for s in received if s["span_id"] in ids}

    # the application's Resource and the instrumentation's scope, on every request span
    for s in spans.values():
        assert s["resource"]["service.name"] == ["str", service]  # from OTEL_SERVICE_NAME
        assert s["resource"]["telemetry.sdk.language"] == ["str", "python"]
        assert s["scope"]["name"] == "opentelemetry.instrumentation.requests", s["scope"]
        assert s["kind"] == CLIENT, (s["name"], s["kind"])
        assert s["status"]["code"] == "STATUS_CODE_UNSET", s["status"]  # 200 OK: not an error

    # attributes with their OTLP wire types
    for q in requests:
        attrs = spans[q["span_id"]]["attributes"]
        assert attrs[RETRANSMITS][0] == "int", attrs
        assert attrs[RTT][0] == "double" and 0 < value(attrs[RTT]) < 5, attrs
        assert attrs[REUSED] == ["bool", not q["opened"]], attrs
        assert attrs[DEGRADED][0] == "bool", attrs
        if q["opened"]:
            assert attrs[HANDSHAKE][0] == "double" and value(attrs[HANDSHAKE]) > 0, attrs
        else:
            assert HANDSHAKE not in attrs, attrs

    # retransmits per span against the kernel's own per-request count
    kernel_total = sum(q["delta"] for q in requests)
    assert kernel_total >= 5, f"the lossy path made only {kernel_total} retransmits: no test"
    misses = [(q, {k: v for k, v in spans[q["span_id"]]["attributes"].items() if k.startswith("ebpf_flows")})
              for q in requests if value(spans[q["span_id"]]["attributes"][RETRANSMITS]) != q["delta"]]
    assert len(misses) <= 0.05 * ROUNDS, f"{len(misses)}/{ROUNDS} spans not exact (kernel total " \
                                         f"{kernel_total}): {misses[:5]}"
    spurious = [m for m in misses if m[0]["delta"] == 0]
    assert len(spurious) <= 0.02 * ROUNDS, f"spans credited with retransmits they did not have: {spurious}"

    # degraded whenever there were retransmits; retransmit events at times inside their span,
    # one per kernel record, their segments adding up to the span's count
    with_events = 0
    for q in requests:
        s = spans[q["span_id"]]
        attrs = s["attributes"]
        retransmits = value(attrs[RETRANSMITS])
        if retransmits:
            assert attrs[DEGRADED] == ["bool", True], attrs
        elif (not s["events"] and value(attrs[RTT]) < DEGRADED_RTT_S
              and value(attrs.get(HANDSHAKE, ["double", 0.0])) < DEGRADED_HANDSHAKE_S):
            assert attrs[DEGRADED] == ["bool", False], attrs  # nothing went wrong on this span
        events = [e for e in s["events"] if e["name"] == RETRANSMIT_EVENT]
        for e in events:
            assert s["start_time_unix_nano"] <= e["time_unix_nano"] <= s["end_time_unix_nano"], (s, e)
            assert e["attributes"]["ebpf_flows.tcp.segments"][0] == "int", e
            assert e["attributes"]["network.peer.port"] == ["int", HTTP_PORT], e
        if DROPPED not in attrs:
            assert sum(value(e["attributes"]["ebpf_flows.tcp.segments"]) for e in events) == retransmits, s
        with_events += bool(events)
    assert with_events >= 1, "no span carried a retransmit event"

    # the handshake histogram as received: an exemplar that is the exported span that opened
    # the connection (the only handshake made inside a span)
    (opened,) = [q for q in requests if q["opened"]]
    opener = spans[opened["span_id"]]
    batches = receiver.batches(service)
    exemplars = [e for b in batches for sm in b["scopes"] if sm["name"] == "otel_ebpf_flows"
                 for m in sm["metrics"] if m["name"] == HANDSHAKE
                 for p in m["points"]
                 if p["attributes"].get("ebpf_flows.tcp.role") == ["str", "client"]
                 and p["attributes"].get("network.peer.port") == ["int", HTTP_PORT]
                 for e in p["exemplars"]]
    assert exemplars, f"no exemplar on {HANDSHAKE} for port {HTTP_PORT} in {len(batches)} batches"
    for e in exemplars:
        assert (e["trace_id"], e["span_id"]) == (opener["trace_id"], opener["span_id"]), (e, opener["name"])
        assert e["value"] == ["double", pytest.approx(value(opener["attributes"][HANDSHAKE]), abs=1e-9)]
