"""Kernel-test scenarios for the reading side (tests/kernel/test_reader.py).

python -m tests.kernel.reader_workload SCENARIO  (under `unshare --net`). Each
scenario holds many live connections, both ends in this process, and prints one
JSON line: what the reader handed on and the kernel's own view of the sockets
(/proc/net/tcp, TCP_INFO).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

from tests.kernel.harness import Telemetry, emit, recv_exactly, setup_netns, tcp_info

SCENARIOS: Dict[str, Callable[[], Dict[str, Any]]] = {}
CONNECTIONS = 300
PORT = 5590
MSG = b"r" * 64
TCP_ESTABLISHED_HEX = "01"


def scenario(fn: Callable[[], Dict[str, Any]]) -> Callable[[], Dict[str, Any]]:
    SCENARIOS[fn.__name__] = fn
    return fn


def connections(n: int) -> Tuple[List[socket.socket], List[socket.socket]]:
    """``n`` connections to a listener of this process, one request/response each; (clients, accepted)."""
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", PORT))
    lsock.listen(n)
    accepted: List[socket.socket] = []

    def serve() -> None:
        for _ in range(n):
            conn, _ = lsock.accept()
            conn.sendall(recv_exactly(conn, len(MSG)))
            accepted.append(conn)

    server = threading.Thread(target=serve)
    server.start()
    clients = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", PORT))
        c.sendall(MSG)
        recv_exactly(c, len(MSG))
        clients.append(c)
    server.join()
    lsock.close()
    return clients, accepted


def established() -> int:
    """Established TCP sockets in this namespace, as the kernel lists them."""
    with open("/proc/net/tcp", encoding="ascii") as f:
        next(f)
        return sum(1 for line in f if line.split()[3] == TCP_ESTABLISHED_HEX)


@scenario
def rtt_pass_source() -> Dict[str, Any]:
    """KernelSource: one socket-iterator pass, its RTT samples handed on by the following polls."""
    from otel_ebpf_flows._config import Config
    from otel_ebpf_flows._kernel import KernelSource
    from otel_ebpf_flows._source import Role

    setup_netns()
    events: List[Any] = []
    # 2 s sample interval, 0.1 s polls: the backlog is spread over up to 10 polls
    source = KernelSource(Config(sample_interval=2.0, poll_interval=0.1))
    source.start(events.append)
    clients, accepted = connections(CONNECTIONS)
    time.sleep(0.5)  # idle: the smoothed RTTs no longer change
    source.poll(0)
    events.clear()
    source.sample()
    at_sample = sum(1 for e in events if e.kind == "rtt")
    per_poll = []
    while True:
        before = len(events)
        source.poll(0)
        per_poll.append(len(events) - before)
        if per_poll[-1] == 0:
            break
    rtt = [e for e in events if e.kind == "rtt"]
    by_port = {s.getpeername()[1]: tcp_info(s)["rtt_us"] for s in accepted}
    out = {
        "established": established(),
        "at_sample": at_sample,
        "per_poll": per_poll,
        "conn_ids": [e.conn_id for e in rtt],
        "others": sorted({e.kind for e in events if e.kind != "rtt"}),
        # client ends: the peer port is the service's, so compare the values as a multiset
        "client_srtt_us": sorted(round(e.srtt_s * 1e6) for e in rtt if e.key.role is Role.CLIENT),
        "client_tcpi_rtt_us": sorted(tcp_info(s)["rtt_us"] for s in clients),
        # server ends: the peer port is the client's ephemeral port, which names the socket
        "server_pairs": [[round(e.srtt_s * 1e6), by_port.get(e.peer_port)]
                         for e in rtt if e.key.role is Role.SERVER],
    }
    source.close()
    for s in clients + accepted:
        s.close()
    return out


@scenario
def rtt_pass_exported() -> Dict[str, Any]:
    """instrument(): the RTT histogram after one sampling pass over every live connection."""
    setup_netns()
    # a 10 s sample interval: no connection comes due for a second sample during the scenario
    tel = Telemetry(sample_interval=10.0)
    clients, accepted = connections(CONNECTIONS)
    time.sleep(0.3)
    first = tel.points()  # this collection's sample is the pass; its RTT samples follow
    counts = []
    deadline = time.monotonic() + 8.0
    while time.monotonic() < deadline:
        rows = [r for r in tel.points() if r["name"] == "ebpf_flows.tcp.rtt"]
        counts.append(sum(r["count"] for r in rows))
        if counts[-1] >= 2 * CONNECTIONS:
            break
        time.sleep(0.2)
    time.sleep(0.5)
    final = [r for r in tel.points() if r["name"] == "ebpf_flows.tcp.rtt"]
    infos = [tcp_info(s)["rtt_us"] for s in clients + accepted]
    out = {
        "established": established(),
        "first_rtt_count": sum(r["count"] for r in first if r["name"] == "ebpf_flows.tcp.rtt"),
        "counts": counts,
        "final_count": sum(r["count"] for r in final),
        "final_sum_s": sum(r["sum"] for r in final),
        "tcpi_rtt_sum_s": sum(infos) / 1e6,
    }
    tel.close()
    for s in clients + accepted:
        s.close()
    return out


def settled() -> None:
    """Wait until every TCP socket here is established, listening or in TIME_WAIT."""
    deadline = time.monotonic() + 10
    while True:
        with open("/proc/net/tcp", encoding="ascii") as f:
            next(f)
            if all(line.split()[3] in ("01", "06", "0A") for line in f):
                return
        if time.monotonic() > deadline:
            raise RuntimeError("connections did not settle")
        time.sleep(0.01)


@scenario
def collect_without_a_pass() -> Dict[str, Any]:
    """instrument(): a collection right after connections open and close, with no socket pass
    in between, against one after a pass."""
    from tests.kernel.conftest import skipped, total

    setup_netns()
    tel = Telemetry(sample_interval=10.0)  # no periodic pass during the scenario
    clients, accepted = connections(CONNECTIONS)
    tel.points()  # passes after that traffic: the live connections' bytes are counted
    pipeline = tel.instrumentor.pipeline
    assert pipeline is not None
    passes = pipeline._sample_done
    by_port = {a.getpeername()[1]: a for a in accepted}
    closed, extra = 100, 10
    for c in clients[:closed]:  # both ends close: 2 x closed closes
        by_port.pop(c.getsockname()[1]).close()
        c.close()
    for c in clients[closed:closed + extra]:  # bytes on live connections: counted by the next pass
        c.sendall(MSG)
    new_clients, new_accepted = connections(20)
    settled()
    rows = tel.points(refresh=False)
    passes_during = pipeline._sample_done - passes
    after = tel.points()  # now with a pass
    out = {
        "established": established(),
        "passes_during": passes_during,
        "skipped": skipped(after),
        "attempts_client": total(rows, "ebpf_flows.tcp.connection.attempts", ebpf_flows__tcp__role="client"),
        "attempts_server": total(rows, "ebpf_flows.tcp.connection.attempts", ebpf_flows__tcp__role="server"),
        "closes": total(rows, "ebpf_flows.tcp.connection.closes"),
        "active": total(rows, "ebpf_flows.tcp.connections.active"),
        "transmit_without_pass": total(rows, "ebpf_flows.tcp.io", network__io__direction="transmit"),
        "receive_without_pass": total(rows, "ebpf_flows.tcp.io", network__io__direction="receive"),
        "transmit_after_pass": total(after, "ebpf_flows.tcp.io", network__io__direction="transmit"),
        "receive_after_pass": total(after, "ebpf_flows.tcp.io", network__io__direction="receive"),
        "closes_after_pass": total(after, "ebpf_flows.tcp.connection.closes"),
        "active_after_pass": total(after, "ebpf_flows.tcp.connections.active"),
    }
    tel.close()
    for s in clients[closed:] + list(by_port.values()) + new_clients + new_accepted:
        s.close()
    return out


if __name__ == "__main__":
    emit(SCENARIOS[sys.argv[1]]())
