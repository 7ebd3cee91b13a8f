"""Kernel records: decoding, rejection of what cannot be a record, and the ctypes mirrors vs the BTF."""

from __future__ import annotations

import ctypes
import ipaddress
import os
import re
import shutil
import subprocess
from typing import Dict, List, Optional, Tuple

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_ebpf_flows import _records
from otel_ebpf_flows._records import (
    EVENT_SIZE,
    MIRRORS,
    CFlowCounters,
    CFlowEvent,
    CFlowKey,
    RecordError,
    decode_counters,
    decode_event,
    decode_events,
    decode_key,
)
from otel_ebpf_flows._source import FlowEvent, FlowKey, Role
from otel_ebpf_flows.exceptions import EbpfFlowsError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED_OBJECT = os.path.join(REPO, "otel_ebpf_flows", "bpf", "tcp_flows.bpf.o")
HEADER_DIR = os.path.join(REPO, "bpf")

CLIENT, SERVER = _records.FLOW_ROLE_CLIENT, _records.FLOW_ROLE_SERVER
V4, V6, OVERFLOW = _records.FLOW_FAMILY_IPV4, _records.FLOW_FAMILY_IPV6, _records.FLOW_FAMILY_OVERFLOW


def raw_key(addr: bytes = bytes(16), port: int = 0, family: int = 0, role: int = CLIENT) -> CFlowKey:
    key = CFlowKey()
    ctypes.memmove(key.addr, addr, 16)
    key.port, key.family, key.role = port, family, role
    return key


def mapped(v4: str) -> bytes:
    return bytes(10) + b"\xff\xff" + ipaddress.IPv4Address(v4).packed


def raw_event(
    key: Optional[CFlowKey] = None,
    kind: int = _records.FLOW_EVENT_HANDSHAKE,
    reason: int = 0,
    srtt_us: int = 0,
    tid: int = 0,
    ts_ns: int = 0,
    duration_ns: int = 0,
    conn_id: int = 0,
    peer_port: int = 0,
) -> bytes:
    event = CFlowEvent()
    event.peer_port = peer_port
    event.key = key if key is not None else raw_key(mapped("192.0.2.1"), 443, V4, CLIENT)
    event.kind, event.reason, event.srtt_us, event.tid = kind, reason, srtt_us, tid
    event.ts_ns, event.duration_ns, event.conn_id = ts_ns, duration_ns, conn_id
    return bytes(event)


# -- keys ---------------------------------------------------------------------------------------


def test_ipv4_mapped_key_is_an_ipv4_text_address():
    assert decode_key(raw_key(mapped("192.0.2.1"), 443, V4, CLIENT)) == FlowKey(
        role=Role.CLIENT, address="192.0.2.1", port=443, family="ipv4"
    )


def test_ipv6_key():
    addr = ipaddress.IPv6Address("2001:db8::42").packed
    assert decode_key(raw_key(addr, 8080, V6, SERVER)) == FlowKey(
        role=Role.SERVER, address="2001:db8::42", port=8080, family="ipv6"
    )


def test_ports_are_host_order_and_full_width():
    assert decode_key(raw_key(mapped("10.0.0.1"), 65535, V4, CLIENT)).port == 65535
    assert decode_key(raw_key(mapped("10.0.0.1"), 1, V4, CLIENT)).port == 1


@pytest.mark.parametrize("role", [CLIENT, SERVER])
def test_overflow_key_has_no_address(role):
    key = decode_key(raw_key(bytes(16), 0, OVERFLOW, role))
    assert key == FlowKey(
        role=Role.CLIENT if role == CLIENT else Role.SERVER, address=None, port=0, family=""
    )
    assert decode_key(_records.overflow_key(role)) == key


def test_listener_key_has_an_empty_address():
    assert decode_key(raw_key(bytes(16), 8080, OVERFLOW, SERVER)) == FlowKey(
        role=Role.SERVER, address="", port=8080, family=""
    )


@pytest.mark.parametrize(
    "key",
    [
        raw_key(bytes(16), 8080, OVERFLOW, CLIENT),  # a listener is a server
        raw_key(mapped("192.0.2.1"), 8080, OVERFLOW, SERVER),  # a listener has no peer
        raw_key(mapped("192.0.2.1"), 443, V4, 0),
        raw_key(mapped("192.0.2.1"), 443, V4, 3),
        raw_key(mapped("192.0.2.1"), 443, 2, CLIENT),  # AF_INET is not a FLOW_FAMILY
        raw_key(mapped("192.0.2.1"), 443, 10, CLIENT),
        raw_key(ipaddress.IPv6Address("2001:db8::1").packed, 443, V4, CLIENT),  # IPv4 but not mapped
    ],
    ids=["listener-client", "listener-address", "role-0", "role-3", "family-2", "family-10", "v4-unmapped"],
)
def test_bad_keys_raise_record_error(key):
    with pytest.raises(RecordError):
        decode_key(key)


def test_record_error_is_a_value_error_of_the_package():
    assert issubclass(RecordError, ValueError) and issubclass(RecordError, EbpfFlowsError)


# -- counters -----------------------------------------------------------------------------------


def test_counters_decode_field_by_field():
    raw = CFlowCounters()
    raw.attempts_ok, raw.adopted, raw.closed = 5, 2, 4
    for i in range(_records.CONN_ERR_MAX):
        raw.attempts_failed[i] = 10 + i
    for i in range(_records.CLOSE_MAX):
        raw.closes[i] = 20 + i
    raw.retrans_segs, raw.bytes_acked, raw.bytes_received = 30, 31, 32
    raw.resets_sent, raw.resets_received = 33, 34
    raw.zero_window_rx, raw.zero_window_tx, raw.wscale_disabled, raw.listen_overflows = 35, 36, 37, 38
    raw.listen_overflows = (1 << 64) - 1

    counters = decode_counters(raw)
    assert attrs.asdict(counters) == {
        "attempts_ok": 5,
        "attempts_failed": {
            "refused": 10,
            "timed_out": 11,
            "reset": 12,
            "host_unreachable": 13,
            "net_unreachable": 14,
            "_OTHER": 15,
        },
        "established": 7,  # handshakes completed + adopted
        "closed": 4,
        "closes": {"normal": 20, "reset_sent": 21, "reset_received": 22, "timeout": 23, "_OTHER": 24},
        "retransmits": 30,
        "bytes_transmitted": 31,
        "bytes_received": 32,
        "resets_sent": 33,
        "resets_received": 34,
        "zero_window_receive": 35,
        "zero_window_transmit": 36,
        "window_scaling_disabled": 37,
        "listen_overflows": (1 << 64) - 1,
    }
    for value in attrs.asdict(counters).values():
        assert all(type(v) is int for v in value.values()) if isinstance(value, dict) else type(value) is int


def test_the_kernel_enums_match_the_names():
    assert _records.CONN_ERR_MAX == 6 and _records.CLOSE_MAX == 5
    from otel_ebpf_flows._source import CLOSE_REASONS, CONNECT_ERRORS

    assert len(CONNECT_ERRORS) == _records.CONN_ERR_MAX
    assert len(CLOSE_REASONS) == _records.CLOSE_MAX
    with open(os.path.join(HEADER_DIR, "tcp_flows.h"), encoding="utf-8") as f:
        header = f.read()
    for i, name in enumerate(
        ["REFUSED", "TIMED_OUT", "RESET", "HOST_UNREACHABLE", "NET_UNREACHABLE", "OTHER"]
    ):
        assert re.search(rf"CONN_ERR_{name} = {i},", header), name
    for i, name in enumerate(["NORMAL", "RESET_SENT", "RESET_RECEIVED", "TIMEOUT", "OTHER"]):
        assert re.search(rf"CLOSE_{name} = {i},", header), name
    for name in (
        "FLOW_ROLE_CLIENT",
        "FLOW_ROLE_SERVER",
        "FLOW_FAMILY_IPV4",
        "FLOW_FAMILY_IPV6",
        "FLOW_FAMILY_OVERFLOW",
        "FLOW_EVENT_HANDSHAKE",
        "FLOW_EVENT_CLOSE",
        "FLOW_EVENT_RTT",
        "STAT_EVENTS_LOST",
        "STAT_SOCKS_FULL",
        "STAT_FLOWS_FOLDED",
        "STAT_SYN_WAIT_MISSED",
        "STAT_RETRANS_UNSEEN",
        "STAT_HANDSHAKE_UNSEEN",
        "STAT_SYNACKS_FULL",
        "STAT_CHILD_DISCARDED",
        "STAT_CLOSE_UNSEEN",
        "STAT_HISTS_FOLDED",
        "STAT_MAX",
        "HIST_HANDSHAKE",
        "HIST_DURATION",
        "HIST_RTT",
        "HIST_MAX",
        "HOOK_SET_STATE",
        "HOOK_DESTROY_SOCK",
        "HOOK_RETRANSMIT_SKB",
        "HOOK_RETRANSMIT_SYNACK",
        "HOOK_SEND_RESET",
        "HOOK_RECEIVE_RESET",
        "HOOK_PROBE",
        "HOOK_MAX",
    ):
        assert re.search(rf"\b{name}\b\s*=?\s*{getattr(_records, name)}\b", header), name
    for name in ("SF_ESTABLISHED", "SF_LISTENER", "SF_CLOSED", "SF_PENDING", "HIST_MODE_HANDSHAKE",
                 "HIST_MODE_CLOSE", "HIST_MODE_AUDIT"):
        bit = getattr(_records, name).bit_length() - 1
        assert re.search(rf"#define {name} \(1 << {bit}\)", header), name
    assert re.search(rf"#define HIST_BOUNDS_MAX {_records.HIST_BOUNDS_MAX}\b", header)


# -- events -------------------------------------------------------------------------------------


def test_event_size():
    assert EVENT_SIZE == ctypes.sizeof(CFlowEvent) == 56


def test_handshake_event():
    data = raw_event(
        kind=_records.FLOW_EVENT_HANDSHAKE, srtt_us=0, tid=1234, ts_ns=99, duration_ns=2_500_000, conn_id=7
    )
    assert decode_event(data) == FlowEvent(
        kind="handshake",
        key=FlowKey(role=Role.CLIENT, address="192.0.2.1", port=443, family="ipv4"),
        ts_ns=99,
        duration_s=0.0025,
        srtt_s=None,
        close_reason=None,
        tid=1234,
        conn_id=7,
    )


@pytest.mark.parametrize("reason", range(_records.CLOSE_MAX))
def test_close_event_reasons(reason):
    event = decode_event(
        raw_event(kind=_records.FLOW_EVENT_CLOSE, reason=reason, srtt_us=1500, duration_ns=3_000_000_000)
    )
    assert event.kind == "close"
    assert event.close_reason == ["normal", "reset_sent", "reset_received", "timeout", "_OTHER"][reason]
    assert event.srtt_s == pytest.approx(0.0015) and event.duration_s == 3.0


def test_rtt_event():
    key = raw_key(ipaddress.IPv6Address("2001:db8::9").packed, 8080, V6, SERVER)
    event = decode_event(raw_event(key=key, kind=_records.FLOW_EVENT_RTT, reason=200, srtt_us=42))
    assert (event.kind, event.srtt_s, event.close_reason) == ("rtt", pytest.approx(0.000042), None)
    assert event.key == FlowKey(role=Role.SERVER, address="2001:db8::9", port=8080, family="ipv6")


@pytest.mark.parametrize("size", [0, 1, EVENT_SIZE - 1, EVENT_SIZE + 1, 2 * EVENT_SIZE])
def test_events_of_the_wrong_size_raise(size):
    with pytest.raises(RecordError, match="bytes"):
        decode_event(bytes(size))


@pytest.mark.parametrize("kind", [0, 9, 255])
def test_events_of_unknown_kind_raise(kind):
    with pytest.raises(RecordError, match="kind"):
        decode_event(raw_event(kind=kind))


@pytest.mark.parametrize("reason", [_records.CLOSE_MAX, 7, 255])
def test_close_events_with_unknown_reason_raise(reason):
    with pytest.raises(RecordError, match="reason"):
        decode_event(raw_event(kind=_records.FLOW_EVENT_CLOSE, reason=reason))


def test_events_with_a_bad_key_raise():
    with pytest.raises(RecordError):
        decode_event(raw_event(key=raw_key(mapped("192.0.2.1"), 443, V4, 9)))


def test_events_back_to_back():
    a = raw_event(kind=_records.FLOW_EVENT_HANDSHAKE, conn_id=1)
    b = raw_event(kind=_records.FLOW_EVENT_RTT, srtt_us=10, conn_id=2)
    assert [e.conn_id for e in decode_events(a + b)] == [1, 2]
    assert decode_events(b"") == []
    with pytest.raises(RecordError, match="whole number"):
        decode_events(a + b[:-1])
    with pytest.raises(RecordError):
        decode_events(a + raw_event(kind=9))


# -- properties: whatever the bytes, a record or a RecordError ----------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=3 * EVENT_SIZE + 5))
def test_arbitrary_bytes_decode_or_raise_record_error(data):
    for decode in (decode_event, decode_events):
        try:
            decoded = decode(data)
        except RecordError:
            continue
        events = decoded if isinstance(decoded, list) else [decoded]
        assert all(isinstance(e, FlowEvent) for e in events)


@st.composite
def plausible_events(draw) -> bytes:
    """Records near the valid ones, so decoding gets past the size and kind checks."""
    key = raw_key(
        draw(
            st.one_of(
                st.just(bytes(16)),
                st.binary(min_size=16, max_size=16),
                st.builds(mapped, st.ip_addresses(v=4).map(str)),
            )
        ),
        draw(st.integers(0, 65535)),
        draw(st.sampled_from([0, 4, 6, 2, 10, 255])),
        draw(st.sampled_from([0, 1, 2, 3, 255])),
    )
    return raw_event(
        key=key,
        kind=draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 255])),
        reason=draw(st.integers(0, 255)),
        srtt_us=draw(st.integers(0, 2**32 - 1)),
        tid=draw(st.integers(0, 2**32 - 1)),
        ts_ns=draw(st.integers(0, 2**64 - 1)),
        duration_ns=draw(st.integers(0, 2**64 - 1)),
        conn_id=draw(st.integers(0, 2**64 - 1)),
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(plausible_events(), max_size=3))
def test_plausible_records_decode_or_raise_record_error(records):
    for data in records:
        try:
            event = decode_event(data)
        except RecordError:
            continue
        assert event.kind in ("handshake", "close", "rtt", "conn", "retransmit", "reset", "zero_window", "gone")
        assert (event.close_reason is not None) == (event.kind == "close")
        assert (event.direction is not None) == (event.kind in ("reset", "zero_window"))
        if event.kind in ("conn", "retransmit", "reset", "zero_window", "gone"):
            assert event.conn_id > 0 and event.key.family in ("ipv4", "ipv6")
        if event.kind == "retransmit":
            assert 0 < event.count < 1 << 16
        assert event.srtt_s is None or event.srtt_s > 0
        assert event.key.family in ("ipv4", "ipv6", "")
        if event.key.family:
            assert ipaddress.ip_address(event.key.address).version == (4 if event.key.family == "ipv4" else 6)
    try:
        decode_events(b"".join(records))
    except RecordError:
        pass


# -- the ctypes mirrors vs the BTF --------------------------------------------------------------


class BtfStructMissing(AssertionError):
    """The object's BTF has no struct of that name."""


_TYPE = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
_MEMBER = re.compile(r"^\s+'([^']*)' type_id=(\d+) bits_offset=(\d+)(?: bitfield_size=(\d+))?")


@attrs.frozen
class BtfType:
    kind: str
    name: str
    props: Dict[str, str]
    members: Tuple[Tuple[str, int, int, int], ...]  # (name, type id, bits offset, bitfield size)


def parse_btf(text: str) -> Dict[int, BtfType]:
    types: Dict[int, BtfType] = {}
    current: Optional[Tuple[int, str, str, Dict[str, str]]] = None
    members: List[Tuple[str, int, int, int]] = []

    def flush() -> None:
        if current is not None:
            tid, kind, name, props = current
            types[tid] = BtfType(kind=kind, name=name, props=props, members=tuple(members))

    for line in text.splitlines():
        m = _TYPE.match(line)
        if m:
            flush()
            props = dict(re.findall(r"(\w+)=(\S+)", m.group(4)))
            current, members = (int(m.group(1)), m.group(2), m.group(3), props), []
            continue
        m = _MEMBER.match(line)
        if m and current is not None and current[1] in ("STRUCT", "UNION"):
            members.append((m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4) or 0)))
    flush()
    return types


def btf_size(types: Dict[int, BtfType], tid: int) -> int:
    t = types[tid]
    if t.kind in ("INT", "STRUCT", "UNION", "ENUM", "ENUM64", "FLOAT", "DATASEC"):
        return int(t.props["size"])
    if t.kind in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
        return btf_size(types, int(t.props["type_id"].rstrip(",")))
    if t.kind == "ARRAY":
        return int(t.props["nr_elems"]) * btf_size(types, int(t.props["type_id"]))
    if t.kind == "PTR":
        return 8
    raise AssertionError(f"no size for BTF kind {t.kind}")


def btf_struct(types: Dict[int, BtfType], tid: int) -> Optional[BtfType]:
    t = types[tid]
    while t.kind in ("TYPEDEF", "CONST", "VOLATILE"):
        t = types[int(t.props["type_id"].rstrip(","))]
    return t if t.kind == "STRUCT" else None


def find_bpftool() -> Optional[str]:
    return shutil.which("bpftool") or next(
        (
            p
            for p in ("/usr/sbin/bpftool", "/usr/local/sbin/bpftool", "/sbin/bpftool")
            if os.access(p, os.X_OK)
        ),
        None,
    )


def dump_btf(path: str) -> Dict[int, BtfType]:
    bpftool = find_bpftool()
    if bpftool is None:
        pytest.skip("bpftool is not installed (apt-get install bpftool); it reads the BTF of the objects")
    out = subprocess.run(
        [bpftool, "btf", "dump", "file", path, "format", "raw"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return parse_btf(out.stdout)


def check_mirror(types: Dict[int, BtfType], mirror_name: str) -> None:
    mirror, c_name = MIRRORS[mirror_name]
    structs = [(tid, t) for tid, t in types.items() if t.kind == "STRUCT" and t.name == c_name]
    if not structs:
        raise BtfStructMissing(f"struct {c_name} is not in the BTF")
    assert len(structs) == 1, f"struct {c_name} is in the BTF {len(structs)} times"
    tid, struct = structs[0]

    assert ctypes.sizeof(mirror) == int(struct.props["size"]), f"sizeof(struct {c_name})"
    btf_members = [
        (name, bits // 8, btf_size(types, member_tid)) for name, member_tid, bits, bitfield in struct.members
    ]
    assert all(bits % 8 == 0 and not bitfield for _n, _t, bits, bitfield in struct.members)
    mirror_members = [
        (name, getattr(mirror, name).offset, getattr(mirror, name).size) for name, *_ in mirror._fields_
    ]
    assert mirror_members == btf_members, f"members of struct {c_name}: (name, offset, size)"
    # a member that is itself a mirrored struct is that struct in the BTF too
    c_names = {m: c for m, c in MIRRORS.values()}
    for (name, ctype, *_), (_n, member_tid, _b, _f) in zip(mirror._fields_, struct.members):
        if ctype in c_names:
            nested = btf_struct(types, member_tid)
            assert nested is not None and nested.name == c_names[ctype], f"{c_name}.{name}"


# Every mirrored struct, flow_event included (tcp_flows.bpf.c keeps it in the BTF on purpose).
@pytest.mark.parametrize("mirror_name", sorted(MIRRORS))
def test_mirror_matches_the_btf_of_the_shipped_object(mirror_name):
    assert os.path.exists(SHIPPED_OBJECT), SHIPPED_OBJECT
    check_mirror(dump_btf(SHIPPED_OBJECT), mirror_name)


@pytest.mark.parametrize("mirror_name", sorted(MIRRORS))
def test_mirror_matches_the_header(mirror_name, tmp_path):
    """Every mirror, flow_event included, against bpf/tcp_flows.h compiled to BPF with its BTF."""
    clang = shutil.which("clang") or shutil.which("clang-14")
    if clang is None:
        pytest.skip("clang is not installed; it compiles bpf/tcp_flows.h to read its BTF")
    source = tmp_path / "layout.c"
    source.write_text(
        "typedef unsigned char __u8; typedef unsigned short __u16;\n"
        "typedef unsigned int __u32; typedef unsigned long long __u64;\n"
        '#include "tcp_flows.h"\n' + "".join(f"struct {c} layout_{c};\n" for _m, c in MIRRORS.values())
    )
    obj = tmp_path / "layout.o"
    subprocess.run(
        [clang, "-target", "bpf", "-g", "-O2", "-I", HEADER_DIR, "-c", str(source), "-o", str(obj)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    check_mirror(dump_btf(str(obj)), mirror_name)


def test_the_btf_parser_sees_nested_and_array_members():
    types = dump_btf(SHIPPED_OBJECT)
    (counters,) = [t for t in types.values() if t.kind == "STRUCT" and t.name == "flow_counters"]
    sizes = {name: btf_size(types, tid) for name, tid, _b, _f in counters.members}
    assert sizes["attempts_failed"] == 8 * _records.CONN_ERR_MAX and sizes["closes"] == 8 * _records.CLOSE_MAX


# -- span-enrichment records ------------------------------------------------------------------


def test_a_retransmit_record_carries_its_segments_connection_and_peer_port():
    e = decode_event(raw_event(kind=_records.FLOW_EVENT_RETRANSMIT, duration_ns=3, conn_id=9,
                               ts_ns=123, peer_port=40000))
    assert (e.kind, e.count, e.conn_id, e.ts_ns, e.peer_port, e.duration_s) == ("retransmit", 3, 9, 123, 40000, 0.0)


@pytest.mark.parametrize(("kind", "name"), [(_records.FLOW_EVENT_RESET, "reset"),
                                            (_records.FLOW_EVENT_ZERO_WINDOW, "zero_window")])
@pytest.mark.parametrize(("reason", "direction"), [(0, "transmit"), (1, "receive")])
def test_reset_and_zero_window_records_carry_a_direction(kind, name, reason, direction):
    e = decode_event(raw_event(kind=kind, reason=reason, conn_id=1))
    assert (e.kind, e.direction, e.count) == (name, direction, 1)
    with pytest.raises(RecordError, match="direction"):
        decode_event(raw_event(kind=kind, reason=2, conn_id=1))


def test_a_conn_record_says_whether_it_was_adopted():
    fresh = decode_event(raw_event(kind=_records.FLOW_EVENT_CONN, reason=0, conn_id=4, duration_ns=2_000_000))
    adopted = decode_event(raw_event(kind=_records.FLOW_EVENT_CONN, reason=1, conn_id=5))
    assert (fresh.adopted, fresh.duration_s) == (False, 0.002)
    assert adopted.adopted is True


def test_a_conn_record_says_whether_its_handshake_point_is_in_the_kernel():
    """reason 2: established, the handshake point aggregated in the hists map (its exemplar is
    taken from this record); the record's tid is the connecting thread's."""
    raw = raw_event(kind=_records.FLOW_EVENT_CONN, reason=_records.CONN_HIST_IN_KERNEL, conn_id=4,
                    duration_ns=2_000_000, tid=4321)
    record = _records.decode_conn(raw)
    assert record is not None and record[9:] == (False, 4321, True) and record[5] == 0.002
    assert decode_event(raw).adopted is False
    for reason in (_records.CONN_ESTABLISHED, _records.CONN_ADOPTED):
        record = _records.decode_conn(raw_event(kind=_records.FLOW_EVENT_CONN, reason=reason, conn_id=4))
        assert record is not None and record[11] is False
    with pytest.raises(RecordError, match="unknown reason 3"):
        _records.decode_conn(raw_event(kind=_records.FLOW_EVENT_CONN, reason=3, conn_id=4))


@pytest.mark.parametrize("kind", [4, 5, 6, 7, 8])
def test_span_records_without_a_connection_or_a_peer_are_rejected(kind):
    with pytest.raises(RecordError, match="connection id"):
        decode_event(raw_event(kind=kind, duration_ns=1, conn_id=0))
    with pytest.raises(RecordError, match="peer"):
        decode_event(raw_event(key=_records.overflow_key(CLIENT), kind=kind, duration_ns=1, conn_id=3))


@pytest.mark.parametrize("segments", [0, 1 << 16])
def test_a_retransmit_record_of_implausible_size_is_rejected(segments):
    with pytest.raises(RecordError, match="segments"):
        decode_event(raw_event(kind=_records.FLOW_EVENT_RETRANSMIT, duration_ns=segments, conn_id=1))


# -- the reader's side: a bad record is counted and logged once, never raised -------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=2 * EVENT_SIZE),  # garbage, of any length
    st.builds(lambda cut: raw_event()[:cut], st.integers(0, EVENT_SIZE - 1)),  # truncated
    plausible_events(),
), max_size=6))
def test_bad_ring_buffer_records_are_counted_not_raised(records):
    import logging

    from otel_ebpf_flows._kernel import KernelSource

    source = KernelSource()
    delivered = []
    source._on_event = delivered.append
    logger = logging.getLogger("otel_ebpf_flows")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    handler = Keep(logging.WARNING)
    logger.addHandler(handler)
    try:
        for data in records:
            source._on_record(data)  # what libbpf's callback calls for each record
    finally:
        logger.removeHandler(handler)
    bad = 0
    for data in records:
        try:
            decode_event(data)
        except RecordError:
            bad += 1
    assert source._decode_errors == bad  # exported as ebpf_flows.probe.events.lost{tcp_flows.decode}
    assert len(delivered) == len(records) - bad
    assert len(seen) == (1 if bad else 0)  # one warning, however many
