"""A stage's code fingerprint, computed from what its action really runs (never a hand-written list).

Roots come from the action object itself: the ``moeprune`` modules imported in its body, the
module-level names it uses that come from a ``moeprune`` module, and, followed the same way, the
functions of its own module it calls (closures included). From the roots, the static import graph
of the package gives the closure: every import statement of a file counts (top level,
function-local, relative, ``from pkg import submodule``), and so does every parent package (its
``__init__`` runs first). A static graph over-approximates what runs, which costs a rerun at most;
it never misses a module that a later edit could change the numbers through.

The fingerprint is one sha256 per file of the closure, keyed ``moeprune/arch/gemma4.py``, plus
one per definition of the action's own module that it runs, keyed
``moeprune/pipeline/stages.py:_profile`` (its source text). So the pipeline's wiring counts per
stage: an edit to one stage's action reruns that stage, not every stage. The modules that only
decide *whether* a stage runs (graph, lock, fingerprint, view) are not part of any stage's code
unless an action imports them.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FunctionType, ModuleType
from typing import Any

from moeprune.hashing import sha256_bytes, sha256_file

PACKAGE = "moeprune"


def _ours(module: str, package: str = PACKAGE) -> bool:
    return module == package or module.startswith(package + ".")


def module_key(module: str, is_package: bool) -> str:
    """Location-independent name of a module's file: ``moeprune/arch/__init__.py``."""
    return "/".join(module.split(".")) + ("/__init__.py" if is_package else ".py")


def _parents(module: str) -> Iterator[str]:
    parts = module.split(".")
    for end in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:end])


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name an import statement anywhere in ``tree`` may load: ``import a.b`` gives
    ``a.b``; ``from .x import y`` (in ``module``) gives ``<package>.x`` and ``<package>.x.y``
    (``y`` may be a submodule). Callers keep the names that are modules."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


@dataclass
class ImportGraph:
    """The modules of one package (name -> file) and what each imports, statically."""

    files: dict[str, Path]
    edges: dict[str, frozenset[str]] = field(default_factory=dict)
    shas: dict[str, str] = field(default_factory=dict)  # module -> sha256 of the bytes the edges came from

    @classmethod
    def of_package(cls, package_dir: Path, name: str = PACKAGE) -> ImportGraph:
        """The graph of the package's files. Parsing every file is most of a no-op reproduce's
        time, so the edges are cached on disk under the sha256 of every (module, file sha256)
        pair: any edit, added or removed file gives another key."""
        files: dict[str, Path] = {}
        for path in sorted(Path(package_dir).rglob("*.py")):
            parts = [name, *path.relative_to(package_dir).with_suffix("").parts]
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
        sources = {module: path.read_bytes() for module, path in files.items()}
        graph = cls(files, shas={module: sha256_bytes(data) for module, data in sources.items()})
        cache = _edges_cache_path(graph.shas)
        cached = _read_edges(cache, files)
        if cached is not None:
            graph.edges = cached
            return graph
        for module, path in files.items():
            tree = ast.parse(sources[module], filename=str(path))
            names = imported_names(tree, module, graph.is_package(module))
            graph.edges[module] = frozenset(n for n in names | set(_parents(module)) if n in files)
        _write_edges(cache, graph.edges)
        return graph

    def is_package(self, module: str) -> bool:
        return self.files[module].name == "__init__.py"

    def closure(self, roots: Iterable[str]) -> set[str]:
        """``roots`` (those that are modules of the package), everything they import, transitively,
        and their parent packages."""
        todo = [m for root in roots for m in (root, *_parents(root)) if m in self.files]
        seen: set[str] = set()
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(self.edges[module] - seen)
        return seen

    def digests(self, modules: Iterable[str]) -> dict[str, str]:
        return {module_key(m, self.is_package(m)): self.shas.get(m) or sha256_file(self.files[m]) for m in modules}


def _edges_cache_path(shas: dict[str, str]) -> Path:
    from moeprune.hashing import sha256_json
    from moeprune.llamacpp.source import cache_root

    return cache_root() / "import-graph" / f"{sha256_json(sorted(shas.items()))}.json"


def _read_edges(path: Path, files: dict[str, Path]) -> dict[str, frozenset[str]] | None:
    """The cached edges, or None when absent or unreadable (then they are parsed again)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        edges = {module: frozenset(data[module]) for module in files}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return edges if all(n in files for names in edges.values() for n in names) else None


def _write_edges(path: Path, edges: dict[str, frozenset[str]]) -> None:
    """Best effort: a cache that cannot be written only costs the next run the parse."""
    import contextlib

    from moeprune.atomic import write_json

    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {module: sorted(names) for module, names in edges.items()})


def package_graph() -> ImportGraph:
    """The graph of the moeprune package this process runs (a pipeline parses it once per run)."""
    import moeprune

    return ImportGraph.of_package(Path(moeprune.__file__).resolve().parent)


# --- the roots of an action ----------------------------------------------------------------------
@dataclass(frozen=True)
class CodeRoots:
    """What an action runs: package modules it imports, and the source digests of the
    definitions of its own module it runs (``module/path.py:qualname`` -> sha256)."""

    modules: frozenset[str]
    definitions: tuple[tuple[str, str], ...]

    def fingerprint(self, graph: ImportGraph) -> dict[str, str]:
        """The code part of a stage's key: one sha256 per file of the closure and per definition."""
        return dict(sorted({**dict(self.definitions), **graph.digests(graph.closure(self.modules))}.items()))


@functools.cache
def _parsed(filename: str) -> tuple[str, ast.AST] | None:
    try:
        source = Path(filename).read_text(encoding="utf-8")
        return source, ast.parse(source, filename=filename)
    except (OSError, SyntaxError, ValueError):
        return None


def _definition_nodes(code: CodeType) -> tuple[str, list[ast.AST]] | None:
    """The source and AST node(s) of the def (or lambda) that compiled to ``code``."""
    parsed = _parsed(code.co_filename)
    if parsed is None:
        return None
    source, tree = parsed
    nodes = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == code.co_name:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        elif isinstance(node, ast.Lambda) and code.co_name == "<lambda>":
            first = node.lineno
        else:
            continue
        if first == code.co_firstlineno:
            nodes.append(node)
    return (source, nodes) if nodes else None


def _global_names(code: CodeType) -> set[str]:
    """Names ``code`` (and the lambdas, comprehensions and defs nested in it) may load as globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _global_names(const)
    return names


def _module_of(value: Any) -> str | None:
    if isinstance(value, ModuleType):
        return value.__name__
    module = getattr(value, "__module__", None)
    return module if isinstance(module, str) else None


def _is_package_module(module: str) -> bool:
    found = sys.modules.get(module)
    return Path(getattr(found, "__file__", "") or "").name == "__init__.py"


def _is_literal(value: Any) -> bool:
    """A module constant whose repr is its value (so its digest is stable across processes)."""
    if isinstance(value, tuple):  # not sets: their order varies between processes
        return all(_is_literal(item) for item in value)
    return isinstance(value, (str, int, float, bytes)) or value is None


def action_roots(action: Callable[..., Any], package: str = PACKAGE) -> CodeRoots:
    """The roots of ``action``'s code (see the module docstring)."""
    modules: set[str] = set()
    definitions: dict[str, str] = {}
    seen: set[CodeType] = set()

    def visit(function: Any) -> None:
        if isinstance(function, functools.partial):
            visit(function.func)
            return
        function = getattr(function, "__func__", function)  # a bound method: its function
        if not isinstance(function, FunctionType):  # a callable object, a builtin: its module
            if (module := _module_of(function)) and _ours(module, package):
                modules.add(module)
            return
        code = function.__code__
        if code in seen:
            return
        seen.add(code)
        home = function.__module__
        key = f"{module_key(home, _is_package_module(home))}:{function.__qualname__}"
        found = _definition_nodes(code)
        if found is None:  # no source file: the bytecode stands in for it
            definitions[key] = sha256_bytes(code.co_code + repr(code.co_consts).encode())
        else:
            source, nodes = found
            text = "\n".join(ast.get_source_segment(source, node) or ast.dump(node) for node in nodes)
            definitions[key] = sha256_bytes(text.encode("utf-8"))
            for node in nodes:
                modules.update(n for n in imported_names(node, home, _is_package_module(home)) if _ours(n, package))
        for name in sorted(_global_names(code)):
            value = function.__globals__.get(name)
            if isinstance(value, FunctionType) and value.__module__ == home:
                visit(value)
            elif _is_literal(value) and name in function.__globals__:
                definitions[f"{module_key(home, _is_package_module(home))}:{name}"] = sha256_bytes(repr(value).encode())
            elif (module := _module_of(value)) and _ours(module, package) and module != home:
                modules.add(module)
        for cell in function.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(value, FunctionType):
                visit(value)

    visit(inspect.unwrap(action))
    return CodeRoots(frozenset(modules), tuple(sorted(definitions.items())))
