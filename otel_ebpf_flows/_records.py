"""The kernel's records, mirrored once from ``bpf/tcp_flows.h``, and their decoding.

The ctypes mirrors are checked against the BTF of the shipped object by
``tests/unit/test_records.py`` so the two sides cannot drift. Decoding turns raw
bytes into the frozen value types of :mod:`otel_ebpf_flows._source`, and rejects
what cannot be a record (wrong size, unknown kind, bad family) with
:class:`RecordError` instead of guessing.
"""

from __future__ import annotations

import ctypes
import ipaddress
import struct
from typing import Dict, List, Optional, Sequence, Tuple

from ._source import (
    CLOSE_REASONS,
    CONN_EVENT_KINDS,
    CONNECT_ERRORS,
    Counters,
    FlowEvent,
    FlowKey,
    Role,
)
from .exceptions import EbpfFlowsError

FLOW_ROLE_CLIENT = 1
FLOW_ROLE_SERVER = 2
FLOW_FAMILY_IPV4 = 4
FLOW_FAMILY_IPV6 = 6
FLOW_FAMILY_OVERFLOW = 0

CONN_ERR_MAX = 6
CLOSE_MAX = 5

FLOW_EVENT_HANDSHAKE = 1
FLOW_EVENT_CLOSE = 2
FLOW_EVENT_RTT = 3
FLOW_EVENT_CONN = 4
FLOW_EVENT_RETRANSMIT = 5
FLOW_EVENT_RESET = 6
FLOW_EVENT_ZERO_WINDOW = 7
FLOW_EVENT_GONE = 8

FLOW_DIR_TRANSMIT = 0
FLOW_DIR_RECEIVE = 1

STAT_EVENTS_LOST = 0
STAT_SOCKS_FULL = 1
STAT_FLOWS_FOLDED = 2
STAT_SYN_WAIT_MISSED = 3
STAT_LISTENERS_FULL = 4
STAT_CONN_EVENTS_LOST = 5
STAT_RETRANS_UNSEEN = 6
STAT_HANDSHAKE_UNSEEN = 7
STAT_SYNACKS_FULL = 8
STAT_CHILD_DISCARDED = 9
STAT_CLOSE_UNSEEN = 10
STAT_HISTS_FOLDED = 11
STAT_MAX = 12

# enum hist_id: histograms the kernel can aggregate itself (the hists map)
HIST_HANDSHAKE = 0
HIST_DURATION = 1
HIST_RTT = 2
HIST_MAX = 3
HIST_MODE_HANDSHAKE = 1 << 0
HIST_MODE_CLOSE = 1 << 1
HIST_MODE_AUDIT = 1 << 2  # the records as well (reconciliation)
HIST_BOUNDS_MAX = 31
HIST_BUCKETS = HIST_BOUNDS_MAX + 1
HIST_NO_BOUND = (1 << 63) - 1  # an unused bound: the kernel counts the bounds below a value

# enum hook_id: the TCP hooks, in _kernel.HOOKS order (all but HOOK_PROBE have a nested copy)
HOOK_SET_STATE = 0
HOOK_DESTROY_SOCK = 1
HOOK_RETRANSMIT_SKB = 2
HOOK_RETRANSMIT_SYNACK = 3
HOOK_SEND_RESET = 4
HOOK_RECEIVE_RESET = 5
HOOK_PROBE = 6
HOOK_MAX = 7

THREAD_SLOTS = 16

# sock_state.flags (those user space reads)
SF_ESTABLISHED = 1 << 4
SF_LISTENER = 1 << 5
SF_CLOSED = 1 << 6
SF_PENDING = 1 << 9

_U64 = ctypes.c_uint64


class RecordError(EbpfFlowsError, ValueError):
    """Bytes from the kernel that are not a valid record."""


class CFlowKey(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("role", ctypes.c_uint8),
    ]


class CFlowCounters(ctypes.Structure):
    _fields_ = [
        ("attempts_ok", _U64),
        ("attempts_failed", _U64 * CONN_ERR_MAX),
        ("adopted", _U64),
        ("closed", _U64),
        ("closes", _U64 * CLOSE_MAX),
        ("retrans_segs", _U64),
        ("bytes_acked", _U64),
        ("bytes_received", _U64),
        ("resets_sent", _U64),
        ("resets_received", _U64),
        ("zero_window_rx", _U64),
        ("zero_window_tx", _U64),
        ("wscale_disabled", _U64),
        ("listen_overflows", _U64),
    ]


class CFlowEvent(ctypes.Structure):
    _fields_ = [
        ("key", CFlowKey),
        ("kind", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("peer_port", ctypes.c_uint16),
        ("srtt_us", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("ts_ns", _U64),
        ("duration_ns", _U64),
        ("conn_id", _U64),
    ]


class CSynackKey(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("peer_port", ctypes.c_uint16),
        ("local_port", ctypes.c_uint16),
        ("netns", ctypes.c_uint32),
    ]


class CSynackCount(ctypes.Structure):
    _fields_ = [
        ("last_ns", _U64),
        ("segs", ctypes.c_uint32),
        ("__pad0", ctypes.c_uint32),
    ]


class CThreadSlot(ctypes.Structure):
    _fields_ = [
        ("conn_id", _U64),
        ("last_ns", _U64),
        ("srtt_us", ctypes.c_uint32),
        ("__pad0", ctypes.c_uint32),
    ]


class CThreadConns(ctypes.Structure):
    _fields_ = [("slot", CThreadSlot * THREAD_SLOTS)]


#: struct thread_slot as one precompiled layout (conn_id, last_ns, srtt_us, __pad0)
THREAD_SLOT = struct.Struct("=QQII")

class CSockState(ctypes.Structure):
    _fields_ = [
        ("key", CFlowKey),
        ("flags", ctypes.c_uint16),
        ("err", ctypes.c_uint8),
        ("__pad0", ctypes.c_uint8),
        ("tid", ctypes.c_uint32),
        ("drops", ctypes.c_uint32),
        ("conn_id", _U64),
        ("start_ns", _U64),
        ("established_ns", _U64),
        ("closed_ns", _U64),
        ("bytes_acked", _U64),
        ("bytes_received", _U64),
        ("retrans_segs", _U64),
        ("last_rtt_ns", _U64),
        ("srtt_us", ctypes.c_uint32),
        ("last_tid", ctypes.c_uint32),
        ("handshake_ns", _U64),
        ("peer_port", ctypes.c_uint16),
        ("slot", ctypes.c_uint8),
        ("__pad1", ctypes.c_uint8),
        ("netns", ctypes.c_uint32),
        ("seen_ns", _U64),
        ("conn_later", ctypes.c_uint32),
        ("__pad2", ctypes.c_uint32),
    ]


class CHistBounds(ctypes.Structure):
    _fields_ = [("bound", _U64 * HIST_BOUNDS_MAX)]


class CHistExtremes(ctypes.Structure):
    _fields_ = [
        ("gen", _U64),
        ("min", _U64),
        ("max", _U64),
    ]


class CHistValue(ctypes.Structure):
    _fields_ = [
        ("sum", _U64),
        ("ext", CHistExtremes * 2),
        ("buckets", ctypes.c_uint32 * HIST_BUCKETS),
    ]


class CHistSet(ctypes.Structure):
    _fields_ = [("hist", CHistValue * HIST_MAX)]


#: struct hist_value as one layout: sum, then (gen, min, max) twice, then the bucket counts
HIST_VALUE = struct.Struct(f"=Q6Q{HIST_BUCKETS}I")


# name -> (ctypes mirror, C struct name) for the BTF cross-check
MIRRORS: Dict[str, Tuple[type, str]] = {
    "flow_key": (CFlowKey, "flow_key"),
    "flow_counters": (CFlowCounters, "flow_counters"),
    "flow_event": (CFlowEvent, "flow_event"),
    "thread_slot": (CThreadSlot, "thread_slot"),
    "thread_conns": (CThreadConns, "thread_conns"),
    "sock_state": (CSockState, "sock_state"),
    "synack_key": (CSynackKey, "synack_key"),
    "synack_count": (CSynackCount, "synack_count"),
    "hist_bounds": (CHistBounds, "hist_bounds"),
    "hist_set": (CHistSet, "hist_set"),
    "hist_extremes": (CHistExtremes, "hist_extremes"),
    "hist_value": (CHistValue, "hist_value"),
}

_V4_PREFIX = bytes(10) + b"\xff\xff"

_EVENT_KINDS = {
    FLOW_EVENT_HANDSHAKE: "handshake",
    FLOW_EVENT_CLOSE: "close",
    FLOW_EVENT_RTT: "rtt",
    FLOW_EVENT_CONN: "conn",
    FLOW_EVENT_RETRANSMIT: "retransmit",
    FLOW_EVENT_RESET: "reset",
    FLOW_EVENT_ZERO_WINDOW: "zero_window",
    FLOW_EVENT_GONE: "gone",
}
_DIRECTIONS = {FLOW_DIR_TRANSMIT: "transmit", FLOW_DIR_RECEIVE: "receive"}


def overflow_key(role: int) -> CFlowKey:
    """The reserved key the kernel counts into once the flows map is full."""
    key = CFlowKey()
    key.family = FLOW_FAMILY_OVERFLOW
    key.role = role
    return key


def decode_key(raw: CFlowKey) -> FlowKey:
    return decode_key_bytes(bytes(raw))


_KEY = struct.Struct("=16sHBB")  # struct flow_key: native byte order, no padding
KEY_SIZE = _KEY.size
#: Decoded keys by their raw bytes: the same few peers recur in every record, and
#: a FlowKey is immutable. Cleared when it reaches this size (a scan of many peers).
KEY_CACHE_SIZE = 8192
_key_cache: Dict[bytes, FlowKey] = {}


def decode_key_bytes(raw: bytes) -> FlowKey:
    """A flow key from its raw bytes (``struct flow_key``); cached by those bytes."""
    key = _key_cache.get(raw)
    if key is None:
        key = _decode_key(raw)  # raises before anything is cached
        if len(_key_cache) >= KEY_CACHE_SIZE:
            _key_cache.clear()
        _key_cache[raw] = key
    return key


def _decode_key(raw: bytes) -> FlowKey:
    if len(raw) != KEY_SIZE:
        raise RecordError(f"flow key of {len(raw)} bytes, expected {KEY_SIZE}")
    addr, port, family, raw_role = _KEY.unpack(raw)
    if raw_role == FLOW_ROLE_CLIENT:
        role = Role.CLIENT
    elif raw_role == FLOW_ROLE_SERVER:
        role = Role.SERVER
    else:
        raise RecordError(f"flow key with unknown role {raw_role}")
    if family in (FLOW_FAMILY_IPV4, FLOW_FAMILY_IPV6):
        return FlowKey(role=role, address=_address_text(family, addr), port=port,
                       family="ipv4" if family == FLOW_FAMILY_IPV4 else "ipv6")
    if family == FLOW_FAMILY_OVERFLOW:
        if port == 0:  # what no longer fitted in the kernel's map
            return FlowKey(role=role, address=None, port=0, family="")
        if role is not Role.SERVER or any(addr):
            raise RecordError("listener key with a peer address or a client role")
        return FlowKey(role=role, address="", port=port, family="")
    raise RecordError(f"flow key with unknown family {family}")


def _address_text(family: int, addr: bytes) -> str:
    if family == FLOW_FAMILY_IPV4:
        if not addr.startswith(_V4_PREFIX):
            raise RecordError("IPv4 flow key without an IPv4-mapped address")
        return str(ipaddress.IPv4Address(addr[12:]))
    return str(ipaddress.IPv6Address(addr))


def decode_counters(raw: CFlowCounters) -> Counters:
    return Counters(
        attempts_ok=raw.attempts_ok,
        attempts_failed=dict(zip(CONNECT_ERRORS, (int(v) for v in raw.attempts_failed))),
        established=raw.attempts_ok + raw.adopted,
        closed=raw.closed,
        closes=dict(zip(CLOSE_REASONS, (int(v) for v in raw.closes))),
        retransmits=raw.retrans_segs,
        bytes_transmitted=raw.bytes_acked,
        bytes_received=raw.bytes_received,
        resets_sent=raw.resets_sent,
        resets_received=raw.resets_received,
        zero_window_receive=raw.zero_window_rx,
        zero_window_transmit=raw.zero_window_tx,
        window_scaling_disabled=raw.wscale_disabled,
        listen_overflows=raw.listen_overflows,
    )


EVENT_SIZE = ctypes.sizeof(CFlowEvent)
#: struct flow_event as one precompiled layout: the key's raw bytes, kind,
#: reason, peer_port, srtt_us, tid, ts_ns, duration_ns, conn_id.
EVENT = struct.Struct("=20sBBHIIQQQ")
_CLOSE_REASON_COUNT = len(CLOSE_REASONS)


def decode_event(data: bytes) -> FlowEvent:
    if len(data) != EVENT_SIZE:
        raise RecordError(f"flow event of {len(data)} bytes, expected {EVENT_SIZE}")
    raw_key, raw_kind, raw_reason, peer_port, srtt_us, tid, ts_ns, duration_ns, conn_id = EVENT.unpack(data)
    kind = _EVENT_KINDS.get(raw_kind)
    if kind is None:
        raise RecordError(f"flow event of unknown kind {raw_kind}")
    if kind in CONN_EVENT_KINDS:
        _, conn_id, key, peer_port, ts_ns, duration_s, srtt_s, direction, count, adopted, _, _ = _conn_record(
            kind, raw_key, raw_reason, peer_port, srtt_us, tid, ts_ns, duration_ns, conn_id)
        return FlowEvent(kind=kind, key=key, ts_ns=ts_ns, duration_s=duration_s, srtt_s=srtt_s,
                         close_reason=None, tid=tid, conn_id=conn_id, peer_port=peer_port,
                         direction=direction, count=count, adopted=adopted)
    reason = None
    if kind == "close":
        if raw_reason >= _CLOSE_REASON_COUNT:
            raise RecordError(f"close event with unknown reason {raw_reason}")
        reason = CLOSE_REASONS[raw_reason]
    return FlowEvent(
        kind=kind,
        key=decode_key_bytes(raw_key),
        ts_ns=ts_ns,
        duration_s=duration_ns / 1e9,
        srtt_s=srtt_us / 1e6 if srtt_us else None,
        close_reason=reason,
        tid=tid,
        conn_id=conn_id,
        peer_port=peer_port,
    )


_METRIC_KINDS = {FLOW_EVENT_HANDSHAKE: "handshake", FLOW_EVENT_CLOSE: "close", FLOW_EVENT_RTT: "rtt"}
MetricRecord = Tuple[str, FlowKey, int, float, Optional[float], int]


#: Each kernel-aggregated histogram's kernel unit, as decode_metric() divides it: ns, ns, µs.
HIST_SCALE = {HIST_HANDSHAKE: 1e9, HIST_DURATION: 1e9, HIST_RTT: 1e6}

#: What one histogram of the hists map gained since the last read: (hist, key, bucket
#: counts, sum, min, max), the values in seconds; min and max None where unknown.
HistDelta = Tuple[int, FlowKey, Tuple[int, ...], float, Optional[float], Optional[float]]


def kernel_bounds(bounds: Sequence[float], scale: float) -> List[int]:
    """Bucket bounds in a kernel unit: for each bound b, the largest integer u with ``u / scale <= b``.

    A kernel value u then lands in bucket i (the first with ``u <= bound``) exactly
    when the SDK would put ``u / scale`` there (``bisect_left``: the first bound
    ``>= value``): division by a positive constant never reorders two values.
    """
    out = []
    for b in bounds:
        if not 0 <= b < HIST_NO_BOUND / scale:
            raise ValueError(f"histogram bound {b!r} cannot be a kernel bound")
        u = int(b * scale)
        while u / scale > b:
            u -= 1
        while (u + 1) / scale <= b:
            u += 1
        out.append(u)
    return out


def decode_metric(data: bytes) -> Optional[MetricRecord]:
    """A histogram record's (kind, key, ts_ns, duration_s, srtt_s, tid), without a FlowEvent.

    The reader's hot path: the same checks as :func:`decode_event` for the
    kinds that feed histograms (handshake, close, rtt); None for any other kind.
    """
    if len(data) != EVENT_SIZE:
        raise RecordError(f"flow event of {len(data)} bytes, expected {EVENT_SIZE}")
    raw_key, raw_kind, raw_reason, _, srtt_us, tid, ts_ns, duration_ns, _ = EVENT.unpack(data)
    kind = _METRIC_KINDS.get(raw_kind)
    if kind is None:
        return None
    if raw_kind == FLOW_EVENT_CLOSE and raw_reason >= _CLOSE_REASON_COUNT:
        raise RecordError(f"close event with unknown reason {raw_reason}")
    return kind, decode_key_bytes(raw_key), ts_ns, duration_ns / 1e9, srtt_us / 1e6 if srtt_us else None, tid


_CONN_KINDS = {k: v for k, v in _EVENT_KINDS.items() if v in CONN_EVENT_KINDS}
#: A CONN span record's reason (enum conn_reason): established, its handshake point (if any)
#: a HANDSHAKE record; established before span enrichment began; established, its handshake
#: point aggregated in the kernel's hists map (its exemplar is taken from this record).
CONN_ESTABLISHED, CONN_ADOPTED, CONN_HIST_IN_KERNEL = 0, 1, 2
#: A span-enrichment record as the span side takes it: (kind, conn_id, key, peer_port,
#: ts_ns, duration_s, srtt_s, direction, count, adopted, tid, hist_in_kernel) -- FlowEvent's
#: fields, no FlowEvent; the last: a CONN record whose handshake point is in the hists map.
ConnRecord = Tuple[str, int, FlowKey, int, int, float, Optional[float], Optional[str], int, bool, int, bool]


def decode_conn(data: bytes) -> Optional[ConnRecord]:
    """A span record (conn, retransmit, reset, zero_window, gone) as a :data:`ConnRecord`.

    The conn_events ring's hot path: the same checks as :func:`decode_event`,
    without building a FlowEvent; None for a kind that is not a span record.
    """
    if len(data) != EVENT_SIZE:
        raise RecordError(f"flow event of {len(data)} bytes, expected {EVENT_SIZE}")
    raw_key, raw_kind, raw_reason, peer_port, srtt_us, tid, ts_ns, duration_ns, conn_id = EVENT.unpack(data)
    kind = _CONN_KINDS.get(raw_kind)
    if kind is None:
        return None
    return _conn_record(kind, raw_key, raw_reason, peer_port, srtt_us, tid, ts_ns, duration_ns, conn_id)


def _conn_record(kind: str, raw_key: bytes, raw_reason: int, peer_port: int, srtt_us: int, tid: int,
                 ts_ns: int, duration_ns: int, conn_id: int) -> ConnRecord:
    """A span record's fields, checked (decode_conn and decode_event both come here)."""
    direction = None
    count = 0
    duration_s = duration_ns / 1e9
    if kind == "conn":
        if raw_reason > CONN_HIST_IN_KERNEL:
            raise RecordError(f"conn event with unknown reason {raw_reason}")
    elif kind == "reset" or kind == "zero_window":
        direction = _DIRECTIONS.get(raw_reason)
        if direction is None:
            raise RecordError(f"{kind} event with unknown direction {raw_reason}")
        count = 1
    elif kind == "retransmit":
        count, duration_s = duration_ns, 0.0
        if not 0 < count < 1 << 16:
            raise RecordError(f"retransmit event of {count} segments")
    if not conn_id:
        raise RecordError(f"{kind} event without a connection id")
    key = decode_key_bytes(raw_key)
    if not key.family:
        raise RecordError(f"{kind} event without a peer")
    return (kind, conn_id, key, peer_port, ts_ns, duration_s, srtt_us / 1e6 if srtt_us else None,
            direction, count, kind == "conn" and raw_reason == CONN_ADOPTED, tid,
            kind == "conn" and raw_reason == CONN_HIST_IN_KERNEL)


def decode_events(data: bytes) -> List[FlowEvent]:
    """Records written back to back (the iterator's output)."""
    if len(data) % EVENT_SIZE:
        raise RecordError(f"{len(data)} bytes is not a whole number of flow events")
    return [decode_event(data[i : i + EVENT_SIZE]) for i in range(0, len(data), EVENT_SIZE)]
