"""The shape of the tree: no import circles among the project's modules, `serving/` never imports
torch, no module over 500 lines, and every module says what it is for in its first line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("export", "serving")
MAX_LINES = 500
TORCH_LIKE = ("torch", "transformers", "torchvision")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every importable module of the two packages (the Triton model templates are files Triton
    loads by path, not modules of the package)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "templates" in path.relative_to(ROOT).parts:
                continue
            found[_module_name(path)] = path
    return found


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement anywhere in the file (lazy ones in functions too)
    names, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names.add(stem)
            names.update(f"{stem}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(path, name):
            # `from serving import tensors` names the module serving.tensors; `from serving.x
            # import f` names serving.x. Depend on the longest project module the name reaches.
            candidate = imported
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name and not name.startswith(candidate + "."):
                targets.add(candidate)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_circle():
    # the checker itself: a two-module circle and a three-module one are found, a chain is not
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from .sibling import g\n    import serving.tensors\n")
    names = imported_names(path, "serving.engine.mod")
    assert "serving.engine.sibling" in names and "serving.tensors" in names


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 60, "the import graph found too few modules"
    assert cycles(graph) == []


def test_serving_never_names_torch():
    offenders = []
    for name, path in project_modules().items():
        if not name.startswith("serving"):
            continue
        for imported in imported_names(path, name):
            if imported.split(".")[0] in TORCH_LIKE:
                offenders.append(f"{name} imports {imported}")
    assert offenders == []


def test_importing_every_serving_module_loads_no_torch():
    """The real check behind the static one: a fresh interpreter imports every serving module
    (not the CLI's bench baselines, which load torch only when asked for) and has no torch."""
    names = [n for n in project_modules() if n.startswith("serving")]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {TORCH_LIKE!r})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "", f"torch-like modules loaded: {result.stdout.strip()}"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_over_the_size_limit(package):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / package).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_says_what_it_is_for(package):
    missing = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text())
        doc = ast.get_docstring(tree)
        if not doc and path.read_text().strip():
            missing.append(str(path.relative_to(ROOT)))
    assert missing == []
