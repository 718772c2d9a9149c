"""Keep the layering honest: the package's folders are its layers, and imports only go downward.

The order (src/edgefilter/README.md says what lives in each):

    core < lists < store < rules < outputs < reputation < asterisk < top level

A module may import its own folder and any folder below it, never one above. The top level
(``service.py``, ``cli.py`` ...) may import anything. Every import is checked, also the ones
inside functions (a lazy import upward is still an upward dependency).
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "edgefilter"
ORDER = ["core", "lists", "store", "rules", "outputs", "reputation", "asterisk"]
RANK = {name: i for i, name in enumerate(ORDER)}
TOP = len(ORDER)
LIMIT = 600  # lines; a longer module says why in its first lines ("longer than ... because")


def layer_of(module: str) -> int:
    """``edgefilter.rules.screen`` -> rank of ``rules``; a top-level module -> TOP."""
    parts = module.split(".")
    return RANK.get(parts[1], TOP) if len(parts) > 1 else TOP


def module_of(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Absolute names of the edgefilter modules ``path`` imports (relative imports resolved)."""
    me = module_of(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "edgefilter" or mod.startswith("edgefilter."):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names if mod.count(".") == 0)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("edgefilter."))
    return out


def modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def test_folders_are_the_layers():
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(ORDER), f"a folder must be a layer in ORDER (and in src/edgefilter/README.md): {folders ^ set(ORDER)}"
    readme = (PKG / "README.md").read_text()
    missing = [f for f in ORDER if f"`{f}/`" not in readme]
    assert not missing, f"src/edgefilter/README.md does not say what lives in {missing}"


def test_imports_only_go_downward():
    problems = []
    for path in modules():
        mine = layer_of(module_of(path))
        for dep in imported(path):
            if layer_of(dep) > mine:
                problems.append(f"{module_of(path)} imports {dep}: {ORDER[layer_of(dep)] if layer_of(dep) < TOP else 'top level'} "
                                f"is above {ORDER[mine]}")
    assert not problems, "\n".join(problems)


def test_the_layer_rule_catches_an_upward_import(tmp_path):
    """The checker itself: a module in core/ importing rules/ is reported (guards a hollow test)."""
    fake = PKG / "core" / "_layer_probe.py"
    fake.write_text("from edgefilter.rules.screen import Screener\nfrom ..asterisk import agi\n")
    try:
        deps = imported(fake)
        assert "edgefilter.rules.screen" in deps and "edgefilter.asterisk" in deps
        assert all(layer_of(d) > layer_of(module_of(fake)) for d in deps)
    finally:
        fake.unlink()


def test_no_module_over_the_limit_without_a_reason():
    long = []
    for path in modules():
        text = path.read_text()
        n = text.count("\n")
        if n > LIMIT and "longer than" not in "\n".join(text.splitlines()[:15]):
            long.append(f"{module_of(path)}: {n} lines")
    assert not long, f"split these, or say at their top why they are longer than ~{LIMIT} lines: {long}"


def test_domain_model_does_no_io():
    banned = {"asyncio", "socket", "sqlite3", "aiosqlite", "open"}
    tree = ast.parse((PKG / "core" / "model.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not (names | calls) & banned
