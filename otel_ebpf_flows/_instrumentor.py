"""``EbpfFlowsInstrumentor``: the kernel's TCP view of this process, on its own MeterProvider.

It is an OpenTelemetry ``BaseInstrumentor`` registered as the ``ebpf_flows``
entry point, so ``opentelemetry-instrument python app.py`` loads it, and
``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=ebpf_flows`` turns it off.
``instrument()`` never raises into the application: where eBPF cannot be used it
logs one warning that names what is missing and how to fix it, and (in the
default ``mode=auto``, on Linux) falls back to the node agent or to the
unprivileged sock_diag mode (see ``_sockdiag``); where nothing can run, it does
nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Callable, Collection, Dict, FrozenSet, List, Optional, Sequence, Tuple

from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.metrics import MeterProvider, get_meter

from . import _spans
from ._config import ENV_MODE, Config, load_config
from ._kernel import KernelSource, has_privilege, listening_socket_inodes, own_socket_inodes
from ._sockdiag import CANNOT_SEE, SockDiagSource
from ._sockdiag import MARKER as SOCK_DIAG_MARKER
from ._telemetry import Instruments, Pipeline
from .exceptions import EbpfFlowsError, UnsupportedEnvironment
from .version import __version__

_log = logging.getLogger("otel_ebpf_flows")

SCOPE_NAME = "otel_ebpf_flows"


class EbpfFlowsInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Kernel TCP metrics for this process's connections.

    ``instrument(meter_provider=None, tracer_provider=None, **config)`` where each
    configuration keyword (``max_peers``, ``max_connections``, ``max_flows``,
    ``ring_buffer_bytes``, ``poll_interval``, ``sample_interval``) can also be set
    by its ``OTEL_PYTHON_EBPF_FLOWS_*`` variable.
    """

    _lock = threading.Lock()
    _pipeline: Optional[Pipeline] = None
    # id(meter) -> (meter, its instruments); the meter is held so that its id
    # cannot be reused by another provider's meter while the entry exists
    _instruments: Dict[int, Tuple[Any, Instruments]] = {}
    # What a forked child restarts with (see _after_fork_in_child); None when not instrumented.
    _setup: Optional[Tuple[Config, Instruments, Optional[trace.TracerProvider]]] = None
    # Mode "agent": span enrichment through the node agent (see _agent_client); None otherwise.
    _agent: Optional[Any] = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()

    @property
    def pipeline(self) -> Optional[Pipeline]:
        """The running reader, or None when not instrumented (or a no-op)."""
        return type(self)._pipeline

    def _instrument(self, **kwargs: Any) -> None:
        cls = type(self)
        try:
            meter_provider: Optional[MeterProvider] = kwargs.pop("meter_provider", None)
            tracer_provider: Optional[trace.TracerProvider] = kwargs.pop("tracer_provider", None)
            config = load_config(kwargs)
            if _instrument_via_agent(cls, config, tracer_provider):
                return
            meter = get_meter(SCOPE_NAME, __version__, meter_provider)
            with cls._lock:
                entry = cls._instruments.get(id(meter))
                if entry is not None and entry[0] is meter:
                    instruments = entry[1]
                else:
                    instruments = Instruments(meter, lambda: cls._pipeline)
                    cls._instruments[id(meter)] = (meter, instruments)
            if config.mode == "off":
                _log.info("otel-ebpf-flows: kernel TCP telemetry is off (%s=off)", ENV_MODE)
                return
            pipeline = _make_pipeline(config, instruments, tracer_provider)
            source = pipeline.source
            with cls._lock:
                cls._pipeline = pipeline
                cls._setup = (config, instruments, tracer_provider)
            if isinstance(source, SockDiagSource):
                _log.warning("otel-ebpf-flows: %s", sock_diag_notice(source))
            else:
                _log.info("otel-ebpf-flows: kernel TCP telemetry on (%s programs)", getattr(source, "variant", "?"))
        except EbpfFlowsError as exc:
            _log.warning("otel-ebpf-flows: kernel TCP telemetry is off: %s", exc)
        except Exception:
            _log.warning("otel-ebpf-flows: kernel TCP telemetry is off after an unexpected error",
                         exc_info=True)

    def _uninstrument(self, **kwargs: Any) -> None:
        cls = type(self)
        with cls._lock:
            pipeline, cls._pipeline = cls._pipeline, None
            cls._setup = None
            agent, cls._agent = cls._agent, None
        if agent is not None:
            agent.stop()
        if pipeline is not None:
            try:
                pipeline.stop()
            except Exception:
                _log.warning("otel-ebpf-flows: error while detaching", exc_info=True)


def _instrument_via_agent(cls: Any, config: Config, tracer_provider: Optional[trace.TracerProvider]) -> bool:
    """Mode "agent": without the privilege to load probes, and with the node agent's socket present,
    enrich spans through the agent and register no metric instrument (the agent exports this
    process's metrics under its Resource). True if this mode was chosen."""
    if config.mode not in ("auto", "agent") or (config.mode == "auto" and has_privilege()):
        return False
    if not os.path.exists(config.agent_socket):
        if config.mode == "agent":
            raise UnsupportedEnvironment(
                f"mode=agent, but there is no otel-ebpf-flows node agent socket at {config.agent_socket}: start "
                f"`otel-ebpf-flows agent` on this host (docs/agent.md) or set {ENV_MODE}=auto")
        return False
    from ._agent_client import AgentClient, AgentSpans

    if not config.span_enrichment:
        _log.info("otel-ebpf-flows: mode agent: the agent at %s exports this process's metrics; span "
                  "enrichment is off (OTEL_PYTHON_EBPF_FLOWS_SPAN_ENRICHMENT)", config.agent_socket)
        return True
    client = AgentClient(config.agent_socket)
    client.reconnect()  # a failure is logged once, and retried in the background
    spans = _span_enrichment(client, config)
    assert spans is not None
    client.on_event = spans.on_conn_event
    agent = AgentSpans(client, spans, _attacher(spans, tracer_provider), config.poll_interval)
    agent.setup = (config, tracer_provider)  # what a forked child starts again with
    agent.start()
    with cls._lock:
        old, cls._agent = cls._agent, agent
    if old is not None:
        old.stop()
    _log.info("otel-ebpf-flows: mode agent (no privilege to load probes here): spans are enriched through the "
              "agent at %s; this process registers no metrics, the agent exports them under its Resource",
              config.agent_socket)
    return True


def _make_pipeline(config: Config, instruments: Instruments, tracer_provider: Optional[trace.TracerProvider],
                   inherited: Optional[FrozenSet[int]] = None, parents: Sequence[int] = ()) -> Pipeline:
    """The pipeline of mode ebpf or sock_diag: the first that ``config.mode`` allows and that starts.

    ``auto``: ebpf if the probes load, else sock_diag. A named mode is that mode or nothing (its
    error is raised). Mode agent (no privilege here, the node agent's socket present) is chosen
    before this, by ``_instrument_via_agent``: it registers no instruments and needs no pipeline.
    """
    why = ""
    if config.mode in ("auto", "ebpf"):
        try:
            return _ebpf_pipeline(config, instruments, tracer_provider, inherited, parents)
        except EbpfFlowsError as exc:
            if config.mode == "ebpf" or not sys.platform.startswith("linux"):  # no fallback off Linux
                raise
            why = str(exc)
    # mode agent was chosen (or refused) by _instrument_via_agent before any instrument was made
    return _sock_diag_pipeline(config, instruments, inherited, why)


def _sock_diag_pipeline(config: Config, instruments: Instruments, inherited: Optional[FrozenSet[int]],
                        why: str) -> Pipeline:
    """The unprivileged fallback: this process's sockets from sock_diag dumps (see _sockdiag)."""
    source = SockDiagSource(config, inherited=inherited, why=why)
    pipeline = Pipeline(source, instruments, config.max_peers, min(config.poll_interval, config.sock_diag_interval),
                        config.sock_diag_interval, marker=SOCK_DIAG_MARKER)
    try:
        pipeline.start()
    except UnsupportedEnvironment as exc:
        raise UnsupportedEnvironment(f"{why}; {exc}" if why else str(exc)) from None
    return pipeline


def sock_diag_notice(source: SockDiagSource) -> str:
    """The one line instrument() logs in sock_diag mode: why, what it cannot see, how to get full mode."""
    reason, _, fix = source.why.partition("; ")
    if reason:
        how = (f"{fix or 'fix what `otel-ebpf-flows doctor` reports'}, or run the otel-ebpf-flows node agent "
               "(`otel-ebpf-flows doctor` says what this host lacks)")
    else:
        how = f"mode=auto ({ENV_MODE} unset) where the probes can load"
    return (f"kernel TCP telemetry runs in sock_diag mode {f'because {reason}' if reason else '(mode=sock_diag)'}: "
            f"this process's connections are read from sock_diag/TCP_INFO every "
            f"{source.config.sock_diag_interval:g} s (points carry ebpf_flows.source=sock_diag); it cannot see "
            f"{CANNOT_SEE}. For full mode: {how}")


def _ebpf_pipeline(config: Config, instruments: Instruments, tracer_provider: Optional[trace.TracerProvider],
                   inherited: Optional[FrozenSet[int]] = None, parents: Sequence[int] = ()) -> Pipeline:
    """Load the probes for this process and start its reader (and span enrichment)."""
    # span records start once a tracer provider is hooked (not at all in a metrics-only process)
    source = KernelSource(config, span_mode=config.span_enrichment, inherited=inherited, parents=parents,
                          defer_spans=True)
    spans = _span_enrichment(source, config)
    pipeline = Pipeline(
        source, instruments, config.max_peers, config.poll_interval, config.sample_interval,
        spans=spans, attach_spans=None if spans is None else _attacher(spans, tracer_provider, source.enable_spans),
    )
    try:
        pipeline.start()
    except BaseException:
        if spans is not None:
            _spans.detach(spans)
        raise
    return pipeline


def _span_enrichment(source: _spans.ConnectionSource, config: Config) -> Optional[_spans.SpanEnrichment]:
    if not config.span_enrichment:
        return None
    return _spans.SpanEnrichment(
        source, capacity=2 * config.max_connections, max_events=config.max_span_events,
        handshake_threshold=config.degraded_handshake_threshold,
        rtt_threshold=config.degraded_rtt_threshold,
    )


def _attacher(spans: _spans.SpanEnrichment, tracer_provider: Optional[trace.TracerProvider],
              on_attached: Callable[[], None] = lambda: None) -> Callable[[], bool]:
    """Hooks span enrichment into the tracer provider; True once done (or given up).

    The global provider may be set after ``instrument()``: until then it is a
    proxy, and the reader thread calls this again on every poll. ``on_attached``
    runs once hooked (the kernel source then starts its span records).
    """
    def attach() -> bool:
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        if _spans.attach(provider, spans):
            _log.debug("otel-ebpf-flows: enriching the spans of %r", provider)
            on_attached()
            return True
        if tracer_provider is None and isinstance(provider, trace.ProxyTracerProvider):
            return False  # not set yet: try again later
        _log.info("otel-ebpf-flows: span enrichment is off: the tracer provider %s is not the "
                  "OpenTelemetry SDK's (pip install opentelemetry-sdk and set an SDK TracerProvider)",
                  type(provider).__name__)
        return True

    attach()
    return attach


def _before_fork() -> None:
    """Hold the reader between iterations; share our listeners safely with the child.

    After the fork both processes hold every listening socket, and either may
    accept a given connection: claim mode makes each count only the
    connections it then reads or writes (see ``KernelSource.enable_claim``).
    Turned on before the fork, so no connection falls between the two.
    """
    pipeline = EbpfFlowsInstrumentor._pipeline
    if pipeline is None:
        return
    pipeline.quiesce()
    source = pipeline.source
    try:
        if isinstance(source, KernelSource) and not source.claiming and source.has_listeners():
            source.enable_claim()
    except Exception:  # never fail a fork
        _log.debug("otel-ebpf-flows: could not turn on claim mode before fork", exc_info=True)


def _after_fork_in_parent() -> None:
    pipeline = EbpfFlowsInstrumentor._pipeline
    if pipeline is not None:
        pipeline.resume()


def _after_fork_in_child() -> None:
    """A forked child reports its own connections, never its parent's.

    The parent's probes follow the parent's pid and its reader thread does not
    exist here: the child closes its copies of the parent's kernel objects
    (the parent's probes stay attached for the parent) and loads the probes for
    itself (before fork() returns when it inherited a listener, which it may
    accept on at once; otherwise in a thread of its own) on the
    same instruments, hence the same MeterProvider. Sockets it inherited stay
    counted by the parent, except listeners, which both share in claim mode.
    The reader was quiesced across the fork, so no lock it uses is inherited
    held.
    """
    cls = EbpfFlowsInstrumentor
    agent, cls._agent = cls._agent, None
    if agent is not None:  # mode agent: the child asks the agent for its own process's data
        cls._lock = threading.Lock()
        _spans.after_fork_in_child()
        agent.client.close()
        threading.Thread(target=_instrument_via_agent, args=(cls, *agent.setup),
                         name="otel-ebpf-flows-restart", daemon=True).start()
    pipeline, setup = cls._pipeline, cls._setup
    if pipeline is None:
        return
    cls._pipeline = None
    cls._lock = threading.Lock()  # in case another thread held it at fork
    _spans.after_fork_in_child()
    parents: List[int] = []
    try:
        getattr(pipeline.source, "after_fork_in_child", lambda: None)()
        pipeline.resume()
        if isinstance(pipeline.source, KernelSource) and pipeline.source.claiming:
            parents = pipeline.source.server_sockets_counted()
        pipeline.source.close()
    except Exception:  # pragma: no cover - never fail a fork
        pass
    finally:
        pipeline.discard()
    if setup is None:
        cls._setup = None
        try:
            cls()._is_instrumented_by_opentelemetry = False
        except Exception:  # pragma: no cover
            pass
        return
    try:
        inherited = frozenset(own_socket_inodes())
        if inherited & listening_socket_inodes():
            # A pre-fork worker: it may accept the moment fork() returns, so its probes
            # are attached before then (tens of ms, see benchmarks/README.md), and a
            # connection it takes from the shared queue is never counted by nobody.
            _restart_in_child(setup, inherited, parents)
            return
        threading.Thread(target=_restart_in_child, args=(setup, inherited, parents),
                         name="otel-ebpf-flows-restart", daemon=True).start()
    except Exception:  # pragma: no cover - never fail a fork
        _log.warning("otel-ebpf-flows: kernel TCP telemetry is off in forked process %d: the restart "
                     "failed", os.getpid(), exc_info=True)


def _restart_in_child(setup: Tuple[Config, Instruments, Optional[trace.TracerProvider]],
                      inherited: FrozenSet[int], parents: Sequence[int] = ()) -> None:
    cls = EbpfFlowsInstrumentor
    config, instruments, tracer_provider = setup
    try:
        pipeline = _make_pipeline(config, instruments, tracer_provider, inherited, parents)
    except EbpfFlowsError as exc:
        _log.warning("otel-ebpf-flows: kernel TCP telemetry is off in forked process %d: %s", os.getpid(), exc)
        return
    except Exception:
        _log.warning("otel-ebpf-flows: kernel TCP telemetry is off in forked process %d after an "
                     "unexpected error", os.getpid(), exc_info=True)
        return
    with cls._lock:
        # uninstrument(), or instrument() anew, while this ran: theirs wins
        current = cls._setup is setup and cls._pipeline is None
        if current:
            cls._pipeline = pipeline
    if not current:
        pipeline.stop()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
