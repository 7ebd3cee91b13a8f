"""sock_diag mode: an unprivileged service's own numbers, reconciled with its sockets' TCP_INFO.

The service runs as nobody with no capabilities (so the probes cannot load and
``instrument()`` falls back to sock_diag by itself) in a private network
namespace with 5 % random loss, next to another process that talks to the same
peers and to the service (tests/cli/sock_diag_netns.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from typing import Any, Dict, Tuple

import pytest

from tests.cli.conftest import ROOT, UNPRIVILEGED
from tests.cli.sock_diag_netns import PEERS, SERVE_COUNT, SERVE_PORT

pytestmark = pytest.mark.kernel

EMITTED = {"ebpf_flows.tcp.connection.attempts", "ebpf_flows.tcp.retransmits", "ebpf_flows.tcp.io",
           "ebpf_flows.tcp.rtt", "ebpf_flows.tcp.connections.active", "ebpf_flows.tcp.window_scaling.disabled",
           "ebpf_flows.probe.events.lost"}
TCPI_OPT_WSCALE = 4
NOT_EMITTED = {"ebpf_flows.tcp.handshake.duration", "ebpf_flows.tcp.resets", "ebpf_flows.tcp.connection.closes",
               "ebpf_flows.tcp.connection.duration", "ebpf_flows.tcp.zero_window.events",
               "ebpf_flows.tcp.listen.overflows", "ebpf_flows.probe.map.evictions"}


@pytest.fixture(scope="module")
def report(nobody_python: str) -> Dict[str, Any]:
    proc = subprocess.run(["unshare", "--net", sys.executable, "-m", "tests.cli.sock_diag_netns", nobody_python],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: Dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def series(point: Dict[str, Any]) -> Tuple[str, str, int]:
    a = point["attrs"]
    port = a["network.peer.port"] if a["ebpf_flows.tcp.role"] == "client" else a["network.local.port"]
    return a["ebpf_flows.tcp.role"], a["network.peer.address"], port


def test_the_unprivileged_service_runs_in_sock_diag_mode_and_says_so_once(report) -> None:
    assert report["uid"] == 65534 and report["source"] == "SockDiagSource", report["stderr"]
    warnings = [m for level, m in report["log"] if level == "WARNING"]
    assert len(warnings) == 1, report["log"]
    (line,) = warnings
    assert "runs in sock_diag mode because loading eBPF programs needs root or CAP_BPF and CAP_PERFMON" in line
    assert "it cannot see connections opened and closed between two polls" in line
    assert "For full mode: grant them, e.g. `setcap cap_bpf,cap_perfmon+ep" in line
    assert line.endswith("or run the otel-ebpf-flows node agent (`otel-ebpf-flows doctor` says what this host lacks)")


def test_every_point_says_sock_diag_and_only_what_it_can_see_is_emitted(report) -> None:
    points = report["points"]
    assert points and all(p["attrs"].get("ebpf_flows.source") == "sock_diag" for p in points), points
    names = {p["name"] for p in points}
    assert names == EMITTED, names
    assert not names & NOT_EMITTED
    lost = [p for p in points if p["name"] == "ebpf_flows.probe.events.lost"]
    assert [(p["attrs"]["ebpf_flows.probe.name"], p["value"]) for p in lost] == [("sock_diag.dump", 0)]


def test_counters_per_peer_equal_the_sockets_tcp_info(report) -> None:
    """Retransmits, payload bytes and connections without window scaling per series = the sums over
    the service's own sockets' TCP_INFO (tcpi_total_retrans, tcpi_bytes_acked, tcpi_bytes_received,
    tcpi_options)."""
    want: Dict[Tuple[str, str, int], Dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for i in report["infos"]:
        key = (i["role"], i["peer"], i["peer_port"] if i["role"] == "client" else i["local_port"])
        want[key]["connections"] += 1
        want[key]["retransmits"] += i["total_retrans"]
        # tcpi_bytes_acked counts the SYN of an actively opened socket; the metric is payload
        want[key]["transmit"] += i["bytes_acked"] - (1 if i["role"] == "client" else 0)
        want[key]["receive"] += i["bytes_received"]
        want[key]["no_wscale"] += 0 if i["options"] & TCPI_OPT_WSCALE else 1
    assert report["stable"], "TCP_INFO changed after it was read: the comparison would be unfair"
    expected_keys = {("client", h, p) for h, p, _n in PEERS} | {("server", "127.0.0.1", SERVE_PORT)}
    assert set(want) == expected_keys
    got: Dict[Tuple[str, str, int], Dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for p in report["points"]:
        if p["name"] == "ebpf_flows.tcp.connection.attempts":
            assert "error.type" not in p["attrs"], p  # failed connects cannot be seen: never emitted
            got[series(p)]["connections"] += p["value"]
        elif p["name"] == "ebpf_flows.tcp.retransmits":
            got[series(p)]["retransmits"] += p["value"]
        elif p["name"] == "ebpf_flows.tcp.io":
            got[series(p)][p["attrs"]["network.io.direction"]] += p["value"]
        elif p["name"] == "ebpf_flows.tcp.connections.active":
            got[series(p)]["active"] += p["value"]
        elif p["name"] == "ebpf_flows.tcp.window_scaling.disabled":
            got[series(p)]["no_wscale"] += p["value"]
    for key, values in want.items():
        assert got[key]["connections"] == values["connections"] == got[key]["active"], (key, got[key], values)
        for field in ("retransmits", "transmit", "receive", "no_wscale"):
            assert got[key][field] == values[field], (key, field, got[key][field], values[field])
    assert set(got) == expected_keys, "a series of another process's sockets was counted"
    counts = {(h, p): n for h, p, n in PEERS}
    for (role, host, port), values in want.items():
        assert values["connections"] == (counts[(host, port)] if role == "client" else SERVE_COUNT)
        assert values["transmit"] == values["receive"] == values["connections"] * report["payload"]
        assert values["no_wscale"] == values["connections"]  # net.ipv4.tcp_window_scaling=0 in the namespace
    # the loss really happened, and the namespace retransmitted more than the service did (the
    # peers and the other process retransmit too): what the service reports is only its own
    ours = sum(v["retransmits"] for v in want.values())
    assert ours > 0 and report["mib"]["Tcp.RetransSegs"] > ours, (ours, report["mib"])


def test_rtt_samples_come_from_the_live_connections(report) -> None:
    rtt = [p for p in report["points"] if p["name"] == "ebpf_flows.tcp.rtt"]
    per_series = {series(p): p for p in rtt}
    want = {h: n for h, _p, n in PEERS}
    for (role, host, _port), p in per_series.items():
        connections = want[host] if role == "client" else SERVE_COUNT
        assert p["count"] >= connections, p  # at least one sample per connection
        assert 0 < p["min"] <= p["max"] < 1.0, p
    assert len(per_series) == len(PEERS) + 1


def test_docs_fallback_lists_exactly_what_this_mode_emits() -> None:
    """docs/fallback.md's table: the metrics marked **not emitted** are the ones the scenario finds absent."""
    import os
    import re

    with open(os.path.join(ROOT, "docs", "fallback.md"), encoding="utf-8") as f:
        text = f.read()
    part = text.split("### What each mode sees", 1)[1].split("\n### ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in part.splitlines()
            if line.startswith("| `ebpf_flows.")]
    cells = {re.findall(r"`([^`]+)`", row[0])[0]: row[2] for row in rows}
    assert {m for m, cell in cells.items() if "**not emitted**" in cell} == NOT_EMITTED
    assert {m for m, cell in cells.items() if "**not emitted**" not in cell} == EMITTED


def test_a_forked_child_counts_its_own_connections_and_never_its_parents(nobody_python: str) -> None:
    proc = subprocess.run(["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *UNPRIVILEGED,
                           nobody_python, "-m", "tests.cli.sock_diag_fork"],
                          cwd="/", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for who, size in (("parent", 1000), ("child", 3000)):
        side = r[who]
        assert side["variant"] == "sock_diag", (who, side)
        pts = side["points"]
        assert pts and all(p["attrs"].get("ebpf_flows.source") == "sock_diag" for p in pts), (who, pts)
        ports = {series(p)[2] for p in pts if "ebpf_flows.tcp.role" in p["attrs"]}
        assert ports == {side["port"]}, (who, ports, side["port"])  # only its own listener's connection
        attempts = {p["attrs"]["ebpf_flows.tcp.role"]: p["value"] for p in pts
                    if p["name"] == "ebpf_flows.tcp.connection.attempts"}
        assert attempts == {"client": 1, "server": 1}, (who, attempts)
        io = {(p["attrs"]["ebpf_flows.tcp.role"], p["attrs"]["network.io.direction"]): p["value"] for p in pts
              if p["name"] == "ebpf_flows.tcp.io"}
        client, server = side["infos"]  # the client socket first
        expected = {("client", "transmit"): client["bytes_acked"] - 1, ("client", "receive"): client["bytes_received"],
                    ("server", "receive"): server["bytes_received"], ("server", "transmit"): server["bytes_acked"]}
        assert io == expected, (who, io, side["infos"])
        assert set(expected.values()) == {size}, (who, side["infos"])
