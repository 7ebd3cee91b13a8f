"""``EbpfFlowsInstrumentor``: the kernel's TCP view of this process, on its own MeterProvider.

It is an OpenTelemetry ``BaseInstrumentor`` registered as the ``ebpf_flows``
entry point, so ``opentelemetry-instrument python app.py`` loads it, and
``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=ebpf_flows`` turns it off.
``instrument()`` never raises into the application: where eBPF cannot be used it
logs one warning that names what is missing and how to fix it, and does nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Collection, Dict, Optional, Tuple

from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.metrics import MeterProvider, get_meter

from . import _spans
from ._config import Config, load_config
from ._kernel import KernelSource
from ._telemetry import Instruments, Pipeline
from .exceptions import EbpfFlowsError
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
            meter = get_meter(SCOPE_NAME, __version__, meter_provider)
            with cls._lock:
                entry = cls._instruments.get(id(meter))
                if entry is not None and entry[0] is meter:
                    instruments = entry[1]
                else:
                    instruments = Instruments(meter, lambda: cls._pipeline)
                    cls._instruments[id(meter)] = (meter, instruments)
            source = KernelSource(config, span_mode=config.span_enrichment)
            spans = _span_enrichment(source, config)
            pipeline = Pipeline(
                source, instruments, config.max_peers,
                config.poll_interval, config.sample_interval,
                spans=spans, attach_spans=None if spans is None else _attacher(spans, tracer_provider),
            )
            pipeline.start()
            cls._pipeline = pipeline
            _log.info("otel-ebpf-flows: kernel TCP telemetry on (%s programs)", getattr(source, "variant", "?"))
        except EbpfFlowsError as exc:
            _log.warning("otel-ebpf-flows: kernel TCP telemetry is off: %s", exc)
        except Exception:
            _log.warning("otel-ebpf-flows: kernel TCP telemetry is off after an unexpected error",
                         exc_info=True)

    def _uninstrument(self, **kwargs: Any) -> None:
        cls = type(self)
        pipeline, cls._pipeline = cls._pipeline, None
        if pipeline is not None:
            try:
                pipeline.stop()
            except Exception:
                _log.warning("otel-ebpf-flows: error while detaching", exc_info=True)


def _span_enrichment(source: KernelSource, config: Config) -> Optional[_spans.SpanEnrichment]:
    if not config.span_enrichment:
        return None
    return _spans.SpanEnrichment(
        source, capacity=2 * config.max_connections, max_events=config.max_span_events,
        handshake_threshold=config.degraded_handshake_threshold,
        rtt_threshold=config.degraded_rtt_threshold,
    )


def _attacher(spans: _spans.SpanEnrichment,
              tracer_provider: Optional[trace.TracerProvider]) -> Callable[[], bool]:
    """Hooks span enrichment into the tracer provider; True once done (or given up).

    The global provider may be set after ``instrument()``: until then it is a
    proxy, and the reader thread calls this again on every poll.
    """
    def attach() -> bool:
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        if _spans.attach(provider, spans):
            _log.debug("otel-ebpf-flows: enriching the spans of %r", provider)
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
    pipeline = EbpfFlowsInstrumentor._pipeline
    if pipeline is not None:
        pipeline.quiesce()


def _after_fork_in_parent() -> None:
    pipeline = EbpfFlowsInstrumentor._pipeline
    if pipeline is not None:
        pipeline.resume()


def _after_fork_in_child() -> None:
    """A forked child must not report its parent's connections as its own.

    The parent's probes follow the parent's pid and its reader thread does not
    exist in the child, so the child drops the pipeline (its inherited copies of
    the kernel objects close with the child) and reports no kernel TCP metrics
    until it is instrumented itself (gunicorn: in ``post_fork``). The reader
    was quiesced across the fork, so no lock it uses is inherited held.
    """
    pipeline = EbpfFlowsInstrumentor._pipeline
    if pipeline is None:
        return
    pipeline.resume()
    EbpfFlowsInstrumentor._pipeline = None
    try:
        # The instrumentor may be instrumented again in the child.
        EbpfFlowsInstrumentor()._is_instrumented_by_opentelemetry = False
    except Exception:  # pragma: no cover - never fail a fork
        pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
