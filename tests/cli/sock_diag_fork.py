"""sock_diag mode across fork (run as nobody, in a private network namespace, by tests/cli/test_sock_diag.py).

python -m tests.cli.sock_diag_fork. The parent instruments itself (no privilege:
sock_diag mode), opens a connection to its own listener, and forks. The child
restarts in sock_diag mode by itself, opens a connection to a listener of its
own, and reports its points and its sockets' TCP_INFO; then the parent does the
same. Prints one JSON line: {"parent": ..., "child": ...}.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any, Dict, List

from otel_ebpf_flows import EbpfFlowsInstrumentor
from tests.kernel.harness import Telemetry, recv_exactly, tcp_info


def connection(listener: socket.socket, size: int) -> List[socket.socket]:
    c = socket.create_connection(listener.getsockname()[:2])
    s, _ = listener.accept()
    c.sendall(b"f" * size)
    s.sendall(recv_exactly(s, size))
    recv_exactly(c, size)
    return [c, s]


def report(tel: Telemetry, socks: List[socket.socket], port: int) -> Dict[str, Any]:
    time.sleep(0.5)
    infos = [{"local_port": s.getsockname()[1], **tcp_info(s)} for s in socks]
    time.sleep(0.3)
    pipeline = EbpfFlowsInstrumentor().pipeline
    return {"port": port, "points": tel.points(), "infos": infos,
            "variant": getattr(getattr(pipeline, "source", None), "variant", None)}


def main() -> None:
    tel = Telemetry()
    parent_listener = socket.socket()
    parent_listener.bind(("127.0.0.1", 0))
    parent_listener.listen(4)
    parent_socks = connection(parent_listener, 1000)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        deadline = time.monotonic() + 30
        while EbpfFlowsInstrumentor().pipeline is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the restart runs in a thread of the child's own
        child_listener = socket.socket()
        child_listener.bind(("127.0.0.1", 0))
        child_listener.listen(4)
        socks = connection(child_listener, 3000)
        with os.fdopen(write, "w") as out:
            out.write(json.dumps(report(tel, socks, child_listener.getsockname()[1])))
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = json.loads(f.read() or "null")
    os.waitpid(pid, 0)
    parent = report(tel, parent_socks, parent_listener.getsockname()[1])
    sys.stdout.write(json.dumps({"parent": parent, "child": child}) + "\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
