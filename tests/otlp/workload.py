"""An application instrumented with no code change, for the OTLP end-to-end tests.

Run by tests/otlp as ``opentelemetry-instrument python -m tests.otlp.workload MODE``
and configured only by the standard OTEL_* variables: opentelemetry-distro
builds the SDK MeterProvider with the OTLP exporter, and loads this package's
instrumentor through its ``opentelemetry_instrumentor`` entry point. Nothing
here touches OpenTelemetry or otel_ebpf_flows but to check that the
instrumentor really is on.

Modes:
- ``traffic``: a local echo server (this process) and its clients (this
  process): ``CONNECTIONS`` normal connections of known sizes, a connect to a
  port bound but not listening (refused), and a connection closed with
  SO_LINGER 0 (a reset).
- ``loop``: ``LOOP_COUNT`` paced request/response round trips, each on a new
  connection, timed.

It prints ``ready`` once instrumented, then one JSON line with what it did,
then waits for a line on standard input (at most ``EXIT_WAIT_S``) and exits
normally, so that the SDK's shutdown runs.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time
from typing import Any, Dict, List, Tuple

SIZES = (1, 1000, 60_000, 3, 20_000)  # payload of each normal connection, echoed back
LINGER_PAYLOAD = b"ping"
LOOP_COUNT = 40
LOOP_PACE_S = 0.075
LOOP_PAYLOAD = 100
EXIT_WAIT_S = 60.0
_QUIET_STATES = {"0A", "06", "07"}  # LISTEN, TIME_WAIT, CLOSE


def fail(message: str) -> None:
    sys.stderr.write(f"workload: {message}\n")
    sys.stderr.flush()
    os._exit(3)


def check_instrumented() -> None:
    from opentelemetry import metrics

    from otel_ebpf_flows import EbpfFlowsInstrumentor

    if type(metrics.get_meter_provider()).__module__.split(".")[:3] != ["opentelemetry", "sdk", "metrics"]:
        fail(f"no SDK MeterProvider from opentelemetry-instrument: {metrics.get_meter_provider()!r}")
    if EbpfFlowsInstrumentor().pipeline is None:
        fail("opentelemetry-instrument did not turn otel-ebpf-flows on (see the warning above)")


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(65536, n - len(buf)))
        if not chunk:
            raise ConnectionError("peer closed early")
        buf += chunk
    return bytes(buf)


def bytes_acked(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return struct.unpack_from("Q", raw, 120)[0]


class EchoServer:
    """Accepts ``count`` connections on 127.0.0.1 and echoes each until EOF or reset."""

    def __init__(self, count: int) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self.count = count
        self.resets = 0
        self.echoed = 0
        self.acked = threading.Event()  # set once the echo of a linger connection is acknowledged
        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="echo-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        for _ in range(self.count):
            conn, _ = self.sock.accept()
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _handle(self, conn: socket.socket) -> None:
        sent = 0
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
                sent += len(data)
                if data == LINGER_PAYLOAD:  # its client resets as soon as our echo is acknowledged
                    deadline = time.monotonic() + 5
                    while bytes_acked(conn) < sent and time.monotonic() < deadline:
                        time.sleep(0.001)
                    self.acked.set()
        except ConnectionResetError:
            with self._lock:
                self.resets += 1
        finally:
            conn.close()
            with self._lock:
                self.echoed += sent

    def join(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        self._acceptor.join(timeout)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._acceptor.is_alive() or any(t.is_alive() for t in self._threads):
            fail("the echo server did not finish")
        self.sock.close()


def round_trip(port: int, payload: bytes) -> None:
    """One connection: send, read the echo, close first (FIN), wait for the server's FIN."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        recv_exactly(s, len(payload))
        s.shutdown(socket.SHUT_WR)
        if s.recv(1):
            raise ConnectionError("unexpected data after the echo")


def settle(ports: Tuple[int, ...], timeout: float = 30) -> None:
    """Wait until no TCP connection on ``ports`` is still open or closing, then until one
    sample of the library (its reader refreshes every 0.2 s at most) is surely later."""
    hexports = {f"{p:04X}" for p in ports}
    deadline = time.monotonic() + timeout
    while True:
        busy = []
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if state not in _QUIET_STATES and {local[-4:], remote[-4:]} & hexports:
                    busy.append((local, remote, state))
        if not busy:
            break
        if time.monotonic() > deadline:
            fail(f"connections did not close: {busy}")
        time.sleep(0.02)
    time.sleep(0.3)


def traffic() -> Dict[str, Any]:
    server = EchoServer(count=len(SIZES) + 1)
    for size in SIZES:
        round_trip(server.port, b"x" * size)

    # refused: a port held bound (so nobody else can take it) but not listening
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", refused_port), timeout=10).close()
        fail("connecting to a port that does not listen succeeded")
    except ConnectionRefusedError:
        pass

    # reset: SO_LINGER 0 on an established connection once its data is acknowledged
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(LINGER_PAYLOAD)
    recv_exactly(s, len(LINGER_PAYLOAD))
    if not server.acked.wait(10):
        fail("the echo of the linger connection was not acknowledged")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()

    server.join()
    settle((server.port, refused_port))
    closed.close()
    payload = sum(SIZES) + len(LINGER_PAYLOAD)
    if server.echoed != payload or server.resets != 1:
        fail(f"echo server saw {server.echoed} bytes and {server.resets} resets")
    return {"server_port": server.port, "refused_port": refused_port, "normal": len(SIZES),
            "payload": payload, "done_unix_nano": time.time_ns()}


def loop() -> Dict[str, Any]:
    server = EchoServer(count=LOOP_COUNT)
    payload = b"y" * LOOP_PAYLOAD
    latencies = []
    started = time.monotonic()
    for i in range(LOOP_COUNT):
        t0 = time.monotonic()
        round_trip(server.port, payload)
        latencies.append(time.monotonic() - t0)
        # paced from the start, so a slow iteration is not hidden by a shorter sleep
        time.sleep(max(0.0, started + (i + 1) * LOOP_PACE_S - time.monotonic()))
    elapsed = time.monotonic() - started
    server.join()
    settle((server.port,))
    return {"server_port": server.port, "count": LOOP_COUNT, "payload": LOOP_COUNT * LOOP_PAYLOAD,
            "latencies": latencies, "elapsed": elapsed, "nominal": LOOP_COUNT * LOOP_PACE_S,
            "done_unix_nano": time.time_ns()}


def main() -> None:
    check_instrumented()
    print("ready", flush=True)
    result = {"traffic": traffic, "loop": loop}[sys.argv[1]]()
    result["pid"] = os.getpid()
    print(json.dumps(result), flush=True)
    waiter = threading.Thread(target=sys.stdin.readline, daemon=True)
    waiter.start()
    waiter.join(EXIT_WAIT_S)
    # a normal exit: the SDK's atexit shutdown collects and exports once more


if __name__ == "__main__":
    main()
