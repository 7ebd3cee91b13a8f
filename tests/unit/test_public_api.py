"""The public surface: exported names, entry points, and the instrumentor's degrade path."""

from __future__ import annotations

import logging
import sys
from importlib import metadata
from typing import List

import pytest

import otel_ebpf_flows
from otel_ebpf_flows import EbpfFlowsInstrumentor, UnsupportedEnvironment, _instrumentor, _kernel
from otel_ebpf_flows._sockdiag import SockDiagSource

from .fakes import FakeSource


def _entry_points(group: str) -> List[metadata.EntryPoint]:
    eps = metadata.entry_points()
    if hasattr(eps, "select"):  # Python 3.10+
        return list(eps.select(group=group))
    return list(eps.get(group, []))  # Python 3.9


def test_all_is_pinned():
    assert otel_ebpf_flows.__all__ == [
        "BpfError",
        "Config",
        "ConfigurationError",
        "EbpfFlowsError",
        "EbpfFlowsInstrumentor",
        "UnsupportedEnvironment",
        "__version__",
    ]
    assert otel_ebpf_flows.__all__ == sorted(otel_ebpf_flows.__all__)
    for name in otel_ebpf_flows.__all__:
        assert getattr(otel_ebpf_flows, name) is not None


def test_version_is_the_distribution_version():
    assert otel_ebpf_flows.__version__ == metadata.version("otel-ebpf-flows")


def test_exception_hierarchy():
    assert issubclass(otel_ebpf_flows.ConfigurationError, (otel_ebpf_flows.EbpfFlowsError, ValueError))
    assert issubclass(otel_ebpf_flows.UnsupportedEnvironment, (otel_ebpf_flows.EbpfFlowsError, RuntimeError))
    assert issubclass(otel_ebpf_flows.BpfError, (otel_ebpf_flows.EbpfFlowsError, OSError))
    err = otel_ebpf_flows.BpfError("bpf_object__load", 1)
    assert err.errno == 1 and "bpf_object__load" in str(err) and err.what == "bpf_object__load"


def test_instrumentor_entry_point():
    (ep,) = [ep for ep in _entry_points("opentelemetry_instrumentor") if ep.name == "ebpf_flows"]
    assert ep.value == "otel_ebpf_flows:EbpfFlowsInstrumentor"
    assert ep.load() is EbpfFlowsInstrumentor


def test_console_script_is_declared():
    (ep,) = [ep for ep in _entry_points("console_scripts") if ep.name == "otel-ebpf-flows"]
    assert ep.value == "otel_ebpf_flows.__main__:main"


def test_instrumentor_has_no_library_dependencies():
    assert list(EbpfFlowsInstrumentor().instrumentation_dependencies()) == []


# -- the degrade path ---------------------------------------------------------------------------


@pytest.fixture
def provider(make_provider):
    return make_provider()[0]


@pytest.fixture
def instrumentor(monkeypatch):
    """The singleton, never loading real probes, always uninstrumented afterwards."""

    def unsupported() -> None:
        raise AssertionError("a unit test reached the real kernel checks")

    monkeypatch.setattr(_kernel, "check_environment", unsupported)
    inst = EbpfFlowsInstrumentor()
    assert not inst.is_instrumented_by_opentelemetry
    yield inst
    if inst.is_instrumented_by_opentelemetry:
        inst.uninstrument()
    assert EbpfFlowsInstrumentor().pipeline is None


def _warnings(caplog) -> List[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


FIX = "grant CAP_BPF and CAP_PERFMON (the fix)"


def test_an_unsupported_environment_in_ebpf_mode_logs_one_warning_and_does_nothing(
    instrumentor, provider, monkeypatch, caplog
):
    """mode=ebpf: the probes or nothing (before sock_diag mode, what every unprivileged process got)."""
    def unsupported() -> None:
        raise UnsupportedEnvironment(f"loading eBPF programs needs privilege; {FIX}")

    monkeypatch.setattr(_kernel, "check_environment", unsupported)
    caplog.set_level(logging.DEBUG)

    instrumentor.instrument(meter_provider=provider, mode="ebpf")  # never raises

    warnings = _warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert FIX in warnings[0].getMessage()
    assert warnings[0].name == "otel_ebpf_flows"
    assert warnings[0].exc_info is None  # a clear sentence, not a traceback
    assert instrumentor.pipeline is None
    assert instrumentor.is_instrumented_by_opentelemetry

    caplog.clear()
    instrumentor.uninstrument()
    assert not instrumentor.is_instrumented_by_opentelemetry
    assert _warnings(caplog) == []

    # and it can be instrumented again, this time where the (fake) kernel works
    monkeypatch.setattr(_instrumentor, "KernelSource", lambda config, **_kw: FakeSource())
    instrumentor.instrument(meter_provider=provider, poll_interval=0.01)
    assert instrumentor.pipeline is not None and instrumentor.pipeline.source.started
    assert _warnings(caplog) == []
    source = instrumentor.pipeline.source
    instrumentor.uninstrument()
    assert source.closed and instrumentor.pipeline is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sock_diag is Linux's")
def test_an_unsupported_environment_falls_back_to_sock_diag_with_one_warning(
    instrumentor, provider, monkeypatch, caplog
):
    def unsupported() -> None:
        raise UnsupportedEnvironment(f"loading eBPF programs needs privilege; {FIX}")

    monkeypatch.setattr(_kernel, "check_environment", unsupported)
    caplog.set_level(logging.DEBUG)

    instrumentor.instrument(meter_provider=provider)  # mode auto; never raises

    warnings = _warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert message.startswith("otel-ebpf-flows: kernel TCP telemetry runs in sock_diag mode because loading eBPF "
                              "programs needs privilege: ")
    assert "it cannot see connections opened and closed between two polls" in message
    assert f"For full mode: {FIX}, or run the otel-ebpf-flows node agent" in message
    assert warnings[0].exc_info is None
    pipeline = instrumentor.pipeline
    assert pipeline is not None and isinstance(pipeline.source, SockDiagSource)
    caplog.clear()
    instrumentor.uninstrument()
    assert instrumentor.pipeline is None and _warnings(caplog) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sock_diag is Linux's")
def test_mode_sock_diag_is_used_even_where_the_probes_would_load(instrumentor, provider, monkeypatch, caplog):
    monkeypatch.setattr(_instrumentor, "KernelSource", lambda config, **_kw: FakeSource())
    caplog.set_level(logging.DEBUG)
    instrumentor.instrument(meter_provider=provider, mode="sock_diag", sock_diag_interval=0.5)
    assert isinstance(instrumentor.pipeline.source, SockDiagSource)
    (warning,) = [w.getMessage() for w in _warnings(caplog)]
    assert warning.startswith("otel-ebpf-flows: kernel TCP telemetry runs in sock_diag mode (mode=sock_diag): "
                              "this process's connections are read from sock_diag/TCP_INFO every 0.5 s")
    assert warning.endswith("For full mode: mode=auto (OTEL_PYTHON_EBPF_FLOWS_MODE unset) where the probes can load")
    instrumentor.uninstrument()


def test_mode_off_does_nothing_and_says_so_quietly(instrumentor, provider, monkeypatch, caplog):
    monkeypatch.setenv("OTEL_PYTHON_EBPF_FLOWS_MODE", "off")
    monkeypatch.setattr(_instrumentor, "KernelSource", lambda config, **_kw: FakeSource())
    caplog.set_level(logging.DEBUG)
    instrumentor.instrument(meter_provider=provider)
    assert instrumentor.pipeline is None and _warnings(caplog) == []
    assert any("kernel TCP telemetry is off (OTEL_PYTHON_EBPF_FLOWS_MODE=off)" in r.getMessage()
               for r in caplog.records)


def test_mode_agent_without_an_agent_logs_one_warning(instrumentor, provider, monkeypatch, caplog):
    monkeypatch.setattr(_instrumentor, "KernelSource", lambda config, **_kw: FakeSource())
    caplog.set_level(logging.DEBUG)
    instrumentor.instrument(meter_provider=provider, mode="agent")
    warnings = _warnings(caplog)
    assert [w.getMessage() for w in warnings] == [
        "otel-ebpf-flows: kernel TCP telemetry is off: mode=agent, but there is no otel-ebpf-flows node agent "
        "socket at /run/otel-ebpf-flows/agent.sock: start `otel-ebpf-flows agent` on this host (docs/agent.md) "
        "or set OTEL_PYTHON_EBPF_FLOWS_MODE=auto"]
    assert instrumentor.pipeline is None


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"max_peer": 10}, "max_peer"),
        ({"max_peers": 0}, "max_peers=0"),
        ({"ring_buffer_bytes": 5000}, "ring_buffer_bytes=5000"),
        ({"sample_interval": "often"}, "sample_interval='often'"),
    ],
)
def test_an_invalid_keyword_logs_one_warning_naming_it(instrumentor, provider, caplog, kwargs, named):
    caplog.set_level(logging.DEBUG)

    instrumentor.instrument(meter_provider=provider, **kwargs)

    warnings = _warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert named in warnings[0].getMessage()
    assert instrumentor.pipeline is None

    instrumentor.uninstrument()
    assert not instrumentor.is_instrumented_by_opentelemetry


def test_an_invalid_variable_logs_one_warning_naming_it(instrumentor, provider, caplog, monkeypatch):
    monkeypatch.setenv("OTEL_PYTHON_EBPF_FLOWS_MAX_FLOWS", "lots")
    caplog.set_level(logging.DEBUG)

    instrumentor.instrument(meter_provider=provider)

    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert "OTEL_PYTHON_EBPF_FLOWS_MAX_FLOWS='lots'" in warnings[0].getMessage()


def test_an_unexpected_error_is_one_warning_too(instrumentor, provider, caplog, monkeypatch):
    def broken(config, **_kw):
        raise KeyError("something nobody planned for")

    monkeypatch.setattr(_instrumentor, "KernelSource", broken)
    caplog.set_level(logging.DEBUG)

    instrumentor.instrument(meter_provider=provider)

    warnings = _warnings(caplog)
    assert len(warnings) == 1 and warnings[0].exc_info is not None
    assert instrumentor.pipeline is None


def test_a_source_failing_after_it_started_is_closed(instrumentor, provider, caplog, monkeypatch):
    sources: List[FakeSource] = []

    def failing(config, **_kw):
        sources.append(FakeSource())
        sources[-1].fail_first_sample = True
        return sources[-1]

    monkeypatch.setattr(_instrumentor, "KernelSource", failing)
    caplog.set_level(logging.DEBUG)

    instrumentor.instrument(meter_provider=provider)

    assert len(_warnings(caplog)) == 1
    assert sources[0].started and sources[0].closed
    assert instrumentor.pipeline is None


def test_instrumenting_twice_is_harmless(instrumentor, provider, caplog, monkeypatch):
    monkeypatch.setattr(_instrumentor, "KernelSource", lambda config, **_kw: FakeSource())
    instrumentor.instrument(meter_provider=provider, poll_interval=0.01)
    first = instrumentor.pipeline
    EbpfFlowsInstrumentor().instrument(meter_provider=provider)  # the same singleton
    assert EbpfFlowsInstrumentor() is instrumentor
    assert instrumentor.pipeline is first
    instrumentor.uninstrument()
    assert first.source.closed
