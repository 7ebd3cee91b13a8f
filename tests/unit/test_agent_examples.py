"""examples/agent: the systemd unit and the Kubernetes manifests say what docs/agent.md says.

The agent's end-to-end test (tests/agent) runs it with exactly the capabilities these grant.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from typing import Any, Dict, List

import pytest
import yaml

from otel_ebpf_flows.__main__ import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples", "agent")
UNIT = os.path.join(EXAMPLES, "otel-ebpf-flows-agent.service")
CAPS = {"BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "SYS_RESOURCE", "CHOWN"}


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def manifests() -> List[Dict[str, Any]]:
    with open(os.path.join(EXAMPLES, "daemonset.yaml")) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def agent_args(argv: List[str]) -> Any:
    """The example's command line, parsed by the real CLI parser."""
    return build_parser().parse_args(argv)


def test_the_unit_runs_the_agent_with_exactly_its_capabilities():
    service = unit()["Service"]
    exec_start = service["ExecStart"].split()
    assert exec_start[0].endswith("/otel-ebpf-flows") and exec_start[1] == "agent"
    args = agent_args(exec_start[1:])
    assert args.socket == "/run/otel-ebpf-flows/agent.sock" and args.socket_group == "otel-flows"
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert set(service[key].split()) == {f"CAP_{c}" for c in CAPS}, key
    assert service["RuntimeDirectory"] == "otel-ebpf-flows" and service["RuntimeDirectoryMode"] == "0755"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert "AF_UNIX" in service["RestrictAddressFamilies"]
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_accepts_the_unit(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (no systemd here)")
    script = os.path.join(os.path.dirname(sys.executable), "otel-ebpf-flows")
    if not os.access(script, os.X_OK):
        pytest.skip(f"no installed otel-ebpf-flows script beside {sys.executable}")
    with open(UNIT) as f:
        text = f.read().replace("/opt/otel-ebpf-flows/bin/otel-ebpf-flows", script)
    copy = tmp_path / "otel-ebpf-flows-agent.service"
    copy.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if copy.name in line]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr


def test_the_daemonset_sees_the_host_processes_with_exactly_the_capabilities():
    ds = next(d for d in manifests() if d["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    (container,) = spec["containers"]
    args = agent_args([container["command"][1], *container["args"]])
    assert args.socket == "/run/otel-ebpf-flows/agent.sock" and args.socket_group == "10001"
    sc = container["securityContext"]
    assert set(sc["capabilities"]["add"]) == CAPS and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http") and env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == os.path.dirname(args.socket)
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"]["path"] == "/run/otel-ebpf-flows"


def test_the_application_pod_has_no_capability_and_the_socket_group():
    ds = next(d for d in manifests() if d["kind"] == "DaemonSet")
    agent = ds["spec"]["template"]["spec"]["containers"][0]
    group = int(agent_args([agent["command"][1], *agent["args"]]).socket_group)
    pod = next(d for d in manifests() if d["kind"] == "Pod")
    assert group in pod["spec"]["securityContext"]["supplementalGroups"]
    (app,) = pod["spec"]["containers"]
    assert app["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e["value"] for e in app["env"]}
    assert env["OTEL_SERVICE_NAME"] and env["OTEL_PYTHON_EBPF_FLOWS_AGENT_SOCKET"] == "/run/otel-ebpf-flows/agent.sock"
    (mount,) = app["volumeMounts"]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"]["path"] == "/run/otel-ebpf-flows" == mount["mountPath"]
