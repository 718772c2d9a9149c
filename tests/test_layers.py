"""Keep the layering of DESIGN.md honest: imports only go downward."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "edgefilter"
LAYER = {
    "errors": 0, "model": 0, "durations": 0,
    "config": 1, "numbers": 1, "signals": 1, "scoring": 1, "policy": 1, "lists": 1,
    "store": 2, "pgstore": 2, "spool": 2, "stores": 2, "events": 2, "prometheus": 2, "stats": 1,
    "decisionlog": 3, "screen": 3, "report": 4, "challenge": 3, "mirror": 2,
    "history": 1, "behaviour": 1, "memory": 3, "outcomes": 2, "evidence": 4, "starcodes": 4, "ami": 4,
    "agi": 4, "routes": 4, "callsim": 4, "systemd": 4, "eventloop": 4,
    "feeds": 2, "feedworkers": 3, "imports": 4, "replay": 4, "appeals": 4, "appeals_cli": 5,
    "service": 5, "cli": 5, "launcher": 5, "__main__": 5, "workers": 5, "follower": 4, "calllog": 4,
}


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            out.update(a.name for a in node.names)
    return out


def test_imports_only_go_downward():
    problems = []
    for path in PKG.glob("*.py"):
        name = path.stem
        if name == "__init__" or name not in LAYER:
            continue
        for dep in imports(path):
            if dep in LAYER and LAYER[dep] > LAYER[name]:
                problems.append(f"{name} (layer {LAYER[name]}) imports {dep} (layer {LAYER[dep]})")
    assert not problems, problems


def test_every_module_has_a_layer():
    missing = [p.stem for p in PKG.glob("*.py") if p.stem not in LAYER and p.stem != "__init__"]
    assert not missing, f"add these modules to LAYER in tests/test_layers.py: {missing}"


def test_domain_model_does_no_io():
    banned = {"asyncio", "socket", "sqlite3", "aiosqlite", "open"}
    tree = ast.parse((PKG / "core" / "model.py").read_text())
    names = {n.names[0].name for n in ast.walk(tree) if isinstance(n, ast.Import)}
    assert not names & banned
