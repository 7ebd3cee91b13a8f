"""An unprivileged service that instruments itself: sock_diag mode (run by tests/cli/sock_diag_netns.py).

python -m tests.cli.sock_diag_service PEERS SERVE ROUNDS SIZE, as nobody with no capabilities:
PEERS is ``host:port:count,...`` (long-lived client connections to make), SERVE
is ``port:count`` (connections to accept and echo, ROUNDS x SIZE bytes each).
Prints "ready" once listening; reads "go" on stdin before connecting; then does
its traffic, waits until nothing of its own is in flight, reads TCP_INFO of
every socket it holds, takes the exported points after a final poll, and prints
one JSON line (everything still open), then waits for EOF on stdin.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
import threading
import time
from typing import Any, Dict, List, Tuple

from tests.kernel.harness import Telemetry, in_threads, recv_exactly, tcp_info


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[Tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelname, record.getMessage()))


def unacked(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return int(struct.unpack_from("I", raw, 24)[0])  # tcpi_unacked


def main() -> None:
    peers = [(h, int(p), int(n)) for h, p, n in (x.split(":") for x in sys.argv[1].split(","))]
    serve_port, serve_count = (int(x) for x in sys.argv[2].split(":"))
    rounds, size = int(sys.argv[3]), int(sys.argv[4])
    lines = Lines()
    log = logging.getLogger("otel_ebpf_flows")
    log.addHandler(lines)
    log.setLevel(logging.INFO)

    tel = Telemetry()  # mode auto, sample every second (the default)
    srv = socket.socket()
    srv.bind(("127.0.0.1", serve_port))
    srv.listen(16)
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "go"

    payload = b"q" * size
    served: List[socket.socket] = []

    def serve() -> None:
        def echo(conn: socket.socket) -> None:
            for _ in range(rounds):
                conn.sendall(recv_exactly(conn, size))

        threads = []
        for _ in range(serve_count):
            conn, _ = srv.accept()
            served.append(conn)
            t = threading.Thread(target=echo, args=(conn,))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()

    server = threading.Thread(target=serve)
    server.start()
    targets = [(h, p) for h, p, n in peers for _ in range(n)]

    def connect(i: int) -> socket.socket:
        s = socket.create_connection(targets[i], timeout=60)
        for _ in range(rounds):
            s.sendall(payload)
            recv_exactly(s, size)
        return s

    clients = in_threads(connect, len(targets))
    server.join()
    mine = clients + served
    deadline = time.monotonic() + 60
    while any(unacked(s) for s in mine) and time.monotonic() < deadline:
        time.sleep(0.05)  # nothing of ours in flight: TCP_INFO cannot change any more
    time.sleep(0.5)
    infos: List[Dict[str, Any]] = []
    for role, socks in (("client", clients), ("server", served)):
        for s in socks:
            peer_host, peer_port = s.getpeername()[:2]
            infos.append({"role": role, "peer": peer_host, "peer_port": peer_port,
                          "local_port": s.getsockname()[1], **tcp_info(s)})
    time.sleep(0.3)  # the final poll happens after the TCP_INFO reads
    points = tel.points()
    again = [tcp_info(s) for s in mine]
    source = tel.instrumentor.pipeline.source if tel.instrumentor.pipeline else None
    print(json.dumps({
        "uid": os.geteuid(),
        "source": type(source).__name__,
        "points": points,
        "infos": infos,
        "stable": [{k: i[k] for k in ("total_retrans", "bytes_acked", "bytes_received")} for i in infos]
        == [{k: a[k] for k in ("total_retrans", "bytes_acked", "bytes_received")} for a in again],
        "log": lines.records,
        "payload": rounds * size,
    }), flush=True)
    sys.stdin.read()  # keep every socket open until the runner is done
    tel.close()
    os._exit(0)


if __name__ == "__main__":
    main()
