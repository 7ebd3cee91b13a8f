"""examples/collector, checked as far as it can be without an otelcol binary.

What is not checked here (no collector is installable on these machines): that
otelcol accepts the file and that the backends accept what it sends. See
examples/collector/README.md.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml", reason="pip install -e '.[test]' brings pyyaml")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "examples", "collector")
PLACEHOLDER = re.compile(r"^\$\{env:([A-Z][A-Z0-9_]*)\}$")
ANY_PLACEHOLDER = re.compile(r"\$\{env:([A-Z][A-Z0-9_]*)\}")


def _read(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def _env_file(name: str) -> Dict[str, str]:
    out = {}
    for line in _read(name).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{name}: not KEY=VALUE: {line!r}"
            assert key not in out, f"{name}: {key} twice"
            out[key] = value
    return out


@pytest.fixture(scope="module")
def config() -> Dict[str, Any]:
    loaded = yaml.safe_load(_read("otelcol.yaml"))
    assert isinstance(loaded, dict)
    return loaded


def _kind(component_id: str) -> str:
    """The component type of an id such as ``otlp/tempo``."""
    return component_id.split("/", 1)[0]


def test_every_pipeline_component_is_defined_and_every_defined_one_used(config) -> None:
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics", "logs"}
    used: Dict[str, set] = {"receivers": set(), "processors": set(), "exporters": set()}
    for signal, pipeline in pipelines.items():
        assert set(pipeline) == {"receivers", "processors", "exporters"}, signal
        for section in used:
            ids = pipeline[section]
            assert ids and len(ids) == len(set(ids)), (signal, section, ids)
            for cid in ids:
                assert cid in (config.get(section) or {}), f"{signal}: {section[:-1]} {cid} is not defined"
            used[section] |= set(ids)
    for section, ids in used.items():
        assert set(config[section]) == ids, f"{section} defined but unused: {set(config[section]) - ids}"


def test_each_signal_goes_where_the_readme_says(config) -> None:
    pipelines = config["service"]["pipelines"]
    exporters = config["exporters"]

    def targets(signal: str) -> Dict[str, str]:
        """exporter id -> its endpoint placeholder's variable."""
        out = {}
        for cid in pipelines[signal]["exporters"]:
            m = PLACEHOLDER.match(str(exporters[cid]["endpoint"]))
            assert m, f"{cid}: the endpoint is not an ${{env:...}} placeholder"
            out[cid] = m.group(1)
        return out

    assert sorted(targets("traces").values()) == ["HONEYCOMB_OTLP_ENDPOINT", "TEMPO_OTLP_ENDPOINT"]
    assert sorted(targets("metrics").values()) == ["HONEYCOMB_OTLP_ENDPOINT", "MIMIR_OTLP_ENDPOINT"]
    assert sorted(targets("logs").values()) == ["HONEYCOMB_OTLP_ENDPOINT"]
    # kinds: gRPC OTLP for Tempo and Honeycomb, OTLP/HTTP for Mimir's /otlp ingest
    assert {_kind(c) for c in pipelines["traces"]["exporters"]} == {"otlp"}
    assert {_kind(c) for c in pipelines["metrics"]["exporters"]} == {"otlphttp", "otlp"}
    for signal in pipelines:
        for cid in pipelines[signal]["exporters"]:
            if targets(signal)[cid] == "HONEYCOMB_OTLP_ENDPOINT":
                headers = exporters[cid]["headers"]
                assert headers["x-honeycomb-team"] == "${env:HONEYCOMB_API_KEY}", cid
                if signal == "metrics":
                    assert headers["x-honeycomb-dataset"] == "${env:HONEYCOMB_METRICS_DATASET}", cid
    assert exporters["otlphttp/mimir"]["headers"]["X-Scope-OrgID"] == "${env:MIMIR_TENANT}"


def test_memory_limiter_first_and_batch_in_every_pipeline(config) -> None:
    for signal, pipeline in config["service"]["pipelines"].items():
        processors = [_kind(p) for p in pipeline["processors"]]
        assert processors[0] == "memory_limiter" and "batch" in processors, signal


def test_no_secret_or_address_is_written_in_the_configuration(config) -> None:
    for cid, exporter in config["exporters"].items():
        assert PLACEHOLDER.match(str(exporter["endpoint"])), cid
        for header, value in (exporter.get("headers") or {}).items():
            assert PLACEHOLDER.match(str(value)), f"{cid}: header {header} is written out, not a placeholder"
    # the receiver listens on the standard OTLP ports
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].rsplit(":", 1)[1] == "4317"
    assert protocols["http"]["endpoint"].rsplit(":", 1)[1] == "4318"


def test_every_placeholder_is_documented_and_set(config) -> None:
    text = _read("otelcol.yaml")
    placeholders = set(ANY_PLACEHOLDER.findall(text))
    assert placeholders
    readme = _read("README.md")
    env = _env_file("collector.env")
    assert set(env) == placeholders
    for name in placeholders:
        assert f"`{name}`" in readme, f"{name} is not documented in examples/collector/README.md"
    assert env["HONEYCOMB_API_KEY"] == "", "collector.env must not carry an API key"
    assert all(value for key, value in env.items() if key != "HONEYCOMB_API_KEY")
    assert urlsplit(env["MIMIR_OTLP_ENDPOINT"]).path.endswith("/otlp")


def test_the_app_env_matches_the_receiver(config) -> None:
    app = _env_file("app.env")
    protocols = config["receivers"]["otlp"]["protocols"]
    endpoint = urlsplit(app["OTEL_EXPORTER_OTLP_ENDPOINT"])
    protocol = app["OTEL_EXPORTER_OTLP_PROTOCOL"]
    assert protocol in ("grpc", "http/protobuf")
    listening = protocols["grpc" if protocol == "grpc" else "http"]["endpoint"]
    assert str(endpoint.port) == listening.rsplit(":", 1)[1]
    assert endpoint.scheme == "http"  # the receiver has no TLS configured
    for signal in ("TRACES", "METRICS", "LOGS"):
        assert app[f"OTEL_{signal}_EXPORTER"] == "otlp", signal
        # a pipeline receives what the app sends
        assert "otlp" in config["service"]["pipelines"][signal.lower()]["receivers"]
    assert app["OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"] == "cumulative"
    assert app["OTEL_SERVICE_NAME"]


def test_readme_states_what_is_not_verified() -> None:
    readme = _read("README.md")
    assert "Not verified here" in readme and "otelcol validate" in readme

