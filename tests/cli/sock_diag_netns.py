"""The sock_diag-mode scenario, in this (private) network namespace, as root.

python -m tests.cli.sock_diag_netns NOBODY_PYTHON  (under ``unshare --net``). Two
uninstrumented echo peers (tests/kernel/peer.py) at 127.0.0.2 and 127.0.0.3, 5 %
random loss on every port used (nftables), window scaling off, the unprivileged service
(tests/cli/sock_diag_service.py, as nobody via setpriv) making long-lived client
connections to both peers and serving connections made by this process, which
also talks to both peers itself: another process's traffic, in the same
namespace, to the same peers. Prints one JSON line: the service's report and
the namespace's MIB deltas.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from typing import Any, List

from tests.cli.conftest import UNPRIVILEGED
from tests.kernel.harness import emit, finish, mib, mib_delta, nft, peer, recv_exactly, setup_netns

PEERS = [("127.0.0.2", 5601, 3), ("127.0.0.3", 5602, 2)]
SERVE_PORT, SERVE_COUNT = 5603, 3
INTRUDER = 2  # this process's own connections to each peer
ROUNDS, SIZE = 30, 4000


def loss(percent: int, *ports: int) -> None:
    rules = ["add table inet loss", "add chain inet loss input { type filter hook input priority 0; }"]
    for port in ports:
        for side in ("dport", "sport"):
            rules.append(f"add rule inet loss input tcp {side} {port} numgen random mod 100 < {percent} counter drop")
    nft(*rules)


def talk(host: str, port: int) -> socket.socket:
    s = socket.create_connection((host, port), timeout=60)
    for _ in range(ROUNDS):
        s.sendall(b"i" * SIZE)
        recv_exactly(s, SIZE)
    return s


def main() -> None:
    python = sys.argv[1]
    setup_netns({"net.ipv4.tcp_window_scaling": "0"})  # every connection: window scaling not negotiated
    peers = [peer("echo", str(port), "--host", host, "--count", str(n + INTRUDER)) for host, port, n in PEERS]
    loss(5, SERVE_PORT, *(port for _h, port, _n in PEERS))
    before = mib()
    service = subprocess.Popen(
        [*UNPRIVILEGED, python, "-m", "tests.cli.sock_diag_service",
         ",".join(f"{h}:{p}:{n}" for h, p, n in PEERS), f"{SERVE_PORT}:{SERVE_COUNT}", str(ROUNDS), str(SIZE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    assert service.stdin is not None and service.stdout is not None
    line = service.stdout.readline()
    if line.strip() != "ready":
        service.kill()
        raise RuntimeError(f"the service did not start: {line!r} {service.stderr.read() if service.stderr else ''}")
    service.stdin.write("go\n")
    service.stdin.flush()
    held: List[socket.socket] = []
    errors: List[BaseException] = []

    def intrude(host: str, port: int) -> None:
        try:
            held.append(talk(host, port))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=intrude, args=("127.0.0.1", SERVE_PORT)) for _ in range(SERVE_COUNT)]
    threads += [threading.Thread(target=intrude, args=(h, p)) for h, p, _n in PEERS for _ in range(INTRUDER)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report_line = service.stdout.readline()
    service.stdin.close()  # the service closes its sockets and exits
    for s in held:
        s.close()
    try:
        service.wait(timeout=60)
        stderr = service.stderr.read() if service.stderr else ""
        for p in peers:
            finish(p)
    finally:
        service.kill()
    if errors:
        raise errors[0]
    if not report_line.strip():
        raise RuntimeError(f"the service reported nothing (exit {service.returncode}):\n{stderr[-4000:]}")
    report: Any = json.loads(report_line)
    report["mib"] = {k: v for k, v in mib_delta(before, mib()).items() if k.startswith(("Tcp.", "TcpExt."))}
    report["stderr"] = stderr[-4000:]
    emit(report)


if __name__ == "__main__":
    main()
