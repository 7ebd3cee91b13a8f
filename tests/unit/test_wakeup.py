"""The reader sleeps on its source's wake fds (the kernel's rings), on collections and on stop().

A source with ``wake_fds()`` (KernelSource: the events ring's and the span records' ring's epoll
fds, each readable once a burst fills a quarter of its ring) must be read at once when one turns
readable, not at the end of the poll interval; a collection that wants a sample and ``stop()``
must not wait the interval out either. Here each "ring" is a pipe the test writes to.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Iterator, List, Tuple

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_ebpf_flows import _telemetry

from .fakes import FakeSource, wait_until

POLL_INTERVAL = 5.0  # far longer than any wait below


class RingSource(FakeSource):
    """A FakeSource whose wake fds are pipes (the events ring, the span records' ring); a poll
    drains them, as consume() drains the rings."""

    def __init__(self, drain: bool = True) -> None:
        super().__init__()
        self.drain = drain
        self.ring_r, self.ring_w = os.pipe()
        self.span_r, self.span_w = os.pipe()
        for fd in (self.ring_r, self.span_r):
            os.set_blocking(fd, False)
        self.polls: List[float] = []

    def wake_fds(self) -> List[int]:
        return [self.ring_r, self.span_r]

    def poll(self, timeout_s: float) -> None:
        self.polls.append(time.monotonic())
        for fd in (self.ring_r, self.span_r):
            try:
                while self.drain and os.read(fd, 4096):
                    pass
            except BlockingIOError:
                pass
        super().poll(timeout_s)

    def close_fds(self) -> None:
        for fd in (self.ring_r, self.ring_w, self.span_r, self.span_w):
            os.close(fd)


def started(source: FakeSource) -> Tuple[_telemetry.Pipeline, MeterProvider]:
    """A running pipeline over ``source`` (poll interval POLL_INTERVAL, no sample due)."""
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    instruments = _telemetry.Instruments(provider.get_meter("t"), lambda: None)
    pipeline = _telemetry.Pipeline(source, instruments, max_peers=200, poll_interval=POLL_INTERVAL,
                                   sample_interval=60)
    pipeline.start()
    return pipeline, provider


@pytest.fixture(params=["eventfd", "pipe", "fds above 1024"])
def running(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[Tuple[RingSource, _telemetry.Pipeline]]:
    if request.param == "pipe":  # Python 3.9 has no os.eventfd
        monkeypatch.delattr(os, "eventfd")
    held: List[int] = []
    if request.param == "fds above 1024":  # an application with many sockets: select() cannot take these
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
            request.addfinalizer(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
        while not held or held[-1] < 1030:
            held.append(os.open(os.devnull, os.O_RDONLY))
        request.addfinalizer(lambda: [os.close(fd) for fd in held])
    source = RingSource()
    pipeline, provider = started(source)
    time.sleep(0.05)  # the reader asleep in its first wait
    try:
        yield source, pipeline
    finally:
        pipeline.stop()
        provider.shutdown()
        source.close_fds()


@pytest.mark.parametrize("ring", ["events", "span records"])
def test_the_ring_turning_readable_wakes_the_reader_at_once(running, ring: str) -> None:
    source, _ = running
    before = len(source.polls)
    time.sleep(0.2)
    assert len(source.polls) == before  # asleep: nothing to read
    woken = time.monotonic()
    os.write(source.ring_w if ring == "events" else source.span_w, b"x")  # the kernel's wakeup
    wait_until(lambda: len(source.polls) > before, timeout=1.0)
    assert source.polls[before] - woken < 1.0
    # drained: it sleeps again rather than spinning
    time.sleep(0.3)
    assert len(source.polls) <= before + 2


def test_a_collection_wanting_a_sample_does_not_wait_for_the_poll_interval(running) -> None:
    source, pipeline = running
    time.sleep(pipeline.FRESH_S + 0.05)  # the start's sample is no longer fresh
    samples = source.samples
    t0 = time.monotonic()
    pipeline.refresh(timeout=POLL_INTERVAL)
    assert time.monotonic() - t0 < 1.0
    assert source.samples > samples


def test_stop_wakes_the_reader_and_closes_what_it_slept_on(running) -> None:
    source, pipeline = running
    waker = pipeline._waker
    assert waker is not None
    t0 = time.monotonic()
    pipeline.stop()
    assert time.monotonic() - t0 < 1.0
    assert pipeline._thread is not None and not pipeline._thread.is_alive()
    assert source.closed
    for fd in {waker.fd, waker._write_fd}:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_source_without_a_wake_fd_sleeps_on_the_event_as_before() -> None:
    source = FakeSource()
    pipeline, provider = started(source)
    try:
        assert pipeline._waker is None
        time.sleep(pipeline.FRESH_S + 0.05)
        t0 = time.monotonic()
        pipeline.refresh(timeout=POLL_INTERVAL)
        assert time.monotonic() - t0 < 1.0
    finally:
        t0 = time.monotonic()
        pipeline.stop()
        assert time.monotonic() - t0 < 1.0
        provider.shutdown()


def test_a_ring_that_stays_readable_is_read_in_batches_not_in_a_spin() -> None:
    """A woken BPF ring stays readable while records keep coming (level-triggered)."""
    source = RingSource(drain=False)
    pipeline, provider = started(source)
    try:
        os.write(source.ring_w, b"x")  # readable from now on
        wait_until(lambda: len(source.polls) >= 1, timeout=1.0)
        time.sleep(0.5)
        # at most one read per RING_REWAIT_S (100 in 0.5 s), not thousands
        assert 5 <= len(source.polls) <= 0.5 / _telemetry.RING_REWAIT_S + 10, len(source.polls)
    finally:
        pipeline.stop()
        provider.shutdown()
        source.close_fds()


def test_a_closed_waker_writes_nothing_into_the_fd_number_it_had() -> None:
    waker = _telemetry._Waker()
    number = waker._write_fd
    r, w = os.pipe()
    waker.close()
    os.dup2(w, number)  # the application's pipe got the number the waker had
    try:
        waker.wake()  # a collection thread late to the party
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 64)
    finally:
        for fd in (number, r, w):
            os.close(fd)


class ScriptedRing:
    """A RingBuffer whose libbpf ring_buffer__consume is this object: each call copies out what
    the "kernel" has written since the last one (through the record callback, as libbpf does);
    what it hands on is in ``got``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, writes: List[List[bytes]]) -> None:
        from otel_ebpf_flows import _libbpf

        self.got: List[bytes] = []
        self.ring = object.__new__(_libbpf.RingBuffer)
        self.ring._ptr = 1
        self.ring._batch = []
        self.ring._on_record = self.got.append
        self.writes = writes  # what the kernel writes before each call
        self.calls = 0
        monkeypatch.setattr(_libbpf, "_consume_gil", self)

    def __call__(self, _ptr: int) -> int:
        chunk = self.writes[self.calls] if self.calls < len(self.writes) else []
        self.calls += 1
        self.ring._batch.extend(chunk)  # type: ignore[attr-defined]
        return len(chunk)


def test_a_burst_written_while_the_consumer_hands_records_on_is_taken_at_its_yields(monkeypatch):
    # The kernel goes on writing while the consumer hands a batch on (giving the GIL up every
    # RECORDS_PER_YIELD records); what it wrote is copied out at the next yield, not left to
    # fill the ring until the next consume(). Everything is handed on once, in order.
    from otel_ebpf_flows import _libbpf

    per_yield = _libbpf.RECORDS_PER_YIELD
    writes = [[b"%d" % i for i in range(k * 100, k * 100 + 100)] for k in range(5)]  # 100 per call
    scripted = ScriptedRing(monkeypatch, writes)
    assert scripted.ring.consume() == 500
    assert scripted.got == [r for w in writes for r in w]
    # one copy up front, then one at each yield until the writes ran dry
    assert scripted.calls == 1 + (500 - 1) // per_yield


def test_the_consumer_stops_taking_more_past_the_pending_limit(monkeypatch):
    from otel_ebpf_flows import _libbpf

    monkeypatch.setattr(_libbpf, "RECORDS_PENDING_MAX", 40)
    writes = [[b"a"] * 100, [b"b"] * 100, [b"c"] * 100]
    scripted = ScriptedRing(monkeypatch, writes)
    n = scripted.ring.consume()
    # at each yield, more only while fewer than 40 are pending: 100 first, then at the yield
    # at 64 (36 pending) 100 more, then at 160 (40 pending: no), at 192 (8 pending) the last 100
    assert n == 300 and scripted.got == [b"a"] * 100 + [b"b"] * 100 + [b"c"] * 100
    assert scripted.calls == 4  # up front, at 64, at 192, at 288 (without the limit: every yield, 10)
