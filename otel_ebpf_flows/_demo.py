"""``otel-ebpf-flows demo``: an instrumented client and server, and the metrics they produced.

Everything runs in this one process on loopback, so in-process mode sees both
sides of every connection: a threaded echo server (IPv4, and IPv6 where ``::1``
exists), client threads doing request/response on short-lived connections, one
connect to a closed port (``error.type=refused``), one connection closed with
``SO_LINGER`` 0 (an RST), and one bulk send to a reader that stalls (zero
window). The points are read with an ``InMemoryMetricReader`` on an SDK
``MeterProvider`` whose Resource says ``service.name=otel-ebpf-flows-demo``, and
printed as a table, or as JSON with ``--json``. Each request, the abortive close
and the bulk send run in a CLIENT span on an SDK ``TracerProvider``; a sample of
the finished spans is printed with the TCP attributes and events the kernel added.
No collector is needed.
"""

from __future__ import annotations

import json
import random
import socket
import socketserver
import struct
import sys
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, TextIO, Tuple

import attrs
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricsData,
    NumberDataPoint,
    Sum,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from . import _kernel
from . import _telemetry as T
from ._doctor import format_checks, run_checks, use_color
from ._instrumentor import SCOPE_NAME, EbpfFlowsInstrumentor
from ._source import CLOSE_REASONS
from .exceptions import EbpfFlowsError

SERVICE = "otel-ebpf-flows-demo"
CLIENT_THREADS = 3
REQUESTS_PER_CONNECTION = 5
BULK_BYTES = 1 << 20
STALL_S = 0.5
SETTLE_S = 0.5  # lets the reader thread hand over the last close records

Point = Dict[str, Any]

#: Table order: the contract's metrics, then self-telemetry.
METRIC_ORDER = (
    T.ATTEMPTS, T.HANDSHAKE, T.ACTIVE, T.IO, T.RTT,
    T.RETRANSMITS, T.RESETS, T.CLOSES, T.DURATION,
    T.ZERO_WINDOW, T.WSCALE_DISABLED, T.LISTEN_OVERFLOWS,
    T.EVENTS_LOST, T.MAP_EVICTIONS,
)


# --- traffic --------------------------------------------------------------------------------


@attrs.define
class Traffic:
    """What the demo did, to set beside what the kernel counted."""

    connections: int = 0
    connections_ipv6: int = 0
    requests: int = 0
    refused: int = 0
    resets_sent: int = 0
    bulk_bytes: int = 0
    errors: List[str] = attrs.field(factory=list)
    lock: threading.Lock = attrs.field(factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def error(self, what: str, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}")

    def as_dict(self) -> Dict[str, Any]:
        return attrs.asdict(self, filter=lambda a, _v: a.name != "lock")


class _Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        try:
            for line in self.rfile:
                self.wfile.write(line)
        except OSError:  # the SO_LINGER client resets its connection
            pass


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _EchoServer6(_EchoServer):
    address_family = socket.AF_INET6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(conn: socket.socket, reader: Any, payload: bytes) -> None:
    conn.sendall(payload + b"\n")
    if reader.readline() != payload + b"\n":
        raise OSError("the echo did not match the request")


class DemoTraffic:
    """Loopback servers and clients; :meth:`run` generates traffic for ``duration`` seconds."""

    def __init__(self, duration: float, tracer: Optional[trace.Tracer] = None) -> None:
        self.duration = duration
        self.tracer = tracer or trace.NoOpTracer()
        self.traffic = Traffic()
        self.echo = _EchoServer(("127.0.0.1", 0), _Echo)
        self.echo_port = int(self.echo.server_address[1])
        self.echo6: Optional[_EchoServer] = None
        try:
            self.echo6 = _EchoServer6(("::1", 0), _Echo)
        except OSError:  # no IPv6 on this host: the demo stays IPv4
            pass
        self.echo6_port = int(self.echo6.server_address[1]) if self.echo6 else 0
        # A listener with a tiny receive buffer (inherited by the accepted socket)
        # whose reader stalls: the sender meets a zero window.
        self.slow = socket.socket()
        self.slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.slow.bind(("127.0.0.1", 0))
        self.slow.listen(4)
        self.slow.settimeout(duration + 30)
        self.slow_port = int(self.slow.getsockname()[1])
        self.refused_port = _free_port()
        self._threads: List[threading.Thread] = []

    def _start(self, name: str, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=f"demo-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def run(self) -> Traffic:
        deadline = time.monotonic() + self.duration
        self._start("echo", self.echo.serve_forever, 0.05)
        if self.echo6:
            self._start("echo6", self.echo6.serve_forever, 0.05)
        self._start("slow-reader", self._slow_reader)
        servers = len(self._threads)
        for i in range(CLIENT_THREADS):
            self._start(f"client{i}", self._client, ("127.0.0.1", self.echo_port), deadline, i)
        if self.echo6:
            self._start("client6", self._client, ("::1", self.echo6_port), deadline, CLIENT_THREADS)
        self._refused()
        self._reset()
        self._bulk()
        for thread in self._threads[servers:]:
            thread.join(timeout=self.duration + 30)
        return self.traffic

    def close(self) -> None:
        for server in (self.echo, self.echo6):
            if server is not None:
                server.shutdown()
                server.server_close()
        self.slow.close()

    # Each client opens a connection, makes a few request/responses on it, closes
    # it (a normal close), and does it again until the deadline.
    def _client(self, address: Tuple[str, int], deadline: float, seed: int) -> None:
        rng = random.Random(seed)
        ipv6 = ":" in address[0]
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(address, timeout=5) as conn, conn.makefile("rb") as reader:
                    self.traffic.add(connections=1, connections_ipv6=int(ipv6))
                    for _ in range(REQUESTS_PER_CONNECTION):
                        with self._span("echo request", address):
                            _request(conn, reader, b"x" * rng.randint(16, 16384))
                        self.traffic.add(requests=1)
                        time.sleep(rng.uniform(0.005, 0.03))
            except OSError as exc:
                self.traffic.error(f"client to {address[0]}", exc)
                return

    def _span(self, name: str, address: Tuple[str, int]) -> Any:
        return self.tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT, attributes={
            "server.address": address[0], "server.port": address[1]})

    def _refused(self) -> None:
        try:
            socket.create_connection(("127.0.0.1", self.refused_port), timeout=5).close()
            self.traffic.error("connect to a closed port", OSError("it was accepted"))
        except ConnectionRefusedError:
            self.traffic.add(refused=1)
        except OSError as exc:
            self.traffic.error("connect to a closed port", exc)

    def _reset(self) -> None:
        try:
            with self._span("request, then abort", ("127.0.0.1", self.echo_port)), \
                    socket.create_connection(("127.0.0.1", self.echo_port), timeout=5) as conn, \
                    conn.makefile("rb") as reader:
                self.traffic.add(connections=1)
                _request(conn, reader, b"one request, then an abortive close")
                self.traffic.add(requests=1)
                # SO_LINGER on with a zero timeout: close() sends an RST, no FIN.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.traffic.add(resets_sent=1)
        except OSError as exc:
            self.traffic.error("SO_LINGER 0 close", exc)

    def _bulk(self) -> None:
        def send() -> None:
            try:
                with self._span("bulk upload", ("127.0.0.1", self.slow_port)), \
                        socket.create_connection(("127.0.0.1", self.slow_port), timeout=30) as conn:
                    # Small buffers at both ends make the stall visible from both sides
                    # on loopback: the receiver advertises a zero window, the sender meets it.
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                    self.traffic.add(connections=1)
                    conn.sendall(b"z" * BULK_BYTES)
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(1)  # the reader's close
                self.traffic.add(bulk_bytes=BULK_BYTES)
            except OSError as exc:
                self.traffic.error("bulk send", exc)

        self._start("bulk", send)

    def _slow_reader(self) -> None:
        try:
            conn, _ = self.slow.accept()
        except OSError:
            return
        with conn:
            time.sleep(STALL_S)
            while conn.recv(65536):
                pass


# --- metric points --------------------------------------------------------------------------


def points(data: MetricsData) -> List[Point]:
    """Every point of the instrumentation's scope, as plain JSON-ready values."""
    out: List[Point] = []
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            if sm.scope.name != SCOPE_NAME:
                continue
            for metric in sm.metrics:
                kind = {Sum: "sum", Gauge: "gauge", Histogram: "histogram"}.get(type(metric.data), "other")
                for dp in metric.data.data_points:
                    point: Point = {
                        "name": metric.name,
                        "unit": metric.unit,
                        "kind": kind,
                        "attributes": dict(sorted((dp.attributes or {}).items())),
                    }
                    if isinstance(dp, HistogramDataPoint):
                        point.update(count=dp.count, sum=dp.sum, min=dp.min, max=dp.max,
                                     explicit_bounds=list(dp.explicit_bounds),
                                     bucket_counts=list(dp.bucket_counts))
                    elif isinstance(dp, NumberDataPoint):
                        point["value"] = dp.value
                    out.append(point)
    out.sort(key=_point_order)
    return out


def _point_order(p: Point) -> Tuple[int, str, Tuple[str, ...]]:
    name = p["name"]
    rank = METRIC_ORDER.index(name) if name in METRIC_ORDER else len(METRIC_ORDER)
    attrs_ = p["attributes"]
    shown = tuple(str(attrs_.get(k, "")).rjust(5 if k.endswith(".port") else 0) for k, _ in _COLUMNS)
    rest = tuple(f"{k}={v}" for k, v in attrs_.items() if k not in dict(_COLUMNS))
    return rank, name, shown + rest


def fmt_seconds(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_bytes(n: float) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n:.0f} B ({n / size:.1f} {unit})"
    return f"{n:.0f} B"


def fmt_value(point: Point) -> str:
    if point["kind"] == "histogram":
        count = point["count"]
        if point["unit"] == "s":
            mean = point["sum"] / count if count else None
            return (f"n={count}  mean={fmt_seconds(mean)}  min={fmt_seconds(point['min'])}  "
                    f"max={fmt_seconds(point['max'])}")
        return f"n={count}  sum={point['sum']:g}"
    if point["unit"] == "By":
        return fmt_bytes(point["value"])
    return f"{point['value']}"


_COLUMNS = (  # attribute shown in its own column, header
    ("ebpf_flows.tcp.role", "ROLE"),
    ("network.peer.address", "PEER ADDRESS"),
    ("network.peer.port", "PEER PORT"),
    ("network.local.port", "LOCAL PORT"),
    ("network.type", "TYPE"),
)
_IMPLIED = {"network.transport": "tcp"}


def format_table(pts: Iterable[Point]) -> List[str]:
    """The points as one aligned table per metric."""
    by_metric: Dict[str, List[Point]] = {}
    for p in pts:
        by_metric.setdefault(p["name"], []).append(p)
    lines: List[str] = []
    for name, group in by_metric.items():
        first = group[0]
        lines.append(f"{name}  ({first['kind']}, unit {first['unit']})")
        cols = [(key, head) for key, head in _COLUMNS if any(key in p["attributes"] for p in group)]
        rows = []
        for p in group:
            attrs_ = p["attributes"]
            other = "  ".join(f"{k}={v}" for k, v in attrs_.items()
                              if k not in dict(_COLUMNS) and _IMPLIED.get(k) != v)
            rows.append([str(attrs_.get(key, "")) for key, _ in cols] + [other, fmt_value(p)])
        header = [head for _, head in cols] + ["OTHER ATTRIBUTES", "VALUE"]
        if not any(row[-2] for row in rows):
            header.pop(-2)
            rows = [row[:-2] + row[-1:] for row in rows]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        lines.append("")
    return lines


# --- what a person cares about ----------------------------------------------------------------


def _select(pts: List[Point], name: str, **match: str) -> List[Point]:
    """Points of one metric whose attributes match ``role``, ``direction``, ``reason``, ``error``."""
    keys = {"role": T.ROLE, "direction": T.DIRECTION, "reason": T.CLOSE_REASON, "error": T.ERROR_TYPE}
    return [p for p in pts if p["name"] == name
            and all(p["attributes"].get(keys[k]) == v for k, v in match.items())]


def _sum(pts: List[Point], name: str, **match: str) -> int:
    return int(sum(p.get("value", 0) for p in _select(pts, name, **match)))


def _hist(pts: List[Point], name: str, **match: str) -> Tuple[int, Optional[float], Optional[float]]:
    group = _select(pts, name, **match)
    count = sum(p["count"] for p in group)
    if not count:
        return 0, None, None
    return count, sum(p["sum"] for p in group) / count, max(p["max"] for p in group)


def summarize(pts: List[Point], traffic: Traffic) -> List[str]:
    """The kernel's TCP facts in plain words, beside what the demo did."""
    attempts = _select(pts, T.ATTEMPTS, role="client")
    established = sum(p["value"] for p in attempts if T.ERROR_TYPE not in p["attributes"])
    failed = {p["attributes"][T.ERROR_TYPE]: p["value"] for p in attempts
              if T.ERROR_TYPE in p["attributes"] and p["value"]}
    lines = [
        f"connections   the demo opened {traffic.connections} and tried {traffic.refused} closed port; "
        f"the kernel counted {established} established by clients, "
        f"{_sum(pts, T.ATTEMPTS, role='server')} accepted by servers",
    ]
    if failed:
        lines.append("              failed attempts: "
                     + ", ".join(f"{n} error.type={e}" for e, n in sorted(failed.items())))
    n, mean, worst = _hist(pts, T.HANDSHAKE, role="client")
    if n:
        lines.append(f"handshake     client SYN -> ESTABLISHED: mean {fmt_seconds(mean)}, "
                     f"worst {fmt_seconds(worst)} over {n} connections")
    n, mean, worst = _hist(pts, T.HANDSHAKE, role="server")
    if n:
        lines.append(f"              server SYN -> ESTABLISHED (SYN wait): mean {fmt_seconds(mean)}, "
                     f"worst {fmt_seconds(worst)} over {n}")
    n, mean, worst = _hist(pts, T.RTT)
    if n:
        lines.append(f"RTT           smoothed RTT: mean {fmt_seconds(mean)}, worst {fmt_seconds(worst)} "
                     f"over {n} samples")
    retransmits = _sum(pts, T.RETRANSMITS)
    lines.append(f"retransmits   {retransmits} segments"
                 + (" (loopback does not lose packets)" if not retransmits else ""))
    lines.append(f"resets        {_sum(pts, T.RESETS, direction='transmit')} RST sent, "
                 f"{_sum(pts, T.RESETS, direction='receive')} received (the demo aborted "
                 f"{traffic.resets_sent} connection with SO_LINGER 0; a closed port answers with an RST)")
    closes = []
    for role in ("client", "server"):
        for reason in CLOSE_REASONS:
            n = _sum(pts, T.CLOSES, role=role, reason=reason)
            if n:
                closes.append(f"{n} {role} {reason}")
    if closes:
        lines.append("closes        " + ", ".join(closes))
    sent = _sum(pts, T.IO, role="client", direction="transmit")
    received = _sum(pts, T.IO, role="client", direction="receive")
    lines.append(f"bytes         clients sent {fmt_bytes(sent)} (acknowledged by the peer) and "
                 f"received {fmt_bytes(received)}")
    lines.append(f"zero window   {_sum(pts, T.ZERO_WINDOW, direction='transmit')} advertised by a full "
                 f"receiver, {_sum(pts, T.ZERO_WINDOW, direction='receive')} met by a sender (the demo's "
                 "stalled reader; this process is both ends)")
    lines.append(f"active now    {_sum(pts, T.ACTIVE)} connections")
    lost, evicted = _sum(pts, T.EVENTS_LOST), _sum(pts, T.MAP_EVICTIONS)
    lines.append(f"completeness  {lost} kernel events lost, {evicted} map evictions"
                 + (": the numbers above are complete" if not lost and not evicted else ""))
    return lines


# --- the command ----------------------------------------------------------------------------


def _unavailable(exc: Exception, err: TextIO) -> int:
    print(f"otel-ebpf-flows demo: eBPF is unavailable here: {exc}", file=err)
    try:
        problems = format_checks(run_checks(load=False), color=use_color(err), only_failures=True)
    except Exception:  # pragma: no cover - doctor never raises, but never mask the first reason
        problems = []
    for line in problems:
        print(line, file=err)
    print("Run `otel-ebpf-flows doctor` for the full report.", file=err)
    return 1


def run_demo(duration: float = 3.0, as_json: bool = False, out: Optional[TextIO] = None,
             err: Optional[TextIO] = None) -> int:
    """Run the demo; 0 when the metrics were shown, 1 when eBPF is unavailable here."""
    out = out or sys.stdout
    err = err or sys.stderr
    say = err if as_json else out  # with --json, stdout is only JSON
    try:
        _kernel.check_environment()
    except EbpfFlowsError as exc:
        return _unavailable(exc, err)

    reader = InMemoryMetricReader()
    resource = Resource.create({SERVICE_NAME: SERVICE})
    provider = MeterProvider(metric_readers=[reader], resource=resource)
    span_exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    instrumentor = EbpfFlowsInstrumentor()
    instrumentor.instrument(meter_provider=provider, tracer_provider=tracer_provider)
    try:
        pipeline = instrumentor.pipeline
        if pipeline is None:
            print("otel-ebpf-flows demo: the instrumentation did not start (see the warning above); "
                  "run `otel-ebpf-flows doctor`", file=err)
            return 1
        variant = getattr(pipeline.source, "variant", "?")
        try:
            demo = DemoTraffic(duration, tracer_provider.get_tracer("otel-ebpf-flows-demo"))
        except OSError as exc:
            print(f"otel-ebpf-flows demo: cannot set up the loopback servers: {exc}", file=err)
            return 1
        print(f"otel-ebpf-flows demo: {duration:g} s of loopback traffic in this process, "
              f"observed by {variant} programs", file=say)
        print(f"  echo server 127.0.0.1:{demo.echo_port}"
              + (f" and [::1]:{demo.echo6_port}" if demo.echo6 else "")
              + f"; stalled reader 127.0.0.1:{demo.slow_port}; closed port 127.0.0.1:{demo.refused_port}",
              file=say)
        try:
            traffic = demo.run()
        finally:
            demo.close()
        time.sleep(SETTLE_S)
        data = reader.get_metrics_data()
        spans = list(span_exporter.get_finished_spans())
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
        tracer_provider.shutdown()

    pts = points(data) if data is not None else []
    resource_attrs = dict(data.resource_metrics[0].resource.attributes) if data and data.resource_metrics else {}
    for problem in traffic.errors:
        print(f"  demo traffic problem: {problem}", file=err)
    if as_json:
        json.dump({"resource": resource_attrs, "traffic": traffic.as_dict(), "points": pts,
                   "spans": [span_dict(sp) for sp in spans]}, out, indent=2, default=str)
        out.write("\n")
        return 0
    print(f"\nWhat the demo did: {traffic.connections} connections ({traffic.connections_ipv6} over IPv6) "
          f"with {traffic.requests} request/responses, {traffic.refused} connect to a closed port, "
          f"{traffic.resets_sent} abortive close (SO_LINGER 0), {fmt_bytes(traffic.bulk_bytes)} to a "
          "stalled reader.", file=out)
    print(f"\nMetric points on the application's MeterProvider (resource service.name="
          f"{resource_attrs.get(SERVICE_NAME)}; every TCP point also has network.transport=tcp):\n", file=out)
    for line in format_table(pts):
        print(line, file=out)
    print("What the kernel saw (this process's connections only):", file=out)
    for line in summarize(pts, traffic):
        print(f"  {line}", file=out)
    print(f"\nSpans, as exported ({len(spans)} finished; a sample, the kernel's additions shown):", file=out)
    for line in format_spans(spans):
        print(f"  {line}", file=out)
    return 0


# --- spans ------------------------------------------------------------------------------------


def span_dict(span: ReadableSpan) -> Dict[str, Any]:
    return {
        "name": span.name,
        "duration_s": ((span.end_time or 0) - (span.start_time or 0)) / 1e9,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events],
    }


def format_spans(spans: List[ReadableSpan], per_name: int = 2) -> List[str]:
    """A few spans of each name, those the kernel flagged first."""
    by_name: Dict[str, List[ReadableSpan]] = {}
    for sp in spans:
        by_name.setdefault(sp.name, []).append(sp)
    lines = []
    for name, group in by_name.items():
        group.sort(key=lambda sp: (not (sp.attributes or {}).get("ebpf_flows.tcp.degraded"),
                                   (sp.attributes or {}).get("ebpf_flows.tcp.connection.reused", True)))
        for sp in group[:per_name]:
            d = span_dict(sp)
            ours = {k.replace("ebpf_flows.tcp.", ""): v for k, v in d["attributes"].items()
                    if k.startswith("ebpf_flows.")}
            shown = ", ".join(f"{k}={fmt_seconds(v) if k in ('rtt', 'handshake.duration') else v}"
                              for k, v in ours.items()) or "(no TCP connection used)"
            lines.append(f"{name} ({d['duration_s'] * 1000:.1f} ms): {shown}")
            events: Dict[str, int] = {}
            for e in d["events"]:
                events[e["name"]] = events.get(e["name"], 0) + 1
            if events:
                lines.append("    events: " + ", ".join(f"{k} x{v}" for k, v in events.items()))
    return lines
