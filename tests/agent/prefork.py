"""A pre-fork server run as ``nobody`` (tests/agent): the master listens, forks workers that
accept and echo; every process holds the listener, only the workers accept.

python -m tests.agent.prefork PORT WORKERS -- prints ``ready MASTER WORKER...``; exits (and
stops its workers) on a line on stdin.
"""

from __future__ import annotations

import os
import signal
import socket
import sys


def serve(srv: socket.socket) -> None:
    while True:
        conn, _ = srv.accept()
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)


def main() -> None:
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(128)
    pids = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            try:
                serve(srv)
            finally:
                os._exit(0)
        pids.append(pid)
    print("ready", os.getpid(), *pids, flush=True)
    sys.stdin.readline()
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
