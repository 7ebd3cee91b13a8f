"""Agent tests: the node agent as root, services as nobody, a real OTLP receiver.

They need what the kernel, command-line and OTLP tests need (root, BTF, unshare,
nft, setpriv, an interpreter nobody can run, rotel); they skip only on a host that
lacks one, with the reason, and under CI (CI=true) a missing prerequisite fails.
"""

from tests.cli.conftest import kernel_ok, nobody_python  # noqa: F401  (fixtures)
from tests.otlp.conftest import otlp_ok  # noqa: F401  (fixture)
