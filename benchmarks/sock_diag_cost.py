"""What one sock_diag-mode poll costs on a namespace full of other processes' sockets.

sudo unshare --net python -m benchmarks.sock_diag_cost [--sockets 10000] [--time-wait 10000] [--ours 20]

A helper process opens --sockets/2 loopback connections (so --sockets
established sockets that are not ours) and leaves --time-wait sockets in
TIME_WAIT; this process holds --ours connections of its own. Then it times
SockDiagSource.sample() (two inet_diag dumps, IPv4 and IPv6, plus /proc/self/fd)
and, for comparison, a dump without the state filter. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

from otel_ebpf_flows import _sockdiag
from otel_ebpf_flows._sockdiag import Dumper, SockDiagSource


def hold(n_pairs: int, time_wait: int, port: int) -> None:
    """The other process: n_pairs connections held open, time_wait connections closed by us (TIME_WAIT)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(4096)
    held: List[socket.socket] = []
    for _ in range(n_pairs):
        c = socket.create_connection(("127.0.0.1", port))
        s, _ = srv.accept()
        held += [c, s]
    for _ in range(time_wait):
        c = socket.create_connection(("127.0.0.1", port))
        s, _ = srv.accept()
        c.close()  # the active closer keeps TIME_WAIT
        s.close()
    print("ready", flush=True)
    sys.stdin.read()


def timed(fn: Any, runs: int) -> Dict[str, float]:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_ms": round(statistics.median(times) * 1000, 2), "max_ms": round(max(times) * 1000, 2)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sockets", type=int, default=10000)
    p.add_argument("--time-wait", type=int, default=10000)
    p.add_argument("--ours", type=int, default=20)
    p.add_argument("--runs", type=int, default=30)
    args = p.parse_args()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    helper = subprocess.Popen([sys.executable, "-c", f"from benchmarks.sock_diag_cost import hold; "
                               f"hold({args.sockets // 2}, {args.time_wait}, 7001)"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert helper.stdout is not None and helper.stdout.readline().strip() == "ready"
    srv = socket.socket()
    srv.bind(("127.0.0.1", 7002))
    srv.listen(1024)
    ours = []
    for _ in range(args.ours):
        ours.append(socket.create_connection(("127.0.0.1", 7002)))
        ours.append(srv.accept()[0])
    source = SockDiagSource()
    source.start(lambda _e: None)
    every = Dumper()
    result = {
        "sockets_in_namespace": len(every.dump()),
        "time_wait": args.time_wait,
        "ours": len(ours),
        "sample": timed(source.sample, args.runs),
        "dump_unfiltered_states": timed(lambda: list(_dump_all_states(every)), args.runs),
        "connections_counted": sum(c.established for c in source.sample().counters.values()),
        "cpus": os.cpu_count(),
    }
    source.close()
    helper.stdin.close()  # type: ignore[union-attr]
    helper.wait()
    print(json.dumps(result))


def _dump_all_states(dumper: Dumper) -> Any:
    saved = _sockdiag.STATE_MASK
    _sockdiag.request.__defaults__ = (0xFFF,)  # every state, TIME_WAIT included
    try:
        return dumper.dump()
    finally:
        _sockdiag.request.__defaults__ = (saved,)


if __name__ == "__main__":
    main()
