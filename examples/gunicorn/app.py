"""A WSGI app for the gunicorn example: each request is answered by one worker, which says which.

With ``EXAMPLE_UPSTREAM=host:port`` each request also makes one round trip to that
upstream TCP echo service (a client connection of the worker). ``SERVED`` and
``UPSTREAM_CONNECTS`` count, per process, what this worker did, so it can be
compared with what the worker's kernel TCP metrics say.
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Iterable, List, Tuple

SERVED = 0
UPSTREAM_CONNECTS = 0


def _upstream() -> None:
    global UPSTREAM_CONNECTS
    host, _, port = os.environ["EXAMPLE_UPSTREAM"].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        UPSTREAM_CONNECTS += 1
        s.sendall(b"ping")
        got = b""
        while len(got) < 4:
            chunk = s.recv(4 - len(got))
            if not chunk:
                break
            got += chunk


def app(environ: dict, start_response: Callable[[str, List[Tuple[str, str]]], object]) -> Iterable[bytes]:
    global SERVED
    if os.environ.get("EXAMPLE_UPSTREAM"):
        _upstream()
    SERVED += 1
    body = f"served by worker {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
