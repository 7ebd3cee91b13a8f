"""The collection path: a collection reads the source's counters itself instead of waiting
for the reader's socket pass, never after a newer read, never from a closed source; and the
sweep's selection of sockets found gone, on raw sock_state records."""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from typing import Any, List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_ebpf_flows import _kernel, _libbpf, _records, _telemetry
from otel_ebpf_flows._source import CLOSE_REASONS, CONNECT_ERRORS, Counters, FlowKey, ProbeStats, Role, Snapshot

KEY = FlowKey(role=Role.CLIENT, address="192.0.2.7", port=443, family="ipv4")


def snapshot(attempts: int) -> Snapshot:
    return Snapshot(counters={KEY: Counters(attempts_ok=attempts, established=attempts)}, probes=ProbeStats())


class _ReadsNowSource:
    """A scripted source with the reader's pass (``scan``) and a cheap read (``read``): once
    ``gate_scan`` is set a pass blocks until ``release_scan``; once ``gate_read`` is set a
    read blocks until ``release_read``. ``state`` is what a read returns."""

    def __init__(self) -> None:
        self.state = snapshot(0)
        self.gate_scan = threading.Event()
        self.release_scan = threading.Event()
        self.in_scan = threading.Event()
        self.gate_read = threading.Event()
        self.release_read = threading.Event()
        self.in_read = threading.Event()
        self.scans = 0
        self.reads = 0
        self.closed = False
        self.read_after_close = False

    def start(self, on_event: Any) -> None:
        pass

    def poll(self, timeout_s: float) -> None:
        pass

    def scan(self) -> None:
        self.scans += 1
        if self.gate_scan.is_set():
            self.in_scan.set()
            assert self.release_scan.wait(10)

    def read(self) -> Snapshot:
        self.reads += 1
        self.read_after_close |= self.closed
        taken = self.state
        if self.gate_read.is_set() and threading.current_thread().name != "otel-ebpf-flows-reader":
            self.in_read.set()
            assert self.release_read.wait(10)
        return taken

    def sample(self) -> Snapshot:  # the Source protocol; the pipeline uses scan() + read()
        self.scan()
        return self.read()

    def close(self) -> None:
        self.closed = True


class _Rig:
    def __init__(self, source: Any, sample_interval: float = 60.0) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.pipeline: Optional[_telemetry.Pipeline] = None
        instruments = _telemetry.Instruments(self.provider.get_meter("t"), lambda: self.pipeline)
        self.pipeline = _telemetry.Pipeline(source, instruments, max_peers=200, poll_interval=0.01,
                                            sample_interval=sample_interval)
        self.pipeline.start()

    def attempts(self) -> int:
        data = self.reader.get_metrics_data()
        return sum(int(p.value) for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                   if m.name == _telemetry.ATTEMPTS for p in m.data.data_points)

    def close(self) -> None:
        assert self.pipeline is not None
        self.pipeline.stop()
        self.provider.shutdown()


def test_a_source_that_reads_now_is_recognised_and_one_without_is_not():
    assert isinstance(_ReadsNowSource(), _telemetry.ReadsNow)
    from .fakes import FakeSource

    assert not isinstance(FakeSource(), _telemetry.ReadsNow)


def test_a_collection_reads_the_counters_while_the_readers_pass_is_held_up():
    source = _ReadsNowSource()
    rig = _Rig(source)
    try:
        assert source.scans == 1 and source.reads == 1  # start: one pass, one read
        source.gate_scan.set()
        assert rig.pipeline is not None
        rig.pipeline._wanted.set()  # the reader starts a pass, which now blocks
        assert source.in_scan.wait(5)
        source.state = snapshot(7)  # traffic after the pass began
        done: List[int] = []
        collector = threading.Thread(target=lambda: done.append(rig.attempts()))
        collector.start()
        collector.join(5)
        # the collection did not wait for the pass, and it saw the counters of now
        assert done == [7]
        assert source.scans == 2  # the one held up
    finally:
        source.release_scan.set()
        rig.close()


def test_every_collection_reads_the_source_once():
    source = _ReadsNowSource()
    rig = _Rig(source)
    try:
        for n in (3, 3, 9):
            source.state = snapshot(n)
            before = source.reads
            assert rig.attempts() == n
            assert source.reads == before + 1  # the first callback read; the others used that view
    finally:
        rig.close()


def test_stop_never_closes_the_source_under_a_collections_read():
    source = _ReadsNowSource()
    rig = _Rig(source)
    try:
        source.gate_read.set()
        collector = threading.Thread(target=rig.reader.get_metrics_data)
        collector.start()
        assert source.in_read.wait(5)  # a collection is reading the source
        assert rig.pipeline is not None
        stopper = threading.Thread(target=rig.pipeline.stop)
        stopper.start()
        stopper.join(0.5)
        assert not source.closed  # stop() waits for the read ...
        source.release_read.set()
        stopper.join(10)
        collector.join(10)
        assert source.closed  # ... then closes the source
        assert not stopper.is_alive() and not collector.is_alive()
        # a collection after stop() reads nothing from the closed source
        rig.reader.get_metrics_data()
        assert not source.read_after_close
    finally:
        source.release_read.set()
        rig.provider.shutdown()


def test_a_read_and_its_aggregator_update_are_one_step():
    """While a collection's read is in progress (holding an older state), the reader's newer
    read waits, so the aggregator never takes the older state after the newer one (which
    would count the counters as restarted)."""
    source = _ReadsNowSource()
    rig = _Rig(source, sample_interval=0.05)
    try:
        source.state = snapshot(4)
        source.gate_read.set()
        collector = threading.Thread(target=rig.attempts)
        collector.start()
        assert source.in_read.wait(5)  # the collection holds the state of 4
        source.state = snapshot(6)
        scans = source.scans
        deadline = time.monotonic() + 5
        while source.scans < scans + 1:  # the reader passes and wants to read the 6
            assert time.monotonic() < deadline
            time.sleep(0.01)
        source.release_read.set()
        collector.join(5)
        source.gate_read.clear()
        time.sleep(0.2)  # the reader's reads of 6 land after the collection's 4
        assert rig.attempts() == 6  # 4 then 6: grew by 2, not restarted at 6 (which would give 10)
    finally:
        source.release_read.set()
        rig.close()


def test_quiesce_holds_collections_and_resume_lets_them_go():
    source = _ReadsNowSource()
    rig = _Rig(source)
    assert rig.pipeline is not None
    try:
        rig.pipeline.quiesce()  # before fork
        source.state = snapshot(2)
        done: List[int] = []
        collector = threading.Thread(target=lambda: done.append(rig.attempts()))
        collector.start()
        collector.join(0.3)
        assert done == []  # no read while a fork may be copying the process
        rig.pipeline.resume()
        collector.join(5)
        assert done == [2]
        rig.pipeline.resume()  # a second resume is harmless
    finally:
        rig.close()


# -- the sweep's selection -----------------------------------------------------------------------

NETNS = 4026531840
SINCE = 10_000


def sock_state(flags: int, established_ns: int, netns: int, seen_ns: int, port: int) -> _records.CSockState:
    st = _records.CSockState()
    st.key.family, st.key.role, st.key.port = _records.FLOW_FAMILY_IPV4, _records.FLOW_ROLE_CLIENT, port
    st.key.addr[10:16] = [0xFF, 0xFF, 192, 0, 2, 1]
    st.flags, st.established_ns, st.netns, st.seen_ns = flags, established_ns, netns, seen_ns
    st.conn_id, st.bytes_acked, st.srtt_us = 99, 12345, 77  # fields the selection ignores
    return st


def batch(states: List[_records.CSockState]) -> tuple:
    keys = b"".join(struct.pack("=Q", 0xFFFF0000 + i) for i in range(len(states)))
    return keys, b"".join(bytes(s) for s in states)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_the_sweep_reads_its_fields_where_the_ctypes_mirror_puts_them(flags, established_ns, netns, seen_ns):
    raw = bytes(sock_state(flags, established_ns, netns, seen_ns, 80))
    assert _kernel._SWEEP_FIELDS.size == ctypes.sizeof(_records.CSockState)
    assert _kernel._SWEEP_FIELDS.unpack(raw) == (flags, established_ns, netns, seen_ns)


def test_field_structs_refuse_names_out_of_the_records_order():
    with pytest.raises(ValueError):
        _kernel._field_struct(_records.CSockState, ("seen_ns", "flags"))


def test_the_sweep_selects_exactly_the_established_sockets_no_pass_has_seen():
    est = _records.SF_ESTABLISHED
    states = [
        sock_state(est, 5, NETNS, 6, 1),                             # gone
        sock_state(est, 5, NETNS, SINCE, 2),                         # seen by the last passes
        sock_state(est, SINCE + 1, NETNS, 0, 3),                     # established after: too new
        sock_state(est | _records.SF_CLOSED, 5, NETNS, 6, 4),        # closed: the kernel counted it
        sock_state(est | _records.SF_LISTENER, 5, NETNS, 6, 5),      # a listener
        sock_state(est | _records.SF_PENDING, 5, NETNS, 6, 6),       # pending a claim
        sock_state(0, 5, NETNS, 6, 7),                               # never established
        sock_state(est, 5, NETNS + 1, 6, 8),                         # another namespace's
        sock_state(est, SINCE - 1, NETNS, SINCE - 1, 9),             # gone (just before since)
    ]
    keys, values = batch(states)
    gone = _kernel.unseen_sockets(keys, values, NETNS, SINCE)
    assert [skp for skp, _ in gone] == [0xFFFF0000, 0xFFFF0000 + 8]
    assert [_records.decode_key(_records.CFlowKey.from_buffer_copy(k)).port for _, k in gone] == [1, 9]
    assert _kernel.unseen_sockets(b"", b"", NETNS, SINCE) == []


# -- the aggregator's fast update against the plain per-field definition -------------------------


def _get(counters: Counters, path: str) -> int:
    name, _, sub = path.partition(".")
    value = getattr(counters, name)
    return int(value[sub]) if sub else int(value)


class _Reference:
    """The aggregator's definition, field by field: a field's growth (a value below the last
    one: the kernel entry restarted, grown by its value) goes to the field's series, whose
    peer is admitted under the metric's cap at its first growth."""

    def __init__(self, max_peers: int) -> None:
        self.peers = _telemetry.Aggregator(max_peers)  # only its attributes() (the peer tables)
        self.last: dict = {}
        self.totals: dict = {}

    def update(self, counters: dict) -> None:
        for key, now in counters.items():
            before = self.last.get(key)
            self.last[key] = now
            listener = key.address == ""
            for metric, fields in _telemetry._FIELDS.items():
                if listener != (metric == _telemetry.LISTEN_OVERFLOWS):
                    continue
                for path, extra in fields:
                    delta = _telemetry._delta(_get(now, path), None if before is None else _get(before, path))
                    if delta:
                        attrs = self.peers.attributes(metric, key)
                        attrs.update(extra)
                        series = (metric, frozenset(attrs.items()))
                        self.totals[series] = self.totals.get(series, 0) + delta
            if not listener:
                d_est = _telemetry._delta(now.established, None if before is None else before.established)
                d_closed = _telemetry._delta(now.closed, None if before is None else before.closed)
                if d_est or d_closed:
                    series = (_telemetry.ACTIVE, frozenset(self.peers.attributes(_telemetry.ACTIVE, key).items()))
                    self.totals[series] = self.totals.get(series, 0) + d_est - d_closed

    def rows(self) -> dict:
        return {s: v for s, v in self.totals.items()}


def _rows(agg: _telemetry.Aggregator) -> dict:
    out = {}
    for metric, rows in agg.all_observations().items():
        if metric in (_telemetry.EVENTS_LOST, _telemetry.MAP_EVICTIONS):
            continue
        for value, attrs in rows:
            out[(metric, frozenset(attrs.items()))] = value
    return out


_PEERS = [FlowKey(role=Role.CLIENT, address=f"198.51.100.{i}", port=80 + i % 2, family="ipv4") for i in range(5)]
_PEERS += [FlowKey(role=Role.SERVER, address=f"2001:db8::{i}", port=8080, family="ipv6") for i in range(3)]
_PEERS += [FlowKey(role=Role.SERVER, address="", port=8080, family=""),  # a listener
           FlowKey(role=Role.CLIENT, address=None, port=0, family="")]  # the kernel's overflow key

_small = st.integers(0, 6)
_counters = st.builds(
    Counters,
    attempts_ok=_small,
    attempts_failed=st.fixed_dictionaries({e: _small for e in CONNECT_ERRORS}),
    established=_small,
    closed=_small,
    closes=st.fixed_dictionaries({r: _small for r in CLOSE_REASONS}),
    retransmits=_small, bytes_transmitted=st.integers(0, 10**6), bytes_received=st.integers(0, 10**6),
    resets_sent=_small, resets_received=_small, zero_window_receive=_small, zero_window_transmit=_small,
    window_scaling_disabled=_small, listen_overflows=_small,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(_PEERS), _counters, max_size=len(_PEERS)), min_size=1, max_size=6),
       st.integers(1, 4))
def test_the_aggregator_totals_are_the_per_field_definition(snapshots, max_peers):
    agg = _telemetry.Aggregator(max_peers)
    ref = _Reference(max_peers)
    for counters in snapshots:
        agg.update(Snapshot(counters=dict(counters), probes=ProbeStats()))
        ref.update(counters)
        assert _rows(agg) == ref.rows()


def test_the_aggregator_gives_the_gil_up_while_taking_many_changed_keys(monkeypatch):
    yields: List[None] = []
    monkeypatch.setattr(_libbpf, "yield_gil", lambda: yields.append(None))
    agg = _telemetry.Aggregator(200)
    keys = [FlowKey(role=Role.CLIENT, address=f"10.1.{i // 250}.{i % 250}", port=443, family="ipv4")
            for i in range(10 * _telemetry.KEYS_PER_YIELD)]
    snap = Snapshot(counters={k: Counters(attempts_ok=1, established=1) for k in keys}, probes=ProbeStats())
    agg.update(snap)
    assert len(yields) == 10
    agg.update(snap)  # the same objects: nothing changed, nothing to give up
    assert len(yields) == 10


def test_a_callback_with_many_points_gives_the_gil_up_and_loses_none(monkeypatch):
    source = _ReadsNowSource()
    peers = 3 * _telemetry.ROWS_PER_YIELD + 5
    keys = [FlowKey(role=Role.CLIENT, address=f"10.2.{i // 250}.{i % 250}", port=443, family="ipv4")
            for i in range(peers)]
    source.state = Snapshot(counters={k: Counters(attempts_ok=i + 1, established=i + 1) for i, k in enumerate(keys)},
                            probes=ProbeStats())
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    pipeline: Optional[_telemetry.Pipeline] = None
    instruments = _telemetry.Instruments(provider.get_meter("t"), lambda: pipeline)
    pipeline = _telemetry.Pipeline(source, instruments, max_peers=peers, poll_interval=0.01, sample_interval=60)
    pipeline.start()
    try:
        yields: List[None] = []
        monkeypatch.setattr(_libbpf, "yield_gil", lambda: yields.append(None))
        data = reader.get_metrics_data()
        monkeypatch.undo()
        points = {m.name: list(m.data.data_points) for rm in data.resource_metrics for sm in rm.scope_metrics
                  for m in sm.metrics}
        attempts = points[_telemetry.ATTEMPTS]
        assert len(attempts) == peers
        assert sum(p.value for p in attempts) == peers * (peers + 1) // 2
        assert len(points[_telemetry.ACTIVE]) == peers
        # two callbacks of `peers` points each, a hand-over every ROWS_PER_YIELD points
        assert len(yields) >= 2 * (peers // _telemetry.ROWS_PER_YIELD)
    finally:
        pipeline.stop()
        provider.shutdown()


def test_yielding_the_gil_steps_off_it_for_a_moment(monkeypatch):
    slept: List[float] = []
    monkeypatch.setattr(_libbpf.time, "sleep", slept.append)
    _libbpf.yield_gil()
    assert slept == [_libbpf.YIELD_S] and 0 < _libbpf.YIELD_S <= 0.0002  # not sleep(0): that hands nothing over


def test_reads_that_hold_the_gil_call_the_same_libbpf_functions_through_pydll():
    try:
        lib = _libbpf.load_library()
    except Exception as exc:  # no libbpf on this machine: nothing to wire
        pytest.skip(f"libbpf: {exc}")
    held = _libbpf._lib_gil
    assert isinstance(held, ctypes.PyDLL) and held._handle == lib._handle
    for name in _libbpf._GIL_HELD:
        assert getattr(held, name).argtypes == getattr(lib, name).argtypes
        assert getattr(held, name).restype == getattr(lib, name).restype
    assert _libbpf.Map(lib, 0, "m", hold_gil=True)._read is held
    assert _libbpf.Map(lib, 0, "m")._read is lib


def test_synack_counts_of_requests_gone_for_their_lifetime_are_pruned_and_no_others():
    """The reader forgets a request's SYN-ACK count only once its last retransmit is older than a
    request can live; younger ones (a handshake that may still complete) stay."""
    now = 10 * _kernel.SYNACK_LIFE_NS
    ages = {1: _kernel.SYNACK_LIFE_NS + 1, 2: _kernel.SYNACK_LIFE_NS, 3: 5, 4: 3 * _kernel.SYNACK_LIFE_NS}
    keys = [_records.CSynackKey(peer_port=p, local_port=80, netns=7) for p in ages]
    values = [_records.CSynackCount(last_ns=now - ages[k.peer_port], segs=2) for k in keys]
    deleted: List[int] = []

    class Synacks:
        def batches(self, key_type: Any, value_type: Any, chunk: int = 256) -> Any:
            assert (key_type, value_type) == (_records.CSynackKey, _records.CSynackCount)
            yield b"".join(bytes(k) for k in keys[:3]), b"".join(bytes(v) for v in values[:3])
            yield bytes(keys[3]), bytes(values[3])

        def delete(self, key: Any) -> None:
            assert key.local_port == 80 and key.netns == 7
            deleted.append(key.peer_port)

    class Obj:
        def map(self, name: str, hold_gil: bool = False) -> Synacks:
            assert name == "synacks", name
            return Synacks()

    source = _kernel.KernelSource()
    source._obj = Obj()  # type: ignore[assignment]
    source._prune_synacks(now)
    assert sorted(deleted) == [1, 4]
