"""The example's backend: a plain standard-library HTTP server; opentelemetry-instrument adds the telemetry."""

# Run by ./run (see README.md). Nothing here imports OpenTelemetry or otel_ebpf_flows: run under
# `opentelemetry-instrument`, this process reports its own TCP connections (role "server") under
# its own OTEL_SERVICE_NAME.

import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NoReturn


class Items(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

    def do_GET(self) -> None:
        body = json.dumps({"path": self.path, "items": list(range(50))}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep the console for telemetry
        pass


def stop(_signum: int, _frame: object) -> NoReturn:
    # a normal exit, so that the OpenTelemetry SDK's shutdown exports one last time
    raise SystemExit(0)


def main() -> None:
    port = int(os.environ.get("BACKEND_PORT", "8081"))
    server = ThreadingHTTPServer(("127.0.0.1", port), Items)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, stop)
    print(f"backend: listening on http://127.0.0.1:{server.server_address[1]}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
