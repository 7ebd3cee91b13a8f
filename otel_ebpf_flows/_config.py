"""Configuration: keywords of ``instrument()``, each also an environment variable.

A keyword wins over its variable; a variable wins over the default. Every value
is validated, and a bad one raises :class:`~otel_ebpf_flows.exceptions.ConfigurationError`
naming the keyword or variable, the value, and what is accepted (the
instrumentor turns that into one logged warning and a no-op).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import attrs

from .exceptions import ConfigurationError

#: Distinct peers per metric before further peers fold into ``_OTHER`` (default 200).
ENV_MAX_PEERS = "OTEL_PYTHON_EBPF_FLOWS_MAX_PEERS"
#: Connections tracked at once in the kernel (default 65536); more are counted as map evictions.
ENV_MAX_CONNECTIONS = "OTEL_PYTHON_EBPF_FLOWS_MAX_CONNECTIONS"
#: Peer series the kernel keeps apart (default 4096); more fold into an overflow series.
ENV_MAX_FLOWS = "OTEL_PYTHON_EBPF_FLOWS_MAX_FLOWS"
#: Kernel ring-buffer size in bytes, a power of two of at least 4096 (default 262144).
ENV_RING_BUFFER_BYTES = "OTEL_PYTHON_EBPF_FLOWS_RING_BUFFER_BYTES"
#: Seconds between ring-buffer reads by the reader thread (default 0.1).
ENV_POLL_INTERVAL = "OTEL_PYTHON_EBPF_FLOWS_POLL_INTERVAL"
#: Seconds between samples of live connections (bytes, RTT); at most 10 (default 5).
ENV_SAMPLE_INTERVAL = "OTEL_PYTHON_EBPF_FLOWS_SAMPLE_INTERVAL"
#: Enrich spans with the kernel's TCP events: true or false (default true).
ENV_SPAN_ENRICHMENT = "OTEL_PYTHON_EBPF_FLOWS_SPAN_ENRICHMENT"
#: Span events (retransmit, reset, zero window) kept per span; more are counted (default 16).
ENV_MAX_SPAN_EVENTS = "OTEL_PYTHON_EBPF_FLOWS_MAX_SPAN_EVENTS"
#: A span whose new connection's handshake took at least this many seconds is degraded (default 0.5).
ENV_DEGRADED_HANDSHAKE = "OTEL_PYTHON_EBPF_FLOWS_DEGRADED_HANDSHAKE_THRESHOLD"
#: A span whose connection's smoothed RTT is at least this many seconds is degraded (default 0.25).
ENV_DEGRADED_RTT = "OTEL_PYTHON_EBPF_FLOWS_DEGRADED_RTT_THRESHOLD"
#: Where the numbers come from: auto (default: ebpf if the probes load, else agent if a node agent's
#: socket is there, else sock_diag), ebpf, agent, sock_diag (unprivileged fallback) or off.
ENV_MODE = "OTEL_PYTHON_EBPF_FLOWS_MODE"
#: Seconds between sock_diag dumps in sock_diag mode (default 1): shorter connections can be missed.
ENV_SOCK_DIAG_INTERVAL = "OTEL_PYTHON_EBPF_FLOWS_SOCK_DIAG_INTERVAL"

#: Accepted values of ``mode``.
MODES = ("auto", "ebpf", "agent", "sock_diag", "off")
#: The node agent's socket (``otel-ebpf-flows agent``): used for span enrichment when this process
#: cannot load probes itself (default /run/otel-ebpf-flows/agent.sock).
ENV_AGENT_SOCKET = "OTEL_PYTHON_EBPF_FLOWS_AGENT_SOCKET"
DEFAULT_AGENT_SOCKET = "/run/otel-ebpf-flows/agent.sock"


def _bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _several_bits_set(value: Any) -> bool:
    return bool(value & (value - 1))


def _in_range(
    lo: float, hi: float, whole: bool = False, power_of_two: bool = False
) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    kinds = int if whole else (int, float)
    what = "a power of two" if power_of_two else "a whole number" if whole else "a number"
    expected = f"expected {what} from {_bound(lo)} to {_bound(hi)}"

    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, kinds)
            or not lo <= value <= hi
            or (power_of_two and _several_bits_set(value))
        ):
            raise ConfigurationError(f"{attribute.name}={value!r} is invalid: {expected}")

    return check


def _one_of(choices: Tuple[str, ...]) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            raise ConfigurationError(f"{attribute.name}={value!r} is invalid: expected one of {', '.join(choices)}")

    return check


def _boolean(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{attribute.name}={value!r} is invalid: expected true or false")


def _socket_path(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or len(value.encode()) > 107:
        raise ConfigurationError(f"{attribute.name}={value!r} is invalid: expected an absolute path of at most "
                                 "107 bytes (a Unix socket's limit)")


@attrs.frozen
class Config:
    max_peers: int = attrs.field(default=200, validator=_in_range(1, 100_000, whole=True))
    max_connections: int = attrs.field(default=65536, validator=_in_range(16, 4_194_304, whole=True))
    max_flows: int = attrs.field(default=4096, validator=_in_range(16, 1_048_576, whole=True))
    ring_buffer_bytes: int = attrs.field(
        default=262144, validator=_in_range(4096, 1 << 30, whole=True, power_of_two=True)
    )
    poll_interval: float = attrs.field(default=0.1, validator=_in_range(0.01, 5))
    sample_interval: float = attrs.field(default=5.0, validator=_in_range(0.1, 10))
    span_enrichment: bool = attrs.field(default=True, validator=_boolean)
    max_span_events: int = attrs.field(default=16, validator=_in_range(0, 1024, whole=True))
    degraded_handshake_threshold: float = attrs.field(default=0.5, validator=_in_range(0.000001, 3600))
    degraded_rtt_threshold: float = attrs.field(default=0.25, validator=_in_range(0.000001, 3600))
    mode: str = attrs.field(default="auto", validator=_one_of(MODES))
    sock_diag_interval: float = attrs.field(default=1.0, validator=_in_range(0.05, 60))
    agent_socket: str = attrs.field(default=DEFAULT_AGENT_SOCKET, validator=_socket_path)


_ENV: Dict[str, str] = {
    "max_peers": ENV_MAX_PEERS,
    "max_connections": ENV_MAX_CONNECTIONS,
    "max_flows": ENV_MAX_FLOWS,
    "ring_buffer_bytes": ENV_RING_BUFFER_BYTES,
    "poll_interval": ENV_POLL_INTERVAL,
    "sample_interval": ENV_SAMPLE_INTERVAL,
    "span_enrichment": ENV_SPAN_ENRICHMENT,
    "max_span_events": ENV_MAX_SPAN_EVENTS,
    "degraded_handshake_threshold": ENV_DEGRADED_HANDSHAKE,
    "degraded_rtt_threshold": ENV_DEGRADED_RTT,
    "mode": ENV_MODE,
    "sock_diag_interval": ENV_SOCK_DIAG_INTERVAL,
    "agent_socket": ENV_AGENT_SOCKET,
}
_INT_FIELDS = {"max_peers", "max_connections", "max_flows", "ring_buffer_bytes", "max_span_events"}
_BOOL_FIELDS = {"span_enrichment"}
_CHOICE_FIELDS = {"mode": MODES}
_STR_FIELDS = {"agent_socket"}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse(name: str, var: str, text: str) -> Any:
    text = text.strip()
    if name in _CHOICE_FIELDS:
        if text.lower() not in _CHOICE_FIELDS[name]:
            raise ConfigurationError(f"{var}={text!r} is invalid: expected one of {', '.join(_CHOICE_FIELDS[name])}")
        return text.lower()
    if name in _STR_FIELDS:
        return text
    if name in _BOOL_FIELDS:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigurationError(f"{var}={text!r} is invalid: expected true or false")
    try:
        return int(text) if name in _INT_FIELDS else float(text)
    except ValueError:
        kind = "a whole number" if name in _INT_FIELDS else "a number"
        raise ConfigurationError(f"{var}={text!r} is invalid: expected {kind}") from None


def load_config(kwargs: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None) -> Config:
    """A :class:`Config` from ``instrument()`` keywords over environment variables."""
    environ = os.environ if environ is None else environ
    unknown = sorted(set(kwargs) - set(_ENV))
    if unknown:
        raise ConfigurationError(
            f"unknown configuration keyword(s) {', '.join(unknown)}; accepted: {', '.join(sorted(_ENV))}"
        )
    values: Dict[str, Any] = {}
    for name, var in _ENV.items():
        if name in kwargs:
            values[name] = kwargs[name]
            where = name
        elif environ.get(var, "").strip():
            values[name] = _parse(name, var, environ[var])
            where = var
        else:
            continue
        try:
            Config(**{name: values[name]})
        except ConfigurationError as exc:
            raise ConfigurationError(str(exc).replace(f"{name}=", f"{where}=", 1)) from None
    return Config(**values)
