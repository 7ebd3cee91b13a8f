"""docs/metrics.md says exactly what the code registers.

The reference's tables are parsed and compared with what the real Instruments
create on a real SDK MeterProvider (through a meter that records each create_*
call and passes it on) and with what an InMemoryMetricReader collects when a
FakeSource reports every kind of counter, event and series: names, instrument
kinds, units, attribute keys and values, histogram buckets. A change on either
side fails here.
"""

from __future__ import annotations

import ctypes
import os
import re
from typing import Any, Dict, List, Set, Tuple

import pytest
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import Histogram, ObservableCounter, ObservableUpDownCounter
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.metrics.export import Sum

from otel_ebpf_flows import _kernel, _records, _sockdiag
from otel_ebpf_flows._instrumentor import SCOPE_NAME
from otel_ebpf_flows._source import CLOSE_REASONS, CONNECT_ERRORS, Counters, FlowEvent, FlowKey, ProbeStats, Role
from otel_ebpf_flows._telemetry import Instruments, Pipeline
from otel_ebpf_flows.version import __version__

from .conftest import collect
from .fakes import FakeSource

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "metrics.md")
KINDS = {"ObservableCounter": ObservableCounter, "ObservableUpDownCounter": ObservableUpDownCounter,
         "Histogram": Histogram}
TICKS = re.compile(r"`([^`]+)`")


# -- reading the document -------------------------------------------------------------------


def _tables(text: str) -> List[List[List[str]]]:
    """Every Markdown table: rows of cells, the header row first, the |---| row dropped."""
    tables: List[List[List[str]]] = []
    current: List[List[str]] = []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def _table(text: str, *header: str) -> List[Dict[str, str]]:
    found = [t for t in _tables(text) if tuple(t[0][: len(header)]) == header]
    assert len(found) == 1, f"docs/metrics.md: expected one table headed {header}, found {len(found)}"
    head = found[0][0]
    return [dict(zip(head, row)) for row in found[0][1:]]


def _tick(cell: str) -> str:
    (value,) = TICKS.findall(cell) or [""]
    return value


@pytest.fixture(scope="module")
def doc() -> str:
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def documented(doc: str) -> Dict[str, Tuple[str, str, Set[str]]]:
    """name -> (instrument, unit, attribute keys), *common* expanded."""
    common = {_tick(r["attribute"]) for r in _table(doc, "attribute", "type", "value", "present")}
    out = {}
    for row in _table(doc, "name", "instrument", "unit", "attributes", "meaning"):
        name = _tick(row["name"])
        assert name not in out, f"{name} documented twice"
        keys = set(TICKS.findall(row["attributes"]))
        if "*common*" in row["attributes"]:
            keys |= common
        out[name] = (row["instrument"], _tick(row["unit"]), keys)
    return out


# -- what the code registers ------------------------------------------------------------------


class RecordingMeter:
    """Passes every create_* call to a real SDK meter and keeps what it returned."""

    def __init__(self, meter: Meter) -> None:
        self._meter = meter
        self.created: List[Any] = []

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self._meter, attr)
        if not attr.startswith("create_"):
            return target

        def create(*args: Any, **kwargs: Any) -> Any:
            instrument = target(*args, **kwargs)
            self.created.append(instrument)
            return instrument

        return create


def _everything(role: Role, address: Any, port: int, family: str) -> Tuple[FlowKey, Counters]:
    key = FlowKey(role=role, address=address, port=port, family=family)
    return key, Counters(
        attempts_ok=1, attempts_failed={e: 1 for e in CONNECT_ERRORS}, established=2, closed=1,
        closes={r: 1 for r in CLOSE_REASONS}, retransmits=1, bytes_transmitted=1, bytes_received=1,
        resets_sent=1, resets_received=1, zero_window_receive=1, zero_window_transmit=1,
        window_scaling_disabled=1,
    )


def probe_names() -> Dict[str, Set[str]]:
    """The ebpf_flows.probe.name values KernelSource reports, read through a stand-in stats map."""

    class Stats:
        def lookup(self, _key: Any, out: Any) -> None:
            ctypes.memmove(ctypes.addressof(out), ctypes.addressof(ctypes.c_uint64(1)), 8)

    class Obj:
        def map(self, name: str, hold_gil: bool = False) -> Stats:
            assert name == "stats", name
            return Stats()

    source = _kernel.KernelSource()
    source._obj = Obj()  # type: ignore[assignment]
    assert _records.STAT_MAX > 0
    stats = source._read_probe_stats()
    # sock_diag mode's, read from a source that never dumped
    fallback = _sockdiag.SockDiagSource(inodes=lambda: ()).sample().probes
    return {"ebpf_flows.probe.events.lost": set(stats.events_lost) | set(fallback.events_lost),
            "ebpf_flows.probe.map.evictions": set(stats.map_evictions) | set(fallback.map_evictions)}


@pytest.fixture(scope="module")
def registered() -> Any:
    """(instruments created, one collection) with every series shape the aggregator makes."""
    return _register(None)


@pytest.fixture(scope="module")
def registered_sock_diag() -> Any:
    """The same, through a pipeline marked as sock_diag mode's."""
    return _register(_sockdiag.MARKER)


def _register(marker: Any) -> Any:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    meter = RecordingMeter(provider.get_meter(SCOPE_NAME, __version__))
    current: List[Pipeline] = []
    instruments = Instruments(meter, lambda: current[0] if current else None)  # type: ignore[arg-type]
    source = FakeSource()
    pipeline = Pipeline(source, instruments, 200, 0.005, 0.01, marker=marker)
    pipeline.start()
    current.append(pipeline)
    try:
        keys = dict([
            _everything(Role.CLIENT, "192.0.2.1", 443, "ipv4"),
            _everything(Role.SERVER, "2001:db8::1", 8080, "ipv6"),
            _everything(Role.CLIENT, None, 0, ""),  # the kernel's overflow series
            _everything(Role.SERVER, None, 0, ""),
        ])
        keys[FlowKey(role=Role.SERVER, address="", port=8080, family="")] = Counters(listen_overflows=1)
        names = probe_names()
        source.set_snapshot(keys, ProbeStats(
            events_lost={n: 1 for n in names["ebpf_flows.probe.events.lost"]},
            map_evictions={n: 1 for n in names["ebpf_flows.probe.map.evictions"]},
        ))
        events = []
        for key in keys:
            if key.address != "":
                events += [FlowEvent(kind="handshake", key=key, ts_ns=1, duration_s=0.001, srtt_s=None),
                           FlowEvent(kind="close", key=key, ts_ns=2, duration_s=1.0, srtt_s=0.001),
                           FlowEvent(kind="rtt", key=key, ts_ns=3, duration_s=0.0, srtt_s=0.002)]
        source.emit(*events)
        exported = collect(reader)
    finally:
        pipeline.stop()
        provider.shutdown()
    return meter.created, exported


# -- the comparison ---------------------------------------------------------------------------


def test_documented_metrics_are_the_registered_instruments(doc, registered) -> None:
    created, _ = registered
    docs = documented(doc)
    code = {i.name: i for i in created}
    assert len(code) == len(created), "an instrument name was registered twice"
    assert set(docs) == set(code)
    for name, (kind, unit, _keys) in docs.items():
        assert kind in KINDS, f"{name}: unknown instrument kind {kind!r} in docs/metrics.md"
        assert isinstance(code[name], KINDS[kind]), (name, kind, type(code[name]).__mro__)
        assert code[name].unit == unit, (name, unit, code[name].unit)


def test_documented_metrics_are_what_a_collection_exports(doc, registered) -> None:
    _, exported = registered
    docs = documented(doc)
    assert set(exported.metrics) == set(docs)
    for name, (kind, unit, keys) in docs.items():
        metric = exported.metrics[name]
        assert metric.unit == unit, name
        if kind == "Histogram":
            assert isinstance(metric.data, HistogramData), name
        else:
            assert isinstance(metric.data, Sum) and metric.data.is_monotonic is (kind == "ObservableCounter"), name
        seen = {k for p in metric.data.data_points for k in p.attributes}
        assert seen == keys, f"{name}: documented {sorted(keys)}, exported {sorted(seen)}"


def test_documented_attribute_values_are_the_exported_ones(doc, registered) -> None:
    _, exported = registered
    values: Dict[str, Set[Any]] = {}
    for metric in exported.metrics.values():
        for p in metric.data.data_points:
            for k, v in p.attributes.items():
                values.setdefault(k, set()).add(v)
    rows = _table(doc, "attribute", "values")
    enumerated = {_tick(r["attribute"]): set(TICKS.findall(r["values"])) for r in rows}
    for key, documented_values in enumerated.items():
        assert values.get(key) == documented_values, (key, documented_values, values.get(key))
    # every string-valued attribute but the address is enumerated
    strings = {k for k, vs in values.items() if all(isinstance(v, str) for v in vs)} - {"network.peer.address"}
    assert strings == set(enumerated)


def test_documented_histogram_buckets_are_the_exported_ones(doc, registered) -> None:
    _, exported = registered
    rows = _table(doc, "metric", "boundaries (s)")
    documented_buckets = {_tick(r["metric"]): [float(x) for x in r["boundaries (s)"].split(",")] for r in rows}
    histograms = {n for n, m in exported.metrics.items() if isinstance(m.data, HistogramData)}
    assert set(documented_buckets) == histograms
    for name in histograms:
        for p in exported.metrics[name].data.data_points:
            assert list(p.explicit_bounds) == documented_buckets[name], name


def test_every_metric_has_its_hooks_and_ground_truth(doc) -> None:
    rows = _table(doc, "name", "kernel hook(s)", "checked against")
    assert [_tick(r["name"]) for r in rows] == list(documented(doc))
    assert all(r["kernel hook(s)"] and r["checked against"] for r in rows)
    probe_rows = _table(doc, "`ebpf_flows.probe.name`", "metric", "what it means", "what to do")
    by_metric: Dict[str, Set[str]] = {}
    for r in probe_rows:
        by_metric.setdefault("ebpf_flows.probe." + r["metric"].strip("`"), set()).add(_tick(r["`ebpf_flows.probe.name`"]))
    assert by_metric == probe_names()


def test_the_checks_cited_exist(doc) -> None:
    """Every test named as ground truth is a test of the suite."""
    root = os.path.dirname(os.path.dirname(DOC))
    sources = ""
    for sub in ("tests/kernel", "tests/otlp"):
        for name in os.listdir(os.path.join(root, sub)):
            if name.startswith("test_") and name.endswith(".py"):
                with open(os.path.join(root, sub, name), encoding="utf-8") as f:
                    sources += f.read()
    cited = {t for r in _table(doc, "name", "kernel hook(s)", "checked against")
             for t in TICKS.findall(r["checked against"]) if t.startswith("test_")}
    assert cited
    for test in cited:
        assert f"def {test}(" in sources, f"docs/metrics.md cites {test}, which does not exist"


def test_the_sock_diag_mode_attribute_is_on_every_point_and_documented(doc, registered, registered_sock_diag) -> None:
    """sock_diag mode: the same points, each with the mode attribute the document names; ebpf mode: never."""
    rows = _table(doc, "mode attribute", "value", "on")
    assert [(_tick(r["mode attribute"]), _tick(r["value"])) for r in rows] == list(_sockdiag.MARKER.items())
    (key, value), = _sockdiag.MARKER.items()
    _, plain = registered
    _, marked = registered_sock_diag
    assert set(marked.metrics) == set(plain.metrics)
    for name, metric in marked.metrics.items():
        got = sorted(tuple(sorted(p.attributes.items())) for p in metric.data.data_points)
        want = sorted(tuple(sorted({**p.attributes, key: value}.items())) for p in plain.metrics[name].data.data_points)
        assert got == want, name
        assert all(key not in p.attributes for p in plain.metrics[name].data.data_points), name
