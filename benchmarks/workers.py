"""The processes ``benchmarks/run`` starts; each prints its results as JSON lines on stdout.

    workers.py idle [--calibrate OBJ]   instrument, print the program ids, sleep until stdin closes
    workers.py startup                  time instrument() and the RSS it adds, in a fresh process
    workers.py inproc MODES [--instrument] [--bpf-stats] [--duration S] [--tracer-provider] [--spans]
                                        a threaded Python service whose own client drives it
                                        (MODES: churn, rr, bulk, comma-separated); with
                                        --tracer-provider, instrumented with an SDK TracerProvider
                                        (span enrichment on; the workload makes no spans); with
                                        --spans, each op is a CLIENT span (with or without the library)
    workers.py reader --loadgen PATH [--rate R] [--duration S]
                                        reader-thread CPU while loadgen connects at R per second
    workers.py micro                    the reader thread's Python cost per ring-buffer record, in parts
    workers.py spans [--instrument] [--spans N]
                                        time span.end() of client spans over one connection (span
                                        enrichment's per-span cost: a ring drain and a map lookup)
    workers.py collect --connections N [--collections K] [--no-instrument]
                                        time each collection with N live connections (whose other
                                        ends a ``workers.py peer`` process holds)

The in-process and reader workers expect a private network namespace with lo up
(benchmarks/run starts them with ``unshare --net``). Run as root.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    PeriodicExportingMetricReader,
)
from opentelemetry.trace import SpanKind

READER_THREAD = "otel-ebpf-flows-reader"
MSG = b"x" * 64
BULK_CHUNK = b"y" * 65536
CLK_TCK = os.sysconf("SC_CLK_TCK")


def emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- /proc and bpftool --------------------------------------------------------------


def proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_ticks(path: str) -> int:
    """utime + stime of a /proc/…/stat file, in clock ticks."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def own_prog_ids() -> List[int]:
    """Ids of the BPF programs this process holds (from its file descriptors)."""
    ids = set()
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return sorted(ids)


def prog_stats(ids: Iterable[int]) -> Dict[int, Dict[str, Any]]:
    """name, run_cnt and run_time_ns of the given programs (kernel.bpf_stats_enabled must be 1)."""
    wanted = set(ids)
    out = subprocess.run(["bpftool", "prog", "show", "--json"], check=True, capture_output=True, text=True)
    return {
        p["id"]: {"name": p.get("name", "?"), "run_cnt": p.get("run_cnt", 0), "run_time_ns": p.get("run_time_ns", 0)}
        for p in json.loads(out.stdout)
        if p["id"] in wanted
    }


def stats_delta(before: Dict[int, Dict[str, Any]], after: Dict[int, Dict[str, Any]]) -> Dict[str, Dict[str, int]]:
    """Per program name: run_cnt and run_time_ns accumulated between two prog_stats()."""
    out = {}
    for pid, a in after.items():
        b = before.get(pid, {"run_cnt": 0, "run_time_ns": 0})
        out[a["name"]] = {"run_cnt": a["run_cnt"] - b["run_cnt"], "run_time_ns": a["run_time_ns"] - b["run_time_ns"]}
    return out


# -- OpenTelemetry --------------------------------------------------------------------


EVENTS_LOST = "ebpf_flows.probe.events.lost"


def events_lost(metrics_data: Any) -> Dict[str, int]:
    """The library's own counts of records it could not hand to user space, by probe name."""
    if metrics_data is None:
        return {}
    return {str(p.attributes.get("ebpf_flows.probe.name")): int(p.value)
            for rm in metrics_data.resource_metrics for sm in rm.scope_metrics
            for m in sm.metrics if m.name == EVENTS_LOST for p in m.data.data_points}


def lost_delta(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


class DiscardSpans:
    """A span exporter that drops what it gets (duck-typed: the SDK calls export and shutdown)."""

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class DiscardExporter(MetricExporter):  # type: ignore[misc]
    """Collects through the SDK like a real exporter would, sends nothing (keeps events.lost)."""

    def __init__(self) -> None:
        super().__init__()
        self.events_lost: Dict[str, int] = {}

    def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        self.events_lost.update(events_lost(metrics_data))
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


def instrument(provider: MeterProvider, **kwargs: Any) -> Any:
    from otel_ebpf_flows import EbpfFlowsInstrumentor

    instrumentor = EbpfFlowsInstrumentor()
    instrumentor.instrument(meter_provider=provider, **kwargs)
    if instrumentor.pipeline is None:
        raise SystemExit("instrument() did not start (see the warning above)")
    return instrumentor


def reader_thread() -> threading.Thread:
    for t in threading.enumerate():
        if t.name == READER_THREAD:
            return t
    raise SystemExit(f"no thread named {READER_THREAD}")


# -- sockets --------------------------------------------------------------------------


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return b""
        buf += chunk
    return bytes(buf)


class Server:
    """A threaded TCP service on 127.0.0.1: a fixed pool of threads, each serving one connection at a time.

    Echoes MSG-sized requests, or drains the stream (``bulk``).
    """

    def __init__(self, threads: int = 2, bulk: bool = False, backlog: int = 4096) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.bulk = bulk
        for _ in range(threads):
            threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    if self.bulk:
                        while conn.recv(65536):
                            pass
                    else:
                        while True:
                            data = recv_exactly(conn, len(MSG))
                            if not data:
                                break
                            conn.sendall(data)
                except OSError:
                    pass


def dial(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def drive(mode: str, port: int, duration: float, tracer: Any = None) -> Dict[str, Any]:
    """Run one client for ``duration`` s; ops/s and per-op latency percentiles. With ``tracer``,
    each op is a CLIENT span (started before the op, ended after it, inside the timing)."""
    lat: List[int] = []
    clock = time.perf_counter_ns
    sock: Optional[socket.socket] = None if mode == "churn" else dial(port)
    end = time.monotonic() + duration
    start = clock()
    span = None
    attrs = {"server.address": "127.0.0.1", "server.port": port}
    while time.monotonic() < end:
        t0 = clock()
        if tracer is not None:
            span = tracer.start_span("op", kind=SpanKind.CLIENT, attributes=attrs)
        if mode == "churn":
            s = dial(port)
            s.sendall(MSG)
            recv_exactly(s, len(MSG))
            s.close()
        elif mode == "rr":
            assert sock is not None
            sock.sendall(MSG)
            recv_exactly(sock, len(MSG))
        else:
            assert sock is not None
            sock.sendall(BULK_CHUNK)
        if span is not None:
            span.end()
        lat.append(clock() - t0)
    elapsed = (clock() - start) / 1e9
    if sock is not None:
        sock.close()
    lat.sort()
    n = len(lat)
    return {
        "mode": mode,
        "ops": n,
        "seconds": elapsed,
        "ops_per_s": n / elapsed,
        "p50_us": lat[n // 2] / 1000 if n else None,
        "p99_us": lat[min(n - 1, int(n * 0.99))] / 1000 if n else None,
    }


# -- the workers --------------------------------------------------------------------


CALIB_PROGRAMS = ("calib_empty_probe", "calib_lookup_probe", "calib_storage_probe", "calib_filter_probe",
                  "calib_helper_reads", "calib_direct_reads", "calib_empty_set_state")


def load_calibration(path: str) -> Any:
    """Load and attach benchmarks/calib.bpf.c's programs; one the kernel refuses is left out."""
    from otel_ebpf_flows import _libbpf  # the library's libbpf boundary, borrowed
    from otel_ebpf_flows.exceptions import BpfError

    skip: List[str] = []
    while True:
        obj = _libbpf.BpfObject(path)
        for name in skip:
            obj.set_autoload(name, False)
        try:
            obj.load()
            break
        except BpfError:
            obj.close()
            if "calib_storage_probe" in skip:
                raise
            skip.append("calib_storage_probe")  # socket-local storage from tracing needs 5.11
    for name in CALIB_PROGRAMS:
        if name not in skip:
            obj.attach(name)
    return obj


def cmd_idle(args: argparse.Namespace) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    # As users run it: a tracer provider, and span enrichment on (the default, made explicit
    # so that the host tax includes the send/receive programs whatever the default becomes).
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    instrumentor = instrument(provider, tracer_provider=TracerProvider(), span_enrichment=True)
    calib = load_calibration(args.calibrate) if args.calibrate else None
    source = instrumentor.pipeline.source
    emit({"ready": True, "pid": os.getpid(), "prog_ids": own_prog_ids(),
          "variant": getattr(source, "variant", "?"), "tracks_threads": getattr(source, "tracks_threads", False)})
    sys.stdin.read()  # until the parent closes our stdin
    if calib is not None:
        calib.close()
    instrumentor.uninstrument()
    provider.shutdown()


def cmd_startup(args: argparse.Namespace) -> None:
    t_import = time.perf_counter()
    from otel_ebpf_flows import EbpfFlowsInstrumentor

    import_ms = (time.perf_counter() - t_import) * 1000
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    instrumentor = EbpfFlowsInstrumentor()
    gc.collect()
    rss0 = proc_status_kb("VmRSS")
    t0 = time.perf_counter()
    instrumentor.instrument(meter_provider=provider)
    t1 = time.perf_counter()
    if instrumentor.pipeline is None:
        raise SystemExit("instrument() did not start (see the warning above)")
    gc.collect()
    rss1 = proc_status_kb("VmRSS")
    emit({"instrument_ms": (t1 - t0) * 1000, "rss_added_kb": rss1 - rss0, "rss_before_kb": rss0,
          "hwm_kb": proc_status_kb("VmHWM"), "import_ms": import_ms})
    instrumentor.uninstrument()
    provider.shutdown()


def cmd_inproc(args: argparse.Namespace) -> None:
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    exporter = DiscardExporter()
    provider = MeterProvider(metric_readers=[
        PeriodicExportingMetricReader(exporter, export_interval_millis=args.export_interval_ms)
    ])
    kwargs: Dict[str, Any] = {}
    tracer = None
    if args.tracer_provider or args.spans:
        from opentelemetry.sdk.trace import TracerProvider

        kwargs["tracer_provider"] = tracer_provider = TracerProvider()
        if args.spans:
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            tracer_provider.add_span_processor(BatchSpanProcessor(DiscardSpans()))
            tracer = tracer_provider.get_tracer("bench")
    instrumentor = instrument(provider, **kwargs) if args.instrument else None
    ids = own_prog_ids() if args.bpf_stats else []
    for mode in args.modes.split(","):
        server = Server(threads=2, bulk=mode == "bulk")
        drive(mode, server.port, args.warmup, tracer)
        provider.force_flush()
        lost_before = dict(exporter.events_lost)
        before = prog_stats(ids) if ids else {}
        task = f"/proc/self/task/{reader_thread().native_id}/stat" if args.instrument else None
        r0, p0 = (cpu_ticks(task), cpu_ticks("/proc/self/stat")) if task else (0, 0)
        result = drive(mode, server.port, args.duration, tracer)
        if task:  # the reader thread's share of the process's CPU time in the measured run
            r1, p1 = cpu_ticks(task), cpu_ticks("/proc/self/stat")
            result["reader_cpu_share"] = round((r1 - r0) / max(1, p1 - p0), 3)
        if ids:
            result["bpf"] = stats_delta(before, prog_stats(ids))
        provider.force_flush()
        result["instrumented"] = bool(args.instrument)
        result["events_lost"] = lost_delta(lost_before, exporter.events_lost)
        emit(result)
        server.sock.close()
    if instrumentor is not None:
        instrumentor.uninstrument()
    provider.shutdown()


def cmd_reader(args: argparse.Namespace) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instrumentor = instrument(provider)
    tid = reader_thread().native_id
    server = Server(threads=4)
    stop = threading.Event()
    collections: List[float] = []

    def collect_every(period: float) -> None:
        while not stop.wait(period):
            t0 = time.perf_counter()
            reader.get_metrics_data()
            collections.append((time.perf_counter() - t0) * 1000)

    collector = threading.Thread(target=collect_every, args=(args.collect_every,), daemon=True)
    collector.start()
    task = f"/proc/self/task/{tid}/stat"
    t0, r0, p0 = time.monotonic(), cpu_ticks(task), cpu_ticks("/proc/self/stat")
    out = subprocess.run(
        [args.loadgen, "churn", "-c", str(server.port), "-t", "1", "-r", str(args.rate), "-d", str(args.duration)],
        check=True, capture_output=True, text=True,
    )
    t1, r1, p1 = time.monotonic(), cpu_ticks(task), cpu_ticks("/proc/self/stat")
    stop.set()
    collector.join()
    load = json.loads(out.stdout.strip().splitlines()[-1])
    wall = t1 - t0
    lost = events_lost(reader.get_metrics_data())
    emit({
        "seconds": wall,
        "connections_per_s": load["ops_per_s"],
        "loadgen_errors": load["errors"],
        "reader_cpu_pct": (r1 - r0) / CLK_TCK / wall * 100,
        "process_cpu_pct": (p1 - p0) / CLK_TCK / wall * 100,
        "clk_tck": CLK_TCK,
        "collections_ms": collections,
        "events_lost": lost,
    })
    instrumentor.uninstrument()
    provider.shutdown()


class GilProbe:
    """A thread that sleeps 1 ms at a time and records how late it wakes (GIL and scheduling)."""

    def __init__(self) -> None:
        self.max_late_ms = 0.0
        self.wakes = 0
        self.late_over_2ms = 0  # wakes more than 2 ms late
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(0.001)
            late = (time.perf_counter() - t0) * 1000 - 1.0
            self.wakes += 1
            self.late_over_2ms += late > 2.0
            self.max_late_ms = max(self.max_late_ms, late)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def cmd_peer(args: argparse.Namespace) -> None:
    """Accept ``count`` connections, answer one request on each, hold them until stdin closes."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4096)
    emit({"port": lsock.getsockname()[1]})
    held = []
    for _ in range(args.count):
        conn, _ = lsock.accept()
        conn.sendall(recv_exactly(conn, len(MSG)))
        held.append(conn)
    sys.stdin.read()


def cmd_collect(args: argparse.Namespace) -> None:
    """The instrumented process holds N client connections; a peer process holds the other ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.connections + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.connections + 256), hard))
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    # --no-instrument: the same process and collections without the library (the host's floor)
    instrumentor = None if args.no_instrument else instrument(provider)
    reader.get_metrics_data()
    peer = subprocess.Popen([sys.executable, __file__, "peer", "--count", str(args.connections)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout is not None and peer.stdin is not None
        port = json.loads(peer.stdout.readline())["port"]
        clients = []
        for _ in range(args.connections):
            c = dial(port)
            c.sendall(MSG)
            recv_exactly(c, len(MSG))
            clients.append(c)
        probe = GilProbe()
        times: List[float] = []
        points = 0
        rng = random.Random(5)
        for _ in range(args.collections):
            # at random phases of the reader's 100 ms poll, as a real exporter's timer would be
            time.sleep(args.every + rng.uniform(0, 0.1))
            t0 = time.perf_counter()
            data = reader.get_metrics_data()
            times.append((time.perf_counter() - t0) * 1000)
            points = 0 if data is None else sum(
                len(list(m.data.data_points)) for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            )
        probe.stop()
        emit({"connections": args.connections, "instrumented": instrumentor is not None,
              "collections_ms": times, "points": points, "gil_max_late_ms": probe.max_late_ms,
              "gil_wakes": probe.wakes, "gil_late_over_2ms": probe.late_over_2ms})
        for c in clients:
            c.close()
    finally:
        if peer.stdin is not None:
            peer.stdin.close()
        try:
            peer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            peer.kill()
            peer.wait()
    if instrumentor is not None:
        instrumentor.uninstrument()
    provider.shutdown()


def per_call_us(fn: Any, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def cmd_micro(args: argparse.Namespace) -> None:
    """What one ring-buffer record costs the reader thread in Python, in parts (no kernel involved)."""
    from otel_ebpf_flows import _records  # private: the decoding the reader thread does per record

    raw = _records.CFlowEvent()
    raw.kind = _records.FLOW_EVENT_CLOSE
    raw.key.family, raw.key.role, raw.key.port = _records.FLOW_FAMILY_IPV4, _records.FLOW_ROLE_SERVER, 5555
    raw.key.addr[10:16] = [0xFF, 0xFF, 127, 0, 0, 1]
    raw.srtt_us, raw.duration_ns = 30, 1_000_000
    data = bytes(raw)
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    hist = provider.get_meter("bench").create_histogram("h", unit="s")
    attrs: Dict[str, Any] = {"network.transport": "tcp", "ebpf_flows.tcp.role": "server",
                             "network.peer.address": "127.0.0.1", "network.type": "ipv4", "network.local.port": 5555}
    from otel_ebpf_flows import _histogram, _telemetry  # private: what the reader thread does with a record

    recorder = _histogram.HistogramRecorder(hist)
    assert recorder.fast, "the histogram fast path is off on this SDK"

    instruments = _telemetry.Instruments(provider.get_meter("otel_ebpf_flows"), lambda: None)
    aggregator = _telemetry.Aggregator(200)

    def close_record() -> None:
        record = _records.decode_metric(data)
        assert record is not None
        instruments.record_metric(aggregator, record)

    from otel_ebpf_flows import _spans  # private: the span table the span records go to

    def span_raw(kind: int, conn_id: int) -> bytes:
        e = _records.CFlowEvent.from_buffer_copy(data)
        e.kind, e.reason, e.conn_id, e.ts_ns, e.tid = kind, 0, conn_id, 10 ** 9, 7
        return bytes(e)

    span_records = [span_raw(kind, 1 + i // 2) for i, kind in
                    enumerate([_records.FLOW_EVENT_CONN, _records.FLOW_EVENT_GONE] * args.n)]
    table = _spans.ConnTable(4096)
    feed = iter(span_records)

    def span_record() -> None:  # a connection's CONN, then its GONE, each into the span table
        record = _records.decode_conn(next(feed))
        assert record is not None
        table.add_record(record)

    emit({"span_record_us": per_call_us(span_record, 2 * args.n),
          "decode_event_us": per_call_us(lambda: _records.decode_event(data), args.n),
          "decode_metric_us": per_call_us(lambda: _records.decode_metric(data), args.n),
          "histogram_record_us": per_call_us(lambda: hist.record(0.001, attrs), args.n),
          "fast_record_us": per_call_us(lambda: recorder.record(0.001, attrs), args.n),
          "close_record_us": per_call_us(close_record, args.n)})


def cmd_spans(args: argparse.Namespace) -> None:
    """How long span.end() takes with span enrichment on (a ring drain and a map lookup per span) and off."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Discard(SpanExporter):  # type: ignore[misc]
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(Discard()))
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    instrumentor = None
    if args.instrument:
        from otel_ebpf_flows import EbpfFlowsInstrumentor

        instrumentor = EbpfFlowsInstrumentor()
        instrumentor.instrument(meter_provider=provider, tracer_provider=tracer_provider)
        if instrumentor.pipeline is None or instrumentor.pipeline.spans is None:
            raise SystemExit("instrument() did not start span enrichment (see the warning above)")
    server = Server(threads=1)
    sock = dial(server.port)
    tracer = tracer_provider.get_tracer("bench")
    attrs = {"server.address": "127.0.0.1", "server.port": server.port}
    clock = time.perf_counter_ns
    ends: List[int] = []
    for i in range(args.warmup + args.spans):
        span = tracer.start_span("GET", kind=SpanKind.CLIENT, attributes=attrs)
        sock.sendall(MSG)
        recv_exactly(sock, len(MSG))
        t0 = clock()
        span.end()
        if i >= args.warmup:
            ends.append(clock() - t0)
    sock.close()
    ends.sort()
    n = len(ends)
    emit({"instrumented": bool(args.instrument), "spans": n, "end_us_median": ends[n // 2] / 1000,
          "end_us_p99": ends[min(n - 1, int(n * 0.99))] / 1000})
    if instrumentor is not None:
        instrumentor.uninstrument()
    tracer_provider.shutdown()
    provider.shutdown()


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("idle")
    p.add_argument("--calibrate", help="a calibration BPF object to load and attach as well")
    sub.add_parser("startup")
    p = sub.add_parser("inproc")
    p.add_argument("modes")
    p.add_argument("--instrument", action="store_true")
    p.add_argument("--bpf-stats", action="store_true", help="report run_cnt/run_time_ns of our programs per mode")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=0.3)
    p.add_argument("--export-interval-ms", type=int, default=1000)
    p.add_argument("--cpu", type=int, help="pin the process to this CPU")
    p.add_argument("--tracer-provider", action="store_true",
                   help="instrument with an SDK TracerProvider (span enrichment on)")
    p.add_argument("--spans", action="store_true",
                   help="each op a CLIENT span of an SDK TracerProvider (exported in batches to a discarding "
                        "exporter); with --instrument, span enrichment on")
    p = sub.add_parser("reader")
    p.add_argument("--loadgen", required=True)
    p.add_argument("--rate", type=float, default=1000)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--collect-every", type=float, default=5.0)
    p = sub.add_parser("collect")
    p.add_argument("--connections", type=int, required=True)
    p.add_argument("--collections", type=int, default=12)
    p.add_argument("--every", type=float, default=0.5)
    p.add_argument("--no-instrument", action="store_true", help="the same without the library (baseline)")
    p = sub.add_parser("spans")
    p.add_argument("--instrument", action="store_true")
    p.add_argument("--spans", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--cpu", type=int, help="pin the process to this CPU")
    p = sub.add_parser("micro")
    p.add_argument("-n", type=int, default=20000)
    p = sub.add_parser("peer")
    p.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    {"idle": cmd_idle, "startup": cmd_startup, "inproc": cmd_inproc,
     "reader": cmd_reader, "collect": cmd_collect, "peer": cmd_peer,
     "micro": cmd_micro, "spans": cmd_spans}[args.cmd](args)


if __name__ == "__main__":
    main()
