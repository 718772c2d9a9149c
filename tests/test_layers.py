"""Imports only go downward (DESIGN.md): the modules this feature added keep to their layer."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "edgefilter"
# module -> modules of edgefilter it must never import (higher layers)
FORBIDDEN = {
    "history": {"config", "store", "screen", "agi", "ami", "routes", "service", "cli", "behaviour"},
    "behaviour": {"store", "screen", "agi", "ami", "routes", "service", "cli"},
    "outcomes": {"screen", "agi", "ami", "routes", "service", "cli"},
    "ami": {"screen", "agi", "routes", "service", "cli", "store"},
    "starcodes": {"service", "cli", "routes"},
    "evidence": {"service", "cli", "agi", "ami"},
}


def _imports(name: str) -> set[str]:
    tree = ast.parse((SRC / f"{name}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            out.update(a.name for a in node.names)
    return out


def test_new_modules_import_only_downward():
    for name, banned in FORBIDDEN.items():
        assert not (_imports(name) & banned), (name, _imports(name) & banned)
