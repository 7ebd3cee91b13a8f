"""``otel-ebpf-flows agent`` end to end: two unprivileged services, one agent, one OTLP receiver.

tests/agent/scenario.py runs in a private network namespace with random loss on
both services' paths. Each service reports its own sockets' TCP_INFO; the agent's
exports must match them per ``service.name`` and never mix the two; the
instrumented service's spans must carry the kernel's per-request retransmits
through the agent (the same bar as tests/kernel/test_spans.py), with no ebpf_flows
metric registered in the service itself; and a third unprivileged process must
get none of the first one's data from the agent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any, Dict, List

import pytest

from otel_ebpf_flows import _agent_protocol as proto
from tests.kernel import test_spans as span_checks
from tests.kernel.conftest import ROOT

RETRANSMITS = "ebpf_flows.tcp.retransmits"
ATTEMPTS = "ebpf_flows.tcp.connection.attempts"
HANDSHAKE = "ebpf_flows.tcp.handshake.duration"
IO = "ebpf_flows.tcp.io"


_RUNS: Dict[str, Dict[str, Any]] = {}


@pytest.fixture
def run(kernel_ok: None, otlp_ok: None, nobody_python: str) -> Dict[str, Any]:
    """The scenario's result, run once for all the tests of this module."""
    if "last" not in _RUNS:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        proc = subprocess.run(["unshare", "--net", sys.executable, "-m", "tests.agent.scenario", nobody_python],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        if proc.returncode != 0:
            raise AssertionError(f"the agent scenario failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
        _RUNS["last"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return _RUNS["last"]


def total(points: List[Dict[str, Any]], name: str, **want: Any) -> int:
    return sum(p["value"] for p in points if p["name"] == name
               and all(p["attrs"].get(k.replace("__", ".")) == v for k, v in want.items()))


@pytest.mark.parametrize("who", ["a", "b"])
def test_each_service_metrics_reconcile_with_its_own_sockets(run, who):
    check_service(run, who)


def check_service(r: Dict[str, Any], who: str) -> None:
    svc = r[f"svc_{who}"]
    points, infos, n = r["points"][svc], r[who]["infos"], r["conns"][who]
    assert points, f"the receiver got no ebpf_flows points for {svc}:\n{r['agent_log']}"
    kernel_retrans = sum(i["total_retrans"] for i in infos)
    assert total(points, RETRANSMITS) == kernel_retrans, (svc, points, r["agent_log"][-2000:])
    assert total(points, ATTEMPTS, ebpf_flows__tcp__role="client", error__type=None) == n
    # a handshake point per completed attempt (the agent's kernel aggregates the histograms)
    assert sum(p["count"] or 0 for p in points if p["name"] == HANDSHAKE
               and p["attrs"].get("ebpf_flows.tcp.role") == "client") == n, (svc, points)
    refused = r[who]["refused"]
    assert refused == (3 if who == "b" else 0)
    assert total(points, ATTEMPTS, error__type="refused") == refused
    # payload bytes: TCP_INFO's counts also hold the FIN (and, by when the SYN's ACK is counted,
    # the SYN) of each connection; the contract counts payload only
    payload = r["sizes"][who]
    assert payload + n <= sum(i["bytes_acked"] for i in infos) <= payload + 2 * n
    assert total(points, IO, network__io__direction="transmit") == payload
    assert payload + n <= sum(i["bytes_received"] for i in infos) <= payload + 2 * n
    assert total(points, IO, network__io__direction="receive") == payload


def test_a_prefork_server_counts_each_accepted_connection_once(run):
    """Master and workers all hold the listener: without claim mode every one of them would count
    each connection; the workers that serve them count them, the master none."""
    r = run
    c, points = r["c"], r["points"][r["svc_c"]]
    master, *workers = c["pids"]
    n = c["conns"]
    assert len(c["infos"]) == n
    assert total(points, ATTEMPTS, ebpf_flows__tcp__role="server") == n, points
    assert total(points, IO, network__io__direction="receive") == c["payload"]
    assert total(points, IO, network__io__direction="transmit") == c["payload"]
    by_pid = {pid: total([p for p in points if p["pid"] == pid], ATTEMPTS) for pid in c["pids"]}
    assert by_pid[master] == 0 and sum(by_pid[w] for w in workers) == n, by_pid


def test_no_service_is_credited_with_the_others_traffic(run):
    r = run
    for who, host in zip(("a", "b"), r["hosts"]):
        points = r["points"][r[f"svc_{who}"]]
        peers = {p["attrs"].get("network.peer.address") for p in points if "network.peer.address" in p["attrs"]}
        assert peers == {host}, (who, peers)


def test_each_resource_is_built_from_the_process_environment(run):
    r = run
    a, b = r["resources"][r["svc_a"]], r["resources"][r["svc_b"]]
    assert a["service.name"] == ["str", r["svc_a"]]
    assert a["deployment.environment.name"] == ["str", "agent test"]  # percent-decoded, as the SDK does
    assert a["team"] == ["str", "a"] and a["process.pid"] == ["int", r["a"]["pid"]]
    assert b["service.name"] == ["str", r["svc_b"]] and b["team"] == ["str", "b"]
    assert b["process.pid"] == ["int", r["b"]["pid"]]
    assert a["host.name"] == b["host.name"] == ["str", os.uname().nodename]


def test_unprivileged_spans_carry_the_kernel_attributes_via_the_agent(run):
    a = run["a"]
    assert a["mode_agent"] is True and a["pipeline"] is False
    assert not [m for m in a["own_metrics"] if m.startswith("ebpf_flows")], a["own_metrics"]
    span_checks.reconcile(a)


def test_another_unprivileged_process_gets_none_of_the_services_data(run):
    r, intruder = run, run["intruder"]
    a = r["a"]
    # the victim itself does get data for these threads: the requests below could return some
    assert all(n > 0 for n in a["own_slots"].values()), a["own_slots"]
    assert intruder["hello"]["kind"] == proto.WELCOME
    assert intruder["hello"]["payload"]["pid"] != a["pid"]  # SO_PEERCRED, not the pid it claimed
    empty_events = proto.encode_frame(proto.EVENTS, {"events": [], "lost": 0}).hex()
    for reply in intruder["drains"]:
        assert reply["raw"] == empty_events, reply
    empty_slots = proto.encode_frame(proto.SLOTS, {"slots": []}).hex()
    assert set(intruder["threads"]) == {str(t) for t in a["tids"]}
    for reply in intruder["threads"].values():
        assert reply["raw"] == empty_slots, reply
    # a process the agent does not observe gets no span service at all
    undeclared = run["undeclared"]
    assert undeclared["kind"] == proto.ERROR and "does not observe this process" in undeclared["payload"]["error"]
    garbage = bytes.fromhex(intruder["garbage_reply"])
    kind, payload = proto.decode_frame(garbage)
    assert kind == proto.ERROR and "version" in payload["error"], payload


def test_the_agent_retires_exited_processes_and_stops_cleanly(run):
    r = run
    assert r["agent_status"] == 0, r["agent_log"]
    assert not r["socket_left"]
    for who in ("a", "b"):
        assert f"pid {r[who]['pid']} (service.name={r[f'svc_{who}']}) exited: final export" in r["agent_log"]
    assert "Traceback" not in r["agent_log"], r["agent_log"]


def test_doctor_as_an_unprivileged_user_reports_mode_agent(run):
    doctor = run["doctor"]
    assert re.search(r"^\[FAIL\] privileges\s+uid 65534", doctor["out"], re.M), doctor["out"]
    assert re.search(r"^\[ OK \] agent\s+mode agent: the agent at \S+agent.sock answers", doctor["out"], re.M), doctor["out"]
    assert "will work here in mode agent" in doctor["out"]
    assert doctor["status"] == 0, doctor["out"]


def test_an_in_process_instrumentation_is_recognised_by_its_bpf_programs(kernel_ok):
    """What keeps the agent from observing (and double counting) a privileged in-process service."""
    from otel_ebpf_flows import _agent
    from otel_ebpf_flows._kernel import KernelSource

    before = _agent.loads_own_probes(os.getpid())  # False unless an earlier test left probes loaded
    source = KernelSource()
    source.start(lambda _event: None)
    try:
        assert _agent.loads_own_probes(os.getpid())
    finally:
        source.close()
    assert _agent.loads_own_probes(os.getpid()) is before
