"""``otel-ebpf-flows demo --json`` in this (private) network namespace, with the namespace's MIB deltas.

python -m tests.cli.demo_netns  (under ``unshare --net``). Prints one JSON line:
the demo's exit status, its JSON output, and the namespace's TCP MIB counter
deltas over the run (the demo is the only thing in the namespace).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.kernel.harness import emit, mib, mib_delta, setup_netns

if __name__ == "__main__":
    setup_netns()
    before = mib()
    proc = subprocess.run([sys.executable, "-m", "otel_ebpf_flows", "demo", "--duration", "1", "--json"],
                          capture_output=True, text=True, timeout=120)
    delta = {k: v for k, v in mib_delta(before, mib()).items() if k.startswith(("Tcp.", "TcpExt."))}
    emit({"status": proc.returncode, "stderr": proc.stderr[-4000:],
          "demo": json.loads(proc.stdout) if proc.returncode == 0 else None, "mib": delta})
