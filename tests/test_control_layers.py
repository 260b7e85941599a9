"""The control plane's layers, read from the source with `ast` so the shape cannot rot:

  app.py (wiring) -> api/ -> web.py -> domain/, store/;  jobs/ -> domain/, store/

Each module's imports of gateway.control must stay within the edges its layer allows, no
module imports anything inside a function (the way a cycle gets papered over), and the import
graph of gateway.control has no cycle."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "gateway" / "control"
PACKAGE = "gateway.control"

# module (relative to gateway/control, without .py) -> layer; packages by their directory
LAYER_OF_DIR = {"api": "api", "domain": "domain", "jobs": "jobs", "store": "store"}
LAYER_OF_FILE = {
    "__init__": "package",
    "app": "app",
    "web": "web",
    "auth": "web",
    "config": "config",
    "backup": "cli",
    "slorules": "cli",
}
# layer -> the layers it may import (its own included where listed)
ALLOWED = {
    "domain": {"domain"},
    "store": {"store"},
    "jobs": {"jobs", "domain", "store"},
    "web": {"web", "config", "domain", "store"},
    "api": {"api", "web", "config", "domain", "store"},
    "config": {"config", "domain", "jobs", "store"},
    "cli": {"config", "domain", "store"},
    "app": {"app", "api", "web", "config", "domain", "jobs", "store"},
    "package": set(),
}
# what domain and store may import of the rest of the project
DOMAIN_STORE_EXTERNAL = {"gateway.validation", "gateway.clock", "gateway.errors"}


@dataclass(frozen=True, slots=True)
class Edge:
    source: str          # dotted module name
    target: str          # dotted module name
    line: int
    in_function: bool
    type_only: bool      # under `if TYPE_CHECKING:`


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(name: str) -> str:
    rel = name.removeprefix(PACKAGE).lstrip(".").split(".")
    if rel == [""]:
        return "package"
    if rel[0] in LAYER_OF_DIR:
        return LAYER_OF_DIR[rel[0]]
    return LAYER_OF_FILE[rel[0]]


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(path: Path, known: set[str], source: str | None = None) -> list[Edge]:
    """Every import in the module, resolved to the modules it names."""
    source = source or module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[Edge] = []

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            func = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                     ast.Lambda))
            tc = type_only or (isinstance(child, ast.If) and _is_type_checking(child))
            if isinstance(child, ast.Import):
                for a in child.names:
                    out.append(Edge(source, a.name, child.lineno, func, tc))
            elif isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"{path}:{child.lineno}: relative import"
                base = child.module or ""
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    out.append(Edge(source, sub if sub in known else base, child.lineno,
                                    func, tc))
            visit(child, func, tc)

    visit(tree, False, False)
    return out


def all_edges() -> list[Edge]:
    mods = modules()
    known = set(mods)
    return [e for p in mods.values() for e in imports(p, known)]


def internal(e: Edge) -> bool:
    # a package's own modules import through it (`from gateway.control.store import database`):
    # not an edge to its __init__
    return (e.target == PACKAGE or e.target.startswith(PACKAGE + ".")) and \
        not e.source.startswith(e.target + ".")


def test_the_layers_cover_every_module() -> None:
    for name in modules():
        assert layer(name) in ALLOWED, name
    for d in LAYER_OF_DIR:
        assert (ROOT / d / "__init__.py").is_file(), d


def test_each_layer_imports_only_what_it_may() -> None:
    bad = []
    for e in all_edges():
        if not internal(e) or e.target == PACKAGE:
            continue
        src, dst = layer(e.source), layer(e.target)
        if e.type_only and src == "domain" and dst == "store":
            continue      # annotations of the store a domain function is handed
        if dst not in ALLOWED[src]:
            bad.append(f"{e.source}:{e.line} ({src}) imports {e.target} ({dst})")
    assert bad == []


def test_domain_and_store_import_nothing_else_of_the_project() -> None:
    bad = []
    for e in all_edges():
        if layer(e.source) not in ("domain", "store") or not e.target.startswith("gateway"):
            continue
        if e.target.startswith(PACKAGE + ".") or e.target in DOMAIN_STORE_EXTERNAL or \
                e.target == "gateway":      # `from gateway import validation`
            continue
        bad.append(f"{e.source}:{e.line} imports {e.target}")
    assert bad == []


def test_domain_has_no_web_and_no_sql_driver() -> None:
    bad = [f"{e.source}:{e.line} imports {e.target}" for e in all_edges()
           if layer(e.source) == "domain" and not e.type_only
           and e.target.split(".")[0] in ("aiohttp", "sqlite3", "psycopg", "psycopg_pool")]
    assert bad == []


def test_no_imports_inside_functions() -> None:
    bad = [f"{e.source}:{e.line} imports {e.target}" for e in all_edges() if e.in_function]
    assert bad == []


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for e in all_edges():
        if internal(e) and not e.type_only and not e.in_function and e.target in graph:
            graph[e.source].add(e.target)
    # Tarjan's strongly connected components: any with more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
            if len(component) > 1 or v in graph[v]:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    assert cycles == []


def test_the_checks_see_what_they_guard(tmp_path: Path) -> None:
    """A domain module's aiohttp import, an import inside a function and one for annotations
    only are each seen as what they are."""
    p = tmp_path / "probe.py"
    p.write_text("from typing import TYPE_CHECKING\n"
                 "from aiohttp import web\n"
                 "if TYPE_CHECKING:\n    from gateway.control.store import Store\n"
                 "def f():\n    import json\n")
    name = PACKAGE + ".domain.probe"
    edges = {e.target: e for e in imports(p, {PACKAGE + ".store"}, source=name)}
    assert layer(name) == "domain"
    assert not edges["aiohttp"].in_function and not edges["aiohttp"].type_only
    assert edges["json"].in_function
    assert edges[PACKAGE + ".store"].type_only
