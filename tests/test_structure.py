"""The package's layering (ARCHITECTURE.md): no import cycle between its modules, `model/` pure PyTorch (no Lightning,
no data or application modules), and the LightningModule learning about data only through `split_info`."""

import ast
from pathlib import Path

from conftest import REPOSITORY

PACKAGE = REPOSITORY / "deepgaze_lit"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPOSITORY).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """Absolute names of the modules (or names inside modules) that `path` imports at module level."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    imported = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            imported.update(f"{base}.{alias.name}" for alias in node.names)
            imported.add(base)
    return imported


def package_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports at module level (a package's own re-exports of its children are
    left out: importing a child runs its package's __init__ first, which is not a cycle of the child's making)."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        targets = {target for target in top_level_imports(path) if target in paths}
        graph[name] = {target for target in targets if not target.startswith(name + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_no_import_cycle():
    graph = package_graph()
    assert len(graph) > 30
    assert find_cycle(graph) == []


def test_find_cycle_detects_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_model_is_pure_pytorch():
    for path in (PACKAGE / "model").rglob("*.py"):
        for target in top_level_imports(path):
            root = target.split(".")[0]
            assert root not in ("lightning", "pytorch_lightning"), (path, target)
            if root == "deepgaze_lit":
                assert target.startswith(("deepgaze_lit.model", "deepgaze_lit.batch")), (path, target)


def test_module_reads_data_only_through_split_info():
    source = (PACKAGE / "module.py").read_text()
    uses = [line.strip() for line in source.splitlines() if "datamodule." in line]
    assert uses and all("datamodule.split_info(" in line or "datamodule is None" in line for line in uses), uses
    assert "FixationDataset" not in source
