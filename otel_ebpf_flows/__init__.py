"""otel-ebpf-flows: the Linux kernel's view of a service's TCP connections, as OpenTelemetry.

::

    from otel_ebpf_flows import EbpfFlowsInstrumentor
    EbpfFlowsInstrumentor().instrument()     # on the global MeterProvider

or, with no code change, ``opentelemetry-instrument python app.py``. The README
lists every metric; ``otel-ebpf-flows doctor`` says what this host supports.
"""

from ._config import Config
from ._instrumentor import EbpfFlowsInstrumentor
from .exceptions import BpfError, ConfigurationError, EbpfFlowsError, UnsupportedEnvironment
from .version import __version__

__all__ = [
    "BpfError",
    "Config",
    "ConfigurationError",
    "EbpfFlowsError",
    "EbpfFlowsInstrumentor",
    "UnsupportedEnvironment",
    "__version__",
]
