"""The import graph of ``leantune/`` is the one ARCHITECTURE.md draws: every import points to a lower floor (or
stays inside its own package), modules import each other without circles, and a function-local import is there only
for an optional dependency or an import order that has to be late (each with a comment saying which).

The floors are read from ARCHITECTURE.md's "Layers" table, so the document and this test cannot drift apart."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "leantune"
#: third-party modules that may be missing on a user's machine (or are slow and rarely needed), so they are imported
#: where they are used
OPTIONAL = ("bitsandbytes", "triton", "matplotlib", "torch.distributed.tensor", "torch.distributed.fsdp",
            "torch.distributed.checkpoint", "deepspeed", "mkdocs", "liger_kernel")


def floors() -> dict[str, int]:
    """``{unit: floor}`` from ARCHITECTURE.md's table ``| floor | units |``."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    out = {}
    for floor, units in re.findall(r"^\| (\d+) \| (.+?) \|", text, flags=re.M):
        for unit in re.findall(r"`([\w.]+)`", units):
            out[unit] = int(floor)
    assert out, "ARCHITECTURE.md has no layer table"
    return out


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "leantune"


def imports(module: str) -> list[tuple[str, bool, ast.AST]]:
    """``(imported leantune module, function-local?, node)`` for every import of ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    local_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            out.append((target, id(node) in local_nodes, node))
    return out


def test_floors_cover_every_unit():
    units = {unit(m) for m in MODULES}
    missing = sorted(units - set(floors()))
    assert not missing, f"ARCHITECTURE.md's layer table does not place {missing}"


def test_imports_point_downwards():
    table = floors()
    wrong = []
    for module in MODULES:
        for target, _, node in imports(module):
            if not target.startswith("leantune") or target == "leantune" and module == "leantune":
                continue
            a, b = unit(module), unit(target)
            if a != b and table[b] >= table[a]:
                wrong.append(f"{module}:{node.lineno} imports {target} (floor {table[b]} >= {table[a]})")
    assert not wrong, "imports that do not point to a lower floor:\n" + "\n".join(wrong)


def test_no_import_circles():
    graph = {m: {t for t, local, _ in imports(m) if not local and t in MODULES and t != m} for m in MODULES}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            # a package importing its own submodules is how packages work; a submodule importing its package back
            # while the package imports it is a circle
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_function_local_imports_are_optional_or_explained():
    wrong = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, local, node in imports(module):
            if not local:
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            optional = all(any(n == o or n.startswith(o + ".") for o in OPTIONAL) for n in names)
            explained = "# local:" in lines[node.lineno - 1] or "# local:" in lines[node.lineno - 2]
            if not (optional or explained):
                wrong.append(f"{module}:{node.lineno} {ast.unparse(node)}")
    assert not wrong, ("function-local imports of required modules (import them at the top, or say why they must be "
                       "late with a '# local: <reason>' comment):\n" + "\n".join(sorted(set(wrong))))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_alone(module):
    """Every module imports, also those ``import leantune`` does not load (``leantune.testing``, the CLI's parts).
    (In this one interpreter: it does not show that a module would import first in a fresh one.)"""
    import importlib

    importlib.import_module(module)
