"""The seam between where kernel data comes from and how it becomes telemetry.

A :class:`Source` hands out two things: cumulative :class:`Counters` per
:class:`FlowKey` (a snapshot, read when asked) and rare :class:`FlowEvent`
records (handshakes, closes, RTT samples) pushed to a callback from the reader
thread. :class:`~otel_ebpf_flows._kernel.KernelSource` is the real one; tests of
aggregation and naming use a fake with the same shape.
"""

from __future__ import annotations

import enum
from typing import Callable, Dict, Mapping, Optional, Protocol, Tuple

import attrs


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


#: ``error.type`` values of failed connection attempts, in the kernel's order.
CONNECT_ERRORS = ("refused", "timed_out", "reset", "host_unreachable", "net_unreachable", "_OTHER")
#: ``ebpf_flows.tcp.close.reason`` values, in the kernel's order.
CLOSE_REASONS = ("normal", "reset_sent", "reset_received", "timeout", "_OTHER")


@attrs.frozen(cache_hash=True)
class FlowKey:
    """A series as the kernel keys it.

    ``address`` is the peer's address as text; ``None`` for the kernel's overflow
    series (its map was full), ``""`` for a listener's own series (listen drops).
    ``port`` is the peer's port for a client, our listening port for a server.
    """

    role: Role
    address: Optional[str]
    port: int
    family: str  # "ipv4", "ipv6", or "" for the overflow and listener series


def _zeros(names: Tuple[str, ...]) -> Dict[str, int]:
    return {name: 0 for name in names}


@attrs.frozen
class Counters:
    """Cumulative counts of one :class:`FlowKey` since the source started."""

    attempts_ok: int = 0
    attempts_failed: Mapping[str, int] = attrs.field(factory=lambda: _zeros(CONNECT_ERRORS))
    established: int = 0
    closed: int = 0
    closes: Mapping[str, int] = attrs.field(factory=lambda: _zeros(CLOSE_REASONS))
    retransmits: int = 0
    bytes_transmitted: int = 0
    bytes_received: int = 0
    resets_sent: int = 0
    resets_received: int = 0
    zero_window_receive: int = 0
    zero_window_transmit: int = 0
    window_scaling_disabled: int = 0
    listen_overflows: int = 0


#: FlowEvent kinds that feed span enrichment (the conn_events ring), not metrics.
CONN_EVENT_KINDS = frozenset({"conn", "retransmit", "reset", "zero_window", "gone"})


@attrs.frozen
class FlowEvent:
    """A rare per-connection record."""

    #: "handshake", "close", "rtt" (metrics); "conn", "retransmit", "reset",
    #: "zero_window", "gone" (span enrichment)
    kind: str
    key: FlowKey
    ts_ns: int  # CLOCK_MONOTONIC
    #: handshake (and conn): SYN -> ESTABLISHED, 0 when unknown; close: ESTABLISHED -> CLOSE
    duration_s: float
    srtt_s: Optional[float]
    close_reason: Optional[str] = None
    tid: int = 0
    conn_id: int = 0
    peer_port: int = 0  # the peer's actual port (ephemeral for server connections)
    direction: Optional[str] = None  # reset, zero_window: "transmit" or "receive"
    count: int = 0  # retransmit: segments; reset, zero_window: 1
    adopted: bool = False  # conn: found by the iterator, opened before instrument()


@attrs.frozen
class ProbeStats:
    """Self-telemetry: what the kernel could not hand over or keep apart.

    Both map a probe name to a cumulative count.
    """

    events_lost: Mapping[str, int] = attrs.field(factory=dict)
    map_evictions: Mapping[str, int] = attrs.field(factory=dict)


@attrs.frozen
class Snapshot:
    counters: Mapping[FlowKey, Counters]
    probes: ProbeStats


class Source(Protocol):
    """Where kernel data comes from."""

    def start(self, on_event: Callable[[FlowEvent], None]) -> None:
        """Begin observing; ``on_event`` is called from :meth:`poll` and :meth:`sample`."""

    def poll(self, timeout_s: float) -> None:
        """Deliver pending events, waiting at most ``timeout_s`` for the first."""

    def sample(self) -> Snapshot:
        """Refresh per-connection state (bytes, RTT samples) and read every counter."""

    def close(self) -> None:
        """Stop observing and free every kernel resource."""
