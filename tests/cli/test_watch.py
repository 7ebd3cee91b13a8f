"""``otel-ebpf-flows watch`` on a real terminal (tmux) and in a pipe, against the kernel's own counters.

Each test starts the command, waits until its probes are attached (the first
screen or snapshot), makes traffic in a private network namespace
(tests/cli/traffic.py: loss, aborts, refused connects on 127.77.0.2/.3), and
reads a refresh whose counters were sampled after every connection there had
closed. The rows for that traffic must equal the namespace's MIB counters.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import threading
import time
from typing import IO, Any, Callable, Dict, List, Optional, Tuple

import pytest

from otel_ebpf_flows._watch import fmt_bytes
from tests.cli.conftest import CLI, ROOT, UNPRIVILEGED, Tmux, find_child, run_traffic, service_port, wait_for

pytestmark = pytest.mark.kernel

TITLE = "watch: this host's TCP flows"
SERVER, CLIENT = "127.77.0.2", "127.77.0.3"
RowKey = Tuple[str, str, int]


def watch_args(port: int, *extra: str) -> List[str]:
    """watch, every second, showing only the traffic of this test (its addresses and ports)."""
    return ["watch", "--interval", "1", "--peer", "127.77.0.0/16",
            "--port", str(port), "--port", str(port + 1), "--port", str(port + 2), *extra]


def parse_table(lines: List[str]) -> Tuple[List[str], List[Dict[str, str]]]:
    """(column titles, rows as title -> cell) of one rendered snapshot; the sort mark is stripped."""
    start = next(i for i, line in enumerate(lines) if line.startswith("ROLE "))
    titles = [t.rstrip("^v") for t in lines[start].split()]
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith(("client ", "server ")):
            break
        cells = line.split()
        assert len(cells) == len(titles), (titles, line)
        rows.append(dict(zip(titles, cells)))
    return titles, rows


def keyed(rows: List[Dict[str, str]]) -> Dict[RowKey, Dict[str, str]]:
    return {(r["ROLE"], r["PEER"], int(r["PORT"])): r for r in rows}


def seconds(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert m, f"not a duration: {text!r}"
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]


def clock_after(lines: List[str], after: float) -> bool:
    """Whether the title's clock (the time the counters were sampled) is later than ``after``."""
    title = next((line for line in lines if TITLE in line), "")
    m = re.search(r"\b(\d\d):(\d\d):(\d\d)\b", title)
    if not m:
        return False
    shown = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3))
    t = time.localtime(after)
    # a whole second later than `after`, so sampled after it (across midnight too)
    return 1 <= (shown - (t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec)) % 86400 < 3600


def assert_reconciles(rows: Dict[RowKey, Dict[str, str]], r: Dict[str, Any], port: int) -> None:
    """The rows of the traffic equal its namespace's own counters (text cells, as shown)."""
    mib = r["mib"]
    want = {("client", SERVER, port), ("client", SERVER, port + 1), ("client", SERVER, port + 2),
            ("server", CLIENT, port), ("server", CLIENT, port + 1)}
    assert set(rows) == want, sorted(rows)
    total = lambda col, role=None: sum(int(v[col]) for k, v in rows.items() if role in (None, k[0]))  # noqa: E731
    assert mib["Tcp.RetransSegs"] > 0, "5 % loss made no retransmit: no test"
    tcpi = r["tcpi_total_retrans"]  # each end of each lossy connection, read once it had closed
    shown = {role: rows[(role, peer, port)]["RETRANS"] for role, peer in (("client", SERVER), ("server", CLIENT))}
    assert shown == {"client": str(sum(tcpi["client"])), "server": str(sum(tcpi["server"]))}, (tcpi, mib)
    assert total("RETRANS") == mib["Tcp.RetransSegs"]
    assert total("CONNS", "client") == mib["Tcp.ActiveOpens"] == r["connections"] + r["aborts"] + r["refused"]
    assert total("FAILED", "client") == mib["Tcp.AttemptFails"] == r["refused"]
    assert rows[("client", SERVER, port + 2)]["FAILED"] == str(r["refused"])
    assert total("CONNS", "server") == mib["Tcp.PassiveOpens"] == r["connections"] + r["aborts"]
    # every RST of the namespace was received by one of its sockets; the refused
    # connects' RSTs are sent by no socket, the aborts' by the server's
    assert total("RST-RX") == mib["Tcp.OutRsts"]
    assert total("RST-TX") == mib["Tcp.OutRsts"] - r["refused"]
    assert rows[("server", CLIENT, port + 1)]["RST-TX"] == str(r["aborts"])
    for key in (("client", SERVER, port), ("server", CLIENT, port)):
        assert rows[key]["TX"] == rows[key]["RX"] == fmt_bytes(r["payload"]), rows[key]
        assert 0 < seconds(rows[key]["RTT"]) < 1 and 0 < seconds(rows[key]["HSp99"]), rows[key]
    assert all(row["ACTIVE"] == "0" for row in rows.values())


# --- on a terminal --------------------------------------------------------------------------


def start_watch(tmux: Tmux, port: int) -> None:
    """watch in a tmux window, under bash, which then reports its exit status and the tty's modes."""
    command = shlex.join([*CLI, *watch_args(port)])
    after = "; echo WATCH-EXIT=$?; stty -a; echo STTY-DONE; sleep 600"
    tmux.start(f"bash --norc --noprofile -c {shlex.quote(command + after)}")
    wait_for(lambda: any("no TCP activity seen yet" in line for line in tmux.screen()), 60,
             "watch's first screen", lambda: "\n".join(tmux.screen()))


def screen_when(tmux: Tmux, condition: Callable[[List[str]], bool], what: str, timeout: float = 30) -> List[str]:
    """The first screen that meets ``condition``."""
    def check() -> Optional[List[str]]:
        screen = tmux.screen()
        return screen if condition(screen) else None

    found: List[str] = wait_for(check, timeout, what, lambda: "\n".join(tmux.screen()))
    return found


def title(tmux: Tmux) -> str:
    return next((line for line in tmux.screen() if TITLE in line), "")


def assert_terminal_restored(tmux: Tmux) -> None:
    # the whole of stty's report, not a screen caught between the echo and stty
    screen = screen_when(tmux, lambda s: any("STTY-DONE" in line for line in s), "watch to exit")
    text = "\n".join(screen)
    assert "WATCH-EXIT=0" in text, text
    modes = set(text.split())
    assert {"icanon", "echo", "icrnl", "opost"} <= modes, text  # cooked mode, not curses' cbreak/noecho
    assert tmux.display("#{alternate_on} #{cursor_flag}") == "0 1"  # main screen, cursor shown


def test_screen_rows_reconcile_with_the_namespace_counters(tmux: Tmux) -> None:
    port = service_port()
    start_watch(tmux, port)
    r = run_traffic(port)
    ended = time.time()
    screen = screen_when(tmux, lambda s: clock_after(s, ended), "a refresh sampled after the traffic ended")
    _, rows = parse_table(screen)
    assert_reconciles(keyed(rows), r, port)
    # self-telemetry (host-wide, so it may count others' troubles): one line that says which
    assert any(line.startswith(("complete: 0 records lost, 0 map evictions", "INCOMPLETE: ")) for line in screen)

    # keys: the order follows the sort and its direction
    assert "sort: retrans (descending)" in title(tmux)
    retrans = [int(row["RETRANS"]) for row in rows]
    assert retrans == sorted(retrans, reverse=True)
    tmux.keys("r")
    wait_for(lambda: "sort: retrans (ascending)" in title(tmux), 10, "r to reverse the order", lambda: title(tmux))
    _, rows = parse_table(tmux.screen())
    assert [int(row["RETRANS"]) for row in rows] == sorted(retrans)
    tmux.keys("r")
    tmux.keys("s")
    wait_for(lambda: "sort: rate (descending)" in title(tmux), 10, "s to sort by the next key", lambda: title(tmux))
    tmux.keys("S", "S")  # back past retrans, wrapping to the last key: peer
    wait_for(lambda: "sort: peer (ascending)" in title(tmux), 10, "S to go back", lambda: title(tmux))
    _, rows = parse_table(tmux.screen())
    assert [(row["ROLE"], int(row["PORT"])) for row in rows] == [
        ("client", port), ("client", port + 1), ("client", port + 2), ("server", port), ("server", port + 1)]
    tmux.keys("q")
    assert_terminal_restored(tmux)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_and_sigterm_exit_cleanly_and_restore_the_terminal(tmux: Tmux, how: str) -> None:
    start_watch(tmux, service_port())
    if how == "ctrl-c":
        tmux.keys("C-c")
    else:
        pid = find_child(tmux.pane_pid(), "otel_ebpf_flows")
        os.kill(pid, signal.SIGTERM)
    assert_terminal_restored(tmux)


# --- in a pipe ------------------------------------------------------------------------------


class Lines:
    """A process's stdout, line by line, without blocking the test."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[Optional[str]] = queue.Queue()
        self.seen: List[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def next(self, timeout: float = 30) -> str:
        line = self._queue.get(timeout=timeout)
        if line is None:
            raise AssertionError("the output ended:\n" + "\n".join(self.seen[-40:]))
        self.seen.append(line)
        return line

    def snapshot(self) -> List[str]:
        """The next text snapshot (its lines up to the blank line that ends it)."""
        lines = []
        while (line := self.next()) != "" or not lines:
            if line:
                lines.append(line)
        return lines


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)


def stop(proc: subprocess.Popen) -> Tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


def test_text_snapshots_when_output_is_a_pipe(kernel_ok: None) -> None:
    port = service_port()
    proc = spawn(*watch_args(port))
    try:
        out = Lines(proc.stdout)  # type: ignore[arg-type]
        first = out.snapshot()
        assert TITLE in first[0] and "no TCP activity seen yet that matches the filter" in first[-1], first
        assert not any(line.startswith("q quit") for line in first)  # no key help off a terminal
        r = run_traffic(port)
        ended = time.time()
        while not clock_after(snap := out.snapshot(), ended):
            pass
        assert_reconciles(keyed(parse_table(snap)[1]), r, port)
    finally:
        status, err = stop(proc)
    assert status == 0, err


def test_json_snapshots_reconcile_exactly(kernel_ok: None) -> None:
    port = service_port()
    proc = spawn(*watch_args(port, "--json"))
    try:
        out = Lines(proc.stdout)  # type: ignore[arg-type]
        assert json.loads(out.next())["rows"] == []  # attached, nothing yet
        r = run_traffic(port)
        ended = time.time()
        while (snap := json.loads(out.next()))["timestamp"] <= ended:
            pass
    finally:
        status, err = stop(proc)
    assert status == 0, err
    rows = {(x["role"], x["address"], x["port"]): x for x in snap["rows"]}
    mib = r["mib"]
    assert mib["Tcp.RetransSegs"] > 0, "5 % loss made no retransmit: no test"
    tcpi = r["tcpi_total_retrans"]
    assert rows[("client", SERVER, port)]["retransmits"] == sum(tcpi["client"]), (tcpi, rows)
    assert rows[("server", CLIENT, port)]["retransmits"] == sum(tcpi["server"]), (tcpi, rows)
    assert sum(x["retransmits"] for x in rows.values()) == mib["Tcp.RetransSegs"], (rows, mib)
    assert snap["totals"]["retransmits"] == mib["Tcp.RetransSegs"]
    assert snap["totals"]["attempts"] == mib["Tcp.ActiveOpens"] + mib["Tcp.PassiveOpens"]
    assert snap["totals"]["failed"] == mib["Tcp.AttemptFails"]
    assert rows[("client", SERVER, port + 2)]["failed_by"] == {"refused": r["refused"]}
    assert snap["totals"]["resets_received"] == mib["Tcp.OutRsts"]
    echo_client, echo_server = rows[("client", SERVER, port)], rows[("server", CLIENT, port)]
    for row in (echo_client, echo_server):  # exact payload bytes each way
        assert row["bytes_transmitted"] == row["bytes_received"] == r["payload"]
        assert row["closes"] == {"normal": r["connections"]}
        assert 0 < row["handshake_p50_s"] <= row["handshake_p99_s"]
        assert 0 < row["rtt_s"] < 1
    assert echo_client["handshakes"] == r["connections"]
    # a server handshake is timed only when its request is found at the accept queue's tail;
    # concurrent handshakes on one listener can miss it (counted in tcp_flows.syn_wait)
    assert 1 <= echo_server["handshakes"] <= r["connections"]
    assert rows[("server", CLIENT, port + 1)]["closes"] == {"reset_sent": r["aborts"]}
    assert rows[("client", SERVER, port + 1)]["closes"] == {"reset_received": r["aborts"]}
    # self-telemetry is host-wide (other processes' traffic too): its flag must agree with its counts
    probes = snap["probes"]
    assert probes["variant"] == "tp_btf"
    counts = {**probes["events_lost"], **probes["map_evictions"]}
    assert {"tcp_flows.events", "tcp_flows.syn_wait", "tcp_flows.socks", "tcp_flows.flows"} <= set(counts)
    assert probes["complete"] is (not any(counts.values())), probes


def test_count_prints_that_many_snapshots_and_exits_0(kernel_ok: None) -> None:
    proc = subprocess.run([*CLI, "watch", "--json", "--interval", "0.5", "--count", "3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    snaps = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(snaps) == 3
    assert [s["timestamp"] for s in snaps] == sorted(s["timestamp"] for s in snaps)


def test_without_privilege_it_says_to_run_doctor(nobody_python: str) -> None:
    proc = subprocess.run([*UNPRIVILEGED, nobody_python, "-m", "otel_ebpf_flows", "watch", "--count", "1"],
                          cwd="/", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert "cannot load the eBPF probes" in proc.stderr and "CAP_BPF" in proc.stderr, proc.stderr
    assert "Run `otel-ebpf-flows doctor`" in proc.stderr, proc.stderr
