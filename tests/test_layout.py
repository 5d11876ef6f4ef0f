"""The repository's layout: what sits at the root, and no import cycles between the project's modules."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "pipeline", "model", "training", "deploy")
SCRIPTS = ("train.py", "export.py", "score.py", "serve.py", "compare.py")


def project_modules() -> dict[str, Path]:
    """odir_dual module name → its file: the root scripts and every module of the four packages."""
    found = {f"odir_dual.{name[:-3]}": ROOT / name for name in SCRIPTS}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            stem = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[f"odir_dual.{stem}"] = path
    return found


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere in it (top level or inside functions): `from odir_dual.model
    import loss` counts as odir_dual.model.loss when that is a module, else as the package odir_dual.model."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("odir_dual"):
            names = {f"{node.module}.{a.name}" for a in node.names}
            found |= (names & modules.keys()) or ({node.module} & modules.keys())
            if names & modules.keys() and node.module in modules:
                found.add(node.module)  # importing a submodule runs its package's __init__ first
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycles_between_the_projects_modules():
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    assert sum(map(len, graph.values())) > 50  # the graph was read (a broken parser would find no edges)
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_root_holds_the_scripts_the_packages_and_the_project_files():
    tracked = {p.name for p in ROOT.iterdir() if not p.name.startswith(".") and p.name not in
               {"runs", "odir_dual.egg-info", "build", "__pycache__"}}
    assert tracked == {*SCRIPTS, *PACKAGES, "benchmarks", "tests", "docs", "README.md", "pyproject.toml", "setup.sh"}
    for package in PACKAGES:
        assert (ROOT / package / "__init__.py").is_file(), package


def test_the_library_imports_only_through_odir_dual():
    """No module imports a sibling by a bare name (`from config import ...`): that works in a clone only."""
    bare = {p.stem for path in project_modules().values() for p in [path]} | set(PACKAGES)
    for name, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                assert node.module.split(".")[0] not in bare, f"{path.name}: from {node.module} import ..."
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & bare, f"{path.name}: import ..."
