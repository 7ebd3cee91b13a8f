"""A metrics processor for the rotel collector: appends everything received to a JSON-lines file.

Loaded by ``rotel-agent start --otlp-with-metrics-processor THIS_FILE`` into the
collector's own embedded Python (the system libpython, not the test's
interpreter), so it uses the standard library only. The file is named by the
environment variable OTEL_EBPF_FLOWS_TEST_SINK. One line per ResourceMetrics
as rotel decoded it from the wire; attribute values keep their OTLP type
(``["int", 5]``, ``["str", "x"]``, ...). A line is written once at import, so the
test can tell the processor was loaded; a failure to convert is written as a
line too, never swallowed.
"""

import json
import os
import sys
import threading
import time
import traceback

_PATH = os.environ["OTEL_EBPF_FLOWS_TEST_SINK"]
_LOCK = threading.Lock()


def _write(record):
    line = json.dumps(record, sort_keys=True)
    with _LOCK, open(_PATH, "a") as f:
        f.write(line + "\n")
        f.flush()


def _enum(value):
    """A pyo3 enum member (AggregationTemporality) by its protobuf name."""
    return value.as_str_name() if hasattr(value, "as_str_name") else repr(value)


def _any(value):
    """An AnyValue as [type, value]."""
    v = None if value is None else value.value
    if v is None:
        return ["none", None]
    if isinstance(v, bool):
        return ["bool", v]
    if isinstance(v, int):
        return ["int", v]
    if isinstance(v, float):
        return ["double", v]
    if isinstance(v, str):
        return ["str", v]
    if isinstance(v, bytes):
        return ["bytes", v.hex()]
    return [type(v).__name__, repr(v)]


def _attrs(kvs):
    return {kv.key: _any(kv.value) for kv in kvs}


def _number(value):
    """A NumberDataPointValue (AsInt / AsDouble) as [type, value]."""
    if value is None:
        return ["none", None]
    name = type(value).__name__
    if name.endswith("AsInt"):
        return ["int", value._0]
    if name.endswith("AsDouble"):
        return ["double", value._0]
    raise TypeError(f"unknown number value {name}")


def _point(p):
    out = {"attributes": _attrs(p.attributes), "start_time_unix_nano": p.start_time_unix_nano,
           "time_unix_nano": p.time_unix_nano, "flags": p.flags}
    if hasattr(p, "bucket_counts"):
        out.update(count=p.count, sum=p.sum, min=p.min, max=p.max,
                   bucket_counts=list(p.bucket_counts), explicit_bounds=list(p.explicit_bounds))
    else:
        out["value"] = _number(p.value)
    return out


def _metric(m):
    out = {"name": m.name, "unit": m.unit, "description": m.description}
    data = m.data
    if data is None:
        out["type"] = None
        return out
    kind = type(data).__name__.split("_")[-1]  # MetricData_Sum -> Sum
    inner = data._0
    out["type"] = kind
    if hasattr(inner, "aggregation_temporality"):
        out["temporality"] = _enum(inner.aggregation_temporality)
    if hasattr(inner, "is_monotonic"):
        out["is_monotonic"] = inner.is_monotonic
    out["points"] = [_point(p) for p in inner.data_points] if kind in ("Sum", "Gauge", "Histogram") else []
    return out


def process_metrics(resource_metrics):
    try:
        resource = resource_metrics.resource
        record = {
            "kind": "metrics",
            "received_unix_nano": time.time_ns(),
            "resource": None if resource is None else _attrs(resource.attributes),
            "scopes": [
                {
                    "name": None if sm.scope is None else sm.scope.name,
                    "version": None if sm.scope is None else sm.scope.version,
                    "metrics": [_metric(m) for m in sm.metrics],
                }
                for sm in resource_metrics.scope_metrics
            ],
        }
    except Exception:
        record = {"kind": "error", "error": traceback.format_exc()}
    _write(record)


_write({"kind": "started", "pid": os.getpid(), "python": sys.version.split()[0]})
