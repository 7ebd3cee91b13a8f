"""Span-enrichment scenarios, each run in a fresh network namespace by tests/kernel/test_spans.py.

python -m tests.kernel.span_scenarios SCENARIO  (under `unshare --net`). The
scenario sets a global SDK TracerProvider (spans exported through a
BatchSpanProcessor, as in production), instruments this process, makes real
requests over a lossy path and prints one JSON line: the exported spans, the
metric points with their exemplars, and per request the kernel's own count
(the change of TCP_INFO tcpi_total_retrans on the request's connection).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.kernel.harness import (
    Telemetry,
    emit,
    finish,
    in_threads,
    peer,
    random_loss,
    recv_exactly,
    setup_netns,
    tcp_info,
)

SCENARIOS: Dict[str, Callable[[], Dict[str, Any]]] = {}


def scenario(fn: Callable[[], Dict[str, Any]]) -> Callable[[], Dict[str, Any]]:
    SCENARIOS[fn.__name__] = fn
    return fn


def ethernet_loopback() -> None:
    """Loopback at an Ethernet MTU, one segment per packet (no GSO super-packets), so a
    request is many segments and random loss hits it as it would on a real path."""
    setup_netns()
    subprocess.run(["ip", "link", "set", "lo", "mtu", "1500", "gso_max_segs", "1"], check=True)


def lossy_path(port: int, percent: int = 5) -> None:
    ethernet_loopback()
    random_loss(port, percent)


class Spans:
    """A global SDK TracerProvider exporting through a BatchSpanProcessor to memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(BatchSpanProcessor(self.exporter, schedule_delay_millis=200))
        trace.set_tracer_provider(self.provider)

    def finished(self) -> List[Dict[str, Any]]:
        self.provider.force_flush()
        out = []
        for s in self.exporter.get_finished_spans():
            out.append({
                "name": s.name,
                "kind": s.kind.name,
                "span_id": f"{s.context.span_id:016x}",
                "trace_id": f"{s.context.trace_id:032x}",
                "start": s.start_time,
                "end": s.end_time,
                "attrs": dict(s.attributes or {}),
                "events": [{"name": e.name, "ts": e.timestamp, "attrs": dict(e.attributes or {})}
                           for e in s.events],
            })
        return out


def metric_points(tel: Telemetry) -> List[Dict[str, Any]]:
    """Histogram points of the span-related metrics, with their exemplars."""
    out = []
    for rm in tel.reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    if not hasattr(p, "bucket_counts"):
                        continue
                    out.append({
                        "name": m.name,
                        "attrs": dict(p.attributes),
                        "count": p.count,
                        "exemplars": [{"span_id": f"{e.span_id:016x}" if e.span_id else None,
                                       "trace_id": f"{e.trace_id:032x}" if e.trace_id else None,
                                       "value": e.value} for e in (p.exemplars or [])],
                    })
    return out


def span_hex(span: Any) -> str:
    return f"{span.get_span_context().span_id:016x}"


def requests_on(tracer: Any, s: socket.socket, port: int, rounds: int, size: int) -> List[Dict[str, Any]]:
    """``rounds`` echo requests on an open connection, a CLIENT span each; per request its span
    and the kernel's own count of its retransmits (the change of tcpi_total_retrans)."""
    out = []
    for _r in range(rounds):
        attrs = {"server.address": "127.0.0.1", "server.port": port}
        with tracer.start_as_current_span("request", kind=trace.SpanKind.CLIENT, attributes=attrs) as span:
            before = tcp_info(s)["total_retrans"]
            s.sendall(b"x" * size)
            recv_exactly(s, size)
            after = tcp_info(s)["total_retrans"]
        out.append({"span_id": span_hex(span), "delta": after - before, "opened": False})
    return out


@scenario
def keepalive_loss() -> Dict[str, Any]:
    """Threads, each with its own persistent connection, one CLIENT span per request."""
    port, n, rounds, size = 5570, 4, 30, 20000
    lossy_path(port)
    echo = peer("echo", str(port), "--count", str(n))
    spans = Spans()
    tel = Telemetry(sample_interval=0.5)
    tracer = trace.get_tracer("kernel-test")

    def one(_i: int) -> List[Dict[str, Any]]:
        out = []
        s: Optional[socket.socket] = None
        for r in range(rounds):
            attrs = {"server.address": "127.0.0.1", "server.port": port}
            with tracer.start_as_current_span("request", kind=trace.SpanKind.CLIENT, attributes=attrs) as span:
                if s is None:
                    s = socket.create_connection(("127.0.0.1", port), timeout=60)
                    before = 0
                else:
                    before = tcp_info(s)["total_retrans"]
                s.sendall(b"x" * size)
                recv_exactly(s, size)
                after = tcp_info(s)["total_retrans"]
            out.append({"span_id": span_hex(span), "delta": after - before, "opened": r == 0})
        assert s is not None
        s.close()
        return out

    requests = [r for rs in in_threads(one, n) for r in rs]
    finish(echo)
    tel.instrumentor.pipeline.refresh(timeout=60.0)  # type: ignore[union-attr]
    return {"requests": requests, "spans": spans.finished(), "metrics": metric_points(tel),
            "hist_mode": tel.instrumentor.pipeline._hist_mode}


@scenario
def connections_before_any_span() -> Dict[str, Any]:
    """Threads, each with a persistent connection opened and used over the lossy path while no
    span is open anywhere in the process, then one CLIENT span per request on it."""
    from tests.kernel.workload import _tap_span_records

    port, n, rounds, size = 5575, 4, 30, 20000
    lossy_path(port)
    echo = peer("echo", str(port), "--count", str(n))
    spans = Spans()
    tel = Telemetry(sample_interval=0.5)
    tracer = trace.get_tracer("kernel-test")
    kinds: Dict[str, int] = {}
    _tap_span_records(tel.instrumentor.pipeline.source,  # type: ignore[union-attr]
                      lambda record: kinds.__setitem__(record[0], kinds.get(record[0], 0) + 1))
    socks = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(n)]
    for s in socks:  # used before any span: retransmits the kernel counts, for no span
        for _ in range(5):
            s.sendall(b"x" * size)
            recv_exactly(s, size)
    idle_retransmits = sum(tcp_info(s)["total_retrans"] for s in socks)
    tel.instrumentor.pipeline.refresh(timeout=60.0)  # type: ignore[union-attr]
    idle_kinds = dict(kinds)

    requests = [r for rs in in_threads(lambda i: requests_on(tracer, socks[i], port, rounds, size), n) for r in rs]
    for s in socks:
        s.close()
    finish(echo)
    tel.instrumentor.pipeline.refresh(timeout=60.0)  # type: ignore[union-attr]
    return {"requests": requests, "spans": spans.finished(), "metrics": metric_points(tel),
            "idle_kinds": idle_kinds, "idle_retransmits": idle_retransmits, "kinds": kinds, "connections": n,
            "probes": [p for p in tel.points() if p["name"] == "ebpf_flows.probe.events.lost"]}


@scenario
def late_tracer_provider() -> Dict[str, Any]:
    """instrument() before any tracer provider is set (the global one still a proxy): no span
    records and no send/receive programs until the provider appears; connections opened
    meanwhile are enriched once it does (handed on from the socks map)."""
    port, n, rounds, size = 5571, 4, 30, 20000
    lossy_path(port)
    echo = peer("echo", str(port), "--count", str(n))
    tel = Telemetry(sample_interval=0.5)
    pipeline = tel.instrumentor.pipeline
    assert pipeline is not None and pipeline.spans is not None
    source: Any = pipeline.source
    socks = []
    for _ in range(n):  # opened and used while no provider is hooked
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.sendall(b"x" * size)
        recv_exactly(s, size)
        socks.append(s)
    source.drain_conn_events()
    before = {"tracks_threads": source.tracks_threads, "conn_table": len(pipeline.spans.table),
              "io_programs": [a for a in source.attached if "_length" in a]}
    spans = Spans()  # the global provider, set now: the reader hooks it on its next poll
    deadline = time.monotonic() + 30
    while not (source.tracks_threads and len(pipeline.spans.table) >= n) and time.monotonic() < deadline:
        time.sleep(0.05)
    after = {"tracks_threads": source.tracks_threads, "conn_table": len(pipeline.spans.table),
             "io_programs": [a for a in source.attached if "_length" in a]}
    tracer = trace.get_tracer("kernel-test")

    def one(i: int) -> List[Dict[str, Any]]:
        out = requests_on(tracer, socks[i], port, rounds, size)
        socks[i].close()
        return out

    requests = [r for rs in in_threads(one, n) for r in rs]
    finish(echo)
    pipeline.refresh(timeout=60.0)
    return {"requests": requests, "spans": spans.finished(), "before": before, "after": after,
            "probes": tel.points()}


def _pool_socket(adapter: Any) -> Optional[socket.socket]:
    """The socket of the (one) idle connection in the adapter's pools."""
    pools = adapter.poolmanager.pools
    for key in pools.keys():
        for conn in list(pools[key].pool.queue):
            if conn is not None and getattr(conn, "sock", None) is not None:
                return conn.sock  # type: ignore[no-any-return]
    return None


@scenario
def requests_session() -> Dict[str, Any]:
    """opentelemetry-instrumentation-requests on a keep-alive Session over a lossy path."""
    import requests
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from requests.adapters import HTTPAdapter

    port, rounds, size = 5571, 40, 20000
    lossy_path(port)
    server = peer("server", str(port), module="tests.kernel.http_peer")
    spans = Spans()
    tel = Telemetry(sample_interval=0.5)
    ids: List[str] = []
    RequestsInstrumentor().instrument(response_hook=lambda span, _req, _resp: ids.append(span_hex(span)))
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1)
    session.mount("http://", adapter)
    url = f"http://127.0.0.1:{port}/echo"
    out = []
    for r in range(rounds):
        sock = _pool_socket(adapter)
        before = tcp_info(sock)["total_retrans"] if sock is not None else 0
        resp = session.post(url, data=b"x" * size, timeout=60)
        assert len(resp.content) == size
        after_sock = _pool_socket(adapter)
        assert after_sock is not None and (sock is None or after_sock is sock), "the session reconnected"
        out.append({"span_id": ids[-1], "delta": tcp_info(after_sock)["total_retrans"] - before,
                    "opened": r == 0})
    session.close()
    server.kill()
    tel.instrumentor.pipeline.refresh(timeout=60.0)  # type: ignore[union-attr]
    return {"requests": out, "spans": spans.finished(), "metrics": metric_points(tel),
            "hist_mode": tel.instrumentor.pipeline._hist_mode}


@scenario
def httpx_async() -> Dict[str, Any]:
    """opentelemetry-instrumentation-httpx: two AsyncClients to two peers, concurrently on one
    event loop, so their spans interleave on one thread and are told apart by connection."""
    import httpx
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    ports, rounds, size = (5572, 5574), 30, 20000
    ethernet_loopback()
    random_loss(ports[0], 5)
    random_loss(ports[1], 2)  # a second rule in the same table
    servers = [peer("server", str(p), module="tests.kernel.http_peer") for p in ports]
    spans = Spans()
    tel = Telemetry(sample_interval=0.5)
    ids: Dict[int, List[str]] = {p: [] for p in ports}

    async def hook(span: Any, request: Any, _response: Any) -> None:
        ids[request.url.port].append(span_hex(span))

    HTTPXClientInstrumentor().instrument(async_response_hook=hook)

    async def one(port: int) -> List[Dict[str, Any]]:
        out = []
        url = f"http://127.0.0.1:{port}/echo"
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        sock: Optional[socket.socket] = None
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            for r in range(rounds):
                before = tcp_info(sock)["total_retrans"] if sock is not None else 0
                resp = await client.post(url, content=b"x" * size)
                assert len(resp.content) == size
                now = resp.extensions["network_stream"].get_extra_info("socket")
                assert sock is None or now is sock, "the client reconnected"
                sock = now
                out.append({"span_id": ids[port][-1], "port": port, "opened": r == 0,
                            "delta": tcp_info(sock)["total_retrans"] - before})
        return out

    async def both() -> List[List[Dict[str, Any]]]:
        return list(await asyncio.gather(*(one(p) for p in ports)))

    out = [r for rs in asyncio.run(both()) for r in rs]
    for server in servers:
        server.kill()
    tel.instrumentor.pipeline.refresh(timeout=60.0)  # type: ignore[union-attr]
    return {"requests": out, "spans": spans.finished(), "metrics": metric_points(tel),
            "hist_mode": tel.instrumentor.pipeline._hist_mode}


@scenario
def wsgi_server() -> Dict[str, Any]:
    """SERVER spans of opentelemetry-instrumentation-wsgi on accepted connections."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    port, n, rounds, size = 5573, 3, 15, 20000
    lossy_path(port)
    spans = Spans()
    tel = Telemetry(sample_interval=0.5)
    measured: List[Dict[str, Any]] = []
    lock = threading.Lock()
    current = threading.local()

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
        current.span_id = span_hex(trace.get_current_span())  # the middleware's SERVER span
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    class Handler(WSGIRequestHandler):
        def handle(self) -> None:  # one request per connection (wsgiref is HTTP/1.0)
            before = tcp_info(self.connection)["total_retrans"]
            super().handle()
            after = tcp_info(self.connection)["total_retrans"]
            with lock:
                measured.append({"span_id": getattr(current, "span_id", None), "delta": after - before,
                                 "client_port": self.client_address[1]})
            current.span_id = None

        def log_message(self, *_args: Any) -> None:
            pass

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    httpd = make_server("127.0.0.1", port, OpenTelemetryMiddleware(app), server_class=Server,
                        handler_class=Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    clients = [peer("client", str(port), str(rounds), str(size), module="tests.kernel.http_peer")
               for _ in range(n)]
    for c in clients:
        finish(c, timeout=120)
    httpd.shutdown()
    tel.instrumentor.pipeline.refresh(timeout=60.0)  # type: ignore[union-attr]
    return {"requests": measured, "spans": spans.finished(), "metrics": metric_points(tel),
            "hist_mode": tel.instrumentor.pipeline._hist_mode}


if __name__ == "__main__":
    emit(SCENARIOS[sys.argv[1]]())
