"""Which SLO-violating checkout requests were the network's fault? From exported telemetry only.

python analyze.py DIR   (DIR has spans.jsonl and metrics.jsonl written by slo_demo.py)

A request violates the SLO when its SERVER span lasted longer than 200 ms. It is the
network's fault when the span or one of its descendants carries ebpf_flows.tcp.degraded=true
(the kernel saw retransmits, resets, zero windows or a slow handshake on its connections);
otherwise the time went elsewhere: the code's. Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from typing import Any, Dict, List

SLO_S = 0.2


def _ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def analyze(directory: str) -> Dict[str, Any]:
    with open(os.path.join(directory, "spans.jsonl")) as f:
        spans = [json.loads(line) for line in f if line.strip()]
    children: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for s in spans:
        if s.get("parent_id"):
            children[s["parent_id"]].append(s)

    def degraded(span: Dict[str, Any]) -> bool:
        if span["attributes"].get("ebpf_flows.tcp.degraded") is True:
            return True
        return any(degraded(c) for c in children[span["context"]["span_id"]])

    def retransmits(span: Dict[str, Any]) -> int:
        own = span["attributes"].get("ebpf_flows.tcp.retransmits", 0)
        return own + sum(retransmits(c) for c in children[span["context"]["span_id"]])

    rows = []
    for s in spans:
        if s["kind"] != "SpanKind.SERVER":
            continue
        duration = _ts(s["end_time"]) - _ts(s["start_time"])
        target = s["attributes"].get("http.target") or s["attributes"].get("http.url")
        rows.append({"span_id": s["context"]["span_id"], "target": target,
                     "duration_s": round(duration, 4), "violates": duration > SLO_S,
                     "network": degraded(s), "retransmits": retransmits(s)})
    violating = [r for r in rows if r["violates"]]

    services: Dict[str, set] = defaultdict(set)
    with open(os.path.join(directory, "metrics.jsonl")) as f:
        for line in f:
            if not line.strip():
                continue
            for rm in json.loads(line)["resource_metrics"]:
                name = rm["resource"]["attributes"].get("service.name")
                for sm in rm["scope_metrics"]:
                    for m in sm["metrics"]:
                        if m["data"]["data_points"]:
                            services[name].add(m["name"])
    return {
        "slo_s": SLO_S,
        "requests": len(rows),
        "violating": len(violating),
        "violating_network": sum(r["network"] for r in violating),
        "violating_code": sum(not r["network"] for r in violating),
        "ok_but_degraded": sum(r["network"] and not r["violates"] for r in rows),
        "metrics_by_service": {k: sorted(v) for k, v in services.items()},
        "rows": rows,
    }


if __name__ == "__main__":
    result = analyze(sys.argv[1])
    rows = result.pop("rows")
    for r in sorted(rows, key=lambda r: -r["duration_s"])[:15]:
        cause = "network" if r["network"] else "code"
        print(f"{r['duration_s'] * 1000:8.1f} ms  {'VIOLATES' if r['violates'] else 'ok      '}  "
              f"{cause:8s} retransmits={r['retransmits']:<3d} {r['target']}", file=sys.stderr)
    print(json.dumps(result, indent=2))
