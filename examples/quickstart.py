"""Quickstart: an app that instruments itself and prints its kernel TCP metrics on the console."""

# Run as root (or with CAP_BPF + CAP_PERFMON): python examples/quickstart.py
# Without the privilege, instrument() logs one warning and the app runs on unharmed.

import logging
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from otel_ebpf_flows import EbpfFlowsInstrumentor


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello\n" * 100
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep the console for metrics
        pass


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    # The application's own MeterProvider and Resource: the TCP metrics go there too.
    reader = PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=60_000)
    resource = Resource.create({"service.name": "quickstart"})
    provider = MeterProvider(resource=resource, metric_readers=[reader])
    EbpfFlowsInstrumentor().instrument(meter_provider=provider)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"

    for _ in range(20):  # urllib opens a new connection per request
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()

    server.shutdown()
    server.server_close()
    time.sleep(0.5)  # the reader thread polls the kernel's records every 0.1 s
    provider.shutdown()  # exports once more, with every point, before the probes go
    EbpfFlowsInstrumentor().uninstrument()


if __name__ == "__main__":
    main()
