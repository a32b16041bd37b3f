"""The layout keeps its promises: no import cycle among the product's modules (module-level and function-level
imports, and the trainer facade's lazy imports), and no product file over the length limit."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRODUCT_PACKAGES = ("trainer", "generation", "uploads", "captioning", "ui")
PRODUCT_FILES = ("app.py",)
MAX_LINES = 400


def product_modules() -> dict[str, str]:
    """module name -> file path, for every product .py file."""
    out = {}
    for pkg in PRODUCT_PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, pkg)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for fn in filenames:
                if fn.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, fn), ROOT)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    out[".".join(rel)] = os.path.join(dirpath, fn)
    for fn in PRODUCT_FILES:
        out[fn[:-3]] = os.path.join(ROOT, fn)
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges(modules: dict[str, str]) -> dict[str, set[str]]:
    """module -> product modules it imports anywhere in its body (top level, functions, methods)."""
    edges: dict[str, set[str]] = {m: set() for m in modules}

    def target(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for n in names:
                t = target(n)
                if t and t != mod:
                    edges[mod].add(t)
    # The trainer facade resolves its names with importlib on first use: those are imports too.
    facade = modules["trainer"]
    for node in ast.walk(ast.parse(open(facade, encoding="utf-8").read())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS" for t in node.targets):
            for sub in ast.literal_eval(node.value).values():
                edges["trainer"].add(target(f"trainer.{sub}"))
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle():
    modules = product_modules()
    edges = import_edges(modules)
    assert len(modules) > 60 and sum(map(len, edges.values())) > 150  # the walk really saw the product
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_cycles():
    # The check itself must be able to fail: a cycle through a function-level import, and a relative one.
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    node = ast.parse("from ..loading import x").body[0]
    assert _resolve("trainer.families.base", False, node) == "trainer.loading"
    assert _resolve("trainer.families", True, ast.parse("from .base import x").body[0]) == "trainer.families.base"


def test_known_function_level_import_is_seen():
    # preflight.measure imports the Trainer inside a function; the walk must see it.
    edges = import_edges(product_modules())
    assert "trainer.training.trainer" in edges["trainer.preflight.measure"]
    assert "trainer.api" in edges["trainer"]


def test_no_product_file_over_the_limit():
    long = {os.path.relpath(p, ROOT): n for p in product_modules().values()
            if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_LINES}
    assert not long, f"product files over {MAX_LINES} lines: {long}"
