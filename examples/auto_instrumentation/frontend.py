"""The example's frontend: calls the backend with requests; opentelemetry-instrument adds the telemetry."""

# Run by ./run (see README.md). Nothing here imports OpenTelemetry or otel_ebpf_flows: run under
# `opentelemetry-instrument`, the requests instrumentation traces each call and otel-ebpf-flows
# reports this process's TCP connections (role "client") under its own OTEL_SERVICE_NAME.

import os
import sys
import time

import requests


def main() -> None:
    url = os.environ.get("BACKEND_URL", "http://127.0.0.1:8081/items")
    count = int(os.environ.get("REQUESTS", "20"))
    interval = float(os.environ.get("INTERVAL", "0.1"))
    for _ in range(count):
        # a new session, so a new connection, per call: one TCP handshake each. Closing the session
        # after the response was read closes the connection now (requests.get alone leaves it
        # to the garbage collector)
        with requests.Session() as session:
            session.get(url, timeout=5).raise_for_status()
        time.sleep(interval)
    # a port nothing listens on: a refused connection attempt, counted with error.type=refused
    refused_url = os.environ.get("REFUSED_URL", "http://127.0.0.1:9/")
    try:
        requests.get(refused_url, timeout=5)
    except requests.ConnectionError:
        pass
    print(f"frontend: {count} requests to {url}, one to {refused_url}", file=sys.stderr, flush=True)
    # stay a little, so that a periodic export shows every connection closed; the SDK exports once
    # more when the process exits
    time.sleep(float(os.environ.get("LINGER", "2")))


if __name__ == "__main__":
    main()
