"""vmlinux_tracepoint_arities(): one parse of the running kernel's BTF per process, same answers."""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional

import pytest

from otel_ebpf_flows import _kernel, _libbpf

if not os.access(_kernel.VMLINUX_BTF, os.R_OK):
    pytest.skip(f"{_kernel.VMLINUX_BTF} is not readable here", allow_module_level=True)

try:
    _libbpf.load_library()
except Exception as exc:  # pragma: no cover - scripts/setup installs libbpf
    pytest.skip(f"no usable libbpf: {exc}", allow_module_level=True)


class _CountingLib:
    """The real libbpf, counting the vmlinux BTF parses made through it."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self.parses = 0

    def btf__load_vmlinux_btf(self) -> int:
        self.parses += 1
        return int(self._lib.btf__load_vmlinux_btf())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)


@pytest.fixture()
def counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[_CountingLib]:
    lib = _CountingLib(_libbpf.load_library())
    monkeypatch.setattr(_libbpf, "load_library", lambda: lib)
    monkeypatch.setattr(_libbpf, "_arities", {})
    yield lib


def _uncached(name: str) -> Optional[int]:
    """The answer from a parse of its own (what every call did before the cache)."""
    lib = _libbpf.load_library()
    btf = lib.btf__load_vmlinux_btf()
    assert btf
    try:
        return _libbpf._tracepoint_arity(lib, btf, name)
    finally:
        lib.btf__free(btf)


def test_one_parse_answers_every_tracepoint_asked(counting: _CountingLib) -> None:
    names = _kernel.ARITY_TRACEPOINTS + ("no_such_tracepoint_anywhere",)
    first = _libbpf.vmlinux_tracepoint_arities(names)
    assert counting.parses == 1
    again = _libbpf.vmlinux_tracepoint_arities(names)
    one = _libbpf.vmlinux_tracepoint_arity("tcp_retransmit_skb")
    assert counting.parses == 1, "answers already known must not parse vmlinux BTF again"
    assert again == first and one == first["tcp_retransmit_skb"]
    assert first["no_such_tracepoint_anywhere"] is None


def test_a_new_name_parses_once_more_and_answers_as_a_parse_of_its_own(counting: _CountingLib) -> None:
    _libbpf.vmlinux_tracepoint_arities(("tcp_retransmit_skb",))
    got: Dict[str, Optional[int]] = _libbpf.vmlinux_tracepoint_arities(("tcp_retransmit_skb", "inet_sock_set_state"))
    assert counting.parses == 2
    expected: List[Optional[int]] = []
    for name in ("tcp_retransmit_skb", "inet_sock_set_state"):
        expected.append(_uncached(name))
    assert [got["tcp_retransmit_skb"], got["inet_sock_set_state"]] == expected
    # inet_sock_set_state(sk, oldstate, newstate) on every kernel this package supports
    assert got["inet_sock_set_state"] == 3
