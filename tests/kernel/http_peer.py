"""Uninstrumented HTTP peers for the span tests (another process in the test's namespace).

python -m tests.kernel.http_peer server PORT      an HTTP/1.1 keep-alive server that
                                                  answers every request with its body
python -m tests.kernel.http_peer client PORT N SIZE [PATH]
                                                  N keep-alive POSTs of SIZE bytes on one
                                                  connection, then close
Prints "ready" when started, and a JSON line at the end (client).
"""

from __future__ import annotations

import http.client
import http.server
import json
import sys


class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "server":
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), Echo)
        srv.daemon_threads = True
        print("ready", flush=True)
        srv.serve_forever()
    elif mode == "client":
        n, size = int(sys.argv[3]), int(sys.argv[4])
        path = sys.argv[5] if len(sys.argv) > 5 else "/"
        print("ready", flush=True)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(n):
            conn.request("POST", path, body=b"y" * size)
            resp = conn.getresponse()
            assert len(resp.read()) == size
        conn.close()
        print(json.dumps({"requests": n}), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
