"""Exceptions of otel-ebpf-flows.

Raised only from explicit APIs (a :class:`~otel_ebpf_flows.KernelSource` the
caller opens, configuration parsing, the command line). The instrumentor never
lets one reach the host application: it logs once and becomes a no-op.
"""

from __future__ import annotations


class EbpfFlowsError(Exception):
    """Base of every error this package raises."""


class ConfigurationError(EbpfFlowsError, ValueError):
    """A configuration keyword or ``OTEL_PYTHON_EBPF_FLOWS_*`` variable is invalid."""


class UnsupportedEnvironment(EbpfFlowsError, RuntimeError):
    """eBPF cannot be used here (not Linux, no libbpf, no BTF, no privilege); says how to fix it."""


class BpfError(EbpfFlowsError, OSError):
    """A libbpf or kernel call failed; ``errno`` holds the kernel's error number."""

    def __init__(self, what: str, code: int = 0) -> None:
        import os

        detail = f": {os.strerror(code)} (errno {code})" if code else ""
        super().__init__(code, f"{what}{detail}")
        self.what = what
