"""docs/troubleshooting.md has a section for every problem ``otel-ebpf-flows doctor`` can report.

The checks are read from the doctor's source (every ``Check(...)`` whose ``ok``
is False or None), so a new failing check, a renamed one or a reworded fix
fails here until the document follows; and a section for a check the doctor
no longer has fails too.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
from typing import Dict, List, Set, Tuple

import pytest

from otel_ebpf_flows import _doctor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "troubleshooting.md")
UNEXPECTED = "unexpected error"
MARKS = {False: "FAIL", None: "WARN"}


def _text(node: ast.AST) -> Tuple[str, List[str]]:
    """A string expression as (exact text if constant else "", its constant pieces)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value, [node.value]
    if isinstance(node, ast.JoinedStr):
        return "", [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return "", []


def doctor_problems() -> Dict[str, List[Tuple[str, List[str]]]]:
    """heading -> [(exact fix or "", constant pieces of the fix)] for every non-passing Check."""
    tree = ast.parse(inspect.getsource(_doctor))
    out: Dict[str, List[Tuple[str, List[str]]]] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Check"):
            continue
        args = list(node.args) + [None] * 4
        kw = {k.arg: k.value for k in node.keywords}
        name_node, ok_node, detail_node = args[0] or kw["name"], args[1] or kw["ok"], args[2] or kw["detail"]
        fix_node = args[3] or kw.get("fix")
        assert isinstance(ok_node, ast.Constant), ast.unparse(node)
        if ok_node.value is True:
            continue
        detail, detail_pieces = _text(detail_node)
        name, _ = _text(name_node)
        if (detail or "".join(detail_pieces)).startswith(UNEXPECTED):
            heading = UNEXPECTED
        else:
            assert name, f"a failing check without a constant name: {ast.unparse(node)}"
            heading = f"[{MARKS[ok_node.value]}] {name}"
        fix = _text(fix_node) if fix_node is not None else ("", [])
        out.setdefault(heading, []).append(fix)
    return out


def _norm(s: str) -> str:
    return " ".join(s.split())


@pytest.fixture(scope="module")
def sections() -> Dict[str, str]:
    """### heading -> its text, within the "Doctor lines" part of the document."""
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    part = text.split("\n## Doctor lines\n", 1)[1].split("\n## ", 1)[0]
    out = {}
    for chunk in part.split("\n### ")[1:]:
        heading, _, body = chunk.partition("\n")
        out[heading.strip()] = body
    return out


def test_the_source_reading_finds_the_doctor_checks() -> None:
    problems = doctor_problems()
    # the reading itself works: these are certainly among the doctor's failures
    assert {"[FAIL] privileges", "[FAIL] BTF", "[FAIL] libbpf", "[WARN] load", UNEXPECTED} <= set(problems)


def test_every_problem_the_doctor_reports_has_a_section(sections) -> None:
    problems = doctor_problems()
    missing = set(problems) - set(sections)
    assert not missing, f"docs/troubleshooting.md has no section for {sorted(missing)}"
    stale = set(sections) - set(problems)
    assert not stale, f"docs/troubleshooting.md has sections for checks the doctor does not have: {sorted(stale)}"


def test_each_section_quotes_the_fix_the_doctor_prints(sections) -> None:
    for heading, fixes in doctor_problems().items():
        body = _norm(sections[heading])
        for exact, pieces in fixes:
            if exact:
                assert _norm(exact) in body, f"{heading}: the fix {exact!r} is not quoted"
            for piece in pieces:
                if len(piece.strip()) >= 12:
                    assert _norm(piece) in body, f"{heading}: {piece!r} of the fix is not quoted"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_within_the_document_resolve() -> None:
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    anchors: Set[str] = {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links
    for link in links:
        assert link in anchors, f"#{link} names no heading"
