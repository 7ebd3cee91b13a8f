"""``otel-ebpf-flows watch``: a live terminal view of this host's TCP flows.

One row per peer, as the metrics name it: ``client`` rows are connections this
host opened to ``PEER:PORT`` (the service port), ``server`` rows are connections
``PEER`` opened to our listening ``PORT``. Each row shows connections (active
now, attempts, failed attempts), retransmitted segments (total and per second
over the last refresh), smoothed RTT (latest sample, median), handshake latency
(median, 99th percentile), RSTs sent and received, payload bytes each way and
zero-window stalls. A header has the totals and whether the numbers are complete
(kernel records lost, peers folded, connections or listeners the kernel maps had
no room for).

Counts start when ``watch`` starts. The probes are the library's own
(:class:`~otel_ebpf_flows._kernel.KernelSource`, in its host-wide mode), so a row
here is what an instrumented process would export for the same connections.
Connections and listeners already open at start are adopted in this network
namespace; in other namespaces only connections and listeners created after start
are seen, and their bytes and RTT when they close (the socket iterator walks this
namespace only).

:class:`FlowTable` turns the source's snapshots and records into rows (no
terminal involved, unit-tested with a fake source); :func:`render` lays rows out
for a given width; :func:`run_watch` drives curses, or prints snapshots (text or
JSON lines) when the output is not a terminal.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, TextIO, Tuple, Union

import attrs

from ._source import Counters, FlowEvent, FlowKey, ProbeStats, Snapshot
from .exceptions import ConfigurationError, EbpfFlowsError
from .version import __version__

#: Samples kept per peer for the RTT and handshake percentiles (the most recent ones).
WINDOW = 1024
POLL_S = 0.1  # ring-buffer reads between refreshes

OTHER = "_OTHER"


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@attrs.frozen
class PeerRow:
    """One peer's numbers, cumulative since the watch started (rates: over the last refresh)."""

    key: FlowKey
    active: int
    attempts: int  # client: connect attempts that reached the wire; server: completed handshakes
    failed: int
    failed_by: Mapping[str, int]
    retransmits: int
    retransmits_per_s: float
    rtt_s: Optional[float]  # the latest smoothed-RTT sample
    rtt_p50_s: Optional[float]
    handshakes: int  # handshake samples held for the percentiles
    handshake_p50_s: Optional[float]
    handshake_p99_s: Optional[float]
    resets_sent: int
    resets_received: int
    bytes_transmitted: int
    bytes_received: int
    zero_window_receive: int
    zero_window_transmit: int
    closes: Mapping[str, int]

    @property
    def role(self) -> str:
        return self.key.role.value

    @property
    def address(self) -> str:
        return OTHER if self.key.address is None else self.key.address

    @property
    def zero_windows(self) -> int:
        return self.zero_window_receive + self.zero_window_transmit

    def as_dict(self) -> Dict[str, Any]:
        return {
            "role": self.role, "address": self.address, "port": self.key.port if self.key.address else None,
            "family": self.key.family or None, "active": self.active, "attempts": self.attempts,
            "failed": self.failed, "failed_by": {k: v for k, v in self.failed_by.items() if v},
            "retransmits": self.retransmits, "retransmits_per_s": round(self.retransmits_per_s, 3),
            "rtt_s": self.rtt_s, "rtt_p50_s": self.rtt_p50_s, "handshakes": self.handshakes,
            "handshake_p50_s": self.handshake_p50_s, "handshake_p99_s": self.handshake_p99_s,
            "resets_sent": self.resets_sent, "resets_received": self.resets_received,
            "bytes_transmitted": self.bytes_transmitted, "bytes_received": self.bytes_received,
            "zero_window_receive": self.zero_window_receive, "zero_window_transmit": self.zero_window_transmit,
            "closes": {k: v for k, v in self.closes.items() if v},
        }


@attrs.frozen
class Filter:
    """Which rows to show: every given criterion must match (an empty one matches all)."""

    ports: Tuple[int, ...] = ()
    networks: Tuple[Union[ipaddress.IPv4Network, ipaddress.IPv6Network], ...] = ()
    role: Optional[str] = None

    def __call__(self, row: PeerRow) -> bool:
        if self.role and row.role != self.role:
            return False
        if self.ports and row.key.port not in self.ports:
            return False
        if self.networks:
            if not row.key.address:
                return False
            addr = ipaddress.ip_address(row.key.address)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            if not any(addr.version == net.version and addr in net for net in self.networks):
                return False
        return True

    @property
    def active(self) -> bool:
        return bool(self.ports or self.networks or self.role)


def parse_network(text: str) -> Union[ipaddress.IPv4Network, ipaddress.IPv6Network]:
    """An address or CIDR block, for ``--peer``."""
    return ipaddress.ip_network(text.strip(), strict=False)


def _delta(now: int, before: int) -> int:
    return now - before if now >= before else now  # a kernel counter that restarted lower


class FlowTable:
    """Per-peer state from a source's snapshots (counters) and records (handshakes, closes, RTT).

    ``on_event`` may be called from any thread; ``update`` and ``rows`` from one.
    """

    def __init__(self, window: int = WINDOW) -> None:
        self._window = window
        self._lock = threading.Lock()
        self._counters: Dict[FlowKey, Counters] = {}
        self._before: Dict[FlowKey, int] = {}  # retransmits at the previous update
        self._rates: Dict[FlowKey, float] = {}
        self._rtt: Dict[FlowKey, Deque[float]] = {}
        self._rtt_last: Dict[FlowKey, float] = {}
        self._handshake: Dict[FlowKey, Deque[float]] = {}
        self._updated_at: Optional[float] = None
        self.probes = ProbeStats()
        self.listen_overflows: Dict[int, int] = {}
        self.samples = 0

    def on_event(self, event: FlowEvent) -> None:
        with self._lock:
            if event.kind == "handshake":
                self._samples(self._handshake, event.key).append(event.duration_s)
            if event.kind in ("close", "rtt") and event.srtt_s:
                self._samples(self._rtt, event.key).append(event.srtt_s)
                self._rtt_last[event.key] = event.srtt_s

    def _samples(self, store: Dict[FlowKey, Deque[float]], key: FlowKey) -> Deque[float]:
        values = store.get(key)
        if values is None:
            values = store[key] = collections.deque(maxlen=self._window)
        return values

    def update(self, snapshot: Snapshot, now: float) -> None:
        """Take a new snapshot; per-second rates are over the time since the last one."""
        with self._lock:
            elapsed = None if self._updated_at is None else now - self._updated_at
            self._updated_at = now
            self.samples += 1
            for key, counters in snapshot.counters.items():
                if key.address == "":  # a listener's own series: listen-queue drops
                    self.listen_overflows[key.port] = counters.listen_overflows
                    continue
                self._counters[key] = counters
                before = self._before.get(key, 0 if elapsed else counters.retransmits)
                grew = _delta(counters.retransmits, before)
                self._rates[key] = grew / elapsed if elapsed else 0.0
                self._before[key] = counters.retransmits
            self.probes = snapshot.probes

    def rows(self, keep: Callable[[PeerRow], bool] = lambda _row: True) -> List[PeerRow]:
        with self._lock:
            rows = [self._row(key, c) for key, c in self._counters.items()]
        return [r for r in rows if _has_traffic(r) and keep(r)]

    def _row(self, key: FlowKey, c: Counters) -> PeerRow:
        failed = sum(c.attempts_failed.values())
        rtt = list(self._rtt.get(key, ()))
        handshake = list(self._handshake.get(key, ()))
        return PeerRow(
            key=key,
            active=max(0, c.established - c.closed),
            attempts=c.attempts_ok + failed,
            failed=failed,
            failed_by=dict(c.attempts_failed),
            retransmits=c.retransmits,
            retransmits_per_s=self._rates.get(key, 0.0),
            rtt_s=self._rtt_last.get(key),
            rtt_p50_s=percentile(rtt, 50),
            handshakes=len(handshake),
            handshake_p50_s=percentile(handshake, 50),
            handshake_p99_s=percentile(handshake, 99),
            resets_sent=c.resets_sent,
            resets_received=c.resets_received,
            bytes_transmitted=c.bytes_transmitted,
            bytes_received=c.bytes_received,
            zero_window_receive=c.zero_window_receive,
            zero_window_transmit=c.zero_window_transmit,
            closes=dict(c.closes),
        )


def _has_traffic(row: PeerRow) -> bool:
    """The kernel's overflow keys exist from the start; show them once they count something."""
    return bool(row.attempts or row.active or row.retransmits or row.resets_sent or row.resets_received
                or row.bytes_transmitted or row.bytes_received or sum(row.closes.values()))


@attrs.frozen
class Totals:
    peers: int
    active: int
    attempts: int
    failed: int
    retransmits: int
    retransmits_per_s: float
    resets_sent: int
    resets_received: int
    bytes_transmitted: int
    bytes_received: int
    zero_windows: int

    @classmethod
    def of(cls, rows: Sequence[PeerRow]) -> Totals:
        return cls(
            peers=len(rows), active=sum(r.active for r in rows), attempts=sum(r.attempts for r in rows),
            failed=sum(r.failed for r in rows), retransmits=sum(r.retransmits for r in rows),
            retransmits_per_s=sum(r.retransmits_per_s for r in rows),
            resets_sent=sum(r.resets_sent for r in rows), resets_received=sum(r.resets_received for r in rows),
            bytes_transmitted=sum(r.bytes_transmitted for r in rows),
            bytes_received=sum(r.bytes_received for r in rows), zero_windows=sum(r.zero_windows for r in rows),
        )


# --- sorting --------------------------------------------------------------------------------


def _peer_order(r: PeerRow) -> Tuple[Any, ...]:
    try:
        addr: Tuple[int, int] = (0, int(ipaddress.ip_address(r.key.address or "")))
    except ValueError:
        addr = (1, 0)
    return (r.role, addr, r.key.port)


def _opt(v: Optional[float]) -> float:
    return -1.0 if v is None else v


#: --sort name -> (what it is, the row's sort value); biggest first unless reversed (``peer``: A to Z).
SORTS: Dict[str, Tuple[str, Callable[[PeerRow], Any]]] = {
    "retrans": ("retransmitted segments", lambda r: r.retransmits),
    "rate": ("retransmits per second", lambda r: r.retransmits_per_s),
    "rtt": ("median RTT", lambda r: _opt(r.rtt_p50_s)),
    "handshake": ("p99 handshake latency", lambda r: _opt(r.handshake_p99_s)),
    "conns": ("connection attempts", lambda r: r.attempts),
    "fail": ("failed attempts", lambda r: r.failed),
    "resets": ("RSTs sent + received", lambda r: r.resets_sent + r.resets_received),
    "bytes": ("bytes sent + received", lambda r: r.bytes_transmitted + r.bytes_received),
    "active": ("active connections", lambda r: r.active),
    "peer": ("role, peer, port", _peer_order),
}
SORT_NAMES = tuple(SORTS)


def sort_rows(rows: Iterable[PeerRow], by: str, reverse: bool = False) -> List[PeerRow]:
    """Rows ordered by ``by`` (biggest first; ``peer`` A to Z), ties by peer; ``reverse`` flips."""
    value = SORTS[by][1]
    ordered = sorted(rows, key=_peer_order)  # stable: ties stay in peer order
    if by != "peer":
        ordered.sort(key=value, reverse=True)
    return ordered[::-1] if reverse else ordered


# --- formatting -----------------------------------------------------------------------------


def fmt_duration(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f}us"
    if s < 1:
        return f"{s * 1e3:.3g}ms" if s * 1e3 < 100 else f"{s * 1e3:.0f}ms"
    return f"{s:.3g}s" if s < 100 else f"{s:.0f}s"


def fmt_bytes(n: int) -> str:
    """Binary units: 1.5K is 1536 bytes."""
    if n < 1024:
        return str(n)
    value = float(n)
    for unit in "KMGTP":
        value /= 1024
        if value < 1024 or unit == "P":
            return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)  # pragma: no cover


def fmt_rate(r: float) -> str:
    if r == 0:
        return "0"
    return f"{r:.1f}" if r < 100 else f"{r:.0f}"


def fmt_uptime(s: float) -> str:
    s = int(s)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


@attrs.frozen
class Column:
    title: str
    width: int
    value: Callable[[PeerRow], str]
    keep: int  # 0: always shown; higher numbers are dropped first when the terminal is narrow
    left: bool = False


def _port(r: PeerRow) -> str:
    return "-" if r.key.address is None else str(r.key.port)


COLUMNS = (
    Column("ROLE", 6, lambda r: r.role, 0, left=True),
    Column("PEER", 15, lambda r: r.address, 0, left=True),  # widened to the longest address shown
    Column("PORT", 5, _port, 0),
    Column("ACTIVE", 7, lambda r: str(r.active), 2),
    Column("CONNS", 6, lambda r: str(r.attempts), 1),
    Column("FAILED", 7, lambda r: str(r.failed), 1),
    Column("RETRANS", 8, lambda r: str(r.retransmits), 0),
    Column("RETR/s", 7, lambda r: fmt_rate(r.retransmits_per_s), 3),
    Column("RTT", 7, lambda r: fmt_duration(r.rtt_s), 1),
    Column("RTTp50", 7, lambda r: fmt_duration(r.rtt_p50_s), 4),
    Column("HSp50", 7, lambda r: fmt_duration(r.handshake_p50_s), 3),
    Column("HSp99", 7, lambda r: fmt_duration(r.handshake_p99_s), 2),
    Column("RST-TX", 7, lambda r: str(r.resets_sent), 1),
    Column("RST-RX", 7, lambda r: str(r.resets_received), 1),
    Column("TX", 7, lambda r: fmt_bytes(r.bytes_transmitted), 3),
    Column("RX", 7, lambda r: fmt_bytes(r.bytes_received), 3),
    Column("ZWIN", 5, lambda r: str(r.zero_windows), 4),
)
#: The column each sort highlights.
SORT_COLUMN = {"retrans": "RETRANS", "rate": "RETR/s", "rtt": "RTTp50", "handshake": "HSp99", "conns": "CONNS",
               "fail": "FAILED", "resets": "RST-RX", "bytes": "TX", "active": "ACTIVE", "peer": "PEER"}


def fit_columns(rows: Sequence[PeerRow], width: int) -> List[Column]:
    """The columns that fit ``width``, dropping the least essential first; PEER fits its longest address."""
    peer_width = min(39, max([15] + [len(r.address) for r in rows]))
    cols = [attrs.evolve(c, width=peer_width) if c.title == "PEER" else c for c in COLUMNS]
    for level in range(max(c.keep for c in cols), 0, -1):
        if sum(c.width + 1 for c in cols) - 1 <= width:
            break
        cols = [c for c in cols if c.keep < level]
    return cols


def _cell(text: str, col: Column) -> str:
    if len(text) > col.width:
        text = text[: col.width - 1] + "~"
    return text.ljust(col.width) if col.left else text.rjust(col.width)


def format_table(rows: Sequence[PeerRow], cols: Sequence[Column], sort: str = "", reverse: bool = False) -> List[str]:
    marked = SORT_COLUMN.get(sort, "")
    head = []
    for c in cols:
        title = c.title
        if title == marked:
            title += "^" if reverse != (sort == "peer") else "v"
        head.append(_cell(title, c))
    lines = [" ".join(head).rstrip()]
    lines += [" ".join(_cell(c.value(r), c) for c in cols).rstrip() for r in rows]
    return lines


@attrs.frozen
class View:
    """What the user asked to see."""

    sort: str = "retrans"
    reverse: bool = False
    keep: Filter = Filter()
    limit: Optional[int] = None  # rows; None: all (the terminal's height in the live view)


def completeness(probes: ProbeStats) -> Tuple[bool, str]:
    """Whether the numbers are complete, and the self-telemetry line that says so."""
    lost = {k: v for k, v in probes.events_lost.items() if v}
    evicted = {k: v for k, v in probes.map_evictions.items() if v}
    parts = []
    names = {
        "tcp_flows.events": "records lost (ring buffer full)",
        "tcp_flows.syn_wait": "server handshakes not timed",
        "tcp_flows.decode": "malformed records",
        "tcp_flows.skipped": "kernel events skipped by the probes",
        "tcp_flows.unseen_close": "closes found late (reason unknown)",
        "tcp_flows.unseen_retransmit": "retransmits counted late (no event)",
        "tcp_flows.socks": "connections not tracked (map full)",
        "tcp_flows.flows": "counts folded into _OTHER (too many peers)",
        "tcp_flows.listeners": "listeners not registered (map full)",
    }
    for k, v in {**lost, **evicted}.items():
        parts.append(f"{v} {names.get(k, k)}")
    if not parts:
        return True, "complete: 0 records lost, 0 map evictions"
    return False, "INCOMPLETE: " + ", ".join(parts)


def header_lines(totals: Totals, probes: ProbeStats, *, variant: str, started: float, now: float,
                 interval: float, view: View, shown: int) -> List[str]:
    direction = "ascending" if view.reverse != (view.sort == "peer") else "descending"
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    lines = [
        f"{stamp}  otel-ebpf-flows watch: this host's TCP flows  up {fmt_uptime(now - started)}  "
        f"every {interval:g}s  sort: {view.sort} ({direction})  {variant} probes, version {__version__}",
        f"{'shown' if view.keep.active else 'all'}: {totals.peers} peers  active {totals.active}  "
        f"conns {totals.attempts} (failed {totals.failed})  retrans {totals.retransmits} "
        f"({fmt_rate(totals.retransmits_per_s)}/s)  RST tx {totals.resets_sent} rx {totals.resets_received}  "
        f"TX {fmt_bytes(totals.bytes_transmitted)} RX {fmt_bytes(totals.bytes_received)}  "
        f"zero-win {totals.zero_windows}",
        completeness(probes)[1],
    ]
    if shown < totals.peers:
        lines[-1] += f"  ({totals.peers - shown} more rows below)"
    return lines


LEGEND = ("counts since start; PORT: the service port (client rows) or our listening port (server rows); "
          "RTT: latest; HS: handshake")
KEYS = "q quit  s/S next/previous sort  r reverse  p pause"


def render(table: FlowTable, *, width: int, height: Optional[int], variant: str, started: float, now: float,
           interval: float, view: View, paused: bool = False, error: str = "") -> List[Tuple[str, str]]:
    """The screen as (kind, text) lines; kind is 'title', 'alert', 'head', 'hot', 'row' or 'text'."""
    rows = sort_rows(table.rows(view.keep), view.sort, view.reverse)
    totals = Totals.of(rows)
    complete, _ = completeness(table.probes)
    out: List[Tuple[str, str]] = []
    fixed = 6  # header (3), legend, keys or a blank, table head
    room = len(rows) if height is None else max(0, height - fixed - 1)
    if view.limit is not None:
        room = min(room, view.limit)
    shown = rows[:room]
    head = header_lines(totals, table.probes, variant=variant, started=started, now=now, interval=interval,
                        view=view, shown=len(shown))
    out.append(("title", head[0] + ("  [PAUSED]" if paused else "")))
    out.append(("text", head[1]))
    out.append(("text" if complete else "alert", head[2]))
    out.append(("text", LEGEND))
    if error:
        out.append(("alert", error))
    elif height is not None:
        out.append(("text", KEYS))
    cols = fit_columns(shown, width)
    table_lines = format_table(shown, cols, view.sort, view.reverse)
    out.append(("head", table_lines[0]))
    for row, line in zip(shown, table_lines[1:]):
        hot = row.retransmits_per_s > 0 or row.failed or row.resets_sent or row.resets_received
        out.append(("hot" if hot else "row", line))
    overflows = {p: n for p, n in sorted(table.listen_overflows.items()) if n}
    if overflows:
        out.append(("alert", "listen queue overflows: "
                    + ", ".join(f"port {p}: {n}" for p, n in overflows.items())))
    if not rows:
        out.append(("text", "(no TCP activity seen yet" + (" that matches the filter)" if view.keep.active else ")")))
    return [(kind, text[:width]) for kind, text in out]


def snapshot_json(table: FlowTable, *, variant: str, started: float, now: float, interval: float,
                  view: View) -> Dict[str, Any]:
    rows = sort_rows(table.rows(view.keep), view.sort, view.reverse)
    if view.limit is not None:
        rows = rows[: view.limit]
    complete, _ = completeness(table.probes)
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
        "timestamp": round(now, 3),
        "uptime_s": round(now - started, 3),
        "interval_s": interval,
        "probes": {"variant": variant, "complete": complete, "events_lost": dict(table.probes.events_lost),
                   "map_evictions": dict(table.probes.map_evictions)},
        "totals": attrs.asdict(Totals.of(rows)),
        "rows": [r.as_dict() for r in rows],
        "listen_overflows": {str(p): n for p, n in sorted(table.listen_overflows.items()) if n},
    }


# --- running --------------------------------------------------------------------------------


class _Stop:
    """Set by SIGINT, SIGTERM and SIGHUP: the loops notice within one poll and exit cleanly."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._saved: Dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._saved[sig] = signal.signal(sig, self._handle)

    def _handle(self, _signum: int, _frame: Any) -> None:
        self.event.set()

    def restore(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


class Watch:
    """A started source feeding a :class:`FlowTable`, refreshed every ``interval`` seconds."""

    def __init__(self, source: Any, interval: float, view: View) -> None:
        self.source = source
        self.interval = interval
        self.view = view
        self.table = FlowTable()
        self.started = time.time()
        self.error = ""
        self.sampled_at = self.started  # wall-clock time of the counters shown
        self._next = time.monotonic() + interval

    @property
    def variant(self) -> str:
        return str(getattr(self.source, "variant", "") or "?")

    def baseline(self) -> None:
        self.table.update(self.source.sample(), time.monotonic())

    def tick(self) -> bool:
        """Read pending records; when a refresh is due, sample the counters. True if it sampled."""
        try:
            self.source.poll(0)
            if time.monotonic() < self._next:
                return False
            self._next = max(self._next + self.interval, time.monotonic() + self.interval / 2)
            began = time.time()  # the counters shown are at least this recent
            self.table.update(self.source.sample(), time.monotonic())
            self.sampled_at = began
            self.error = ""
            return True
        except Exception as exc:  # shown in the view; the next refresh tries again
            self.error = f"reading the kernel maps failed ({type(exc).__name__}: {exc}); retrying"
            return True


def run_batch(watch: Watch, stop: threading.Event, out: TextIO, count: Optional[int], as_json: bool) -> int:
    printed = 0
    while not stop.is_set() and (count is None or printed < count):
        if not watch.tick():
            stop.wait(POLL_S)
            continue
        now = watch.sampled_at
        if as_json:
            out.write(json.dumps(snapshot_json(watch.table, variant=watch.variant, started=watch.started,
                                               now=now, interval=watch.interval, view=watch.view)) + "\n")
        else:
            lines = render(watch.table, width=1000, height=None, variant=watch.variant, started=watch.started,
                           now=now, interval=watch.interval, view=watch.view, error=watch.error)
            out.write("\n".join(text for _, text in lines) + "\n\n")
        out.flush()
        printed += 1
    return 0


def run_curses(watch: Watch, stop: threading.Event, count: Optional[int]) -> int:
    import curses

    def loop(screen: Any) -> int:
        try:
            curses.curs_set(0)
        except curses.error:
            pass
        styles = {"title": curses.A_REVERSE, "head": curses.A_BOLD | curses.A_UNDERLINE, "row": curses.A_NORMAL,
                  "text": curses.A_NORMAL, "hot": curses.A_BOLD, "alert": curses.A_BOLD}
        if curses.has_colors():
            try:
                curses.use_default_colors()
                curses.init_pair(1, curses.COLOR_RED, -1)
                curses.init_pair(2, curses.COLOR_YELLOW, -1)
                styles["alert"] = curses.color_pair(1) | curses.A_BOLD
                styles["hot"] = curses.color_pair(2) | curses.A_BOLD
            except curses.error:
                pass
        screen.timeout(int(POLL_S * 1000))
        sorts = list(SORT_NAMES)
        paused = False
        refreshes = 0
        dirty = True
        while not stop.is_set():
            if watch.tick():
                refreshes += 1
                dirty = dirty or not paused
            if dirty:
                height, width = screen.getmaxyx()
                lines = render(watch.table, width=max(1, width - 1), height=height, variant=watch.variant,
                               started=watch.started, now=watch.sampled_at, interval=watch.interval, view=watch.view,
                               paused=paused, error=watch.error)
                screen.erase()
                for y, (kind, text) in enumerate(lines[:height]):
                    try:
                        screen.addstr(y, 0, text, styles[kind])
                    except curses.error:  # the bottom-right cell, or a terminal shrinking under us
                        pass
                screen.refresh()
                dirty = False
            if count is not None and refreshes >= count:
                break
            key = screen.getch()
            if key in (ord("q"), ord("Q"), 27):
                break
            if key in (ord("s"), ord("S")):
                step = 1 if key == ord("s") else -1
                watch.view = attrs.evolve(watch.view, sort=sorts[(sorts.index(watch.view.sort) + step) % len(sorts)])
            elif key == ord("r"):
                watch.view = attrs.evolve(watch.view, reverse=not watch.view.reverse)
            elif key == ord("p"):
                paused = not paused
            elif key == -1:
                continue
            dirty = True
        return 0

    # The terminal's own size: LINES/COLUMNS exported at some other size (non-interactive
    # shells and tools do) would pin ncurses' layout to them and ignore every resize.
    for name in ("LINES", "COLUMNS"):
        os.environ.pop(name, None)
    result: int = curses.wrapper(loop)
    return result


def run_watch(*, interval: float, view: View, count: Optional[int] = None, batch: bool = False,
              as_json: bool = False, source_factory: Optional[Callable[[float], Any]] = None,
              out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    """The command: 0 on a clean exit (q, Ctrl-C, SIGTERM, or --count reached), 1 if the probes cannot load."""
    out = out or sys.stdout
    err = err or sys.stderr
    factory = source_factory or _kernel_source
    try:
        source = factory(interval)
    except ConfigurationError as exc:
        print(f"otel-ebpf-flows watch: {exc}", file=err)
        return 1
    try:
        watch = Watch(source, interval, view)
        source.start(watch.table.on_event)
    except (EbpfFlowsError, OSError) as exc:
        print(f"otel-ebpf-flows watch: cannot load the eBPF probes: {exc}\n"
              "Run `otel-ebpf-flows doctor` to see what this host lacks and how to fix it.", file=err)
        return 1
    stop = _Stop()
    stop.install()
    try:
        watch.baseline()
        interactive = not (batch or as_json) and out is sys.stdout and out.isatty() and sys.stdin.isatty()
        if interactive:
            return run_curses(watch, stop.event, count)
        return run_batch(watch, stop.event, out, count, as_json)
    finally:
        stop.restore()
        source.close()


def _kernel_source(interval: float) -> Any:
    from ._config import load_config
    from ._kernel import KernelSource

    config = load_config({})
    # live connections' RTT is sampled by the iterator at most once per sample_interval
    config = attrs.evolve(config, sample_interval=min(10.0, max(0.1, interval)))
    return KernelSource(config, host_wide=True)
