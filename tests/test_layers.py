"""The package's layers, read from the source: maths and plugins at the bottom, the trainer above
them, the application (Hydra, run directories) on top; imports only point down, none form a cycle,
and ``__init__`` files only re-export."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"
#: layer of each module, by the longest matching prefix; higher layers may import lower ones only
LAYERS = {
    "metalab.types": 0,
    "metalab.errors": 0,
    "metalab.distributed": 0,
    "metalab.checkpoint": 0,
    "metalab.recorded": 0,
    "metalab.hypergrad": 0,
    "metalab.models": 0,
    "metalab.optim": 0,
    "metalab.tasks": 0,
    "metalab.algorithms": 1,
    "metalab.auxilearn": 1,
    "metalab.training": 2,
    "metalab.app": 3,
    "metalab.inference": 3,
    "metalab.__main__": 3,
    "metalab": 3,
}


def modules() -> dict[str, Path]:
    found = {}
    for path in SOURCE.rglob("*.py"):
        parts = list(path.relative_to(SOURCE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The metalab modules ``path`` imports anywhere in it (functions included)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                for alias in node.names
            ]
        else:
            continue
        targets.update(name for name in names if name.split(".")[0] == "metalab")
    return targets


def layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


GRAPH = {name: imports(path, modules()) for name, path in modules().items()}


def test_the_layers_cover_every_module_and_the_tree_keeps_few_top_level_modules():
    assert all(name in GRAPH for name in ("metalab.app.cli", "metalab.training.trainer", "metalab.hypergrad.implicit"))
    top = [p for p in (SOURCE / "metalab").glob("*.py")]
    assert len(top) <= 9, sorted(p.name for p in top)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    upward = [target for target in GRAPH[module] if layer(target) > layer(module)]
    assert not upward, f"{module} (layer {layer(module)}) imports {upward} from a higher layer"


def test_no_import_cycle():
    # Tarjan's strongly connected components over the module graph
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH.get(node, ()):
            if target == node or target not in GRAPH:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("init", sorted(str(p.relative_to(SOURCE)) for p in SOURCE.rglob("__init__.py")))
def test_init_files_only_re_export(init):
    body = ast.parse((SOURCE / init).read_text()).body
    for statement in body:
        docstring = isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
        exported = isinstance(statement, ast.Assign) and [t.id for t in statement.targets] == ["__all__"]
        assert docstring or exported or isinstance(statement, (ast.Import, ast.ImportFrom)), (
            f"{init} line {statement.lineno} does more than re-export"
        )
