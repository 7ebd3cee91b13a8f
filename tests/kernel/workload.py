"""Kernel-test scenarios, each run in a fresh network namespace by tests/kernel/test_*.py.

python -m tests.kernel.workload SCENARIO  (under `unshare --net`). The scenario
instruments this process, makes real traffic with real faults, and prints one
JSON line: the exported metric points and the kernel's ground truth.
"""

from __future__ import annotations

import ctypes
import errno
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List

from tests.kernel.harness import (
    Telemetry,
    drain_until_eof,
    emit,
    finish,
    in_threads,
    mib,
    mib_delta,
    nft,
    peer,
    random_loss,
    recv_exactly,
    settle,
    setup_netns,
    tcp_info,
)

TCP_CLOSE = 7
TCP_FIN_WAIT2 = 5
SCENARIOS: Dict[str, Callable[[], Dict[str, Any]]] = {}


def scenario(fn: Callable[[], Dict[str, Any]]) -> Callable[[], Dict[str, Any]]:
    SCENARIOS[fn.__name__] = fn
    return fn


def _listener(port: int, backlog: int = 64) -> socket.socket:
    """An IPv4 listener on 127.0.0.1:``port``."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", port))
    srv.listen(backlog)
    return srv


def wait_closed(sock: socket.socket, timeout: float = 30) -> Dict[str, int]:
    """TCP_INFO once the connection is fully closed (nothing more can be retransmitted)."""
    deadline = time.monotonic() + timeout
    while True:
        info = tcp_info(sock)
        if info["state"] == TCP_CLOSE or time.monotonic() > deadline:
            return info
        time.sleep(0.01)


def filter_balance(source: Any) -> Dict[str, int]:
    """The owned-socket filter's slots summed, and the sockets tracked: equal once the programs are quiet.

    Every socket the typed programs take on adds one to its slot of the filter and every
    one they forget takes it off, whichever program or global function does it; a slot
    left counting a forgotten socket makes every later socket hashed there be looked up
    for nothing, one never counted hides its socket from the programs.
    """
    from otel_ebpf_flows import _records

    obj = source._obj
    offset, size = obj._section_vars(".bss")["owned_filter"]
    _, bss_size = obj._section_data(".bss")
    bss = ctypes.create_string_buffer(bss_size)
    assert obj.map(".bss").lookup(ctypes.c_uint32(0), bss)
    slots = struct.unpack_from(f"<{size // 4}I", bss.raw, offset)
    tracked = sum(1 for _ in obj.map("socks").items(ctypes.c_uint64, _records.CSockState))
    return {"filter": sum(slots), "tracked": tracked}


@scenario
def client_loss() -> Dict[str, Any]:
    """This process is the client over a lossy path to another process's echo server."""
    setup_netns()
    n, rounds, size = 6, 40, 3000
    echo = peer("echo", "5555", "--count", str(n))
    random_loss(5555, 5)
    tel = Telemetry()
    before = mib()

    def one(_i: int) -> Dict[str, int]:
        s = socket.create_connection(("127.0.0.1", 5555), timeout=60)
        base = tcp_info(s)
        for _ in range(rounds):
            s.sendall(b"x" * size)
            recv_exactly(s, size)
        s.shutdown(socket.SHUT_WR)
        drain_until_eof(s)
        info = wait_closed(s)  # our FIN acknowledged too: nothing of ours is in flight
        s.close()
        return {
            "total_retrans": info["total_retrans"],
            "bytes_acked": info["bytes_acked"] - base["bytes_acked"],
            "bytes_received": info["bytes_received"] - base["bytes_received"],
        }

    infos = in_threads(one, n)
    finish(echo)
    settle()
    return {"points": tel.points(), "infos": infos, "mib": mib_delta(before, mib()),
            "payload": n * rounds * size, "connections": n}


@scenario
def unseen_retransmits() -> Dict[str, Any]:
    """Client over a lossy path while the retransmit probes are detached, then attached again.

    A real fault: for the first half of each connection (the connect included)
    the kernel runs no program for its retransmits, as it does, silently, for
    events raised in some softirqs. Between the halves nothing of ours is in
    flight (every request's echo is in), so the detached half's retransmits are
    exactly what TCP_INFO says then."""
    setup_netns()
    n, rounds, size = 4, 40, 3000
    echo = peer("echo", "5586", "--count", str(n))
    random_loss(5586, 5)
    tel = Telemetry()
    source = tel.instrumentor.pipeline.source  # type: ignore[union-attr]
    obj = source._obj
    names = [name for name in source.attached if "retransmit_skb" in name]
    detached = [link for link in obj._links if link.name in names]
    for link in detached:
        link.destroy()
        obj._links.remove(link)
    before = mib()
    socks = [socket.create_connection(("127.0.0.1", 5586), timeout=60) for _ in range(n)]

    def exchange(i: int) -> None:
        for _ in range(rounds // 2):
            socks[i].sendall(b"x" * size)
            recv_exactly(socks[i], size)

    in_threads(exchange, n)
    unseen = sum(tcp_info(s)["total_retrans"] for s in socks)
    for name in names:
        obj.attach(name)
    in_threads(exchange, n)

    def close(i: int) -> int:
        socks[i].shutdown(socket.SHUT_WR)
        drain_until_eof(socks[i])
        info = wait_closed(socks[i])
        socks[i].close()
        return info["total_retrans"]

    totals = in_threads(close, n)
    finish(echo)
    settle()
    return {"points": tel.points(), "totals": totals, "unseen": unseen, "detached": names,
            "mib": mib_delta(before, mib())}


def _detach(source: Any, part: str) -> List[str]:
    """Detach the attached programs whose name has ``part`` (main and nested copy) through the
    library's own links: the kernel then runs none of them, as it silently does for events
    raised in some softirqs. Returns their names, for :func:`_reattach`."""
    obj = source._obj
    names = [name for name in source.attached if part in name]
    for link in [link for link in obj._links if link.name in names]:
        link.destroy()
        obj._links.remove(link)
    return names


def _reattach(source: Any, names: List[str]) -> None:
    for name in names:
        source._obj.attach(name)


def _drop_synacks(port: int) -> None:
    """Drop the SYN-ACKs from ``port`` on input: its clients wait in SYN_SENT, its requests retransmit."""
    nft("add table inet hs",
        "add chain inet hs input { type filter hook input priority 0; }",
        f"add rule inet hs input tcp sport {port} tcp flags & (syn | ack) == (syn | ack) counter drop")


def _lift() -> None:
    nft("delete table inet hs")


def _connect_nonblocking(port: int, n: int) -> List[socket.socket]:
    socks = []
    for _ in range(n):
        c = socket.socket()
        c.setblocking(False)
        assert c.connect_ex(("127.0.0.1", port)) == errno.EINPROGRESS
        socks.append(c)
    return socks


def _until(what: str, cond: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _echo_and_close(client: socket.socket, server: socket.socket, size: int) -> Dict[str, int]:
    """``size`` bytes each way, then an orderly close (client first); both ends' final TCP_INFO."""
    client.setblocking(True)
    server.setblocking(True)
    client.settimeout(30)
    server.settimeout(30)
    client.sendall(b"q" * size)
    server.sendall(recv_exactly(server, size))
    recv_exactly(client, size)
    client.shutdown(socket.SHUT_WR)
    drain_until_eof(server)
    server_info = tcp_info(server)
    server.close()
    drain_until_eof(client)
    info = wait_closed(client)
    client.close()
    return {"client_retrans": info["total_retrans"], "server_retrans": server_info["total_retrans"]}


@scenario
def unseen_handshakes() -> Dict[str, Any]:
    return _unseen_handshakes("default")


@scenario
def unseen_handshakes_spans() -> Dict[str, Any]:
    """With span enrichment: the send/receive programs run, and find the connections first."""
    return _unseen_handshakes("spans")


@scenario
def unseen_handshakes_claim() -> Dict[str, Any]:
    """Claim mode (a listener shared after fork): accepted sockets count once this process uses them."""
    return _unseen_handshakes("claim")


def _unseen_handshakes(mode: str) -> Dict[str, Any]:
    """Handshakes completed while no set_state program runs, on both ends; then traffic and closes.

    This process is both client and server (client attempts = ActiveOpens, server ones =
    PassiveOpens). The clients' SYN_SENT is seen; their SYN-ACKs are dropped so they wait
    in SYN_SENT; then the set_state programs (main and nested copy) are detached and the
    drop lifted: each handshake completes at the next SYN or SYN-ACK retransmit with no
    program run on either end (the client's ESTABLISHED, the server's SYN_RECV and
    ESTABLISHED), as the kernel does silently for events raised in some softirqs. With the
    programs back, half of those connections close before a socket-iterator pass is forced
    (found at their close), the other half after it (found by the iterator). Connections
    established before instrument(), one accepted then (adopted) and one still in the
    listener's accept queue (not seen as this process's then), are never new handshakes.
    """
    setup_netns()
    port, normal, unseen, size = 5590, 2, 6, 20000
    srv = _listener(port)
    adopted = socket.create_connection(("127.0.0.1", port))
    adopted_server, _ = srv.accept()
    early = socket.create_connection(("127.0.0.1", port))  # established, not accepted yet
    if mode == "spans":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        trace.set_tracer_provider(TracerProvider())
    tel = Telemetry(sample_interval=10)
    pipeline = tel.instrumentor.pipeline
    source = pipeline.source  # type: ignore[union-attr]
    if mode == "claim":
        assert source.enable_claim()
    before = mib()
    early_server, _ = srv.accept()
    # used (in claim mode it would be counted: a forked worker counts what it accepts from
    # the queue it shares, whenever that connection was made)
    early_bytes = 0 if mode == "claim" else 3000
    if early_bytes:
        early.sendall(b"e" * early_bytes)
        early_server.sendall(recv_exactly(early_server, early_bytes))
        recv_exactly(early, early_bytes)
    pairs = []
    for _ in range(normal):
        c = socket.create_connection(("127.0.0.1", port))
        pairs.append((c, srv.accept()[0]))
    _drop_synacks(port)
    clients = _connect_nonblocking(port, unseen)
    _until("SYN_SENT", lambda: all(tcp_info(c)["state"] == 2 for c in clients))
    names = _detach(source, "set_state")
    _lift()
    _until("ESTABLISHED", lambda: all(tcp_info(c)["state"] == 1 for c in clients))
    servers = [srv.accept()[0] for _ in range(unseen)]
    by_port = {s.getpeername()[1]: s for s in servers}
    unseen_pairs = [(c, by_port[c.getsockname()[1]]) for c in clients]
    _reattach(source, names)
    # with span enrichment, inside a span: the send/receive programs note nothing while none is open
    span = trace.get_tracer(__name__).start_span("traffic") if mode == "spans" else None
    half = unseen // 2
    closed = [_echo_and_close(c, s, size) for c, s in unseen_pairs[:half]]  # found at their close
    pipeline.refresh(timeout=60.0)  # an iterator pass finds the others  # type: ignore[union-attr]
    closed += [_echo_and_close(c, s, size) for c, s in unseen_pairs[half:] + pairs]
    if span is not None:
        span.end()
    for sock in (early, early_server, adopted, adopted_server):
        sock.close()
    srv.close()
    settle()
    return {"points": tel.points(), "mib": mib_delta(before, mib()), "detached": names,
            "normal": normal, "unseen": unseen, "size": size, "closed": closed,
            "attached": list(source.attached), "claiming": source.claiming, "early_bytes": early_bytes,
            "balance": filter_balance(source)}


@scenario
def nested_copies_only() -> Dict[str, Any]:
    """Every event handled by the hooks' nested copies alone, as for events the kernel skipped
    for a main program interrupted on its CPU: the main programs detached, and every hook marked
    busy on every CPU (what a running main program does), so each nested copy acts on every
    event (on this kernel: jumps into its main program's code). Connections with both ends in
    this process, 10 % loss, traffic both ways and orderly closes."""
    setup_netns()
    port, n, size = 5603, 12, 20000
    srv = _listener(port)
    tel = Telemetry(sample_interval=10)
    source = tel.instrumentor.pipeline.source  # type: ignore[union-attr]
    obj = source._obj
    mains = list(source._main_programs)
    for link in [link for link in obj._links if link.name in mains]:
        link.destroy()
        obj._links.remove(link)
    ncpus = int(_possible_cpus())
    busy = obj.map("busy")
    for hook in range(len(mains)):  # a per-CPU u32, each CPU's value in 8 bytes
        busy.update(ctypes.c_uint32(hook), (ctypes.c_uint64 * ncpus)(*([1] * ncpus)))
    before = mib()
    random_loss(port, 10)
    pairs = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port))
        pairs.append((c, srv.accept()[0]))
    closed = [_echo_and_close(c, s, size) for c, s in pairs]
    srv.close()
    settle()
    nft("delete table inet loss")
    rescued = {name: value for name, value in zip(mains, _rescued(obj, len(mains)))}
    from otel_ebpf_flows import _records

    discarded = ctypes.c_uint64()  # children PassiveOpens counts that never became established
    obj.map("stats").lookup(ctypes.c_uint32(_records.STAT_CHILD_DISCARDED), discarded)
    return {"points": tel.points(), "mib": mib_delta(before, mib()), "connections": n, "size": size,
            "closed": closed, "mains": mains, "nested": [x for x in source.attached if x.endswith(("_jump", "_nested"))],
            "rescued": rescued, "discarded": discarded.value}


def _possible_cpus() -> int:
    """How many CPUs a per-CPU map holds a value for (libbpf's count of possible CPUs)."""
    from otel_ebpf_flows import _libbpf

    lib = _libbpf.load_library()
    fn = lib.libbpf_num_possible_cpus
    fn.restype, fn.argtypes = ctypes.c_int, []
    return int(fn())


def _rescued(obj: Any, hooks: int) -> List[int]:
    out = []
    for hook in range(hooks):
        value = ctypes.c_uint64()
        obj.map("rescued").lookup(ctypes.c_uint32(hook), value)
        out.append(value.value)
    return out


@scenario
def unseen_synacks() -> Dict[str, Any]:
    """SYN-ACK retransmits while the SYN-ACK retransmit programs are detached, then attached.

    The clients' SYN-ACKs are dropped: the listener retransmits them (on its timer, and
    for each retransmitted SYN) for about 4.5 s, with no program run for the first 2.3 s,
    then the drop is lifted and the connections carry a little traffic and close."""
    setup_netns()
    port, n = 5592, 4
    srv = _listener(port)
    tel = Telemetry(sample_interval=10)
    source = tel.instrumentor.pipeline.source  # type: ignore[union-attr]
    before = mib()
    _drop_synacks(port)
    names = _detach(source, "retransmit_synack")
    clients = _connect_nonblocking(port, n)
    time.sleep(2.3)
    # SYN-ACK retransmits so far: the namespace's SYN retransmits less the clients' SYNs
    client_syns = sum(tcp_info(c)["total_retrans"] for c in clients)
    unseen = mib_delta(before, mib())["TcpExt.TCPSynRetrans"] - client_syns
    _reattach(source, names)
    time.sleep(2.2)
    _lift()
    _until("ESTABLISHED", lambda: all(tcp_info(c)["state"] == 1 for c in clients))
    servers = [srv.accept()[0] for _ in range(n)]
    by_port = {s.getpeername()[1]: s for s in servers}
    closed = [_echo_and_close(c, by_port[c.getsockname()[1]], 1000) for c in clients]
    srv.close()
    settle()
    return {"points": tel.points(), "mib": mib_delta(before, mib()), "detached": names,
            "unseen": unseen, "closed": closed, "connections": n, "balance": filter_balance(source)}


@scenario
def server_loss() -> Dict[str, Any]:
    """This process is the server; another process's clients reach it over a lossy path.

    Retransmits of the server's sockets happen in softirq and timer context."""
    setup_netns()
    n, rounds, size = 6, 40, 3000
    tel = Telemetry()
    srv = _listener(5556)
    random_loss(5556, 5)
    before = mib()
    infos = []
    lock = threading.Lock()

    def handle(conn: socket.socket) -> None:
        base = tcp_info(conn)
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        info = wait_closed(conn)
        conn.close()
        with lock:
            infos.append({
                "total_retrans": info["total_retrans"],
                "bytes_acked": info["bytes_acked"] - base["bytes_acked"],
                "bytes_received": info["bytes_received"] - base["bytes_received"],
                "state": info["state"],
            })

    def accept_all() -> None:
        threads = []
        for _ in range(n):
            conn, _ = srv.accept()
            t = threading.Thread(target=handle, args=(conn,))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()

    acceptor = threading.Thread(target=accept_all)
    acceptor.start()
    clients = peer("clients", "5556", "--count", str(n), "--rounds", str(rounds), "--size", str(size))
    peer_infos = finish(clients, timeout=120)
    acceptor.join()
    settle()
    return {"points": tel.points(), "infos": infos, "peer_infos": peer_infos,
            "mib": mib_delta(before, mib()), "payload": n * rounds * size, "connections": n}


@scenario
def attempts() -> Dict[str, Any]:
    """Successful, refused and timed-out connects; another process connects elsewhere."""
    setup_netns({"net.ipv4.tcp_syn_retries": "1"})
    ok, refused = 4, 3
    echo = peer("echo", "5557", "--count", str(ok))
    other_echo = peer("echo", "5560", "--count", "4")
    nft("add table inet f", "add chain inet f input { type filter hook input priority 0; }",
        "add rule inet f input tcp dport 5559 drop")
    tel = Telemetry()
    before = mib()
    for _ in range(ok):
        s = socket.create_connection(("127.0.0.1", 5557))
        s.sendall(b"ping")
        recv_exactly(s, 4)
        s.close()
    errors = []
    for _ in range(refused):
        try:
            socket.create_connection(("127.0.0.1", 5558))
        except ConnectionRefusedError:
            errors.append("refused")
    other = peer("clients", "5560", "--count", "4")
    try:  # no SYN gets through: the kernel gives up after one retransmit (about 3 s)
        socket.create_connection(("127.0.0.1", 5559), timeout=30)
    except OSError as exc:
        errors.append(type(exc).__name__ + ":" + str(exc.errno))
    finish(other)
    finish(echo)
    finish(other_echo)
    settle()
    return {"points": tel.points(), "mib": mib_delta(before, mib()), "errors": errors,
            "ok": ok, "refused": refused, "other_connects": 4,
            "balance": filter_balance(tel.instrumentor.pipeline.source)}


@scenario
def server_attempts() -> Dict[str, Any]:
    """Accepted handshakes, and SYNs dropped by a full listen queue."""
    setup_netns()
    tel = Telemetry()
    srv = _listener(5561)
    full = socket.socket()
    full.bind(("127.0.0.1", 5562))
    full.listen(1)  # never accepted
    before = mib()

    def accept_all() -> None:
        for _ in range(5):
            conn, _ = srv.accept()
            drain_until_eof(conn)
            conn.close()

    acceptor = threading.Thread(target=accept_all)
    acceptor.start()
    finish(peer("clients", "5561", "--count", "5", "--rounds", "0"))
    acceptor.join()
    finish(peer("flood", "5562", "--count", "8", "--hold", "2.5"))
    full.close()  # resets what its queue still holds
    settle()
    return {"points": tel.points(), "mib": mib_delta(before, mib())}


@scenario
def accept_race() -> Dict[str, Any]:
    """A server accepting in a busy non-blocking loop: accept() on one CPU can take a request
    off the accept queue between the kernel queueing it and the child's ESTABLISHED on the
    other. Each accepted socket's TCP_INFO RTT, read before any data: the SYN-ACK's RTT sample
    (the SYN wait), what each server handshake point must match."""
    setup_netns()
    n = 1500
    tel = Telemetry()
    srv = _listener(5571, backlog=128)
    srv.setblocking(False)
    rtts: List[int] = []
    retransmitted = []

    def accept_busily() -> None:
        while len(rtts) < n:
            try:
                conn, _ = srv.accept()
            except BlockingIOError:
                continue
            info = tcp_info(conn)
            rtts.append(info["rtt_us"])
            if info["total_retrans"]:
                retransmitted.append(info["total_retrans"])
            conn.close()

    before = mib()
    acceptor = threading.Thread(target=accept_busily)
    acceptor.start()
    for _ in range(n):
        socket.create_connection(("127.0.0.1", 5571), timeout=30).close()
    acceptor.join(60)
    srv.close()
    settle()
    return {"points": tel.points(), "mib": mib_delta(before, mib()), "n": n, "rtts_us": rtts,
            "retransmitted": retransmitted}


@scenario
def resets() -> Dict[str, Any]:
    """RST received on connect, RST sent (SO_LINGER 0), RST received on an established connection."""
    setup_netns()
    rst_peer = peer("echo", "5563", "--count", "1", "--rst")
    plain = peer("echo", "5565", "--count", "1")
    tel = Telemetry()
    before = mib()
    try:
        socket.create_connection(("127.0.0.1", 5564))
    except ConnectionRefusedError:
        pass
    s = socket.create_connection(("127.0.0.1", 5565))
    s.sendall(b"ping")
    recv_exactly(s, 4)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    s = socket.create_connection(("127.0.0.1", 5563))
    s.sendall(b"ping")
    recv_exactly(s, 4)
    try:
        s.recv(10)
    except ConnectionResetError:
        pass
    s.close()
    finish(rst_peer)
    finish(plain)
    settle()
    return {"points": tel.points(), "mib": mib_delta(before, mib()),
            "balance": filter_balance(tel.instrumentor.pipeline.source)}


@scenario
def bytes_rtt_wscale() -> Dict[str, Any]:
    """A live connection without window scaling: bytes and RTT samples against TCP_INFO."""
    setup_netns({"net.ipv4.tcp_window_scaling": "0"})
    echo = peer("echo", "5566", "--count", "1")
    tel = Telemetry(sample_interval=0.5)
    s = socket.create_connection(("127.0.0.1", 5566))
    base = tcp_info(s)
    sent = 0
    for size in (100, 5000, 70000):
        s.sendall(b"y" * size)
        recv_exactly(s, size)
        sent += size
    time.sleep(1.2)  # idle: srtt no longer changes
    first = tel.points()
    time.sleep(1.5)
    info = tcp_info(s)
    second = tel.points()
    s.close()
    finish(echo)
    return {"first": first, "second": second, "info": info, "base": base, "sent": sent}


@scenario
def ipv6() -> Dict[str, Any]:
    """IPv6 connections with both ends in this process, then an IPv4 client of a dual-stack listener
    (its accepted socket is an IPv6 socket whose peer is IPv4-mapped)."""
    setup_netns()
    n, size = 3, 5000
    srv = socket.socket(socket.AF_INET6)
    srv.bind(("::1", 5594))
    srv.listen(16)
    dual = socket.socket(socket.AF_INET6)
    dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    dual.bind(("::", 5595))
    dual.listen(16)
    tel = Telemetry()
    before = mib()
    for listener, address in [(srv, "::1")] * n + [(dual, "127.0.0.1")]:
        c = socket.create_connection((address, listener.getsockname()[1]))
        s, _ = listener.accept()
        c.sendall(b"x" * size)
        recv_exactly(s, size)
        s.sendall(b"y" * size)
        recv_exactly(c, size)
        c.close()
        s.close()
    srv.close()
    dual.close()
    settle()
    return {"points": tel.points(), "mib": mib_delta(before, mib()), "n": n, "size": size,
            "balance": filter_balance(tel.instrumentor.pipeline.source)}


def _segment(sport: int, dport: int, flags: int) -> bytes:
    """A bare TCP header from 127.0.0.1 to 127.0.0.1 (for a raw socket), checksum included."""
    hdr = struct.pack("!HHIIBBHHH", sport, dport, 1000, 2000, 5 << 4, flags, 65535, 0, 0)
    data = socket.inet_aton("127.0.0.1") * 2 + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(hdr)) + hdr
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return hdr[:16] + struct.pack("!H", ~total & 0xFFFF) + hdr[18:]


def _connect_from(port: int, dport: int) -> socket.socket:
    c = socket.socket()
    c.bind(("127.0.0.1", port))
    c.setblocking(False)
    c.connect_ex(("127.0.0.1", dport))
    return c


def _block_acks(table: str, dport: int, sports: str) -> None:
    """Drop the bare ACKs (no SYN) from client ports ``sports`` to ``dport``."""
    nft(f"add table inet {table}", f"add chain inet {table} input {{ type filter hook input priority 0; }}",
        f"add rule inet {table} input tcp dport {dport} tcp sport {sports} tcp flags & (syn | ack) == ack drop")


@scenario
def listener_drops() -> Dict[str, Any]:
    """What the kernel charges to a listener's drop count: one kind per phase and listener.

    final_ack: five requests are made while their final ACKs are dropped and five SYN-cookie
    connections fill the accept queue meanwhile; then each request's ACK (sent again for each
    SYN-ACK retransmit) finds the queue full. cookie: cookie SYN-ACKs go out while the queue
    has room, their ACKs dropped; requests then fill the queue, and the cookie clients' data
    (each segment an ACK of its cookie) finds it full. syn: SYNs to a listener whose accept
    queue is full. repeated: SYN-ACKs are dropped, so clients repeat their SYNs to requests
    the listener holds. stray: an ACK, an RST, a SYN+FIN, a flagless segment and a PSH+ACK
    sent to a listener with no connection. Each phase ends with its listener and clients
    closed (the listener's drops are read then), so the namespace's ListenOverflows of a
    phase are that listener's.
    """
    setup_netns()
    tel = Telemetry(sample_interval=10)
    pipeline = tel.instrumentor.pipeline
    phases: Dict[str, Dict[str, int]] = {}
    sk_drops: Dict[str, int] = {}

    def run(name: str, port: int, backlog: int, body: Callable[[], List[socket.socket]]) -> None:
        before = mib()
        srv = _listener(port, backlog)
        clients = body()
        out = subprocess.run(["ss", "-tlnm", f"sport = :{port}"], capture_output=True, text=True).stdout
        found = re.search(r"\bd(\d+)\)", out)
        sk_drops[name] = int(found.group(1)) if found else -1
        srv.close()
        for c in clients:
            c.close()
        time.sleep(0.3)
        phases[name] = mib_delta(before, mib())

    def final_ack() -> List[socket.socket]:
        _block_acks("held", 5580, "40001-40005")
        held = [_connect_from(p, 5580) for p in range(40001, 40006)]
        time.sleep(0.2)
        held += [_connect_from(p, 5580) for p in range(40011, 40016)]  # cookies, completed at once
        time.sleep(0.2)
        nft("delete table inet held")
        time.sleep(3.5)  # SYN-ACK retransmits at 1 s and 3 s, each answered by an ACK that overflows
        return held

    def cookie() -> List[socket.socket]:
        _block_acks("requests", 5581, "40101-40105")
        _block_acks("cookies", 5581, "40111-40115")
        held = [_connect_from(p, 5581) for p in range(40101, 40106)]
        time.sleep(0.2)
        cookies = [_connect_from(p, 5581) for p in range(40111, 40116)]
        time.sleep(0.2)
        nft("delete table inet requests")
        time.sleep(2.5)  # the requests' ACKs come with the SYN-ACK retransmits: the queue fills
        nft("delete table inet cookies")
        for c in cookies:
            c.send(b"cookie")
        time.sleep(1.5)
        return held + cookies

    def syn() -> List[socket.socket]:
        held = [_connect_from(p, 5582) for p in range(40201, 40207)]
        time.sleep(3.5)
        return held

    def repeated() -> List[socket.socket]:
        nft("add table inet synack", "add chain inet synack output { type filter hook output priority 0; }",
            "add rule inet synack output tcp sport 5583 tcp flags & (syn | ack) == syn | ack drop")
        held = [_connect_from(p, 5583) for p in range(40301, 40305)]
        time.sleep(3.5)
        nft("delete table inet synack")
        time.sleep(1.5)
        return held

    def stray() -> List[socket.socket]:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
        for flags in (0x10, 0x04, 0x03, 0x00, 0x18):  # ACK, RST, SYN+FIN, none, PSH+ACK
            raw.sendto(_segment(40401, 5584, flags), ("127.0.0.1", 0))
        time.sleep(0.5)
        return [raw]

    run("final_ack", 5580, 4, final_ack)
    run("cookie", 5581, 4, cookie)
    run("syn", 5582, 1, syn)
    run("repeated", 5583, 16, repeated)
    run("stray", 5584, 4, stray)
    settle()
    return {"points": tel.points(), "phases": phases, "sk_drops": sk_drops,
            "ports": {"final_ack": 5580, "cookie": 5581, "syn": 5582, "repeated": 5583, "stray": 5584},
            "attached": list(pipeline.source.attached)}  # type: ignore[union-attr]


@scenario
def discarded_child() -> Dict[str, Any]:
    """A socket the kernel creates for a request and closes before ESTABLISHED.

    A TCP Fast Open child is created at the SYN (SYN_RECV, counted in PassiveOpens
    then); with every segment but the SYN dropped on the way to the server, the
    client's ACK never arrives and the child closes when its SYN-ACK retries run out.
    """
    setup_netns({"net.ipv4.tcp_fastopen": str(0x203), "net.ipv4.tcp_synack_retries": "1"})
    tel = Telemetry()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 5591))
    srv.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 8)
    srv.listen(8)
    nft(
        "add table inet tfo",
        "add chain inet tfo input { type filter hook input priority 0; }",
        "add rule inet tfo input tcp dport 5591 tcp flags != syn counter drop",
    )
    before = mib()
    client = socket.socket()
    client.sendto(b"hello", socket.MSG_FASTOPEN, ("127.0.0.1", 5591))
    deadline = time.monotonic() + 30
    saw_syn_recv = False
    while time.monotonic() < deadline:  # until the child is gone
        with open("/proc/net/tcp") as f:
            states = [line.split()[3] for line in f if line.split()[1].endswith(f":{5591:04X}")]
        saw_syn_recv = saw_syn_recv or "03" in states
        if saw_syn_recv and "03" not in states:
            break
        time.sleep(0.05)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    srv.close()
    settle()
    points = tel.points()
    from otel_ebpf_flows import _records

    stats = tel.instrumentor.pipeline.source._require().map("stats")  # type: ignore[union-attr]
    discarded = ctypes.c_uint64()
    stats.lookup(ctypes.c_uint32(_records.STAT_CHILD_DISCARDED), discarded)
    return {"points": points, "mib": mib_delta(before, mib()), "saw_syn_recv": saw_syn_recv,
            "discarded": discarded.value}


def _socks_conn_ids(source: Any) -> Dict[int, int]:
    """The socks map now: socket address -> conn_id of its entry."""
    from otel_ebpf_flows import _records

    socks = source._require().map("socks")
    out: Dict[int, int] = {}
    conn_id = _records.CSockState.conn_id.offset
    for keys, values in socks.batches(ctypes.c_uint64, _records.CSockState):
        size = ctypes.sizeof(_records.CSockState)
        for i in range(len(keys) // 8):
            out[struct.unpack_from("=Q", keys, i * 8)[0]] = struct.unpack_from("=Q", values, i * size + conn_id)[0]
    return out


@scenario
def unseen_ends_then_reused() -> Dict[str, Any]:
    """Connections whose ends no program saw, their sockets' memory then reused for new ones.

    The kernel can run a tracepoint without our programs (see unseen_handshakes): when a
    socket's CLOSE and destruction both go unseen, its entry stays in the socks map after
    the socket is freed, and the kernel soon hands that memory to a new socket (TCP
    sockets come from a slab cache, most recently freed first). Here: connections made
    and used with the programs attached; their ends (both sides' CLOSE and destruction)
    with the set_state and destroy programs (main and nested copies) detached; then, the
    programs back, new connections on the same CPU (so from the same per-CPU free list).
    """
    import os

    setup_netns()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # threads made from here on too
    port, old, new, size = 5593, 4, 3, 5000
    srv = _listener(port)
    tel = Telemetry(sample_interval=10)
    source = tel.instrumentor.pipeline.source  # type: ignore[union-attr]
    before = mib()

    def connection() -> Any:
        c = socket.create_connection(("127.0.0.1", port), timeout=30)
        s, _ = srv.accept()
        c.sendall(b"o" * size)
        s.sendall(recv_exactly(s, size))
        recv_exactly(c, size)
        return c, s

    def close(c: socket.socket, s: socket.socket) -> None:
        c.close()
        drain_until_eof(s)
        s.close()

    pairs = [connection() for _ in range(old)]
    names = _detach(source, "set_state") + _detach(source, "destroy_sock")
    for c, s in pairs:
        close(c, s)
    settle()  # every socket of theirs freed (the clients' ends now TIME_WAIT minisocks)
    stale = _socks_conn_ids(source)  # entries of sockets that are gone
    _reattach(source, names)
    pairs = [connection() for _ in range(new)]
    now = _socks_conn_ids(source)
    reused = sum(1 for skp, conn_id in stale.items() if skp in now and now[skp] != conn_id)
    tracked_new = sum(1 for skp, conn_id in now.items() if stale.get(skp) != conn_id)
    for c, s in pairs:
        close(c, s)
    srv.close()
    settle()
    # passes that all begin after the old sockets were gone (the first pass, at load, may
    # have visited them): the sweep finds those whose memory no new socket took
    pipeline = tel.instrumentor.pipeline
    for _ in range(2):
        pipeline.refresh(timeout=60.0)  # type: ignore[union-attr]
        time.sleep(pipeline.FRESH_S)  # type: ignore[union-attr]
    return {"points": tel.points(), "mib": mib_delta(before, mib()), "detached": names, "old": old,
            "new": new, "stale": len(stale), "reused": reused, "tracked_new": tracked_new}


@scenario
def unseen_fins() -> Dict[str, Any]:
    """Connections whose first FIN went out while no set_state program ran; their close seen.

    The kernel counts a FIN in ``bytes_acked`` once it is acknowledged. Here the end that
    closes first (the client in half the connections, the server in the other half) shuts
    down its writing and has its FIN acknowledged (FIN_WAIT1, then FIN_WAIT2) with the
    set_state programs (main and nested copy) detached, as for a transition the kernel ran
    none of our programs for; the other end closes once they are back, so each socket's
    CLOSE is seen. TCP_INFO of both ends gives the payload acknowledged and received.
    """
    setup_netns()
    port, n, size = 5599, 4, 3000
    srv = _listener(port)
    tel = Telemetry(sample_interval=10)
    source = tel.instrumentor.pipeline.source  # type: ignore[union-attr]
    before = mib()
    pairs = []
    for _ in range(2 * n):
        c = socket.create_connection(("127.0.0.1", port), timeout=30)
        s, _ = srv.accept()
        c.sendall(b"c" * size)
        s.sendall(recv_exactly(s, size))
        recv_exactly(c, size)
        pairs.append((c, s))
    order = [(c, s) for c, s in pairs[:n]] + [(s, c) for c, s in pairs[n:]]  # (first, second)
    names = _detach(source, "set_state")
    for first, _second in order:
        first.shutdown(socket.SHUT_WR)
    _until("every first FIN acknowledged", lambda: all(tcp_info(f)["state"] == TCP_FIN_WAIT2 for f, _ in order))
    _reattach(source, names)
    infos = []
    for first, second in order:
        drain_until_eof(second)
        second_info = tcp_info(second)
        second.close()
        drain_until_eof(first)
        infos += [wait_closed(first), second_info]
        first.close()
    srv.close()
    settle()
    return {"points": tel.points(), "mib": mib_delta(before, mib()), "detached": names, "n": n, "size": size,
            "acked": sum(i["bytes_acked"] for i in infos), "received": sum(i["bytes_received"] for i in infos)}


@scenario
def reconnect_after_disconnect() -> Dict[str, Any]:
    """One socket, two connections: connect, disconnect (connect to AF_UNSPEC), connect again.

    The disconnect moves the socket to CLOSE (an RST to the peer) but does not destroy it,
    so its entry is still in the socks map when the same socket connects again."""
    setup_netns()
    port = 5594
    srv = _listener(port, 8)
    tel = Telemetry(sample_interval=10)
    before = mib()
    c = socket.create_connection(("127.0.0.1", port), timeout=30)
    first, _ = srv.accept()
    c.sendall(b"1" * 1000)
    recv_exactly(first, 1000)
    unspec = (ctypes.c_ubyte * 16)()  # struct sockaddr, sa_family AF_UNSPEC (0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.connect(c.fileno(), unspec, 16) != 0:
        raise OSError(ctypes.get_errno(), "connect(AF_UNSPEC)")
    c.connect(("127.0.0.1", port))
    second, _ = srv.accept()
    c.sendall(b"2" * 2000)
    recv_exactly(second, 2000)
    c.shutdown(socket.SHUT_WR)
    drain_until_eof(second)
    second.close()
    drain_until_eof(c)
    wait_closed(c)
    c.close()
    first.close()
    srv.close()
    settle()
    return {"points": tel.points(), "mib": mib_delta(before, mib())}


def _zero_win_marks(obj: Any, samples: int) -> List[int]:
    """The kernel's count of sockets in a zero-window episode, every 0.1 s through a stall."""
    marks = []
    for _ in range(samples):
        time.sleep(0.1)
        marks.append(obj.get_global(".bss", "zero_win_marks"))
    return marks


def _end_stall(s: socket.socket, sink: Any) -> None:
    """Close our end of a stalled connection once the sink is done holding and reading it."""
    s.shutdown(socket.SHUT_WR)
    finish(sink)
    s.close()
    settle()


@scenario
def zero_window() -> Dict[str, Any]:
    """The peer stops reading (it advertises zero windows), then we do."""
    setup_netns()
    tel = Telemetry()
    sink = peer("sink", "5567", "--rcvbuf", "4096", "--hold", "1.5")
    before = mib()
    s = socket.create_connection(("127.0.0.1", 5567))
    s.sendall(b"z" * 400_000)
    # Stay ESTABLISHED through the stall: the kernel's only per-segment receive
    # tracepoint (tcp_probe) is on the ESTABLISHED path.
    obj = tel.instrumentor.pipeline.source._obj  # type: ignore[union-attr]
    marks_in_stall = _zero_win_marks(obj, 25)
    _end_stall(s, sink)
    middle = mib()
    rx_points = tel.points()

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    srv.bind(("127.0.0.1", 5568))
    srv.listen(4)
    sender = peer("send", "5568", "--size", "400000")
    conn, _ = srv.accept()
    time.sleep(1.5)
    drain_until_eof(conn)
    conn.close()
    finish(sender)
    settle()
    points = tel.points()
    return {"rx_points": rx_points, "rx_mib": mib_delta(before, middle),
            "points": points, "tx_mib": mib_delta(middle, mib()),
            "marks_in_stall": marks_in_stall, "zero_win_marks": obj.get_global(".bss", "zero_win_marks")}


@scenario
def zero_window_caught_up() -> Dict[str, Any]:
    """The peer's window closes while the kernel runs no tcp_probe program (detached: as for the
    segments it skips a program for, which has no nested copy); the program is back while the
    window stays closed, and the connection's next segments (the replies to our window probes)
    show the episode."""
    setup_netns()
    tel = Telemetry()
    source = tel.instrumentor.pipeline.source  # type: ignore[union-attr]
    obj = source._obj
    sink = peer("sink", "5604", "--rcvbuf", "4096", "--hold", "3")
    before = mib()
    names = _detach(source, "_probe")
    s = socket.create_connection(("127.0.0.1", 5604))
    s.sendall(b"z" * 400_000)
    _until("the peer's zero window", lambda: mib_delta(before, mib())["TcpExt.TCPToZeroWindowAdv"] > 0)
    time.sleep(0.3)
    marks_detached = obj.get_global(".bss", "zero_win_marks")
    _reattach(source, names)
    marks_in_stall = _zero_win_marks(obj, 15)
    _end_stall(s, sink)
    return {"points": tel.points(), "mib": mib_delta(before, mib()), "detached": names,
            "marks_detached": marks_detached, "marks_in_stall": marks_in_stall,
            "zero_win_marks": obj.get_global(".bss", "zero_win_marks")}


@scenario
def durations_timeout() -> Dict[str, Any]:
    """Two normal closes of known lifetime, and one connection that times out."""
    setup_netns()
    echo = peer("echo", "5569", "--count", "2")
    victim = peer("echo", "5570", "--count", "1")
    tel = Telemetry()
    for hold in (0.3, 0.6):
        s = socket.create_connection(("127.0.0.1", 5569))
        s.sendall(b"hi")
        recv_exactly(s, 2)
        time.sleep(hold)
        s.close()
    s = socket.create_connection(("127.0.0.1", 5570))
    s.sendall(b"hi")
    recv_exactly(s, 2)
    nft("add table inet f", "add chain inet f input { type filter hook input priority 0; }",
        "add rule inet f input tcp dport 5570 drop", "add rule inet f input tcp sport 5570 drop")
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 500)
    s.sendall(b"lost")
    err = None
    try:
        s.recv(10)
    except OSError as exc:
        err = exc.errno
    s.close()
    nft("delete table inet f")
    victim.kill()
    victim.wait()
    finish(echo)
    settle()
    return {"points": tel.points(), "timeout_errno": err}


@scenario
def preexisting() -> Dict[str, Any]:
    """A connection opened before instrument() is still attributed."""
    setup_netns()
    echo = peer("echo", "5571", "--count", "1")
    s = socket.create_connection(("127.0.0.1", 5571))
    s.sendall(b"a" * 1000)
    recv_exactly(s, 1000)
    tel = Telemetry()
    base = tcp_info(s)
    for _ in range(3):
        s.sendall(b"b" * 2000)
        recv_exactly(s, 2000)
    time.sleep(0.3)  # the connection stays open: no settle() here
    info = tcp_info(s)
    live = tel.points()
    s.close()
    finish(echo)
    settle()
    return {"live": live, "closed": tel.points(), "base": base, "info": info, "sent_after": 6000}


@scenario
def fork_child() -> Dict[str, Any]:
    """The parent makes connections and forks; the child restarts the probes for itself.

    Parent and child then both accept on the listener they share: each counts
    exactly the connections it accepted, never the other's, never its parent's."""
    import json
    import os

    from otel_ebpf_flows import EbpfFlowsInstrumentor

    setup_netns()
    echo = peer("echo", "5572", "--count", "5")
    shared = socket.socket()
    shared.bind(("127.0.0.1", 5576))
    shared.listen(64)
    clients_n = 8

    def connect(n: int) -> None:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", 5572))
            s.sendall(b"f")
            recv_exactly(s, 1)
            s.close()

    def serve(idle_s: float) -> int:
        """Accept and echo on the shared listener until it is idle for idle_s."""
        served = 0
        shared.settimeout(idle_s)
        while True:
            try:
                conn, _ = shared.accept()
            except socket.timeout:
                return served
            conn.settimeout(30)
            with conn:
                data = conn.recv(65536)
                while data:
                    conn.sendall(data)
                    data = conn.recv(65536)
            served += 1

    def by_role(rows: Any) -> Dict[str, int]:
        out = {"client": 0, "server": 0}
        for p in rows:
            if p["name"] == "ebpf_flows.tcp.connection.attempts" and "error.type" not in p["attrs"]:
                out[p["attrs"]["ebpf_flows.tcp.role"]] += p["value"]
        return out

    tel = Telemetry()
    connect(3)
    before = mib()
    rfd, wfd = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no code of its own to instrument it
        import faulthandler

        faulthandler.dump_traceback_later(60, exit=True)  # a hang shows where it is
        try:
            os.close(rfd)
            os.close(go_w)
            deadline = time.monotonic() + 20
            while EbpfFlowsInstrumentor().pipeline is None and time.monotonic() < deadline:
                time.sleep(0.01)
            out: Dict[str, Any] = {"restarted": EbpfFlowsInstrumentor().pipeline is not None,
                                   "claiming": getattr(EbpfFlowsInstrumentor().pipeline.source, "claiming", None)
                                   if EbpfFlowsInstrumentor().pipeline else None}
            out["at_start"] = by_role(tel.points())
            os.read(go_r, 1)  # the parent started the clients
            out["served"] = serve(2.0)
            connect(2)
            settle()
            out["own"] = by_role(tel.points())
            os.write(wfd, json.dumps(out).encode())
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(0)
    os.close(wfd)
    os.close(go_r)
    clients = peer("clients", "5576", "--count", str(clients_n), "--rounds", "1")
    os.write(go_w, b"g")
    served = serve(2.0)
    finish(clients, timeout=60)
    with os.fdopen(rfd) as f:
        child = json.loads(f.read())
    os.waitpid(pid, 0)
    settle()
    parent = {"own": by_role(tel.points()), "served": served,
              "claiming": getattr(EbpfFlowsInstrumentor().pipeline.source, "claiming", None)}
    finish(echo)
    return {"parent": parent, "child": child, "clients": clients_n, "mib": mib_delta(before, mib())}


@scenario
def fork_serve_at_once() -> Dict[str, Any]:
    """Pre-fork workers that accept the moment fork() returns, from a queue already holding
    connections whose handshakes completed before the fork (counted by the parent, which
    accepted the handshake) and others that complete while the workers load their probes:
    parent and workers together count every connection exactly once."""
    import json
    import os

    setup_netns()
    shared = socket.socket()
    shared.bind(("127.0.0.1", 5577))
    shared.listen(64)
    early, late, workers = 6, 6, 2
    clients_n = early + late
    tel = Telemetry()
    before = mib()
    clients = peer("clients", "5577", "--count", str(early), "--rounds", "1")
    time.sleep(0.5)  # their handshakes complete in the kernel; nobody has accepted yet

    def connect_late(_i: int) -> None:
        s = socket.create_connection(("127.0.0.1", 5577), timeout=60)
        s.sendall(b"l" * 100)
        recv_exactly(s, 100)
        s.shutdown(socket.SHUT_WR)
        drain_until_eof(s)
        s.close()

    def served_by_me(rows: Any) -> int:
        return sum(p["value"] for p in rows if p["name"] == "ebpf_flows.tcp.connection.attempts"
                   and p["attrs"]["ebpf_flows.tcp.role"] == "server" and "error.type" not in p["attrs"])

    def serve(idle_s: float) -> int:
        served = 0
        shared.settimeout(idle_s)
        while True:
            try:
                conn, _ = shared.accept()
            except socket.timeout:
                return served
            conn.settimeout(30)
            with conn:
                data = conn.recv(65536)
                while data:
                    conn.sendall(data)
                    data = conn.recv(65536)
            served += 1

    pipes = []
    for _ in range(workers):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(rfd)
                served = serve(2.0)  # at once: no waiting for the probes
                settle()
                os.write(wfd, json.dumps({"served": served, "counted": served_by_me(tel.points())}).encode())
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(0)
        os.close(wfd)
        pipes.append((pid, rfd))
    served = 0  # the parent only forks, as a pre-fork server's master does
    # while the workers load their probes: handshakes they will take from the shared queue
    in_threads(connect_late, late)
    finish(clients, timeout=60)
    children = []
    for pid, rfd in pipes:
        with os.fdopen(rfd) as f:
            children.append(json.loads(f.read()))
        os.waitpid(pid, 0)
    settle()
    parent = {"served": served, "counted": served_by_me(tel.points())}
    return {"parent": parent, "children": children, "clients": clients_n, "early": early,
            "mib": mib_delta(before, mib())}


@scenario
def fork_shared_overflows() -> Dict[str, Any]:
    """A full listen queue shared by a parent and its forked child: each drop counted once."""
    import json
    import os

    from otel_ebpf_flows import EbpfFlowsInstrumentor

    setup_netns()
    full = socket.socket()
    full.bind(("127.0.0.1", 5578))
    full.listen(1)  # never accepted
    tel = Telemetry()
    before = mib()

    def overflows(rows: Any) -> int:
        return sum(p["value"] for p in rows if p["name"] == "ebpf_flows.tcp.listen.overflows")

    rfd, wfd = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rfd)
            os.close(go_w)
            os.read(go_r, 1)  # the flood is over
            os.write(wfd, json.dumps({"restarted": EbpfFlowsInstrumentor().pipeline is not None,
                                      "overflows": overflows(tel.points())}).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    os.close(go_r)
    finish(peer("flood", "5578", "--count", "8", "--hold", "2.5"))
    os.write(go_w, b"g")
    with os.fdopen(rfd) as f:
        child = json.loads(f.read())
    os.waitpid(pid, 0)
    parent = {"overflows": overflows(tel.points())}
    return {"parent": parent, "child": child, "mib": mib_delta(before, mib())}


@scenario
def gunicorn_workers() -> Dict[str, Any]:
    """examples/gunicorn with 3 workers: each worker's metrics against what it served and opened."""
    import glob
    import json
    import os
    import signal
    import subprocess
    import tempfile

    setup_netns()
    n, workers, port = 36, 3, 8000
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    echo = peer("echo", "5581", "--count", str(n))
    out = tempfile.mkdtemp(prefix="otel-ebpf-flows-gunicorn-")
    env = dict(os.environ, EXAMPLE_UPSTREAM="127.0.0.1:5581", EXAMPLE_BIND=f"127.0.0.1:{port}",
               EXAMPLE_WORKERS=str(workers), OTEL_EBPF_FLOWS_TEST_DIR=out)
    stderr = open(os.path.join(out, "gunicorn.err"), "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "python:tests.kernel.gunicorn_conf",
         "--pythonpath", f"{root},{os.path.join(root, 'examples', 'gunicorn')}", "app:app"],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
    )
    deadline = time.monotonic() + 60
    while len(glob.glob(os.path.join(out, "ready-*"))) < workers:
        if proc.poll() is not None or time.monotonic() > deadline:
            stderr.seek(0)
            raise RuntimeError(f"gunicorn did not start its workers:\n{stderr.read()[-3000:]}")
        time.sleep(0.05)
    ready = [json.load(open(p)) for p in glob.glob(os.path.join(out, "ready-*"))]
    before = mib()

    def request(_i: int) -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            return drain_all(s).decode().rsplit(" ", 1)[-1].strip()

    def drain_all(s: socket.socket) -> bytes:
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk

    answered_by = [pid for batch in in_threads(lambda i: [request(i) for _ in range(n // 6)], 6) for pid in batch]
    finish(echo)
    settle()
    after = mib()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    stderr.seek(0)
    errors = stderr.read()
    results = [json.load(open(p)) for p in glob.glob(os.path.join(out, "worker-*.json"))]
    master = json.load(open(os.path.join(out, "master.json")))
    return {"workers": results, "master": master, "ready": ready, "answered_by": answered_by,
            "mib": mib_delta(before, after), "requests": n, "stderr": errors[-4000:], "status": proc.returncode}


def bpf_fds() -> Dict[str, int]:
    """This process's BPF file descriptors by kind (prog, map, link), and all its fds."""
    import os

    out = {"prog": 0, "map": 0, "link": 0, "fds": 0}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        out["fds"] += 1
        for kind, label in (("prog", "bpf-prog"), ("map", "bpf-map"), ("link", "bpf_link")):
            if target == f"anon_inode:{label}":
                out[kind] += 1
    return out


def private_mounts() -> None:
    """A mount namespace of this process's own (its mounts no longer touch the host's)."""
    import ctypes
    import subprocess

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x00020000):  # CLONE_NEWNS
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)


def process_state() -> Dict[str, Any]:
    import os

    # a joined thread can stay a kernel task for a moment while it exits: give it that moment
    deadline = time.monotonic() + 2
    while len(os.listdir("/proc/self/task")) > threading.active_count() and time.monotonic() < deadline:
        time.sleep(0.01)
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {**bpf_fds(), "threads": len(os.listdir("/proc/self/task")),
            "py_threads": threading.active_count(), "rss_kb": int(status["VmRSS"].split()[0])}


def listening() -> Any:
    """(local address, port) of the listening TCP sockets in this namespace."""
    out = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6", "/proc/net/udp", "/proc/net/udp6"):
        with open(path) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" or "udp" in path:
                    out.add((path, fields[1]))
    return sorted(out)


def bpffs_entries() -> Any:
    import os

    return sorted(os.path.join(d, n) for d, dirs, files in os.walk("/sys/fs/bpf") for n in dirs + files)


@scenario
def lifecycle() -> Dict[str, Any]:
    """instrument()/uninstrument() many times on one MeterProvider: nothing leaks, nothing is left open.

    In a mount namespace of its own with a fresh bpffs at /sys/fs/bpf, so any pin would show."""
    import gc
    import subprocess
    import tracemalloc

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from otel_ebpf_flows import EbpfFlowsInstrumentor

    setup_netns()
    private_mounts()
    subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True)
    cycles, warmup = 25, 5
    echo = peer("echo", "5582", "--count", str(cycles + warmup + 1))  # + 1: the last one ends it
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    inst = EbpfFlowsInstrumentor()
    base = process_state()
    listen_before, pins_before = listening(), bpffs_entries()
    states, during, attempts = [], [], []
    tracemalloc.start()
    traced = []
    for i in range(cycles + warmup):
        inst.instrument(meter_provider=provider)
        assert inst.pipeline is not None
        if i == 0:
            during = {"listening": listening(), "pins": bpffs_entries(), **process_state()}
        s = socket.create_connection(("127.0.0.1", 5582))
        s.sendall(b"l")
        recv_exactly(s, 1)
        s.close()
        settle()  # more than Pipeline.FRESH_S: the collection below takes a fresh sample
        attempts.append(sum(p.value for rm in reader.get_metrics_data().resource_metrics
                            for sm in rm.scope_metrics for m in sm.metrics
                            if m.name == "ebpf_flows.tcp.connection.attempts" for p in m.data.data_points))
        inst.uninstrument()
        gc.collect()
        states.append(process_state())
        traced.append(tracemalloc.get_traced_memory()[0])
    tracemalloc.stop()
    listen_after = listening()  # the echo peer's listener is still there, as before
    socket.create_connection(("127.0.0.1", 5582)).close()
    finish(echo)
    return {"base": base, "during": during, "states": states, "warmup": warmup, "traced": traced,
            "listen_before": listen_before, "pins_before": pins_before, "attempts": attempts,
            "listen_after": listen_after, "pins_after": bpffs_entries()}


@scenario
def tampered_object() -> Dict[str, Any]:
    """A modified copy of the shipped object is refused before anything is loaded."""
    import logging
    import os
    import shutil
    import tempfile

    from otel_ebpf_flows import EbpfFlowsInstrumentor, _kernel

    setup_netns()
    copy = tempfile.mkdtemp(prefix="otel-ebpf-flows-tamper-")
    for name in os.listdir(_kernel.BPF_DIR):
        shutil.copy(os.path.join(_kernel.BPF_DIR, name), copy)
    path = os.path.join(copy, _kernel.OBJECT_NAME)
    with open(path, "r+b") as f:  # flip one byte in the middle of the object
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    _kernel.BPF_DIR = copy
    records: list = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append((record.levelname, record.getMessage()))

    logging.getLogger("otel_ebpf_flows").addHandler(Keep())
    before = bpf_fds()
    tel_error = None
    try:
        Telemetry()
    except RuntimeError as exc:
        tel_error = str(exc)
    pipeline = EbpfFlowsInstrumentor().pipeline
    return {"records": records, "error": tel_error, "before": before, "after": bpf_fds(),
            "pipeline": pipeline is not None, "path": path,
            "variant": getattr(getattr(pipeline, "source", None), "variant", None)}


@scenario
def no_tracefs() -> Dict[str, Any]:
    """tracefs (and debugfs) not mounted: the probes load and count all the same."""
    import os
    import subprocess

    setup_netns()
    private_mounts()
    for where in ("/sys/kernel/debug/tracing", "/sys/kernel/tracing", "/sys/kernel/debug"):
        subprocess.run(["umount", "-l", where], capture_output=True)
    mounted = [line.split()[1:3] for line in open("/proc/mounts") if line.split()[2] in ("tracefs", "debugfs")]
    echo = peer("echo", "5583", "--count", "3")
    tel = Telemetry()
    before = mib()
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", 5583))
        s.sendall(b"t")
        recv_exactly(s, 1)
        s.close()
    finish(echo)
    settle()
    return {"mounted": mounted, "points": tel.points(), "mib": mib_delta(before, mib()),
            "tracefs_dir": os.listdir("/sys/kernel/tracing") if os.path.isdir("/sys/kernel/tracing") else None}


def _hist_counts(rows: Any) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for r in rows:
        if "count" in r:
            out[r["name"]] = out.get(r["name"], 0) + r["count"]
    return out


def _pressure_round(tel: Telemetry, port: int, concurrent: int, churn: int) -> Dict[str, Any]:
    """``concurrent`` connections to this process's own listener held open at once, then ``churn``
    connect/request/close in a row; collections taken along the way."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(4096)
    accepted: list = []

    def accept_all(n: int) -> None:
        for _ in range(n):
            conn, _ = srv.accept()
            accepted.append(conn)

    before = mib()
    collections = [tel.points()]
    t = threading.Thread(target=accept_all, args=(concurrent,))
    t.start()
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(concurrent)]
    t.join()
    for c in held:
        c.sendall(b"p")
    for a in accepted:
        recv_exactly(a, 1)
    collections.append(tel.points())
    for c in held:
        c.close()
    for a in accepted:
        a.close()
    accepted.clear()
    for _ in range(churn):
        c = socket.create_connection(("127.0.0.1", port))
        a, _ = srv.accept()
        c.sendall(b"q")
        recv_exactly(a, 1)
        c.close()
        a.close()
    srv.close()
    settle(0.5)
    collections.append(tel.points())
    return {"collections": collections, "mib": mib_delta(before, mib()), "connections": concurrent + churn}


@scenario
def pressure() -> Dict[str, Any]:
    """Thousands of concurrent connections and churn, then the same into small kernel maps and a
    4 KiB ring buffer: bounded maps, every eviction and lost record counted."""
    import resource

    setup_netns()
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    tel = Telemetry()
    roomy = _pressure_round(tel, 5584, concurrent=2000, churn=2000)
    tel.close()
    tight_config = {"max_connections": 256, "ring_buffer_bytes": 4096, "max_flows": 16}
    tel = Telemetry(records=True, **tight_config)  # histogram records: a ring to overflow
    tight = _pressure_round(tel, 5585, concurrent=600, churn=400)
    tel.close()
    return {"roomy": roomy, "tight": tight, "tight_config": tight_config}


def _burst(port: int, n: int) -> float:
    """``n`` connections to a listener of this process on ``port``, each accepted and both ends
    closed at once; how long they took (s)."""
    srv = _listener(port, 1024)
    started = time.monotonic()
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port))
        a, _ = srv.accept()
        c.close()
        a.close()
    burst_s = time.monotonic() - started
    srv.close()
    return burst_s


def _tap_span_records(source: Any, see: Callable[[Any], None]) -> None:
    """Let ``see`` look at each span record (a ConnRecord tuple) before the pipeline takes it."""
    handled = source.on_conn

    def tapped(record: Any) -> None:
        see(record)
        handled(record)

    source.on_conn = tapped


@scenario
def ring_wakeup() -> Dict[str, Any]:
    """A burst of records four times the ring's size, well within one (long) poll interval."""
    setup_netns()
    poll_interval = 5.0
    # 1,024 records, woken at 256 (histogram records, not kernel buckets: the ring is what is tested)
    tel = Telemetry(records=True, poll_interval=poll_interval, ring_buffer_bytes=65536)
    before = mib()
    n = 600  # 4 records each: two handshakes, two closes
    burst_s = _burst(5597, n)
    settle(0.5)
    return {"points": tel.points(), "mib": mib_delta(before, mib()), "connections": n, "burst_s": burst_s,
            "poll_interval": poll_interval}


@scenario
def span_ring_wakeup() -> Dict[str, Any]:
    """Span enrichment on, one span open (span records are made only then), none ending: a
    burst of span records (CONN and GONE per socket) over twice the ring's size, well within
    one (long) poll interval."""
    from opentelemetry.sdk.trace import TracerProvider

    setup_netns()
    poll_interval = 5.0
    provider = TracerProvider()
    tel = Telemetry(poll_interval=poll_interval, ring_buffer_bytes=65536, tracer_provider=provider)
    pipeline = tel.instrumentor.pipeline
    kinds: Dict[str, int] = {}
    _tap_span_records(pipeline.source, lambda record: kinds.__setitem__(record[0], kinds.get(record[0], 0) + 1))
    before = mib()
    n = 600  # 2,400 span records of 64 bytes: 150 KiB into a 64 KiB ring, woken at 16 KiB
    with provider.get_tracer("kernel-test").start_as_current_span("burst"):
        burst_s = _burst(5598, n)
        settle(0.5)  # read by the wakeup (or lost), not by the span's end
    return {"points": tel.points(), "mib": mib_delta(before, mib()), "connections": n, "burst_s": burst_s,
            "poll_interval": poll_interval, "kinds": kinds, "hist_mode": pipeline._hist_mode}


@scenario
def flows_overflow() -> Dict[str, Any]:
    """More peers than the kernel's flows map holds: nothing is lost, the overflow is counted."""
    from opentelemetry.sdk.trace import TracerProvider

    setup_netns()
    peers = 30
    echo = peer("echo", "5573", "--count", str(peers), "--host", "0.0.0.0")
    # span enrichment on, a span open: each CONN span record says whether its handshake point is the peer's
    provider = TracerProvider()
    tel = Telemetry(max_flows=16, tracer_provider=provider)
    in_kernel: Dict[str, bool] = {}
    _tap_span_records(tel.instrumentor.pipeline.source,
                      lambda record: in_kernel.__setitem__(record[2].address, record[11]) if record[0] == "conn" else None)
    before = mib()
    with provider.get_tracer("kernel-test").start_as_current_span("connections"):
        for i in range(peers):  # 127.0.0.1 .. 127.0.0.30: all loopback, 30 distinct peers
            s = socket.create_connection((f"127.0.0.{i + 1}", 5573))
            s.sendall(b"o")
            recv_exactly(s, 1)
            s.close()
    finish(echo)
    settle()
    return {"points": tel.points(), "mib": mib_delta(before, mib()), "peers": peers, "in_kernel": in_kernel}


@scenario
def raw_tp_variant() -> Dict[str, Any]:
    """The raw_tp programs (loaded where tp_btf is refused) count what tp_btf counts."""
    from otel_ebpf_flows._kernel import KernelSource

    setup_netns()
    echo = peer("echo", "5574", "--count", "3")
    src = KernelSource(variants=("raw_tp",))
    src.start(lambda event: None)
    before = mib()
    infos = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", 5574))
        base = tcp_info(s)
        s.sendall(b"r" * 5000)
        recv_exactly(s, 5000)
        info = tcp_info(s)
        infos.append(info["bytes_acked"] - base["bytes_acked"])
        s.close()
    try:
        socket.create_connection(("127.0.0.1", 5575))
    except ConnectionRefusedError:
        pass
    finish(echo)
    settle()
    snap = src.sample()
    variant, attached = src.variant, src.attached
    src.close()
    counters = {f"{k.role.value}:{k.port}": {"attempts_ok": v.attempts_ok, "refused": v.attempts_failed["refused"],
                                             "bytes_tx": v.bytes_transmitted, "closed": v.closed}
                for k, v in snap.counters.items() if k.address}
    return {"variant": variant, "attached": attached, "counters": counters, "tcpi_bytes": infos,
            "mib": mib_delta(before, mib())}


@scenario
def kernel_histograms() -> Dict[str, Any]:
    """Every histogram value both aggregated in the kernel (hists map) and handed over as a
    record (HIST_MODE_AUDIT): one load of the programs, so the very same values."""
    import bisect

    from otel_ebpf_flows import _records
    from otel_ebpf_flows._kernel import KernelSource
    from otel_ebpf_flows._telemetry import DURATION_BUCKETS, HANDSHAKE_BUCKETS, RTT_BUCKETS

    setup_netns()
    bounds = {_records.HIST_HANDSHAKE: HANDSHAKE_BUCKETS, _records.HIST_DURATION: DURATION_BUCKETS,
              _records.HIST_RTT: RTT_BUCKETS}
    records: List[Any] = []
    source = KernelSource()
    source.on_metric = records.append
    source.start(lambda event: None)
    asked = _records.HIST_MODE_HANDSHAKE | _records.HIST_MODE_CLOSE | _records.HIST_MODE_AUDIT
    first = source.aggregate_histograms(asked, bounds)  # writes the bounds; the mode at the next call
    mode = source.aggregate_histograms(asked, bounds)
    srv = _listener(5598, backlog=256)

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            data = c.recv(100)
            c.sendall(data)
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    random_loss(5598, 3)  # retransmits: RTTs and lifetimes far from loopback's
    before = mib()
    reads: List[Any] = []
    for i in range(240):
        s = socket.create_connection(("127.0.0.1", 5598))
        s.sendall(b"x" * (1 + i % 50))
        s.recv(100)
        time.sleep((0, 0.0005, 0.003, 0.012)[i % 4])
        s.close()
        if i == 120:  # a read mid-way: the generations of the extremes move on
            reads.extend(source.read_histograms())
            source.poll(0)
    nft("delete table inet loss")
    settle()
    reads.extend(source.read_histograms())
    source.poll(0)
    lost_by_probe = source.read().probes.events_lost
    source.close()
    srv.close()

    names = {_records.HIST_HANDSHAKE: "handshake", _records.HIST_DURATION: "duration", _records.HIST_RTT: "rtt"}
    kernel: Dict[str, Any] = {}
    unknown = 0  # reads that caught a value's count but not its extremes (a race, see read_histograms)
    for hist, key, counts, total, low, high in reads:
        k = f"{names[hist]}:{key.role.value}:{key.port}"
        have = kernel.setdefault(k, {"counts": [0] * len(counts), "sum": 0.0, "min": None, "max": None})
        have["counts"] = [a + b for a, b in zip(have["counts"], counts)]
        have["sum"] += total
        if low is None or high is None:
            unknown += any(counts)
            continue
        have["min"] = low if have["min"] is None else min(have["min"], low)
        have["max"] = high if have["max"] is None else max(have["max"], high)
    user: Dict[str, Any] = {}

    def add(name: str, hist: int, key: Any, value: float) -> None:
        k = f"{name}:{key.role.value}:{key.port}"
        have = user.setdefault(k, {"counts": [0] * (len(bounds[hist]) + 1), "sum": 0.0, "min": value, "max": value})
        have["counts"][bisect.bisect_left(bounds[hist], value)] += 1
        have["sum"] += value
        have["min"], have["max"] = min(have["min"], value), max(have["max"], value)

    for kind, key, _ts, duration_s, srtt_s, _tid in records:
        if kind == "handshake":
            add("handshake", _records.HIST_HANDSHAKE, key, duration_s)
        if kind == "close":
            add("duration", _records.HIST_DURATION, key, duration_s)
        if kind in ("close", "rtt") and srtt_s is not None:
            add("rtt", _records.HIST_RTT, key, srtt_s)
    return {"first": first, "mode": mode, "unknown_extremes": unknown, "kernel": kernel, "user": user,
            "reads": len(reads), "lost": lost_by_probe["tcp_flows.events"],
            # connections no probe saw close, or found established late: no duration point
            "unseen": {name: lost_by_probe[name] for name in ("tcp_flows.unseen_close", "tcp_flows.unseen_handshake",
                                                             "tcp_flows.skipped")},
            "mib": mib_delta(before, mib())}


if __name__ == "__main__":
    emit(SCENARIOS[sys.argv[1]]())
