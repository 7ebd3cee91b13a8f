"""Span enrichment through the node agent, for a service that cannot load probes itself.

When ``instrument()`` finds it lacks the privilege to load eBPF programs and the
agent's socket (``agent_socket``, env ``OTEL_PYTHON_EBPF_FLOWS_AGENT_SOCKET``,
default ``/run/otel-ebpf-flows/agent.sock``) exists, it runs in mode ``agent``:

- span enrichment works exactly as in privileged mode (:mod:`._spans` unchanged):
  :class:`AgentClient` is its :class:`~otel_ebpf_flows._spans.ConnectionSource`,
  asking the agent for this process's connection records and thread slots;
- NO metric instrument is registered: ``otel-ebpf-flows agent`` exports this
  process's TCP metrics under its Resource (built from its environment), so
  nothing is counted twice.

The agent identifies this process by the kernel's SO_PEERCRED and serves it only
its own data. Nothing here may block or break the application: every request has
a short timeout (``REQUEST_TIMEOUT_S``); a dead, slow or confused agent makes spans
go out unenriched, with one warning, and a background thread reconnects with
backoff. The wire format is in :mod:`._agent_protocol`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import _agent_protocol as proto
from ._source import FlowEvent
from .exceptions import EbpfFlowsError

_log = logging.getLogger("otel_ebpf_flows")

#: What a span's end may wait for the agent, per request.
REQUEST_TIMEOUT_S = 0.05
#: What instrument() and a reconnection wait for the agent to start following this process.
HELLO_TIMEOUT_S = 2.0
#: Late replies owed before the agent counts as down.
MAX_LATE = 16
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0


class AgentUnavailable(EbpfFlowsError):
    """The agent cannot be reached or did not answer as the protocol says."""


class AgentClient:
    """This process's connection to the agent; implements ``_spans.ConnectionSource``.

    Thread-safe: one request at a time on the one connection. A request that fails
    or times out closes the connection (a reply may be half read) and marks the
    agent down; :meth:`reconnect` (the background thread) brings it back.
    """

    def __init__(self, path: str, on_event: Callable[[FlowEvent], None] = lambda e: None,
                 timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.path = path
        self.on_event = on_event
        self.timeout = timeout
        self.pid = os.getpid()
        self.agent_pid: Optional[int] = None
        self.tracks_threads = False
        self.lost = 0
        self._sock: Optional[socket.socket] = None
        self._buf = bytearray()  # bytes of a reply not yet whole
        self._late = 0  # replies owed for requests that timed out
        self._lock = threading.Lock()
        self._warned = False
        self._retry_at = 0.0
        self._backoff = RETRY_MIN_S

    # -- connection ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self, timeout: float = HELLO_TIMEOUT_S) -> None:
        """Connect and say HELLO; raises AgentUnavailable naming the problem."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
            sock.sendall(proto.encode_frame(proto.HELLO, {}))
            kind, payload = proto.read_frame(sock)
        except (OSError, EOFError, proto.ProtocolError) as exc:
            sock.close()
            raise AgentUnavailable(f"the agent at {self.path} did not answer: {exc}") from None
        if kind != proto.WELCOME:
            sock.close()
            raise AgentUnavailable(f"the agent at {self.path} refused this process: "
                                   f"{payload.get('error', hex(kind))}")
        sock.settimeout(self.timeout)
        self.tracks_threads = bool(payload.get("tracks_threads"))
        with self._lock:
            old, self._sock = self._sock, sock
            self._buf = bytearray()
            self._late = 0
            self.pid = os.getpid()
        if old is not None:
            old.close()
        if self._warned:
            _log.warning("otel-ebpf-flows: the agent at %s answers again; spans are enriched again", self.path)
        self._warned = False
        self._backoff = RETRY_MIN_S

    def reconnect(self) -> bool:
        """Try again if the agent was down and the backoff has passed; True when connected."""
        if self._sock is not None and os.getpid() == self.pid:
            return True
        now = time.monotonic()
        if now < self._retry_at:
            return False
        try:
            self.connect()
            return True
        except AgentUnavailable as exc:
            self._down(str(exc))
            return False

    def _down(self, why: str) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(RETRY_MAX_S, self._backoff * 2)
        if not self._warned:
            self._warned = True
            _log.warning("otel-ebpf-flows: %s; spans are exported without kernel TCP attributes until it "
                         "does (retrying in the background). Fix: check `systemctl status otel-ebpf-flows` "
                         "or the agent pod", why)

    def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _request(self, kind: int, payload: Dict[str, Any], reply: int) -> Optional[Dict[str, Any]]:
        """One round trip, or None (agent down, busy or in a forked child: never waits long).

        A reply that does not come within the timeout is not lost: the bytes read so far
        stay buffered and the late reply is taken before the next one (a late DRAIN
        reply's records are still delivered), so a slow moment costs no records.
        """
        if self._sock is None or os.getpid() != self.pid:
            return None
        if not self._lock.acquire(timeout=self.timeout):
            return None
        failed: Optional[str] = None
        try:
            sock = self._sock
            if sock is None:
                return None
            deadline = time.monotonic() + self.timeout
            try:
                sock.settimeout(self.timeout)
                sock.sendall(proto.encode_frame(kind, payload))
                while True:
                    got, answer = self._read_reply(sock, deadline)
                    if self._late:
                        self._late -= 1
                        self._absorb(got, answer)
                        continue
                    break
            except socket.timeout:
                self._late += 1
                if self._late > MAX_LATE:
                    failed = f"the agent at {self.path} is not answering in time"
                return None
            except (OSError, EOFError, proto.ProtocolError) as exc:
                failed = f"the agent at {self.path} stopped answering ({exc or type(exc).__name__})"
                return None
            if got != reply:
                failed = f"the agent at {self.path} answered {answer.get('error', hex(got))!r}"
                return None
            return answer
        finally:
            self._lock.release()
            if failed is not None:
                self._down(failed)

    def _read_reply(self, sock: socket.socket, deadline: float) -> Tuple[int, Dict[str, Any]]:
        """The next whole frame, buffering partial reads; socket.timeout at the deadline."""
        while True:
            if len(self._buf) >= proto.HEADER.size:
                _kind, length = proto.decode_header(bytes(self._buf[: proto.HEADER.size]))
                end = proto.HEADER.size + length
                if len(self._buf) >= end:
                    frame = bytes(self._buf[:end])
                    del self._buf[:end]
                    return proto.decode_frame(frame)
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            sock.settimeout(left)
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise EOFError("the agent closed the connection")
            self._buf += chunk

    def _absorb(self, kind: int, answer: Dict[str, Any]) -> None:
        """A late reply: its records still count; anything else is stale."""
        if kind == proto.EVENTS:
            events, lost = proto.decode_events(answer)
            self.lost += lost
            for event in events:
                self.on_event(event)

    # -- ConnectionSource ----------------------------------------------------------------

    def drain_conn_events(self) -> None:
        answer = self._request(proto.DRAIN, {}, proto.EVENTS)
        if answer is None:
            return
        try:
            events, lost = proto.decode_events(answer)
        except proto.ProtocolError as exc:
            self._down(f"the agent at {self.path} sent a bad record ({exc})")
            return
        self.lost += lost
        for event in events:
            self.on_event(event)

    def thread_connections(self, tid: int) -> List[Tuple[int, int, int]]:
        answer = self._request(proto.THREADS, {"tid": tid}, proto.SLOTS)
        if answer is None:
            return []
        try:
            return proto.decode_slots(answer)
        except proto.ProtocolError as exc:
            self._down(f"the agent at {self.path} sent a bad thread record ({exc})")
            return []


class AgentSpans:
    """Span enrichment fed by the agent: the client, the span side, and a small refresher thread.

    The thread drains the agent's records every ``poll_interval`` (so connection
    state is known before spans end), prunes closed connections, reconnects after
    an outage, and retries hooking a global tracer provider that is set late.
    """

    def __init__(self, client: AgentClient, spans: Any, attach: Callable[[], bool], poll_interval: float) -> None:
        self.client = client
        self.spans = spans
        self._attach: Optional[Callable[[], bool]] = attach
        self._poll_interval = poll_interval
        #: (config, tracer provider): what a forked child instruments again with
        self.setup: Tuple[Any, Any] = (None, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otel-ebpf-flows-agent-client", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._poll_interval):
            try:
                if self.client.reconnect():
                    self.client.drain_conn_events()
                self.spans.prune()
                if self._attach is not None and self._attach():
                    self._attach = None
            except Exception:  # never let the thread die on a surprise
                _log.debug("otel-ebpf-flows: agent client iteration failed", exc_info=True)

    def stop(self) -> None:
        from . import _spans

        self.spans.enabled = False
        _spans.detach(self.spans)
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self.client.close()
