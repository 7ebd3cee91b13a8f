"""Traffic for the ``watch`` tests, made in a private network namespace on distinctive addresses.

python -m tests.cli.traffic PORT  (under ``unshare --net``). The server listens on
127.77.0.2, the clients bind 127.77.0.3, so host-wide ``watch`` rows of this
traffic are identifiable: ``client 127.77.0.2 PORT..PORT+2`` and
``server 127.77.0.3 PORT..PORT+1``. Faults, each on its own port:

- PORT: request/response over a path that drops 5 % of segments each way (nft):
  retransmits on both ends;
- PORT+1: the server answers once, then aborts with SO_LINGER 0: one RST sent by
  the server, received by the client, per connection;
- PORT+2: nothing listens: each connect is refused (an RST no socket sends).

Prints one JSON line: the namespace's MIB counter deltas (the kernel's own
ground truth) and what the traffic did.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
from typing import Any, Dict, List

from tests.kernel.harness import (
    drain_until_eof,
    emit,
    in_threads,
    mib,
    mib_delta,
    random_loss,
    recv_exactly,
    settle,
    setup_netns,
)
from tests.kernel.workload import wait_closed

SERVER = "127.77.0.2"
CLIENT = "127.77.0.3"
CONNECTIONS = 4
ROUNDS = 25
SIZE = 3000
ABORTS = 2
REFUSED = 3


def serve(srv: socket.socket, count: int, abort: bool, retrans: List[int]) -> threading.Thread:
    def handle(conn: socket.socket) -> None:
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    conn.shutdown(socket.SHUT_WR)
                    retrans.append(wait_closed(conn)["total_retrans"])  # nothing of ours in flight
                    return
                conn.sendall(data)
                if abort:  # answer once, then close with an RST
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return

    def run() -> None:
        handlers = []
        for _ in range(count):
            conn, _ = srv.accept()
            t = threading.Thread(target=handle, args=(conn,))
            t.start()
            handlers.append(t)
        for t in handlers:
            t.join()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def connect(port: int) -> socket.socket:
    s = socket.socket()
    s.bind((CLIENT, 0))
    s.settimeout(60)
    s.connect((SERVER, port))
    return s


def main(port: int) -> Dict[str, Any]:
    setup_netns()
    listeners: List[socket.socket] = []
    for p in (port, port + 1):
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((SERVER, p))
        srv.listen(64)
        listeners.append(srv)
    random_loss(port, 5)
    before = mib()
    server_retrans: List[int] = []
    echo = serve(listeners[0], CONNECTIONS, abort=False, retrans=server_retrans)
    aborting = serve(listeners[1], ABORTS, abort=True, retrans=[])

    def exchange(_i: int) -> int:
        s = connect(port)
        for _ in range(ROUNDS):
            s.sendall(b"w" * SIZE)
            recv_exactly(s, SIZE)
        s.shutdown(socket.SHUT_WR)
        drain_until_eof(s)
        total: int = wait_closed(s)["total_retrans"]
        s.close()
        return total

    client_retrans = in_threads(exchange, CONNECTIONS)
    for _ in range(ABORTS):
        s = connect(port + 1)
        s.sendall(b"ping")
        recv_exactly(s, 4)
        try:
            s.recv(10)
        except ConnectionResetError:
            pass
        s.close()
    refused = 0
    for _ in range(REFUSED):
        try:
            connect(port + 2).close()
        except ConnectionRefusedError:
            refused += 1
    echo.join()
    aborting.join()
    for srv in listeners:
        srv.close()
    settle()  # every connection has reached CLOSE: the counts are final
    tcp = {k: v for k, v in mib_delta(before, mib()).items() if k.startswith(("Tcp.", "TcpExt."))}
    return {"mib": tcp, "payload": CONNECTIONS * ROUNDS * SIZE,
            "connections": CONNECTIONS, "aborts": ABORTS, "refused": refused,
            "tcpi_total_retrans": {"client": client_retrans, "server": server_retrans}}


if __name__ == "__main__":
    emit(main(int(sys.argv[1])))
