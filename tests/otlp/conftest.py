"""OTLP end to end: an instrumented process exports to a real, independently written receiver.

The receiver is rotel (PyPI ``rotel``: a Rust OpenTelemetry collector whose wheel
ships the ``rotel-agent`` binary), listening on 127.0.0.1 for OTLP/gRPC and
OTLP/HTTP (protobuf). It decodes what arrives with its own OTLP implementation
and hands each ResourceMetrics and ResourceSpans to a Python processor
(tests/otlp/rotel_sink.py, run in rotel's embedded interpreter, the system
libpython) that appends it to a JSON-lines file; its exporter is ``blackhole``.

The workload (tests/otlp/workload.py) runs under ``opentelemetry-instrument``
in the root network namespace, configured by the standard OTEL_* variables
only. In-process mode counts only its own connections, so other processes'
traffic on the host does not disturb exact counts.

These tests skip only on a host that cannot run them, with the reason; under
CI (CI=true) a missing prerequisite is a failure.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SINK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rotel_sink.py")
EXPORT_INTERVAL_MS = 500


def rotel_agent() -> Optional[str]:
    try:
        import rotel  # noqa: F401  (the package only carries the binary for us)
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(rotel.__file__)), "rotel-agent")
    return path if os.access(path, os.X_OK) else None


def opentelemetry_instrument() -> Optional[str]:
    """The ``opentelemetry-instrument`` script of this interpreter's environment."""
    beside = os.path.join(os.path.dirname(sys.executable), "opentelemetry-instrument")
    return beside if os.access(beside, os.X_OK) else shutil.which("opentelemetry-instrument")


def _missing() -> Optional[str]:
    if not sys.platform.startswith("linux"):
        return "OTLP end-to-end tests need Linux"
    if os.geteuid() != 0:
        return "OTLP end-to-end tests need root (the workload loads BPF programs)"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "OTLP end-to-end tests need BTF (/sys/kernel/btf/vmlinux)"
    for module, package in (("opentelemetry.distro", "opentelemetry-distro"),
                            ("opentelemetry.exporter.otlp.proto.grpc", "opentelemetry-exporter-otlp"),
                            ("opentelemetry.exporter.otlp.proto.http", "opentelemetry-exporter-otlp")):
        try:
            __import__(module)
        except ImportError:
            return f"OTLP end-to-end tests need {package} (pip install -e '.[test,otlp]')"
    if opentelemetry_instrument() is None:
        return "OTLP end-to-end tests need the opentelemetry-instrument script (opentelemetry-instrumentation)"
    agent = rotel_agent()
    if agent is None:
        return "OTLP end-to-end tests need the rotel receiver (pip install -e '.[test,otlp]' brings it)"
    try:
        proc = subprocess.run([agent, "version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"rotel-agent does not run here: {exc}"
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        hint = ""
        if "libpython" in detail:
            hint = f" (it links the system libpython: apt-get install libpython{sys.version_info[0]}.{sys.version_info[1]})"
        return f"rotel-agent does not run here: {detail}{hint}"
    return None


@pytest.fixture(scope="session")
def otlp_ok() -> None:
    reason = _missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the OTLP end-to-end tests")
        pytest.skip(reason)


def free_ports(n: int) -> List[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Receiver:
    """One rotel-agent on 127.0.0.1; everything it receives lands in ``self.sink``."""

    START_TIMEOUT_S = 20.0
    STOP_TIMEOUT_S = 10.0

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.sink = os.path.join(workdir, "received.jsonl")
        self.log_path = os.path.join(workdir, "rotel.log")
        self.grpc_port, self.http_port = free_ports(2)
        self.proc: Optional[subprocess.Popen] = None
        self._log: Optional[IO[bytes]] = None

    def endpoint(self, protocol: str) -> str:
        return f"http://127.0.0.1:{self.grpc_port if protocol == 'grpc' else self.http_port}"

    def port(self, protocol: str) -> int:
        return self.grpc_port if protocol == "grpc" else self.http_port

    def start(self) -> None:
        """Start, and return once both ports accept and the processor is loaded; else raise."""
        assert self.proc is None, "already started"
        agent = rotel_agent()
        assert agent is not None
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("ROTEL_", "PYTHON", "OTEL_")) and k != "VIRTUAL_ENV"}
        env["OTEL_EBPF_FLOWS_TEST_SINK"] = self.sink
        if os.path.exists(self.sink):  # left by a start that failed
            os.unlink(self.sink)
        cmd = [
            agent, "start",
            "--exporter", "blackhole",
            "--otlp-grpc-endpoint", f"127.0.0.1:{self.grpc_port}",
            "--otlp-http-endpoint", f"127.0.0.1:{self.http_port}",
            "--otlp-with-metrics-processor", SINK,
            "--otlp-with-trace-processor", SINK,
            "--pid-file", os.path.join(self.workdir, "rotel.pid"),
            "--log-file", self.log_path,
        ]
        self._log = open(os.path.join(self.workdir, "rotel.out"), "ab")
        self.proc = subprocess.Popen(cmd, env=env, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.START_TIMEOUT_S
        while True:
            status = self.proc.poll()
            if status is not None:
                output = self.output()
                self.stop()
                raise RuntimeError(f"rotel-agent exited with {status} at start:\n{output}")
            if self._processor_loaded() and _accepting(self.grpc_port) and _accepting(self.http_port):
                return
            if time.monotonic() > deadline:
                output = self.output()
                self.stop()
                raise RuntimeError(f"rotel-agent did not come up in {self.START_TIMEOUT_S:.0f} s "
                                   f"(ports {self.grpc_port}, {self.http_port}):\n{output}")
            time.sleep(0.05)

    def _processor_loaded(self) -> bool:
        return any(r.get("kind") == "started" for r in self.records())

    def output(self) -> str:
        try:
            with open(os.path.join(self.workdir, "rotel.out"), "rb") as f:
                return f.read()[-4000:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(self.STOP_TIMEOUT_S)
        if self._log is not None:
            self._log.close()
            self._log = None

    def records(self) -> List[Dict[str, Any]]:
        """Every line the processor wrote so far (a partly written last line is left for later)."""
        try:
            with open(self.sink) as f:
                text = f.read()
        except FileNotFoundError:
            return []
        out = []
        for line in text.split("\n")[:-1]:
            out.append(json.loads(line))
        errors = [r["error"] for r in out if r.get("kind") == "error"]
        if errors:
            raise AssertionError(f"the receiver's processor failed to read a payload:\n{errors[0]}")
        return out

    def batches(self, service: str) -> List[Dict[str, Any]]:
        """Received ResourceMetrics whose resource has ``service.name`` == ``service``."""
        return [r for r in self.records()
                if r.get("kind") == "metrics" and (r["resource"] or {}).get("service.name") == ["str", service]]

    def spans(self, service: str) -> List[Dict[str, Any]]:
        """Every received span whose resource has ``service.name`` == ``service``, each with its
        ``resource`` and ``scope`` (name, version) added."""
        out = []
        for r in self.records():
            if r.get("kind") != "spans" or (r["resource"] or {}).get("service.name") != ["str", service]:
                continue
            for ss in r["scopes"]:
                for span in ss["spans"]:
                    out.append(dict(span, resource=r["resource"],
                                    scope={"name": ss["name"], "version": ss["version"]}))
        return out

    def wait_for_spans(self, service: str, done: Callable[[List[Dict[str, Any]]], bool],
                       timeout: float = 30.0) -> List[Dict[str, Any]]:
        """Poll the received spans of ``service`` until ``done(spans)``; bounded."""
        return self.wait_for(service, done, timeout, received=self.spans)

    def wait_for(self, service: str, done: Callable[[List[Dict[str, Any]]], bool],
                 timeout: float = 30.0,
                 received: Optional[Callable[[str], List[Dict[str, Any]]]] = None) -> List[Dict[str, Any]]:
        """Poll the received batches of ``service`` (or what ``received`` returns) until
        ``done(batches)``; bounded."""
        deadline = time.monotonic() + timeout
        while True:
            batches = (received or self.batches)(service)
            if done(batches):
                return batches
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"the receiver is not running:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the receiver did not get what was expected from {service} within {timeout:.0f} s "
                    f"({len(batches)} batches received)")
            time.sleep(0.1)


@pytest.fixture
def receiver_down(otlp_ok: None, tmp_path: Any) -> Iterator[Receiver]:
    """A receiver with its ports chosen but not started; stopped afterwards if a test started it."""
    r = Receiver(str(tmp_path))
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def receiver(receiver_down: Receiver) -> Receiver:
    """A running receiver (on other free ports if another process took one meanwhile)."""
    for attempt in range(3):
        try:
            receiver_down.start()
            return receiver_down
        except RuntimeError as exc:
            if "Address already in use" not in str(exc) or attempt == 2:
                raise
            receiver_down.grpc_port, receiver_down.http_port = free_ports(2)
    raise AssertionError("unreachable")


class Workload:
    """``opentelemetry-instrument python -m MODULE MODE ARGS...`` (by default
    tests.otlp.workload), configured by OTEL_* only: ``otel_env`` overrides the defaults."""

    def __init__(self, mode: str, service: str, protocol: str, endpoint: str, stderr_path: str,
                 module: str = "tests.otlp.workload", args: Sequence[str] = (),
                 otel_env: Optional[Dict[str, str]] = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(
            OTEL_SERVICE_NAME=service,
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
            OTEL_METRIC_EXPORT_INTERVAL=str(EXPORT_INTERVAL_MS),
            OTEL_METRICS_EXPORTER="otlp",
            OTEL_TRACES_EXPORTER="none",
            OTEL_LOGS_EXPORTER="none",
        )
        for key, val in (otel_env or {}).items():
            assert key.startswith("OTEL_"), f"{key}: the workload is configured by OTEL_* variables only"
            env[key] = val
        script = opentelemetry_instrument()
        assert script is not None
        self.stderr = open(stderr_path, "w+")
        self._errors: Optional[str] = None
        self.proc = subprocess.Popen(
            [script, sys.executable, "-m", module, mode, *args],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
        )
        self._lines: queue.Queue[Optional[str]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="otlp-workload-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _line(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the workload printed nothing within {timeout:.0f} s:\n{self.errors()}") from None
        if line is None:
            self.proc.wait(10)
            raise AssertionError(f"the workload exited with {self.proc.returncode}:\n{self.errors()}")
        return line

    def ready(self, timeout: float = 60.0) -> None:
        line = self._line(timeout)
        if line.strip() != "ready":
            raise AssertionError(f"the workload said {line!r}:\n{self.errors()}")

    def result(self, timeout: float = 60.0) -> Dict[str, Any]:
        return json.loads(self._line(timeout))

    def errors(self) -> str:
        """The tail of the workload's standard error (kept once the workload is closed)."""
        if self._errors is None:
            self.stderr.flush()
            self.stderr.seek(0)
            return self.stderr.read()[-4000:]
        return self._errors

    def finish(self, timeout: float = 30.0) -> int:
        """Tell the workload to exit (the SDK shuts down and exports once more); bounded."""
        try:
            if self.proc.poll() is None:
                assert self.proc.stdin is not None
                try:
                    self.proc.stdin.write("exit\n")
                    self.proc.stdin.close()
                except BrokenPipeError:
                    pass
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
                    raise AssertionError(f"the workload did not exit within {timeout:.0f} s:\n{self.errors()}") from None
            return self.proc.returncode
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass
        if self._errors is None:
            self._errors = self.errors()
            self.stderr.close()


@pytest.fixture
def start_workload(tmp_path: Any) -> Iterator[Callable[..., Workload]]:
    """Starts workloads (their standard error kept in the test's tmp_path); kills any left."""
    started: List[Workload] = []

    def start(mode: str, service: str, protocol: str, endpoint: str, **kwargs: Any) -> Workload:
        w = Workload(mode, service, protocol, endpoint, str(tmp_path / f"workload-{len(started)}.err"),
                     **kwargs)
        started.append(w)
        return w

    yield start
    for w in started:
        w.close()


# --- reading what was received ------------------------------------------------------------

Attrs = Tuple[Tuple[str, str, Any], ...]


def our_metrics(batches: List[Dict[str, Any]], scope: str) -> List[Dict[str, Any]]:
    """Every metric of scope ``scope`` in every batch, each with its scope version."""
    out = []
    for batch in batches:
        for sm in batch["scopes"]:
            if sm["name"] == scope:
                for m in sm["metrics"]:
                    out.append(dict(m, scope_version=sm["version"]))
    return out


def series_key(point: Dict[str, Any]) -> Attrs:
    return tuple(sorted((k, t, v) for k, (t, v) in point["attributes"].items()))


Collection = Dict[str, Dict[Attrs, Dict[str, Any]]]


def collections(metrics: List[Dict[str, Any]]) -> Dict[int, Collection]:
    """The points of each collection (the SDK stamps one time on all points of a collection):
    time_unix_nano -> name -> series -> point."""
    out: Dict[int, Collection] = {}
    for m in metrics:
        for p in m["points"]:
            out.setdefault(p["time_unix_nano"], {}).setdefault(m["name"], {})[series_key(p)] = p
    return out


def reading(point: Dict[str, Any]) -> Any:
    """What a point says, without its timestamps."""
    if "value" in point:
        return point["value"]
    return (point["count"], point["sum"], point["min"], point["max"], tuple(point["bucket_counts"]))


def plain(point: Dict[str, Any]) -> Dict[str, Any]:
    """A point's attributes as {key: value}, dropping the wire types."""
    return {k: v for k, (_t, v) in point["attributes"].items()}


def select(final: Dict[str, Dict[Attrs, Dict[str, Any]]], name: str, **attrs: Any) -> List[Dict[str, Any]]:
    """Final points of ``name`` whose attributes include ``attrs`` (dots as __)."""
    want = {k.replace("__", "."): v for k, v in attrs.items()}
    return [p for p in final.get(name, {}).values() if all(plain(p).get(k) == v for k, v in want.items())]


def value(point: Dict[str, Any]) -> Any:
    return point["value"][1]


def total(final: Dict[str, Dict[Attrs, Dict[str, Any]]], name: str, **attrs: Any) -> int:
    return sum(value(p) for p in select(final, name, **attrs))
