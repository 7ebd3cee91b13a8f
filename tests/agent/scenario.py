"""The agent end to end, in a private network namespace (run by tests/agent/test_agent.py).

python -m tests.agent.scenario NOBODY_PYTHON   (as root, under `unshare --net`)

A real OTLP receiver (rotel) on this namespace's loopback; ``otel-ebpf-flows agent``
as root exporting to it; two services as ``nobody`` with no capabilities, each
with its own OTEL_SERVICE_NAME, its own peer address and port, both paths lossy
(nft): A instrumented (mode agent: spans through the agent), B not instrumented at
all (also makes refused connects). A third nobody process then asks the agent for
A's data. Prints one JSON line: what each service measured with TCP_INFO, the
agent's final exported points per service, A's spans, the intruder's replies and
the agent's log.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

from tests.cli.conftest import UNPRIVILEGED
from tests.kernel.harness import emit, finish, peer, random_loss
from tests.kernel.span_scenarios import ethernet_loopback
from tests.otlp.conftest import Receiver, collections, our_metrics, plain

HOST_A, HOST_B = "127.0.0.2", "127.0.0.3"
CONNS_A, ROUNDS_A = 3, 15
CONNS_B, ROUNDS_B = 2, 15
CONNS_C, ROUNDS_C, SIZE_C, WORKERS_C = 6, 5, 10000, 2
SIZE = 20000
#: root with exactly the capabilities examples/agent's systemd unit and DaemonSet grant
AGENT_CAPS = ["setpriv", "--bounding-set=-all,+bpf,+perfmon,+sys_ptrace,+dac_read_search,+sys_resource,+chown"]


def clean_env() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PYTHON")) and k != "VIRTUAL_ENV"}


def wait_log(path: str, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as f:
            if text in f.read():
                return
        time.sleep(0.05)
    with open(path) as f:
        raise AssertionError(f"the agent never logged {text!r}:\n{f.read()[-4000:]}")


def final_points(receiver: Receiver, service: str) -> List[Dict[str, Any]]:
    """The points of the last collection the agent exported for each process of ``service``."""
    by_pid: Dict[Any, List[Dict[str, Any]]] = {}
    for batch in receiver.batches(service):
        by_pid.setdefault(tuple((batch["resource"] or {}).get("process.pid", ())), []).append(batch)
    out = []
    for pid, batches in by_pid.items():
        colls = collections(our_metrics(batches, "otel_ebpf_flows"))
        if not colls:
            continue
        last = colls[max(colls)]
        out += [{"name": name, "attrs": plain(p), "value": p.get("value", [None, None])[1], "count": p.get("count"),
                 "pid": pid[1] if pid else None}
                for name, series in last.items() for p in series.values()]
    return out


def total(points: List[Dict[str, Any]], name: str, **want: Any) -> int:
    return sum(p["value"] for p in points if p["name"] == name
               and all(p["attrs"].get(k.replace("__", ".")) == v for k, v in want.items()))


def quiet(*ports: int, timeout: float = 60.0) -> None:
    """Wait until no connection to or from ``ports`` is still open or closing (the receiver's own
    keep-alive connections stay open, so harness.settle() cannot be used here)."""
    hexports = {f"{p:04X}" for p in ports}
    deadline = time.monotonic() + timeout
    while True:
        busy = []
        for path in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(path) as f:
                next(f)
                for line in f:
                    local, remote, state = line.split()[1:4]
                    if state not in ("0A", "06", "07") and {local[-4:], remote[-4:]} & hexports:
                        busy.append((local, remote, state))
        if not busy:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the services' connections did not close: {busy}")
        time.sleep(0.05)


class Service:
    def __init__(self, python: str, name: str, host: str, port: int, extra: List[str], env: Dict[str, str]) -> None:
        self.proc = subprocess.Popen([*UNPRIVILEGED, python, "-m", "tests.agent.service", host, str(port), *extra],
                                     cwd="/", env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "ready":
            raise AssertionError(f"service {name} did not start: {line}")
        self.pid = int(line[1])

    def say(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def result(self) -> Dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"service {self.pid} exited with {self.proc.wait(10)}")
        out: Dict[str, Any] = json.loads(line)
        return out


def main() -> None:
    python = sys.argv[1]
    port_a = random.randrange(20000, 29000)
    port_b, port_refused, port_c = port_a + 1, port_a + 2, port_a + 3
    ethernet_loopback()
    random_loss(port_a, 5)
    random_loss(port_b, 5)
    work = tempfile.mkdtemp(prefix="otel-ebpf-flows-agent-")
    os.chmod(work, 0o755)
    receiver = Receiver(work)
    receiver.start()
    sock_path = os.path.join(work, "run", "agent.sock")
    agent_log = os.path.join(work, "agent.log")
    suffix = f"{os.getpid()}-{port_a}"
    svc_a, svc_b, svc_c = f"agent-test-a-{suffix}", f"agent-test-b-{suffix}", f"agent-test-c-{suffix}"
    agent_env = clean_env()
    agent_env.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint("http/protobuf"),
                     OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf", OTEL_METRIC_EXPORT_INTERVAL="500",
                     OTEL_PYTHON_EBPF_FLOWS_SAMPLE_INTERVAL="0.5", PYTHONPATH=os.getcwd())
    services: List[Service] = []
    echoes = []
    prefork = None
    agent = None
    try:
        with open(agent_log, "w") as log:
            agent = subprocess.Popen([*AGENT_CAPS, sys.executable, "-m", "otel_ebpf_flows", "agent", "--socket", sock_path,
                                      "--socket-group", "65534", "--scan-interval", "0.5"],
                                     env=agent_env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_log(agent_log, "span service on")
        echoes = [peer("echo", str(port_a), "--host", HOST_A, "--count", str(CONNS_A)),
                  peer("echo", str(port_b), "--host", HOST_B, "--count", str(CONNS_B))]
        base = {k: v for k, v in clean_env().items() if k in ("PATH", "LANG", "LC_ALL")}
        env_a = dict(base, OTEL_SERVICE_NAME=svc_a, OTEL_PYTHON_EBPF_FLOWS_AGENT_SOCKET=sock_path,
                     OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=agent%20test,team=a")
        # B declares its service in OTEL_RESOURCE_ATTRIBUTES only
        env_b = dict(base, OTEL_RESOURCE_ATTRIBUTES=f"service.name={svc_b},team=b")
        a = Service(python, "A", HOST_A, port_a, ["--conns", str(CONNS_A), "--rounds", str(ROUNDS_A), "--size",
                                                  str(SIZE), "--instrumented"], env_a)
        services.append(a)
        b = Service(python, "B", HOST_B, port_b, ["--conns", str(CONNS_B), "--rounds", str(ROUNDS_B), "--size",
                                                  str(SIZE), "--refused-port", str(port_refused)], env_b)
        services.append(b)
        # C: a pre-fork server (its master and workers all hold the listener)
        prefork = subprocess.Popen([*UNPRIVILEGED, python, "-m", "tests.agent.prefork", str(port_c), str(WORKERS_C)],
                                   cwd="/", env=dict(base, OTEL_SERVICE_NAME=svc_c), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        assert prefork.stdout is not None and prefork.stdin is not None
        c_pids = [int(p) for p in prefork.stdout.readline().split()[1:]]
        assert len(c_pids) == 1 + WORKERS_C, c_pids
        for pid in (a.pid, b.pid, *c_pids):
            wait_log(agent_log, f"observing pid {pid} ")
        doctor = subprocess.run([*UNPRIVILEGED, python, "-m", "otel_ebpf_flows", "doctor", "--no-load"], cwd="/",
                                env=dict(base, OTEL_PYTHON_EBPF_FLOWS_AGENT_SOCKET=sock_path,
                                         OTEL_SERVICE_NAME=f"agent-test-doctor-{suffix}"), capture_output=True,
                                text=True, timeout=60)
        for s in services:
            s.say("go")
        clients_c = peer("clients", str(port_c), "--count", str(CONNS_C), "--rounds", str(ROUNDS_C), "--size",
                         str(SIZE_C))
        result_a, result_b = a.result(), b.result()
        infos_c = finish(clients_c)
        for e in echoes:
            finish(e)
        quiet(port_a, port_b, port_c)
        intruder = subprocess.run([*UNPRIVILEGED, python, "-m", "tests.agent.intruder", sock_path, str(a.pid),
                                   *map(str, result_a["tids"])], cwd="/",
                                  env=dict(base, OTEL_SERVICE_NAME=f"agent-test-intruder-{suffix}"),
                                  capture_output=True, text=True, timeout=60)
        if intruder.returncode != 0:
            raise AssertionError(f"the intruder failed: {intruder.stderr[-3000:]}")
        undeclared = subprocess.run([*UNPRIVILEGED, python, "-m", "tests.agent.intruder", sock_path, "hello"],
                                    cwd="/", env=base, capture_output=True, text=True, timeout=60)
        if undeclared.returncode != 0:
            raise AssertionError(f"the undeclared client failed: {undeclared.stderr[-3000:]}")

        # The agent's exports, once they show the kernel's count (or 20 s: the test then says what differs).
        expected = {svc_a: sum(i["total_retrans"] for i in result_a["infos"]),
                    svc_b: sum(i["total_retrans"] for i in result_b["infos"])}
        deadline = time.monotonic() + 20
        while True:
            points = {svc: final_points(receiver, svc) for svc in (svc_a, svc_b, svc_c)}
            if all(total(points[s], "ebpf_flows.tcp.retransmits") == expected[s]
                   and total(points[s], "ebpf_flows.tcp.connection.attempts") >= (CONNS_A if s == svc_a else CONNS_B)
                   for s in expected) and total(points[svc_c], "ebpf_flows.tcp.connection.attempts") >= CONNS_C \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        resources = {svc: (receiver.batches(svc) or [{}])[-1].get("resource") for svc in (svc_a, svc_b)}
        for s in services:
            s.say("exit")
            s.proc.wait(30)
        prefork.stdin.write("exit\n")
        prefork.stdin.close()
        prefork.wait(30)
        wait_log(agent_log, f"pid {a.pid} (service.name={svc_a}) exited")
        wait_log(agent_log, f"pid {b.pid} (service.name={svc_b}) exited")
        agent.send_signal(signal.SIGTERM)
        agent_status = agent.wait(60)
        with open(agent_log) as f:
            log_text = f.read()
        result = {"c": {"pids": c_pids, "infos": infos_c, "conns": CONNS_C, "payload": CONNS_C * ROUNDS_C * SIZE_C},
                  "svc_c": svc_c, "a": result_a, "b": result_b, "svc_a": svc_a, "svc_b": svc_b, "points": points,
              "resources": resources, "intruder": json.loads(intruder.stdout.strip().splitlines()[-1]),
                  "undeclared": json.loads(undeclared.stdout.strip().splitlines()[-1]),
              "hosts": [HOST_A, HOST_B], "sizes": {"a": CONNS_A * ROUNDS_A * SIZE, "b": CONNS_B * ROUNDS_B * SIZE},
              "conns": {"a": CONNS_A, "b": CONNS_B}, "agent_status": agent_status,
                  "doctor": {"status": doctor.returncode, "out": doctor.stdout + doctor.stderr},
              "socket_left": os.path.exists(sock_path), "agent_log": log_text[-6000:]}
    finally:
        for s in services:
            if s.proc.poll() is None:
                s.proc.kill()
        for e in echoes:
            if e.poll() is None:
                e.kill()
        if prefork is not None and prefork.poll() is None:
            prefork.kill()
        if agent is not None and agent.poll() is None:
            agent.kill()
        receiver.stop()
        shutil.rmtree(work, ignore_errors=True)
    emit(result)  # exits: after the clean-up above


if __name__ == "__main__":
    main()
