"""A checkout service with a 200 ms latency SLO, calling an upstream over a lossy path.

Run it with ./run (it needs root: a private network namespace and nftables make the loss).
The service exports its spans and metrics (JSON, one object per line) to --out; analyze.py
then answers, from that telemetry alone, which SLO-violating requests were the network's
fault and which were the code's.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import random
import subprocess
import sys
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

UPSTREAM_PORT = 9002
FRONTEND_PORT = 9001
BODY = 30_000


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(BODY))
        self.end_headers()
        self.wfile.write(b"u" * BODY)

    def log_message(self, *_args: object) -> None:
        pass


def network(loss_percent: int) -> None:
    """Loopback with an Ethernet MTU and random loss on the way to the upstream (our SYNs,
    requests and ACKs). Loss of the upstream's own segments would delay us by its retransmits,
    which our kernel counters cannot see (docs/span-enrichment.md, Limits)."""
    subprocess.run(["ip", "link", "set", "lo", "up", "mtu", "1500", "gso_max_segs", "1"], check=True)
    rules = "\n".join([
        "add table inet slo",
        "add chain inet slo input { type filter hook input priority 0; }",
        f"add rule inet slo input tcp dport {UPSTREAM_PORT} numgen random mod 100 < {loss_percent} drop",
    ])
    subprocess.run(["nft", "-f", "-"], input=rules.encode(), check=True)


def telemetry(out: str) -> tuple:
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({"service.name": "checkout", "deployment.environment.name": "demo"})
    spans_file = open(os.path.join(out, "spans.jsonl"), "w")  # noqa: SIM115 - open for the run
    metrics_file = open(os.path.join(out, "metrics.jsonl"), "w")  # noqa: SIM115
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(
        out=spans_file, formatter=lambda s: s.to_json(indent=None) + "\n")))
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(ConsoleMetricExporter(
        out=metrics_file, formatter=lambda m: m.to_json(indent=None) + "\n"), export_interval_millis=60_000)
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    metrics.set_meter_provider(meter_provider)
    return tracer_provider, meter_provider


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--loss", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.upstream:
        http.server.ThreadingHTTPServer(("127.0.0.1", UPSTREAM_PORT), Upstream).serve_forever()
        return
    if not args.out:
        parser.error("--out is required")
    os.makedirs(args.out, exist_ok=True)
    network(args.loss)

    # The upstream is another process: its own retransmits are not the checkout service's.
    up = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--upstream"])
    time.sleep(0.3)

    tracer_provider, meter_provider = telemetry(args.out)
    import requests
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    from otel_ebpf_flows import EbpfFlowsInstrumentor

    EbpfFlowsInstrumentor().instrument()
    RequestsInstrumentor().instrument()

    def checkout(environ: dict, start_response) -> list:
        query = dict(p.split("=", 1) for p in environ.get("QUERY_STRING", "").split("&") if "=" in p)
        if query.get("slow") == "1":
            time.sleep(0.3)  # a slow code path: the code's fault, not the network's
        # a new connection per call, as many clients do without a session
        resp = requests.get(f"http://127.0.0.1:{UPSTREAM_PORT}/price", timeout=30)
        body = b"ok %d" % len(resp.content)
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    class Quiet(WSGIRequestHandler):
        def log_message(self, *_args: object) -> None:
            pass

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    frontend = make_server("127.0.0.1", FRONTEND_PORT, OpenTelemetryMiddleware(checkout),
                           server_class=Server, handler_class=Quiet)
    threading.Thread(target=frontend.serve_forever, daemon=True).start()
    time.sleep(0.3)

    rng = random.Random(args.seed)
    for i in range(args.requests):
        slow = int(rng.random() < 0.08)
        conn = http.client.HTTPConnection("127.0.0.1", FRONTEND_PORT, timeout=60)
        conn.request("GET", f"/checkout?id={i}&slow={slow}")
        conn.getresponse().read()
        conn.close()

    frontend.shutdown()
    up.kill()
    tracer_provider.force_flush()
    meter_provider.force_flush()
    tracer_provider.shutdown()
    meter_provider.shutdown()
    print(json.dumps({"requests": args.requests, "out": args.out}))


if __name__ == "__main__":
    main()
