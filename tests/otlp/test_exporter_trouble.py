"""Exporter trouble and switching the library off, under ``opentelemetry-instrument``.

- ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=ebpf_flows`` turns only this library
  off: the requests instrumentation's metrics still reach the receiver, none of
  ours do, and the process holds no BPF program at all (the same application
  with the library on holds the tcp_flows programs: the check can see them).
- The receiver is (a) not there, (b) there but never answering (it accepts TCP
  and says nothing), then (c) really there: an application making requests in a
  loop all along is never held up, its memory stays bounded, and once the
  receiver is back our metrics arrive with counters that carried on through
  the outage (not reset, nothing missing).

Everything is real: the application, the SDK's OTLP exporters, the kernel
probes, and the rotel receiver (conftest.py).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional, Set

import pytest

from otel_ebpf_flows import _kernel

from .conftest import EXPORT_INTERVAL_MS, ROOT, Receiver, collections, opentelemetry_instrument, our_metrics, total

SCOPE = "otel_ebpf_flows"
REQUESTS_SCOPE = "opentelemetry.instrumentation.requests"
ATTEMPTS = "ebpf_flows.tcp.connection.attempts"
PROTOCOLS = ["grpc", "http/protobuf"]
PHASE_DOWN_S = 3.0
PHASE_SILENT_S = 6.0
# the SDK's default OTLP export timeout (OTEL_EXPORTER_OTLP_TIMEOUT): what an export to a silent
# receiver may block its own thread for
EXPORT_TIMEOUT_S = 10.0


@pytest.fixture(autouse=True)
def _deps(otlp_ok: None) -> None:
    for module, package in (("requests", "requests"),
                            ("opentelemetry.instrumentation.requests", "opentelemetry-instrumentation-requests")):
        try:
            __import__(module)
        except ImportError:
            reason = f"these tests need {package} (pip install -e '.[test]')"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)


class App:
    """``opentelemetry-instrument python -m tests.otlp.trouble_workload ARGS``, configured by OTEL_* only."""

    def __init__(self, args: List[str], env: Dict[str, str], stderr_path: str) -> None:
        script = opentelemetry_instrument()
        assert script is not None
        clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        clean.update(env)
        self.stderr = open(stderr_path, "w+")
        self.proc = subprocess.Popen([script, sys.executable, "-m", "tests.otlp.trouble_workload", *args],
                                     cwd=ROOT, env=clean, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)
        self._lines: queue.Queue[Optional[str]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def errors(self) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read()[-4000:]

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float = 60.0) -> Dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the application said nothing within {timeout:.0f} s:\n{self.errors()}") from None
        if line is None:
            self.proc.wait(10)
            raise AssertionError(f"the application exited with {self.proc.returncode}:\n{self.errors()}")
        return dict(json.loads(line))

    def finish(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            try:
                self.send("exit")
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"the application did not exit within {timeout:.0f} s:\n{self.errors()}") from None
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass
        if not self.stderr.closed:
            self.stderr.close()


@pytest.fixture
def start_app(tmp_path: Any) -> Iterator[Any]:
    apps: List[App] = []

    def start(args: List[str], service: str, protocol: str, endpoint: str, **extra: str) -> App:
        env = dict(OTEL_SERVICE_NAME=service, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
                   OTEL_EXPORTER_OTLP_PROTOCOL=protocol, OTEL_METRIC_EXPORT_INTERVAL=str(EXPORT_INTERVAL_MS),
                   OTEL_METRICS_EXPORTER="otlp", OTEL_TRACES_EXPORTER="none", OTEL_LOGS_EXPORTER="none")
        env.update(extra)
        app = App(args, env, str(tmp_path / f"app-{len(apps)}.err"))
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.close()


def bpf_objects(pid: int) -> Dict[str, List[str]]:
    """The BPF objects a process holds through its file descriptors: kind -> program names (for
    programs) or fd numbers (maps, links)."""
    bpftool = shutil.which("bpftool")
    out: Dict[str, List[str]] = {"prog": [], "map": [], "link": []}
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target == "anon_inode:bpf-prog":
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                prog_id = next(line.split()[1] for line in f if line.startswith("prog_id:"))
            assert bpftool, "bpftool is needed to name BPF programs (scripts/setup installs it)"
            info = json.loads(subprocess.run([bpftool, "prog", "show", "id", prog_id, "--json"],
                                             capture_output=True, text=True, check=True).stdout)
            out["prog"].append(info.get("name", ""))
        elif target == "anon_inode:bpf-map":
            out["map"].append(fd)
        elif target == "anon_inode:bpf_link":
            out["link"].append(fd)
    return out


def _scopes(batches: List[Dict[str, Any]]) -> Set[str]:
    return {sm["name"] for b in batches for sm in b["scopes"]}


def test_disabled_instrumentation_turns_only_this_library_off(receiver: Receiver, start_app: Any) -> None:
    protocol = "http/protobuf"
    count = 5
    results = {}
    for disabled in (False, True):  # the library on first: shows the checks below can see it
        service = f"disabled-{disabled}-{uuid.uuid4().hex[:8]}"
        extra = {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "ebpf_flows"} if disabled else {}
        app = start_app(["requests", str(count)], service, protocol, receiver.endpoint(protocol), **extra)
        r = app.answer()
        held = bpf_objects(r["pid"])  # while the application runs
        assert app.finish() == 0, app.errors()
        # the requests instrumentation's metrics arrive either way (the final export at exit at least)
        batches = receiver.wait_for(service, lambda b: REQUESTS_SCOPE in _scopes(b))
        results[disabled] = (r, held, batches, app.errors())

    r, held, batches, _ = results[False]
    assert r["instrumented"] is True
    names = [n for n in held["prog"] if n.startswith(("tp_btf_", "raw_tp_"))]
    # every hook and the nested copies, the send/receive programs that serve span enrichment and
    # claim mode, and the listener-drop program (this kernel's kfree_skb has the receiving socket)
    expected = len(_kernel.HOOKS) + len(_kernel.NESTED_HOOKS) + len(_kernel.IO_HOOKS) + 1
    assert len(names) == expected and "sample_sockets" in held["prog"], held
    assert _kernel.DROP_PROGRAM in names, names
    assert SCOPE in _scopes(batches)
    final = collections(our_metrics(batches, SCOPE))
    assert total(final[max(final)], ATTEMPTS, ebpf_flows__tcp__role="client",
                 network__peer__port=r["server_port"]) == count

    r, held, batches, errors = results[True]
    assert r["instrumented"] is False
    assert held == {"prog": [], "map": [], "link": []}, f"the disabled library left BPF objects: {held}"
    assert REQUESTS_SCOPE in _scopes(batches)
    assert SCOPE not in _scopes(batches), "otel_ebpf_flows metrics arrived although it was disabled"
    assert "otel-ebpf-flows" not in errors, errors  # not even a warning: it was simply not loaded


class Silent:
    """A TCP endpoint that accepts connections and never says anything (a hung receiver)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.accepted: List[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        for conn in self.accepted:  # reset, so no TIME_WAIT is left on the port the receiver takes
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_receiver_down_then_silent_then_up(receiver_down: Receiver, start_app: Any, protocol: str) -> None:
    receiver = receiver_down
    port = receiver.port(protocol)
    service = f"trouble-{protocol.replace('/', '-')}-{uuid.uuid4().hex[:8]}"
    app = start_app(["loop"], service, protocol, receiver.endpoint(protocol))
    r = app.answer()
    assert r["instrumented"] is True, app.errors()

    time.sleep(PHASE_DOWN_S)  # (a) nothing listens: every export is refused
    app.send("mark down")
    down = app.answer()
    silent = Silent(port)  # (b) something listens and never answers
    try:
        time.sleep(PHASE_SILENT_S)
        app.send("mark silent")
        after_silent = app.answer()
        assert silent.accepted, "the exporter never reached the silent endpoint: no test"
    finally:
        silent.close()
    up_ns = time.time_ns()
    receiver.start()  # (c) the real receiver, on the same port

    def ours_arrived(batches: List[Dict[str, Any]]) -> bool:
        return bool(our_metrics(batches, SCOPE))

    receiver.wait_for(service, ours_arrived, timeout=60)
    app.send("mark up")
    up = app.answer()
    app.send("stop")
    summary = app.answer()
    count = summary["count"]

    def complete(batches: List[Dict[str, Any]]) -> bool:
        by_time = collections(our_metrics(batches, SCOPE))
        return any(total(c, ATTEMPTS, ebpf_flows__tcp__role="client", network__peer__port=r["server_port"]) == count
                   for c in by_time.values())

    batches = receiver.wait_for(service, complete, timeout=30)
    assert app.finish() == 0, app.errors()

    # never held up: every request of the loop took far less than one export timeout, throughout
    # (one outlier allowed: a loaded host alone can stall a loopback round trip by a SYN
    # retransmission timeout, 1 s, now and then, with the library off too)
    latencies = sorted(summary["latencies"])
    assert latencies[-1] < EXPORT_TIMEOUT_S / 4 and latencies[-2] < 0.5, latencies[-5:]
    assert after_silent["count"] - down["count"] >= 10, (down, after_silent)  # the loop went on meanwhile

    # memory stays bounded: failed and hung exports do not pile up (Python allocations, tracemalloc;
    # and the whole process, RSS, which includes gRPC's native buffers)
    assert up["traced"] - down["traced"] < 8 * 2**20, (down, after_silent, up)
    assert up["rss_kb"] - down["rss_kb"] < 48 * 1024, (down, after_silent, up)

    # cumulative counters carried on: one series throughout, never lower, ending at exactly the
    # requests made (none lost in the outage); a collection taken once the receiver was
    # up counts every request made while it was away (collections taken during the outage may
    # arrive late, retried by the exporter, and count what was made until they were taken)
    history = []
    for m in our_metrics(batches, SCOPE):
        if m["name"] == ATTEMPTS:
            for p in m["points"]:
                if p["attributes"].get("network.peer.port", [None, None])[1] == r["server_port"]:
                    history.append(p)
    history.sort(key=lambda p: p["time_unix_nano"])
    # (the SDK stamps a series' start when a collection first sees it, which can be late in an
    # outage: the exporter's retries hold up the SDK's reader thread; the start never changes)
    assert len({p["start_time_unix_nano"] for p in history}) == 1
    values = [p["value"][1] for p in history]
    assert values == sorted(values) and values[-1] == count, values
    later = [p for p in history if p["time_unix_nano"] >= up_ns + 500_000_000]
    assert later and later[0]["value"][1] >= after_silent["count"], (later[:1], after_silent)
    # the exporter's own failed connects while the receiver was down were counted too
    final = collections(our_metrics(batches, SCOPE))
    last = final[max(final)]
    assert total(last, ATTEMPTS, network__peer__port=port, error__type="refused") >= 1
