"""The house rules the code's structure keeps: no import circle, timm's attribute names in one module only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "peftbench"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """peftbench modules that ``name`` imports (anywhere in the file: lazy imports count too)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & set(modules)
            found.update(subs if len(subs) == len(node.names) else subs | {base})
    return {m for m in found if m in modules and m != name}


def test_the_import_graph_of_peftbench_has_no_circle():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(n):], n]))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


#: timm attribute names that only peftbench/backbones/anatomy.py may use to reach into a model
TIMM_ATTRIBUTES = {"cls_token", "reg_token", "pos_embed", "patch_embed", "forward_features", "forward_head", "qkv"}


def test_only_anatomy_reaches_into_timm_models_by_attribute_name():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "anatomy.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):  # attribute access in code, not words in docstrings
            on_self = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
            if isinstance(node, ast.Attribute) and node.attr in TIMM_ATTRIBUTES and not on_self:  # self.x: an option
                offenders.append(f"{path.relative_to(PACKAGE.parent)}: .{node.attr}")
    assert not offenders, offenders
