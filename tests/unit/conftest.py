"""Fixtures of the unit tests: a real OTel SDK pipeline over a scripted source, no kernel."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import attrs
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric
from opentelemetry.sdk.metrics.view import Aggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from otel_ebpf_flows._instrumentor import SCOPE_NAME
from otel_ebpf_flows._telemetry import Instruments, Pipeline
from otel_ebpf_flows.version import __version__

from .fakes import FakeSource

POLL_S = 0.005
SAMPLE_S = 0.01


@attrs.frozen
class Exported:
    """One collection: each metric with the resource and scope it was exported under."""

    metrics: Dict[str, Metric]
    resources: Dict[str, Resource]
    scopes: Dict[str, InstrumentationScope]

    def points(self, name: str) -> List[Any]:
        return list(self.metrics[name].data.data_points)

    def values(self, name: str) -> Dict[frozenset, Any]:
        """attributes -> value of a Sum metric's points."""
        return {frozenset(p.attributes.items()): p.value for p in self.points(name)}


def collect(reader: InMemoryMetricReader) -> Exported:
    data = reader.get_metrics_data()
    metrics: Dict[str, Metric] = {}
    resources: Dict[str, Resource] = {}
    scopes: Dict[str, InstrumentationScope] = {}
    for resource_metrics in data.resource_metrics if data is not None else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                assert metric.name not in metrics, f"{metric.name} exported twice"
                metrics[metric.name] = metric
                resources[metric.name] = resource_metrics.resource
                scopes[metric.name] = scope_metrics.scope
    return Exported(metrics=metrics, resources=resources, scopes=scopes)


@attrs.define
class Harness:
    source: FakeSource
    pipeline: Pipeline
    reader: InMemoryMetricReader

    def collect(self) -> Exported:
        return collect(self.reader)


ProviderFactory = Callable[..., "tuple[MeterProvider, InMemoryMetricReader]"]


@pytest.fixture
def make_provider() -> Iterator[ProviderFactory]:
    providers: List[MeterProvider] = []

    def make(views: Sequence[View] = (), preferred_aggregation: Optional[Dict[type, Aggregation]] = None):
        reader = InMemoryMetricReader(preferred_aggregation=preferred_aggregation)
        provider = MeterProvider(
            metric_readers=[reader],
            resource=Resource.create({"service.name": "unit"}),
            views=list(views),
            shutdown_on_exit=False,
        )
        providers.append(provider)
        return provider, reader

    yield make
    for provider in providers:
        provider.shutdown()


@pytest.fixture
def run_pipeline(make_provider: ProviderFactory) -> Iterator[Callable[..., Harness]]:
    """Start a Pipeline over a FakeSource, wired as the instrumentor wires it."""
    running: List[Pipeline] = []

    def run(
        source: Optional[FakeSource] = None,
        *,
        max_peers: int = 200,
        views: Sequence[View] = (),
        preferred_aggregation: Optional[Dict[type, Aggregation]] = None,
    ) -> Harness:
        source = source or FakeSource()
        provider, reader = make_provider(views, preferred_aggregation)
        meter = provider.get_meter(SCOPE_NAME, __version__)
        current: List[Pipeline] = []
        instruments = Instruments(meter, lambda: current[0] if current else None)
        pipeline = Pipeline(source, instruments, max_peers, POLL_S, SAMPLE_S)
        pipeline.start()
        current.append(pipeline)
        running.append(pipeline)
        return Harness(source=source, pipeline=pipeline, reader=reader)

    yield run
    for pipeline in running:
        pipeline.stop()
