"""An uninstrumented peer process for kernel tests (another process on the same host).

python -m tests.kernel.peer MODE PORT [options]; prints "ready" once listening
or started, and a JSON result line at the end.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time

from tests.kernel.harness import drain_until_eof, in_threads, recv_exactly, tcp_info


def listener(port: int, backlog: int = 128, rcvbuf: int = 0, host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((host, port))
    s.listen(backlog)
    return s


def ready() -> None:
    print("ready", flush=True)


def echo(args: argparse.Namespace) -> object:
    """Echo every request; on EOF close. --rst: answer once then abort with RST."""
    srv = listener(args.port, host=args.host)
    ready()
    handled = 0

    def handle(conn: socket.socket) -> None:
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
                if args.rst:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return

    threads = []
    while handled < args.count:
        conn, _ = srv.accept()
        handled += 1
        t = threading.Thread(target=handle, args=(conn,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return {"handled": handled}


def sink(args: argparse.Namespace) -> object:
    """Accept one connection with a small receive buffer, read nothing for --hold s, then drain."""
    srv = listener(args.port, rcvbuf=args.rcvbuf)
    ready()
    conn, _ = srv.accept()
    time.sleep(args.hold)
    total = drain_until_eof(conn)
    conn.close()
    return {"received": total}


def clients(args: argparse.Namespace) -> object:
    """--count connections to --port, each --rounds request/response of --size bytes.
    The client closes first; it reads TCP_INFO once the close is complete."""
    ready()
    payload = b"x" * args.size

    def one(_i: int) -> dict:
        s = socket.create_connection(("127.0.0.1", args.port), timeout=60)
        for _ in range(args.rounds):
            s.sendall(payload)
            recv_exactly(s, len(payload))
        s.shutdown(socket.SHUT_WR)
        drain_until_eof(s)
        info = tcp_info(s)
        s.close()
        return info

    return in_threads(one, args.count)


def flood(args: argparse.Namespace) -> object:
    """--count non-blocking connects to --port, held open for --hold seconds."""
    ready()
    socks = []
    for _ in range(args.count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", args.port))
        socks.append(s)
    time.sleep(args.hold)
    for s in socks:
        s.close()
    return {"connects": len(socks)}


def send(args: argparse.Namespace) -> object:
    """Connect to --port, send --size bytes, close our side, drain."""
    ready()
    s = socket.create_connection(("127.0.0.1", args.port), timeout=60)
    s.sendall(b"s" * args.size)
    s.shutdown(socket.SHUT_WR)
    drain_until_eof(s)
    s.close()
    return {"sent": args.size}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["echo", "sink", "clients", "flood", "send"])
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--rcvbuf", type=int, default=4096)
    p.add_argument("--hold", type=float, default=1.0)
    p.add_argument("--rst", action="store_true")
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args()
    result = {"echo": echo, "sink": sink, "clients": clients, "flood": flood, "send": send}[args.mode](args)
    print(json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
