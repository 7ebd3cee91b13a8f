"""A metrics and trace processor for the rotel collector: appends everything received to a
JSON-lines file.

Loaded by ``rotel-agent start --otlp-with-metrics-processor THIS_FILE
--otlp-with-trace-processor THIS_FILE`` into the collector's own embedded Python
(the system libpython, not the test's interpreter), so it uses the standard
library only. rotel calls ``process_metrics(resource_metrics)`` and
``process_spans(resource_spans)``. The file is named by the environment variable
OTEL_EBPF_FLOWS_TEST_SINK. One line per ResourceMetrics (``"kind": "metrics"``)
or ResourceSpans (``"kind": "spans"``) as rotel decoded it from the wire;
attribute values keep their OTLP type (``["int", 5]``, ``["str", "x"]``, ...),
trace and span ids are lowercase hex (``""`` when absent). A line is written once
at import, so the test can tell the processor was loaded; a failure to convert
is written as a line too, never swallowed.
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
    """A NumberDataPointValue or ExemplarValue (AsInt / AsDouble) as [type, value]."""
    if value is None:
        return ["none", None]
    name = type(value).__name__
    if name.endswith("AsInt"):
        return ["int", value._0]
    if name.endswith("AsDouble"):
        return ["double", value._0]
    raise TypeError(f"unknown number value {name}")


def _hex(raw):
    """A trace or span id (bytes on the wire) as hex; "" when absent."""
    return bytes(raw or b"").hex()


def _exemplar(e):
    return {"trace_id": _hex(e.trace_id), "span_id": _hex(e.span_id), "value": _number(e.value),
            "time_unix_nano": e.time_unix_nano, "filtered_attributes": _attrs(e.filtered_attributes)}


def _point(p):
    out = {"attributes": _attrs(p.attributes), "start_time_unix_nano": p.start_time_unix_nano,
           "time_unix_nano": p.time_unix_nano, "flags": p.flags,
           "exemplars": [_exemplar(e) for e in p.exemplars]}
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


# Span.kind on the wire (opentelemetry.proto.trace.v1.Span.SpanKind)
_SPAN_KINDS = {0: "SPAN_KIND_UNSPECIFIED", 1: "SPAN_KIND_INTERNAL", 2: "SPAN_KIND_SERVER",
               3: "SPAN_KIND_CLIENT", 4: "SPAN_KIND_PRODUCER", 5: "SPAN_KIND_CONSUMER"}


def _span_kind(kind):
    if isinstance(kind, int):
        return _SPAN_KINDS.get(kind, f"SPAN_KIND_{kind}")
    return _enum(kind)


# Status.code on the wire (opentelemetry.proto.trace.v1.Status.StatusCode)
_STATUS_CODES = {0: "STATUS_CODE_UNSET", 1: "STATUS_CODE_OK", 2: "STATUS_CODE_ERROR"}


def _status_code(code):
    if isinstance(code, int):
        return _STATUS_CODES.get(code, f"STATUS_CODE_{code}")
    return _enum(code)


def _event(e):
    return {"name": e.name, "time_unix_nano": e.time_unix_nano, "attributes": _attrs(e.attributes),
            "dropped_attributes_count": e.dropped_attributes_count}


def _span(s):
    status = s.status
    return {
        "name": s.name,
        "kind": _span_kind(s.kind),
        "trace_id": _hex(s.trace_id),
        "span_id": _hex(s.span_id),
        "parent_span_id": _hex(s.parent_span_id),
        "start_time_unix_nano": s.start_time_unix_nano,
        "end_time_unix_nano": s.end_time_unix_nano,
        "attributes": _attrs(s.attributes),
        "dropped_attributes_count": s.dropped_attributes_count,
        "events": [_event(e) for e in s.events],
        "dropped_events_count": s.dropped_events_count,
        "status": None if status is None else {"code": _status_code(status.code), "message": status.message},
    }


def process_spans(resource_spans):
    try:
        resource = resource_spans.resource
        record = {
            "kind": "spans",
            "received_unix_nano": time.time_ns(),
            "resource": None if resource is None else _attrs(resource.attributes),
            "scopes": [
                {
                    "name": None if ss.scope is None else ss.scope.name,
                    "version": None if ss.scope is None else ss.scope.version,
                    "spans": [_span(s) for s in ss.spans],
                }
                for ss in resource_spans.scope_spans
            ],
        }
    except Exception:
        record = {"kind": "error", "error": traceback.format_exc()}
    _write(record)


_write({"kind": "started", "pid": os.getpid(), "python": sys.version.split()[0]})
