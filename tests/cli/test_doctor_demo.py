"""``otel-ebpf-flows doctor`` and ``demo`` run as a user runs them: separate processes, real probes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from typing import Any, Dict, List, Optional

import pytest

from otel_ebpf_flows._kernel import HOOKS
from tests.cli.conftest import ROOT, UNPRIVILEGED

pytestmark = pytest.mark.kernel


def run(*args: str, user: Optional[List[str]] = None, python: str = sys.executable,
        timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [*(user or []), python, "-m", "otel_ebpf_flows", *args]
    return subprocess.run(cmd, cwd="/" if user else ROOT, capture_output=True, text=True, timeout=timeout)


# --- doctor ---------------------------------------------------------------------------------


def test_doctor_passes_here_and_names_every_probe(kernel_ok: None) -> None:
    proc = run("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "[FAIL]" not in out, out
    for check in ("platform", "kernel", "BTF", "privileges", "libbpf", "BPF object", "load", "iterator"):
        assert re.search(rf"^\[ OK \] {re.escape(check)}\s", out, re.M), f"{check} not OK:\n{out}"
    for hook in HOOKS:  # every program, by name, attached
        assert re.search(rf"^\[ OK \] attach tp_btf_{hook}(_err)?\s+attached$", out, re.M), f"{hook}:\n{out}"
    assert re.search(r"^\[ OK \] mode\s+ebpf: instrument\(\) loads the probes", out, re.M), out
    assert out.rstrip().endswith("Kernel TCP telemetry will work here (tp_btf programs).")


def test_doctor_without_privilege_fails_and_says_what_to_do(nobody_python: str) -> None:
    proc = run("doctor", user=UNPRIVILEGED, python=nobody_python)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"^\[FAIL\] privileges\s+uid 65534, effective capabilities: none of", out, re.M), out
    fix = next(line for line in out.splitlines() if "fix:" in line and "setcap cap_bpf,cap_perfmon+ep" in line)
    assert os.path.realpath(nobody_python) in fix, fix  # the interpreter to give the capabilities to
    assert re.search(r"^\[WARN\] load\s+not attempted", out, re.M), out
    # the mode instrument() would pick without privilege, what it cannot see, and how to get full mode
    assert re.search(r"^\[WARN\] mode\s+sock_diag \(the fallback\): instrument\(\) reads this process's own "
                     r"sockets from sock_diag/TCP_INFO every 1 s", out, re.M), out
    assert re.search(r"^\s+it cannot see: connections opened and closed between two polls, handshake durations, "
                     r"failed connects, resets, close reasons", out, re.M), out
    assert re.search(r"^\s+fix: for full \(ebpf\) mode, fix the failures above \(privileges: grant CAP_BPF and "
                     r"CAP_PERFMON\), or run the otel-ebpf-flows node agent", out, re.M), out
    assert out.rstrip().endswith("Full kernel TCP telemetry will NOT work here: 1 check(s) failed; instrument() "
                                 "would run in sock_diag mode (see the mode line above)."), out


@pytest.mark.parametrize(("mode", "line", "status", "last"), [
    ("sock_diag", r"\[WARN\] mode\s+sock_diag \(chosen by OTEL_PYTHON_EBPF_FLOWS_MODE=sock_diag\)", 0,
     "instrument() would run in sock_diag mode here (see the mode line above)."),
    ("off", r"\[WARN\] mode\s+off: OTEL_PYTHON_EBPF_FLOWS_MODE=off, instrument\(\) does nothing", 1,
     "Kernel TCP telemetry is turned off here (see the mode line above)."),
])
def test_doctor_names_the_mode_the_environment_asks_for(kernel_ok: None, mode: str, line: str, status: int,
                                                        last: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "otel_ebpf_flows", "doctor", "--no-load"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OTEL_PYTHON_EBPF_FLOWS_MODE": mode})
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert re.search(rf"^{line}", proc.stdout, re.M), proc.stdout
    assert proc.stdout.rstrip().endswith(last), proc.stdout


# --- demo -----------------------------------------------------------------------------------


def sums(points: List[Dict[str, Any]], name: str, **match: str) -> int:
    want = {k.replace("__", "."): v for k, v in match.items()}
    return sum(p["value"] for p in points if p["name"] == name
               and all(p["attributes"].get(k) == v for k, v in want.items()))


def test_demo_metrics_reconcile_with_its_namespace(kernel_ok: None) -> None:
    proc = subprocess.run(["unshare", "--net", sys.executable, "-m", "tests.cli.demo_netns"], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["status"] == 0, r["stderr"]
    demo, mib = r["demo"], r["mib"]
    pts, traffic = demo["points"], demo["traffic"]
    assert demo["resource"]["service.name"] == "otel-ebpf-flows-demo"
    assert traffic["errors"] == [] and traffic["connections"] > 0
    a = "ebpf_flows.tcp.connection.attempts"
    ok = sum(p["value"] for p in pts if p["name"] == a and p["attributes"]["ebpf_flows.tcp.role"] == "client"
             and "error.type" not in p["attributes"])
    assert ok == traffic["connections"]
    assert sums(pts, a, ebpf_flows__tcp__role="client") == mib["Tcp.ActiveOpens"]
    assert sums(pts, a, ebpf_flows__tcp__role="server") == mib["Tcp.PassiveOpens"] == traffic["connections"]
    assert sums(pts, a, error__type="refused") == mib["Tcp.AttemptFails"] == traffic["refused"] == 1
    resets = "ebpf_flows.tcp.resets"
    assert sums(pts, resets, network__io__direction="transmit") == traffic["resets_sent"] == 1
    assert sums(pts, resets, network__io__direction="receive") == mib["Tcp.OutRsts"]  # both ends are the demo's
    zero = "ebpf_flows.tcp.zero_window.events"
    assert sums(pts, zero, network__io__direction="transmit") == mib["TcpExt.TCPToZeroWindowAdv"] >= 1
    assert sums(pts, zero, network__io__direction="receive") >= 1
    assert sums(pts, "ebpf_flows.tcp.retransmits") == mib["Tcp.RetransSegs"]
    assert sums(pts, "ebpf_flows.tcp.connections.active") == 0
    io = "ebpf_flows.tcp.io"
    sent = sums(pts, io, ebpf_flows__tcp__role="client", network__io__direction="transmit")
    assert sent == sums(pts, io, ebpf_flows__tcp__role="server", network__io__direction="receive")
    assert sent >= traffic["bulk_bytes"]
    closes = defaultdict(int)
    for p in pts:
        if p["name"] == "ebpf_flows.tcp.connection.closes":
            closes[p["attributes"]["ebpf_flows.tcp.close.reason"]] += p["value"]
    assert closes["reset_sent"] == closes["reset_received"] == 1
    assert sum(closes.values()) == 2 * traffic["connections"]
    # histograms: one handshake per connection, loopback-plausible values
    hs = [p for p in pts if p["name"] == "ebpf_flows.tcp.handshake.duration"
          and p["attributes"]["ebpf_flows.tcp.role"] == "client"]
    assert sum(p["count"] for p in hs) == traffic["connections"]
    assert all(0 < p["min"] <= p["max"] < 1.0 for p in hs), hs
    rtt = [p for p in pts if p["name"] == "ebpf_flows.tcp.rtt"]
    assert rtt and all(0 < p["min"] <= p["max"] < 1.0 for p in rtt), rtt
    # self-telemetry: nothing lost or evicted, except that a server handshake is timed only when
    # its request is still the accept queue's tail (concurrent handshakes can miss it): every
    # server handshake is either timed or counted as missed
    probes = {p["attributes"]["ebpf_flows.probe.name"]: p["value"] for p in pts
              if p["name"] in ("ebpf_flows.probe.events.lost", "ebpf_flows.probe.map.evictions")}
    missed = probes.pop("tcp_flows.syn_wait")
    assert probes and not any(probes.values()), probes
    server_hs = sum(p["count"] for p in pts if p["name"] == "ebpf_flows.tcp.handshake.duration"
                    and p["attributes"]["ebpf_flows.tcp.role"] == "server")
    assert server_hs + missed == traffic["connections"]


def test_demo_table_names_the_contracts_metrics(kernel_ok: None) -> None:
    proc = run("demo", "--duration", "1")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for name in ("ebpf_flows.tcp.connection.attempts", "ebpf_flows.tcp.handshake.duration",
                 "ebpf_flows.tcp.connections.active", "ebpf_flows.tcp.io", "ebpf_flows.tcp.rtt",
                 "ebpf_flows.tcp.resets", "ebpf_flows.tcp.connection.closes", "ebpf_flows.tcp.connection.duration",
                 "ebpf_flows.tcp.zero_window.events", "ebpf_flows.probe.events.lost",
                 "ebpf_flows.probe.map.evictions"):
        assert re.search(rf"^{re.escape(name)}  \(", out, re.M), f"{name} missing:\n{out}"
    m = re.search(r"^What the demo did: (\d+) connections", out, re.M)
    assert m and int(m.group(1)) > 0, out
    kernel = re.search(r"the kernel counted (\d+) established by clients, (\d+) accepted by servers", out)
    assert kernel and int(kernel.group(1)) == int(kernel.group(2)) == int(m.group(1)), out
    assert re.search(r"^  completeness  \d+ kernel events lost, 0 map evictions", out, re.M), out
