"""Dependencies point one way: cluster -> service, model, index; service -> model, index; model -> index.
No circles (the `jointpq` command reaches `cluster` through an entry point, not an import)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"index": {"model", "service", "cluster"}, "model": {"service", "cluster"}, "service": {"cluster"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upward(package):
    bad = {
        f"{p.relative_to(ROOT)} imports {sorted(_imports(p) & FORBIDDEN[package])}"
        for p in (ROOT / package).rglob("*.py")
        if _imports(p) & FORBIDDEN[package]
    }
    assert not bad, bad
