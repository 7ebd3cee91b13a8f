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
