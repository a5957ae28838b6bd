"""The package's layout rules, read from the import graph of `src/dialogue` (every `import` and
`from ... import`, at module level or inside a function: a lazy import is still a dependency).

Rules are tables: FORBIDDEN (importing package, package it must never import) and ONLY (a
package, the only other packages it may import). A package is `dialogue.X`, the first level below
`dialogue`; a top-level module (`dialogue.service`) is a package of its own.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import dialogue

ROOT = Path(dialogue.__file__).parent

# (importer, forbidden): the importer package never imports the forbidden one, directly.
FORBIDDEN: list[tuple[str, str]] = [
    ("dialogue.local", "dialogue.train"),   # serving and training share GGUF code through dialogue.gguf
    ("dialogue.train", "dialogue.local"),
    ("dialogue.gguf", "dialogue.local"),    # gguf is below both
    ("dialogue.gguf", "dialogue.train"),
]

# Surfaces reach everything through the service (docs/architecture.md, "Surfaces").
SURFACE_BASE = {"dialogue.service", "dialogue.document", "dialogue.artifacts", "dialogue.render"}
ONLY: list[tuple[str, set[str]]] = [
    # cli/serve.py starts the web app; dialogue.config (settings from env and file) is a leaf
    ("dialogue.cli", SURFACE_BASE | {"dialogue.terminal", "dialogue.web", "dialogue.config"}),
    ("dialogue.api", SURFACE_BASE),
    ("dialogue.here", SURFACE_BASE),  # runs in a dialogue's kernel, through its own service
    ("dialogue.web", SURFACE_BASE),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    mod = _module_name(path)
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out.add(prefix)
            # `from . import adapters` imports the submodule dialogue.local.adapters
            out.update(f"{prefix}.{a.name}" for a in node.names if a.name != "*")
    return {n for n in out if n == "dialogue" or n.startswith("dialogue.")}


def _package(name: str) -> str:
    return ".".join(name.split(".")[:2])


def import_graph() -> dict[str, set[str]]:
    """Module -> the dialogue modules (or names inside them) it imports."""
    return {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


def package_graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = defaultdict(set)
    for mod, deps in import_graph().items():
        for d in deps:
            if d != "dialogue" and _package(d) != _package(mod):
                g[_package(mod)].add(_package(d))
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one package (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_graph_is_read():
    """The reader finds what is there (so the rules below cannot pass by reading nothing): a lazy
    import inside a function, a relative `from . import x`, and a `from ..pkg.mod import name`."""
    g = import_graph()
    assert "dialogue.gguf.lora" in g["dialogue.local.adapters"]          # from ..gguf.lora import ...
    assert "dialogue.local.merge" in g["dialogue.local.adapters"]        # from .merge import ...
    assert "dialogue.train.export" in g["dialogue.train.loop"]           # inside finetune(): from . import export
    assert "dialogue.gguf" in package_graph()["dialogue.train"]
    assert "dialogue.service" in g["dialogue.cli.main"]                 # from ..service import ...
    assert "dialogue.cli.adapters" in g["dialogue.cli.main"]            # from . import adapters, ...
    assert "dialogue.web" in g["dialogue.cli.serve"]                    # inside cmd_serve
    assert "dialogue.web.paths" in g["dialogue.web.routes.runs"]        # from .. import paths


@pytest.mark.parametrize("importer,forbidden", FORBIDDEN)
def test_forbidden_imports(importer, forbidden):
    bad = sorted(f"{mod} imports {d}" for mod, deps in import_graph().items() if _package(mod) == importer
                 for d in deps if _package(d) == forbidden)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("importer,allowed", ONLY, ids=[i for i, _ in ONLY])
def test_only_allowed_imports(importer, allowed):
    bad = sorted(f"{mod} imports {d}" for mod, deps in import_graph().items() if _package(mod) == importer
                 for d in deps if _package(d) not in allowed | {importer, "dialogue"})
    assert not bad, "\n".join(bad)


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_packages():
    found = cycles(package_graph())
    assert not found, "import cycles between packages: " + "; ".join(" <-> ".join(c) for c in found)


# the surfaces (and the package's own __init__, which offers the Python API) are above the service
ABOVE_SERVICE = {"dialogue.cli", "dialogue.web", "dialogue.api", "dialogue.here", "dialogue"}


def test_nothing_below_the_service_imports_it():
    below = sorted(mod for mod, deps in import_graph().items()
                   if _package(mod) not in ABOVE_SERVICE and _package(mod) != "dialogue.service"
                   and any(d == "dialogue.service" or d.startswith("dialogue.service.") for d in deps))
    assert below == [], f"modules below the service import it: {below}"


def test_no_two_test_files_share_a_name():
    """pytest imports test files by their base name (rootdir mode, no packages): two files of one
    name in different folders stop the collection of the whole suite."""
    tests = Path(__file__).resolve().parent
    names: dict[str, list[str]] = {}
    for f in tests.rglob("*.py"):
        if f.name != "conftest.py" and "__pycache__" not in f.parts:
            names.setdefault(f.name, []).append(str(f.relative_to(tests)))
    assert not {n: fs for n, fs in names.items() if len(fs) > 1}
