"""A scripted :class:`otel_ebpf_flows._source.Source` for unit tests (no kernel, no root)."""

from __future__ import annotations

import threading
import time
from typing import Callable, List, Mapping, Optional, Tuple

from otel_ebpf_flows._source import Counters, FlowEvent, FlowKey, ProbeStats, Snapshot

WAIT_S = 5.0


class FakeSource:
    """Returns the snapshot the test set last; delivers the events the test queued.

    ``set_snapshot`` and ``emit`` return only once the pipeline's reader thread
    has fed them to the aggregator / instruments, so a following collection sees
    them. ``fail_samples`` makes the next N calls of :meth:`sample` raise.
    """

    def __init__(self, snapshot: Optional[Snapshot] = None) -> None:
        self.snapshot = snapshot or Snapshot(counters={}, probes=ProbeStats())
        self.fail_samples = 0
        self.fail_first_sample = False
        self.started = False
        self.closed = False
        self.spans_enabled = False
        self.samples = 0
        self.failed_samples = 0
        self.delivered = 0
        self._pending: List[FlowEvent] = []
        self._on_event: Callable[[FlowEvent], None] = lambda _e: None
        self._cond = threading.Condition()
        self._wake = threading.Event()

    # -- Source ---------------------------------------------------------------

    def start(self, on_event: Callable[[FlowEvent], None]) -> None:
        assert not self.started, "a source is started once"
        self.started = True
        self._on_event = on_event

    def poll(self, timeout_s: float) -> None:
        with self._cond:
            events, self._pending = self._pending, []
        for event in events:
            self._on_event(event)
        with self._cond:
            self.delivered += len(events)
            self._cond.notify_all()
        self._wake.wait(timeout_s)
        self._wake.clear()

    def sample(self) -> Snapshot:
        with self._cond:
            self.samples += 1
            self._cond.notify_all()
            if self.fail_first_sample or self.fail_samples:
                self.fail_first_sample = False
                self.fail_samples = max(0, self.fail_samples - 1)
                self.failed_samples += 1
                raise OSError("scripted sample failure")
            return self.snapshot

    # span enrichment (ConnectionSource): no kernel, so no thread records
    def drain_conn_events(self) -> None:
        pass

    def thread_connections(self, tid: int) -> List[Tuple[int, int, int]]:
        return []

    def enable_spans(self) -> None:  # KernelSource's: a tracer provider was hooked
        self.spans_enabled = True

    def close(self) -> None:
        self.closed = True

    # -- test controls --------------------------------------------------------

    def set_snapshot(self, counters: Mapping[FlowKey, Counters], probes: Optional[ProbeStats] = None) -> None:
        """Make ``counters`` the kernel's state and wait until the aggregator has it."""
        with self._cond:
            self.snapshot = Snapshot(counters=dict(counters), probes=probes or ProbeStats())
            # sample n+1 reads the new snapshot; once sample n+2 started, n+1's update is done
            target = self.samples + 2
            self._wake.set()
            assert self._cond.wait_for(lambda: self.samples >= target, WAIT_S), "the reader did not sample"

    def wait_samples(self, count: int) -> None:
        with self._cond:
            target = self.samples + count
            assert self._cond.wait_for(lambda: self.samples >= target, WAIT_S), "the reader did not sample"

    def emit(self, *events: FlowEvent) -> None:
        """Queue events and wait until the reader thread delivered them."""
        with self._cond:
            self._pending.extend(events)
            target = self.delivered + len(events)
            self._wake.set()
            assert self._cond.wait_for(lambda: self.delivered >= target, WAIT_S), "events not delivered"


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)
