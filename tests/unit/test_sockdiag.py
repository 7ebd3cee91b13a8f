"""sock_diag mode: the inet_diag wire format, and the source on real loopback sockets (no privilege needed).

Parsing is checked against messages built here from the kernel's documented
layout (linux/inet_diag.h, linux/netlink.h) and against garbage: a malformed
reply is a :class:`DiagError`, never another exception. The source is checked
on real sockets of this process, in whatever network namespace the tests run
in (a sock_diag dump needs no privilege), against their own TCP_INFO.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from typing import Any, Dict, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_ebpf_flows import _sockdiag
from otel_ebpf_flows._sockdiag import (
    INET_DIAG_INFO,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOCK_DIAG_BY_FAMILY,
    DiagError,
    SockDiagSource,
    parse_inet_diag,
    parse_messages,
    request,
)
from otel_ebpf_flows._source import FlowEvent, FlowKey, Role

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sock_diag is Linux's")


def tcp_info_bytes(options: int = 7, rtt_us: int = 250, total_retrans: int = 3, acked: int = 1001,
                   received: int = 500, size: int = 248) -> bytes:
    raw = bytearray(size)
    raw[5] = options
    struct.pack_into("=I", raw, 68, rtt_us)
    struct.pack_into("=I", raw, 100, total_retrans)
    struct.pack_into("=QQ", raw, 120, acked, received)
    return bytes(raw)


def attr(kind: int, data: bytes) -> bytes:
    body = struct.pack("=HH", 4 + len(data), kind) + data
    return body + b"\0" * (-len(body) % 4)


def diag_msg(family: int = socket.AF_INET, state: int = 1, sport: int = 40000, dport: int = 443,
             dst: bytes = bytes([192, 0, 2, 7]) + bytes(12), inode: int = 77, cookie: int = (5 << 32) | 9,
             attrs: bytes = b"") -> bytes:
    head = struct.pack("=BBBB", family, state, 0, 0) + struct.pack("!HH", sport, dport)
    sockid = head + bytes(16) + dst + struct.pack("=III", 0, cookie & 0xFFFFFFFF, cookie >> 32)
    return sockid + struct.pack("=5I", 0, 0, 0, 1000, inode) + attrs


def nlmsg(kind: int, payload: bytes, seq: int = 1) -> bytes:
    body = struct.pack("=IHHII", 16 + len(payload), kind, 2, seq, 0) + payload
    return body + b"\0" * (-len(body) % 4)


def test_the_request_is_an_inet_diag_req_v2_dump_asking_for_tcp_info() -> None:
    raw = request(socket.AF_INET6, seq=42)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", raw)
    assert (length, kind, flags, seq, pid) == (len(raw), SOCK_DIAG_BY_FAMILY, 0x301, 42, 0) and len(raw) == 16 + 56
    family, protocol, ext, _pad, states = struct.unpack_from("=BBBBI", raw, 16)
    assert (family, protocol, ext) == (socket.AF_INET6, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1))
    # established, the closing states and listeners; never TIME_WAIT (6), SYN_RECV (3), SYN_SENT (2), CLOSE (7)
    assert [s for s in range(12) if states >> s & 1] == [1, 4, 5, 8, 9, 10, 11]


def test_a_reply_is_parsed_field_by_field() -> None:
    data = nlmsg(SOCK_DIAG_BY_FAMILY, diag_msg(attrs=attr(3, b"xx") + attr(INET_DIAG_INFO, tcp_info_bytes())))
    data += nlmsg(NLMSG_DONE, struct.pack("=i", 0))
    (s,), done = parse_messages(data, seq=1)
    assert done
    assert (s.family, s.state, s.local_port, s.peer_port, s.peer, s.peer_family, s.inode, s.cookie) == (
        socket.AF_INET, 1, 40000, 443, "192.0.2.7", "ipv4", 77, (5 << 32) | 9)
    assert s.info is not None
    assert (s.info.options, s.info.rtt_us, s.info.total_retrans, s.info.bytes_acked, s.info.bytes_received) == (
        7, 250, 3, 1001, 500)


@pytest.mark.parametrize(("dst", "text", "family"), [
    (bytes(10) + b"\xff\xff" + bytes([198, 51, 100, 1]), "198.51.100.1", "ipv4"),
    (bytes.fromhex("20010db8000000000000000000000001"), "2001:db8::1", "ipv6"),
])
def test_ipv6_peers_and_ipv4_mapped_ones(dst: bytes, text: str, family: str) -> None:
    s = parse_inet_diag(diag_msg(family=socket.AF_INET6, dst=dst))
    assert (s.peer, s.peer_family, s.info) == (text, family, None)


def test_other_sequence_numbers_and_other_inodes_are_skipped() -> None:
    data = nlmsg(SOCK_DIAG_BY_FAMILY, diag_msg(inode=1), seq=7)  # a stale dump's
    data += nlmsg(SOCK_DIAG_BY_FAMILY, diag_msg(inode=2))
    data += nlmsg(SOCK_DIAG_BY_FAMILY, diag_msg(inode=3))
    found, done = parse_messages(data, seq=1, inodes={3})
    assert [s.inode for s in found] == [3] and not done


def test_an_error_reply_names_the_errno() -> None:
    data = nlmsg(NLMSG_ERROR, struct.pack("=i", -13) + bytes(16))
    with pytest.raises(DiagError, match="EACCES: Permission denied"):
        parse_messages(data, seq=1)


@pytest.mark.parametrize(("data", "what"), [
    (nlmsg(NLMSG_ERROR, struct.pack("=i", -(2**31))), "error code -2147483648"),
    (nlmsg(NLMSG_ERROR, struct.pack("=i", 0)), "error code 0"),
    (nlmsg(NLMSG_ERROR, b"\x01"), "EPROTO"),
    (b"\x01\x02\x03", "netlink header truncated"),
    (nlmsg(SOCK_DIAG_BY_FAMILY, diag_msg())[:-8], "netlink message of length"),
    (struct.pack("=IHHII", 8, SOCK_DIAG_BY_FAMILY, 0, 1, 0), "netlink message of length 8"),
    (nlmsg(SOCK_DIAG_BY_FAMILY, diag_msg()[:40]), "inet_diag message of 40 bytes"),
    (nlmsg(SOCK_DIAG_BY_FAMILY, diag_msg(attrs=struct.pack("=HH", 200, INET_DIAG_INFO))), "attribute of length 200"),
    (nlmsg(SOCK_DIAG_BY_FAMILY, diag_msg(attrs=struct.pack("=HH", 2, 1))), "attribute of length 2"),
    (nlmsg(SOCK_DIAG_BY_FAMILY, diag_msg(attrs=attr(INET_DIAG_INFO, tcp_info_bytes()[:104]))),
     "tcp_info of 104 bytes"),
    (nlmsg(SOCK_DIAG_BY_FAMILY, diag_msg(family=1)), "address family 1"),
    (nlmsg(99, b""), "unexpected netlink message type 99"),
])
def test_truncated_or_malformed_replies_are_a_clean_error(data: bytes, what: str) -> None:
    with pytest.raises(DiagError, match=what):
        parse_messages(data, seq=1)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([None, {77}]))
def test_garbage_is_a_diag_error_or_parses(data: bytes, inodes: Any) -> None:
    try:
        parse_messages(data, seq=1, inodes=inodes)
    except DiagError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=255))
def test_a_valid_reply_cut_or_corrupted_anywhere_is_a_diag_error_or_parses(cut: int, byte: int) -> None:
    data = bytearray(nlmsg(SOCK_DIAG_BY_FAMILY, diag_msg(attrs=attr(INET_DIAG_INFO, tcp_info_bytes()))))
    data += nlmsg(NLMSG_DONE, struct.pack("=i", 0))
    if cut < len(data):
        data[cut] = byte
    try:
        parse_messages(bytes(data[: max(cut, 1)]), seq=1)
        parse_messages(bytes(data), seq=1)
    except DiagError:
        pass


# -- the source, on real sockets -----------------------------------------------------------------


def info(sock: socket.socket) -> Dict[str, int]:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return {"state": raw[0], "retrans": struct.unpack_from("I", raw, 100)[0],
            "acked": struct.unpack_from("Q", raw, 120)[0], "received": struct.unpack_from("Q", raw, 128)[0]}


def pair(listener: socket.socket) -> List[socket.socket]:
    client = socket.create_connection(listener.getsockname()[:2])
    server, _ = listener.accept()
    return [client, server]


def wait_state(sock: socket.socket, state: int) -> None:
    deadline = time.monotonic() + 10
    while info(sock)["state"] != state:
        assert time.monotonic() < deadline, f"state {info(sock)['state']}, waiting for {state}"
        time.sleep(0.01)


@linux_only
def test_source_counts_this_processs_connections_as_tcp_info_does() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    old_client, old_server = pair(listener)  # before start: adopted, counted from then on
    old_client.sendall(b"a" * 100)
    old_server.recv(100)
    events: List[FlowEvent] = []
    source = SockDiagSource()
    source.start(events.append)
    try:
        client, server = pair(listener)
        client.sendall(b"b" * 3000)
        got = b""
        while len(got) < 3000:
            got += server.recv(3000)
        server.sendall(b"c" * 700)
        client.recv(700)
        old_client.sendall(b"d" * 50)
        old_server.recv(50)
        client.shutdown(socket.SHUT_WR)  # client FIN_WAIT2 (our FIN acked), server CLOSE_WAIT
        wait_state(client, 5)
        wait_state(server, 8)
        counters = source.sample().counters
        ckey = FlowKey(Role.CLIENT, "127.0.0.1", port, "ipv4")
        skey = FlowKey(Role.SERVER, "127.0.0.1", port, "ipv4")
        assert set(counters) == {ckey, skey}
        c, s = counters[ckey], counters[skey]
        assert (c.attempts_ok, c.established, c.closed) == (1, 2, 0)  # the adopted one is active, not an attempt
        assert (s.attempts_ok, s.established, s.closed) == (1, 2, 0)
        # payload only: 3000 + the adopted connection's 50 after start; SYN and FIN left out
        assert c.bytes_transmitted == 3050 == info(client)["acked"] - 2 + 50
        assert c.bytes_received == 700
        assert s.bytes_received == 3050 == info(server)["received"] - 1 + 50
        assert s.bytes_transmitted == 700 == info(server)["acked"]
        assert c.retransmits == info(client)["retrans"] and s.retransmits == info(server)["retrans"]
        assert c.window_scaling_disabled == s.window_scaling_disabled == 0
        rtts = [e for e in events if e.kind == "rtt"]
        assert {e.key for e in rtts} == {ckey, skey} and all(0 < (e.srtt_s or 0) < 1 for e in rtts)
        for sock in (client, server, old_client):
            sock.close()
        after = source.sample().counters
        assert (after[ckey].closed, after[skey].closed) == (2, 1)  # closed, or descriptor closed
        assert after[ckey].bytes_transmitted == 3050  # counters never go down
        assert source.sample().probes.events_lost == {"sock_diag.dump": 0}
    finally:
        source.close()
        for sock in (old_server, listener):
            sock.close()


@linux_only
def test_other_sockets_and_inherited_ones_are_not_counted() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    ours = pair(listener)
    inherited = pair(listener)

    def inode(sock: socket.socket) -> int:
        return int(os.readlink(f"/proc/self/fd/{sock.fileno()}").strip("socket:[]"))

    # what the source is told we hold: the listener, one pair, and a pair inherited from a parent
    source = SockDiagSource(inherited={inode(s) for s in inherited},
                            inodes=lambda: [inode(s) for s in (listener, *ours, *inherited)])
    source.start(lambda e: None)
    try:
        extra = pair(listener)  # not among the inodes: another process's, for the source
        counters = source.sample().counters
        assert sum(c.established for c in counters.values()) == 2  # ours: a client and a server socket
    finally:
        source.close()
        for s in (listener, *ours, *inherited, *extra):
            s.close()


def test_a_failing_dump_is_counted_and_warned_once(caplog, monkeypatch) -> None:
    source = SockDiagSource(inodes=lambda: [])
    source._started = True

    def fail(_inodes: Any) -> Any:
        raise DiagError("sock_diag dump failed: [Errno 13] Permission denied")

    monkeypatch.setattr(source._dumper, "dump", fail)
    for _ in range(3):
        assert source.sample().probes.events_lost == {"sock_diag.dump": source._failed_dumps}
    assert source._failed_dumps == 3
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "Permission denied" in warnings[0].getMessage()


def test_the_marker_is_what_the_docs_name() -> None:
    assert _sockdiag.MARKER == {"ebpf_flows.source": "sock_diag"}
