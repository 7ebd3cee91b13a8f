"""An HTTP client application for the exporter-trouble tests, run under ``opentelemetry-instrument``.

It serves HTTP itself (a standard-library server on 127.0.0.1, in a thread) and
calls it with ``requests``, a new session (so a new TCP connection) per
request; nothing here touches OpenTelemetry but to report whether this
library's instrumentor is on. Commands arrive on standard input, one per line;
each answer is one JSON line on standard output.

Modes:
- ``requests N``: make N requests, then print ``{"pid", "server_port",
  "count", "instrumented"}`` and wait for ``exit``.
- ``loop``: print ``{"pid", "server_port", "instrumented"}``, then make requests
  in a loop, paced, each one timed, until ``stop``. ``mark NAME`` prints how many
  requests were made so far and the process's memory (VmRSS, tracemalloc);
  ``stop`` ends the loop, waits until every connection has closed and prints
  the summary; then ``exit``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List

import requests

PACE_S = 0.05
_QUIET_STATES = {"0A", "06", "07"}  # LISTEN, TIME_WAIT, CLOSE


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"hello\n" * 20
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def emit(record: Dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def instrumented() -> bool:
    from otel_ebpf_flows import EbpfFlowsInstrumentor

    return EbpfFlowsInstrumentor().pipeline is not None


def one_request(url: str) -> None:
    with requests.Session() as session:  # closed here: the connection closes now
        session.get(url, timeout=30).raise_for_status()


def settle(port: int, timeout: float = 30) -> None:
    """Wait until no connection to or from ``port`` is open or closing, then one library sample more."""
    hexport = f"{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            next(f)
            busy = [line for line in f if line.split()[3] not in _QUIET_STATES
                    and hexport in (line.split()[1][-4:], line.split()[2][-4:])]
        if not busy:
            break
        time.sleep(0.02)
    time.sleep(0.3)


def main() -> None:
    tracemalloc.start()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="hello-server", daemon=True).start()
    port = server.server_address[1]
    url = f"http://127.0.0.1:{port}/"
    base = {"pid": os.getpid(), "server_port": port, "instrumented": instrumented()}

    if sys.argv[1] == "requests":
        count = int(sys.argv[2])
        for _ in range(count):
            one_request(url)
        settle(port)
        emit(dict(base, count=count))
        for line in sys.stdin:
            if line.strip() == "exit":
                break
        return

    latencies: List[float] = []
    stop = threading.Event()

    def loop() -> None:
        started = time.monotonic()
        while not stop.is_set():
            t0 = time.monotonic()
            one_request(url)
            latencies.append(time.monotonic() - t0)
            # paced from the start, so one slow request is not hidden by a shorter sleep
            stop.wait(max(0.0, started + len(latencies) * PACE_S - time.monotonic()))

    emit(base)
    looper = threading.Thread(target=loop, name="request-loop")
    looper.start()
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "mark":
            current, peak = tracemalloc.get_traced_memory()
            emit({"mark": arg, "count": len(latencies), "rss_kb": rss_kb(), "traced": current,
                  "traced_peak": peak, "unix_nano": time.time_ns()})
        elif command == "stop":
            stop.set()
            looper.join(60)
            settle(port)
            emit({"count": len(latencies), "latencies": latencies, "done_unix_nano": time.time_ns()})
        elif command == "exit":
            break
    stop.set()


if __name__ == "__main__":
    main()
