"""Architecture rules, checked on the source: no import cycles, no module importing a higher layer.

Every module under ``src/ffid`` is parsed with :mod:`ast` (nothing is imported). An import is any
``import ffid.x`` / ``from ffid.x import y`` / relative ``from ..x import y`` anywhere in the file
(module level, inside functions, under ``if TYPE_CHECKING``) and any ``importlib.import_module``
call with a constant ``"ffid.x"`` name. A lazy import is still an import: it only moves the moment
the dependency bites. Imports under ``TYPE_CHECKING`` count for the layers (a type from a higher
layer is still a dependency on it) but not for cycles (they never run).
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import its own layer and the layers below it, never one above.
# The layer of ffid.x.y is "x" (a subpackage is one layer); the package front door is the top.
LAYERS: list[tuple[str, str]] = [
    ("_version", "the version string; imports nothing so any module may stamp files with it"),
    ("errors", "the exception types every layer raises"),
    ("dtypes", "dtype codes, names, sizes and index widths; needs only errors"),
    ("names", "tensor-name canonicalisation and block numbers; plain strings"),
    ("manifest", "names, shapes and dtypes of a module or safetensors headers; no presets"),
    ("presets", "built-in manifests, made of manifest types"),
    ("models", "resolves a module, path, folder or preset name to a Manifest: above both"),
    ("selection", "which elements a selection picks, over a manifest"),
    ("select", "the selectors that plan a selection from a model"),
    ("checkpoint", "delta and full files of a selection; duck-types an engine handle"),
    ("engine", "trains a selection in memory; handle.save_* delegate to checkpoint"),
    ("figures", "matplotlib output, written with checkpoint's atomic writer"),
    ("report", "plan/overlap tables and figures of a selection"),
    ("estimate", "memory estimate from a manifest and a planned selection"),
    ("preserve", "keeps earlier characters: reads their deltas' prompts"),
    ("train", "the training loop and its model plug-ins, on engine, checkpoint and preserve"),
    ("integrations", "musubi / HF / diffusers adapters; reuse train's latent cache reader"),
    ("demo", "the end-to-end demo, built on train"),
    ("cli", "the command line over everything"),
    ("ffid", "the package front door (__init__, __main__) re-exports the public API"),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}

# (importer, imported) pairs allowed to point upward for now. Each must still exist: when the
# code is fixed the test fails until the pair is removed here, so the list only shrinks.
# (importer, imported) pairs allowed to go upward while a fix is under way, each with its reason.
# Empty: the last one (the trainer finding the demo task by name) went when the demo registered
# itself through the ffid.tasks entry point.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    """One import of an ffid module by another, where it is written."""

    source: str
    target: str
    line: int
    type_only: bool  # under ``if TYPE_CHECKING``: never runs, so it cannot close a cycle


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _type_only_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                for sub in ast.walk(child):
                    if hasattr(sub, "lineno"):
                        lines.add(sub.lineno)
    return lines


def module_imports(module: str, is_package: bool, code: str, known: set[str]) -> list[Import]:
    """The ffid modules ``module`` imports (``known``: every module name, to tell a submodule
    ``from . import paths`` from a name ``from .. import __version__``)."""
    tree = ast.parse(code)
    type_only = _type_only_lines(tree)
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((sub if sub in known else target, node.lineno))
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "import_module")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.args[0].value, node.lineno))
    out: dict[tuple[str, int], Import] = {}  # `from .x import a, b` is one import
    for target, line in found:
        if target == "ffid" or target.startswith("ffid."):
            while target not in known and "." in target:  # `import ffid.x.name`: the module part
                target = target.rsplit(".", 1)[0]
            if target != module:
                out[target, line] = Import(module, target, line, line in type_only)
    return list(out.values())


@functools.cache
def _modules() -> dict[str, tuple[Path, bool]]:
    mods: dict[str, tuple[Path, bool]] = {}
    for path in sorted((SRC / "ffid").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return mods


@functools.cache
def _graph() -> tuple[Import, ...]:
    mods = _modules()
    known = set(mods)
    edges: list[Import] = []
    for name, (path, is_package) in mods.items():
        edges += module_imports(name, is_package, path.read_text(encoding="utf-8"), known)
    return tuple(edges)


def layer_of(module: str) -> str:
    """``ffid.checkpoint.delta`` -> ``checkpoint``; the package itself and ``__main__`` -> ``ffid``."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "ffid"
    return parts[1]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None`` (iterative DFS, deterministic order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path = [root]
        stack = [iter(sorted(graph.get(root, ())))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _where(imp: Import) -> str:
    path, _ = _modules()[imp.source]
    return f"{imp.source} -> {imp.target} ({path.relative_to(SRC.parent)}:{imp.line})"


# -- the parser itself --------------------------------------------------------------------------
def test_parser_sees_every_kind_of_import():
    known = {"ffid", "ffid.a", "ffid.a.b", "ffid.a.c", "ffid.d", "ffid.e", "ffid.f", "ffid.g"}
    code = (
        "from __future__ import annotations\n"
        "import importlib\n"
        "from typing import TYPE_CHECKING\n"
        "from . import c\n"  # a sibling submodule
        "from .. import __version__\n"  # a name of the package front door
        "from ..d import thing\n"
        "if TYPE_CHECKING:\n"
        "    from ..e import Type\n"
        "def f():\n"
        "    import ffid.f\n"
        "    importlib.import_module('ffid.g')\n"
        "    importlib.import_module(name)\n"  # not a constant: cannot be resolved
    )
    got = {(i.target, i.line, i.type_only) for i in module_imports("ffid.a.b", False, code, known)}
    assert got == {
        ("ffid.a.c", 4, False),
        ("ffid", 5, False),
        ("ffid.d", 6, False),
        ("ffid.e", 8, True),
        ("ffid.f", 10, False),
        ("ffid.g", 11, False),
    }


def test_find_cycle_reports_the_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# -- the rules ----------------------------------------------------------------------------------
def test_every_module_has_a_layer():
    missing = sorted({layer_of(m) for m in _modules()} - set(RANK))
    assert not missing, f"add these to LAYERS in {Path(__file__).name} with a one-line reason: {missing}"


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for imp in _graph():
        if not imp.type_only:
            graph.setdefault(imp.source, set()).add(imp.target)
    cycles = []
    while (cycle := find_cycle(graph)) is not None:
        cycles.append(" -> ".join(cycle))
        graph[cycle[-2]].discard(cycle[-1])  # drop the closing edge to find the next cycle
    listing = "\n  ".join(cycles)
    assert not cycles, f"import cycles (move the shared code down a layer or pass it in):\n  {listing}"


def test_no_upward_imports():
    upward = [
        imp
        for imp in _graph()
        if RANK[layer_of(imp.target)] > RANK[layer_of(imp.source)]
        and (imp.source, imp.target) not in KNOWN_EXCEPTIONS
    ]
    listing = "\n  ".join(
        f"{_where(i)}: layer {layer_of(i.source)!r} imports higher layer {layer_of(i.target)!r}"
        for i in upward
    )
    assert not upward, f"upward imports (see LAYERS in {Path(__file__).name}):\n  {listing}"


def test_known_exceptions_still_exist():
    edges = {(i.source, i.target) for i in _graph()}
    for pair in sorted(KNOWN_EXCEPTIONS):
        assert pair in edges, f"{pair[0]} no longer imports {pair[1]}: remove the pair from KNOWN_EXCEPTIONS"
        assert RANK[layer_of(pair[1])] > RANK[layer_of(pair[0])], f"{pair} is not upward: remove it"
