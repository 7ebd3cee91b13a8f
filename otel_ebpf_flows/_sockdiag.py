"""The unprivileged fallback :class:`~otel_ebpf_flows._source.Source`: sock_diag and TCP_INFO.

Where the probes cannot load (no CAP_BPF/CAP_PERFMON, the usual case for a
production service) and no node agent is there, ``instrument()`` runs in
*sock_diag mode*: every ``sock_diag_interval`` seconds the reader thread asks
the kernel, over a ``NETLINK_SOCK_DIAG`` socket, for an ``inet_diag`` dump of
the TCP sockets (IPv4 and IPv6) of the process's own network namespace, each
with its ``struct tcp_info`` (``INET_DIAG_INFO``). It keeps only the sockets
whose inode is one of the process's file descriptors (``/proc/self/fd``), and
turns them into the same :class:`~otel_ebpf_flows._source.Snapshot` the eBPF
source produces, so metric names and attributes are the same; every point
carries ``ebpf_flows.source=sock_diag`` in addition (see :data:`MARKER`).
Neither the dump nor ``/proc/self/fd`` needs any privilege.

What it counts, per series (peer address and service port; a socket whose
local port is one of this process's listening ports is a ``server`` socket,
keyed by that port, anything else a ``client`` socket, keyed by the peer's
port):

- ``connection.attempts`` and ``connections.active``: a connection is counted
  once, when a dump first shows it established; it stops being active when a
  dump no longer shows it (closed, or its descriptor closed);
- ``retransmits``: growth of ``tcpi_total_retrans`` per socket (a passively
  opened socket's count includes its SYN-ACK retransmits);
- ``io``: growth of ``tcpi_bytes_acked`` / ``tcpi_bytes_received``;
- ``rtt``: ``tcpi_rtt``, one sample per connection per dump;
- ``window_scaling.disabled``: ``tcpi_options`` without ``TCPI_OPT_WSCALE``.

A socket that vanished keeps what it had counted: counters never go down.
What it cannot see, and so never emits (no invented zeros): connections
opened and closed between two dumps, what happens on a socket after its
descriptor is closed (the final FIN exchange), handshake durations, failed
connects, resets, close reasons and connection durations, zero windows,
listen overflows, and which thread used a connection (no span enrichment).

Why no library: pyroute2 (0.9.7), the well-kept netlink library, has
``DiagSocket``, but (measured on this project's machine) importing it takes
about 2 s and 24 MB of RSS (about 370 modules) inside the host application;
its ``get_sock_stats`` is marked as an unstable work in progress; it cannot
send an ``inet_diag`` bytecode filter; and its ``tcp_info`` decoder gets the
window-scale bitfields wrong. What is needed here is one request and one
fixed-layout reply, a little over a hundred lines of ``struct``.

Cost: one dump per interval is O(every TCP socket in the network namespace),
not O(this process's): the kernel cannot filter by owner. The request asks
only for the states that matter (no TIME_WAIT, SYN_RECV or CLOSE sockets,
usually the bulk on a busy host), and replies are skipped by inode before
their ``tcp_info`` is decoded. Measured in benchmarks/README.md.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import os
import socket
import struct
import sys
import time
from typing import Callable, Collection, Dict, FrozenSet, Iterator, List, Optional, Tuple

import attrs

from ._config import Config
from ._kernel import own_socket_inodes
from ._source import Counters, FlowEvent, FlowKey, ProbeStats, Role, Snapshot
from .exceptions import EbpfFlowsError, UnsupportedEnvironment

_log = logging.getLogger("otel_ebpf_flows")

MODE = "sock_diag"
#: The attribute every point of this mode carries.
SOURCE_ATTRIBUTE = "ebpf_flows.source"
MARKER = {SOURCE_ATTRIBUTE: MODE}

#: What this mode cannot see (for the log line, doctor and the docs).
CANNOT_SEE = (
    "connections opened and closed between two polls, handshake durations, failed connects, resets, "
    "close reasons and connection durations, zero windows, listen overflows, and span enrichment"
)

# netlink(7), sock_diag(7), linux/inet_diag.h
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
INET_DIAG_INFO = 2

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (48 bytes)
_REQ = struct.Struct("=BBBBI48x")
# inet_diag_msg: family, state, timer, retrans; sockid: sport, dport (big endian), src, dst,
# if, cookie[2]; then expires, rqueue, wqueue, uid, inode
_MSG = struct.Struct("=BBBB2s2s16s16sIII5I")
_RTATTR = struct.Struct("=HH")
_PORT = struct.Struct("!H")
_INODE = struct.Struct("=I")
# struct tcp_info: the fields used, at their offsets (linux/tcp.h; stable ABI)
_TCPI_OPTIONS = struct.Struct("=B")  # offset 5
_TCPI_RTT = struct.Struct("=I")  # offset 68, microseconds
_TCPI_TOTAL_RETRANS = struct.Struct("=I")  # offset 100
_TCPI_BYTES = struct.Struct("=QQ")  # offset 120: bytes_acked, bytes_received (Linux 4.1+)
TCP_INFO_MIN = 136
TCPI_OPT_WSCALE = 4

TCP_ESTABLISHED = 1
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_LISTEN = 10
TCP_CLOSING = 11
#: Only these states are dumped: a process's established (or closing) connections and
#: its listeners. TIME_WAIT and SYN_RECV sockets belong to no descriptor.
STATES = (TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_LISTEN, TCP_CLOSING)
STATE_MASK = sum(1 << s for s in STATES)

_RECV_BYTES = 1 << 16
_TIMEOUT_S = 2.0


class DiagError(EbpfFlowsError):
    """A sock_diag reply that cannot be read, or an error the kernel returned."""


@attrs.frozen
class TcpInfo:
    options: int
    rtt_us: int
    total_retrans: int
    bytes_acked: int
    bytes_received: int


@attrs.frozen
class DiagSocket:
    """One socket of an inet_diag reply."""

    family: int
    state: int
    local_port: int
    peer_port: int
    peer: str  # the peer's address as text; an IPv4-mapped IPv6 address as IPv4
    peer_family: str  # "ipv4" or "ipv6"
    inode: int
    cookie: int
    info: Optional[TcpInfo]


def request(family: int, seq: int, states: int = STATE_MASK) -> bytes:
    """An inet_diag dump request for TCP sockets of ``family`` with their tcp_info."""
    body = _REQ.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0, states)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


@functools.lru_cache(maxsize=4096)
def _peer(family: int, raw: bytes) -> Tuple[str, str]:
    """The peer's address as text, and its family; cached: the same few peers recur in every dump."""
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4])), "ipv4"
    if family != socket.AF_INET6:
        raise DiagError(f"inet_diag message of address family {family}")
    address = ipaddress.IPv6Address(raw)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped), "ipv4"
    return str(address), "ipv6"


def parse_tcp_info(data: bytes) -> TcpInfo:
    if len(data) < TCP_INFO_MIN:
        raise DiagError(f"tcp_info of {len(data)} bytes, fewer than the {TCP_INFO_MIN} needed (Linux 4.1+)")
    acked, received = _TCPI_BYTES.unpack_from(data, 120)
    return TcpInfo(options=_TCPI_OPTIONS.unpack_from(data, 5)[0], rtt_us=_TCPI_RTT.unpack_from(data, 68)[0],
                   total_retrans=_TCPI_TOTAL_RETRANS.unpack_from(data, 100)[0],
                   bytes_acked=acked, bytes_received=received)


def parse_inet_diag(payload: bytes) -> DiagSocket:
    """One inet_diag_msg and its attributes (the payload of a SOCK_DIAG_BY_FAMILY message)."""
    if len(payload) < _MSG.size:
        raise DiagError(f"inet_diag message of {len(payload)} bytes, fewer than {_MSG.size}")
    (family, state, _timer, _retrans, sport, dport, _src, dst, _ifindex, cookie_lo, cookie_hi,
     _expires, _rqueue, _wqueue, _uid, inode) = _MSG.unpack_from(payload)
    peer, peer_family = _peer(family, dst)
    info: Optional[TcpInfo] = None
    offset = _MSG.size
    while offset + _RTATTR.size <= len(payload):
        length, kind = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size or offset + length > len(payload):
            raise DiagError(f"inet_diag attribute of length {length} at offset {offset} of {len(payload)}")
        if kind == INET_DIAG_INFO:
            info = parse_tcp_info(payload[offset + _RTATTR.size:offset + length])
        offset += (length + 3) & ~3
    return DiagSocket(family=family, state=state, local_port=_PORT.unpack(sport)[0],
                      peer_port=_PORT.unpack(dport)[0], peer=peer, peer_family=peer_family,
                      inode=inode, cookie=cookie_lo | cookie_hi << 32, info=info)


def parse_messages(data: bytes, seq: int,
                   inodes: Optional[Collection[int]] = None) -> Tuple[List[DiagSocket], bool]:
    """The sockets in one netlink read, and whether the dump ended (NLMSG_DONE).

    With ``inodes``, only sockets whose inode is among them are decoded.
    Messages of another sequence number (a stale dump) are skipped. A truncated
    or malformed message, or an error reply, raises :class:`DiagError`.
    """
    out: List[DiagSocket] = []
    offset = 0
    while offset < len(data):
        if offset + _NLMSGHDR.size > len(data):
            raise DiagError(f"netlink header truncated at offset {offset} of {len(data)}")
        start = offset
        length, kind, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise DiagError(f"netlink message of length {length} at offset {offset} of {len(data)}")
        offset += (length + 3) & ~3
        if msg_seq != seq:
            continue
        if inodes is not None and kind == SOCK_DIAG_BY_FAMILY and length >= _NLMSGHDR.size + _MSG.size:
            # most replies are other processes' sockets: skip them before copying anything
            if _INODE.unpack_from(data, start + _NLMSGHDR.size + _MSG.size - 4)[0] not in inodes:
                continue
        payload = data[start + _NLMSGHDR.size:start + length]
        if kind == NLMSG_DONE:
            return out, True
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else errno.EPROTO
            if not 0 < code < 4096:
                raise DiagError(f"netlink error reply with error code {-code}")
            raise DiagError(f"the kernel answered the inet_diag request with {errno.errorcode.get(code, code)}: "
                            f"{os.strerror(code)}")
        if kind != SOCK_DIAG_BY_FAMILY:
            raise DiagError(f"unexpected netlink message type {kind}")
        out.append(parse_inet_diag(payload))
    return out, False


class Dumper:
    """A NETLINK_SOCK_DIAG socket, opened on first use and reopened after an error."""

    def __init__(self) -> None:
        self._sock: Optional[socket.socket] = None
        self._seq = 0
        self._buf = bytearray(_RECV_BYTES)

    def dump(self, inodes: Optional[Collection[int]] = None) -> List[DiagSocket]:
        """Every TCP socket (IPv4 and IPv6) of this network namespace in :data:`STATES` (of ``inodes``)."""
        try:
            return [s for family in (socket.AF_INET, socket.AF_INET6) for s in self._dump(family, inodes)]
        except (OSError, DiagError) as exc:
            self.close()  # a half-read dump must not be read as the next one
            if isinstance(exc, DiagError):
                raise
            raise DiagError(f"sock_diag dump failed: {exc}") from exc

    def _dump(self, family: int, inodes: Optional[Collection[int]]) -> Iterator[DiagSocket]:
        sock = self._sock
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
            sock.settimeout(_TIMEOUT_S)  # never wait forever on the reader thread
            self._sock = sock
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        sock.sendto(request(family, self._seq), (0, 0))
        view = memoryview(self._buf)
        while True:
            n, _anc, flags, _addr = sock.recvmsg_into([view])
            if flags & socket.MSG_TRUNC:
                raise DiagError(f"a sock_diag reply did not fit {len(self._buf)} bytes")
            if n == 0:
                raise DiagError("the sock_diag socket was closed mid-dump")
            found, done = parse_messages(bytes(view[:n]), self._seq, inodes)
            yield from found
            if done:
                return

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def payload_bytes(info: TcpInfo, state: int, active_open: bool) -> Tuple[int, int]:
    """(payload bytes acknowledged, payload bytes received): tcp_info's counts without SYN and FIN.

    ``tcpi_bytes_acked`` counts the sequence number of an actively opened
    socket's SYN, and of our FIN once acknowledged (FIN_WAIT2);
    ``tcpi_bytes_received`` counts the peer's FIN (CLOSE_WAIT, LAST_ACK, CLOSING).
    """
    acked = info.bytes_acked - (1 if active_open else 0) - (1 if state == TCP_FIN_WAIT2 else 0)
    received = info.bytes_received - (1 if state in (TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING) else 0)
    return max(0, acked), max(0, received)


@attrs.define
class _Conn:
    key: FlowKey
    retrans: int
    acked: int
    received: int


@attrs.define
class _Totals:
    attempts_ok: int = 0
    established: int = 0
    closed: int = 0
    retransmits: int = 0
    bytes_transmitted: int = 0
    bytes_received: int = 0
    window_scaling_disabled: int = 0

    def counters(self) -> Counters:
        return Counters(**attrs.asdict(self))


class SockDiagSource:
    """This process's TCP connections from sock_diag dumps (see the module docstring).

    ``inherited``: socket inodes a forked child got from its parent, which the
    parent goes on counting (listeners among them still tell roles apart).
    ``why``: why the eBPF probes are not used, for the log line.
    """

    mode = MODE
    variant = MODE

    def __init__(self, config: Optional[Config] = None, inherited: Optional[Collection[int]] = None,
                 why: str = "", inodes: Callable[[], Collection[int]] = own_socket_inodes) -> None:
        self.config = config or Config()
        self.why = why
        self._inherited: FrozenSet[int] = frozenset(inherited or ())
        self._inodes = inodes
        self._dumper = Dumper()
        self._conns: Dict[int, _Conn] = {}  # socket cookie -> what was counted of it
        self._totals: Dict[FlowKey, _Totals] = {}
        self._on_event: Callable[[FlowEvent], None] = lambda e: None
        self._failed_dumps = 0
        self._started = False

    def start(self, on_event: Callable[[FlowEvent], None]) -> None:
        """First dump: connections open now are adopted (counted from now on, not as attempts)."""
        if not sys.platform.startswith("linux") or not hasattr(socket, "AF_NETLINK"):
            raise UnsupportedEnvironment("sock_diag needs Linux (netlink)")
        self._on_event = on_event
        try:
            self._update(adopt=True)
        except DiagError as exc:
            self._dumper.close()
            raise UnsupportedEnvironment(f"the sock_diag fallback cannot read this network namespace's "
                                         f"TCP sockets: {exc}") from None
        self._started = True

    def poll(self, timeout_s: float) -> None:
        """Nothing is pushed: everything is read by :meth:`sample`."""

    def sample(self) -> Snapshot:
        if self._started:
            try:
                self._update(adopt=False)
            except DiagError as exc:
                self._failed_dumps += 1
                if self._failed_dumps == 1:
                    _log.warning("otel-ebpf-flows: %s; counted in ebpf_flows.probe.events.lost"
                                 "{ebpf_flows.probe.name=sock_diag.dump}, retrying every poll", exc)
        return Snapshot(counters={k: t.counters() for k, t in self._totals.items()},
                        probes=ProbeStats(events_lost={"sock_diag.dump": self._failed_dumps}))

    def close(self) -> None:
        self._started = False
        self._dumper.close()

    def _update(self, adopt: bool) -> None:
        mine = set(self._inodes())
        found = self._dumper.dump(mine)
        listening = {s.local_port for s in found if s.state == TCP_LISTEN}
        now_ns = time.monotonic_ns()
        seen = set()
        for s in found:
            if s.state == TCP_LISTEN or s.info is None or s.inode in self._inherited:
                continue
            seen.add(s.cookie)
            conn = self._conns.get(s.cookie)
            info = s.info
            if conn is None:
                server = s.local_port in listening
                key = FlowKey(role=Role.SERVER if server else Role.CLIENT, address=s.peer,
                              port=s.local_port if server else s.peer_port, family=s.peer_family)
                totals = self._totals.setdefault(key, _Totals())
                totals.established += 1
                if adopt:  # opened before instrument(): count what happens from now on
                    conn = _Conn(key, info.total_retrans, *payload_bytes(info, s.state, not server))
                else:
                    conn = _Conn(key, 0, 0, 0)
                    totals.attempts_ok += 1
                    if not info.options & TCPI_OPT_WSCALE:
                        totals.window_scaling_disabled += 1
                self._conns[s.cookie] = conn
            totals = self._totals[conn.key]
            acked, received = payload_bytes(info, s.state, conn.key.role is Role.CLIENT)
            totals.retransmits += max(0, info.total_retrans - conn.retrans)
            totals.bytes_transmitted += max(0, acked - conn.acked)
            totals.bytes_received += max(0, received - conn.received)
            conn.retrans = max(conn.retrans, info.total_retrans)
            conn.acked = max(conn.acked, acked)
            conn.received = max(conn.received, received)
            if info.rtt_us:
                self._on_event(FlowEvent(kind="rtt", key=conn.key, ts_ns=now_ns, duration_s=0.0,
                                         srtt_s=info.rtt_us / 1e6))
        for cookie in [c for c in self._conns if c not in seen]:
            self._totals[self._conns.pop(cookie).key].closed += 1
