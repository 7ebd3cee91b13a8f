"""The node agent's span protocol: one Unix stream socket, length-prefixed JSON frames.

Every frame, in both directions, is a 6-byte header and a payload::

    version  u8   PROTOCOL_VERSION (1); a frame of another version is refused
    type     u8   what the frame is (below)
    length   u32  big-endian byte length of the payload, at most MAX_PAYLOAD
    payload       a UTF-8 JSON object

Requests (client -> agent) and their replies (agent -> client):

``HELLO`` {}  ->  ``WELCOME`` {"pid": P, "tracks_threads": bool}
    The agent starts following the connections of the peer's process (P, as the
    agent's pid namespace sees it) for span enrichment, and returns once it does.
``DRAIN`` {}  ->  ``EVENTS`` {"events": [EVENT, ...], "lost": N}
    The span-enrichment records of the peer's process since this connection's last
    DRAIN (per-connection queue, bounded; ``lost`` counts records it had to drop).
``THREADS`` {"tid": T}  ->  ``SLOTS`` {"slots": [[conn_id, last_ns, srtt_us], ...]}
    The connections thread T of the peer's process used lately. T is the thread id
    as the client sees it (its own pid namespace); a thread of another process gets
    an empty list.
Any request  ->  ``ERROR`` {"error": "text"} when the agent cannot serve it.

Who the peer is comes from the kernel (SO_PEERCRED), never from the payload: a
request that names another pid is served for the sender's own process. An EVENT
is a JSON array mirroring :class:`~otel_ebpf_flows._source.FlowEvent`::

    [kind, role, address, port, family, ts_ns, duration_s, srtt_s, tid, conn_id,
     peer_port, direction, count, adopted]

Only the span-enrichment kinds (``CONN_EVENT_KINDS``) travel. Timestamps are
CLOCK_MONOTONIC, which every process of a host (outside time namespaces) shares.
A frame that is truncated, too long, not JSON or not of the expected shape
raises :class:`ProtocolError`; readers never trust a length without the bound.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any, Dict, List, Optional, Tuple

from ._source import CONN_EVENT_KINDS, FlowEvent, FlowKey, Role
from .exceptions import EbpfFlowsError

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">BBI")
MAX_PAYLOAD = 8 << 20

HELLO = 1
DRAIN = 2
THREADS = 3
WELCOME = 0x81
EVENTS = 0x82
SLOTS = 0x83
ERROR = 0xFF
REQUESTS = frozenset({HELLO, DRAIN, THREADS})
REPLIES = frozenset({WELCOME, EVENTS, SLOTS, ERROR})


class ProtocolError(EbpfFlowsError, ValueError):
    """A frame that is not a well-formed frame of this protocol."""


def encode_frame(kind: int, payload: Dict[str, Any]) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    if len(body) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(body)} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    return HEADER.pack(PROTOCOL_VERSION, kind, len(body)) + body


def decode_header(header: bytes) -> Tuple[int, int]:
    """(type, payload length) of a frame header; ProtocolError if it cannot be one."""
    if len(header) != HEADER.size:
        raise ProtocolError(f"truncated header ({len(header)} of {HEADER.size} bytes)")
    version, kind, length = HEADER.unpack(header)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version}, expected {PROTOCOL_VERSION}")
    if kind not in REQUESTS and kind not in REPLIES:
        raise ProtocolError(f"unknown frame type {kind:#x}")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame length {length} exceeds the {MAX_PAYLOAD}-byte limit")
    return kind, length


def decode_payload(body: bytes) -> Dict[str, Any]:
    try:
        payload = json.loads(body.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ProtocolError(f"payload is a {type(payload).__name__}, expected an object")
    return payload


def decode_frame(data: bytes) -> Tuple[int, Dict[str, Any]]:
    """One whole frame (exactly) from bytes."""
    kind, length = decode_header(data[: HEADER.size])
    body = data[HEADER.size:]
    if len(body) != length:
        raise ProtocolError(f"frame says {length} payload bytes, has {len(body)}")
    return kind, decode_payload(body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if not buf:
                raise EOFError("connection closed")
            raise ProtocolError(f"connection closed mid-frame ({len(buf)} of {n} bytes)")
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket) -> Tuple[int, Dict[str, Any]]:
    """The next frame on ``sock`` (EOFError on a clean close between frames)."""
    kind, length = decode_header(_recv_exactly(sock, HEADER.size))
    body = _recv_exactly(sock, length) if length else b""
    return kind, decode_payload(body)


# -- events -----------------------------------------------------------------------------


def encode_event(e: FlowEvent) -> List[Any]:
    return [e.kind, e.key.role.value, e.key.address, e.key.port, e.key.family, e.ts_ns, e.duration_s,
            e.srtt_s, e.tid, e.conn_id, e.peer_port, e.direction, e.count, e.adopted]


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ProtocolError(f"{what} is {v!r}, expected a whole number >= 0")
    return v


def _num(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ProtocolError(f"{what} is {v!r}, expected a number")
    return float(v)


def _opt_str(v: Any, what: str) -> Optional[str]:
    if v is not None and not isinstance(v, str):
        raise ProtocolError(f"{what} is {v!r}, expected text or null")
    return v


def decode_event(row: Any) -> FlowEvent:
    if not isinstance(row, list) or len(row) != 14:
        raise ProtocolError(f"an event is a 14-element array, got {str(row)[:80]}")
    (kind, role, address, port, family, ts_ns, duration_s, srtt_s, tid, conn_id, peer_port, direction,
     count, adopted) = row
    if kind not in CONN_EVENT_KINDS:
        raise ProtocolError(f"event kind {kind!r} is not a span-enrichment kind")
    try:
        role_v = Role(role)
    except ValueError:
        raise ProtocolError(f"role {role!r} is not client or server") from None
    if not isinstance(family, str) or not isinstance(adopted, bool):
        raise ProtocolError(f"family {family!r} or adopted {adopted!r} has the wrong type")
    return FlowEvent(
        kind=kind, key=FlowKey(role_v, _opt_str(address, "address"), _int(port, "port"), family),
        ts_ns=_int(ts_ns, "ts_ns"), duration_s=_num(duration_s, "duration_s"),
        srtt_s=None if srtt_s is None else _num(srtt_s, "srtt_s"), tid=_int(tid, "tid"),
        conn_id=_int(conn_id, "conn_id"), peer_port=_int(peer_port, "peer_port"),
        direction=_opt_str(direction, "direction"), count=_int(count, "count"), adopted=adopted,
    )


def decode_events(payload: Dict[str, Any]) -> Tuple[List[FlowEvent], int]:
    rows = payload.get("events")
    if not isinstance(rows, list):
        raise ProtocolError("EVENTS without an events array")
    return [decode_event(r) for r in rows], _int(payload.get("lost", 0), "lost")


def decode_slots(payload: Dict[str, Any]) -> List[Tuple[int, int, int]]:
    rows = payload.get("slots")
    if not isinstance(rows, list):
        raise ProtocolError("SLOTS without a slots array")
    out = []
    for r in rows:
        if not isinstance(r, list) or len(r) != 3:
            raise ProtocolError(f"a slot is [conn_id, last_ns, srtt_us], got {str(r)[:80]}")
        out.append((_int(r[0], "conn_id"), _int(r[1], "last_ns"), _int(r[2], "srtt_us")))
    return out
