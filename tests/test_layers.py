"""The package's floors: every import points down, node and sim never meet, no circles.

Why a test and not a convention: an import that runs up a floor is one line, looks harmless,
and ties a low room to everything above it. The simulator and the real node must stay two
engines over the same rooms, so that either can change without the other, and a circle
makes import order matter. The modules are parsed, not imported, and every ``import`` counts,
including those inside functions and under ``TYPE_CHECKING``: a lazy import is still a
dependency, only a later one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "p2prec"

FLOORS: tuple[dict[str, tuple[str, ...]], ...] = (
    {"atomic": ("atomic",), "allocator": ("allocator",), "rng": ("rng",)},
    {"wire": ("wire",)},
    {"config": ("config",)},
    {"data": ("data",), "topology": ("topology",)},
    {"model": ("model",), "gossip": ("gossip",)},
    {"learn": ("learn",), "run": ("run",)},
    {"serve": ("serve",)},
    {"node": ("node",), "sim": ("sim",)},
    {"commands": ("cli", "node.cli", "sim.cli", "launch")},
)
"""The floors, bottom first; each maps a room's name to the module prefixes (below ``p2prec.``) it holds.

A module may import its own room and any room on a lower floor, never a room beside it on
its floor or above it. From the bottom: the foundation (the atomic write, the allocator,
the table of random streams), the wire format, the config schema, data and topologies,
the model and gossip (mixing, codecs, robust rules, privacy), learning and the run's shared
contract (its nodes, results folder and checkpoint format), serving, then the two engines,
the real node and the simulator, side by side; on top the commands and the launcher,
which start processes and may wire any room together. A module belongs to the room with
the longest matching prefix, so ``node.cli`` is a command while ``node.runtime`` is the node.
"""

SIM_CORE = ("p2prec.sim.engine", "p2prec.sim.plan", "p2prec.gossip.mixing", "p2prec.run.folder")
"""The simulator's engine, its mixing (the per-round plan and the mixing it applies) and its results."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _graph() -> dict[str, frozenset[str]]:
    """Each module of the package -> the package modules it imports, anywhere in its body."""
    modules = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = frozenset(_imports(ast.parse(path.read_text(encoding="utf-8")), package, modules))
    return graph


def _imports(tree: ast.Module, package: str, modules: dict[str, Path]) -> Iterator[str]:
    """The package modules ``tree`` imports; ``from a import b`` means module ``a.b`` where that is one."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        yield from (t for t in targets if t in modules)


def _room(module: str) -> str | None:
    """The name of the room that holds ``module``, or None when no floor lists it."""
    relative = module.removeprefix("p2prec.")
    found, length = None, -1
    for floor in FLOORS:
        for room, prefixes in floor.items():
            for prefix in prefixes:
                if (relative == prefix or relative.startswith(prefix + ".")) and len(prefix) > length:
                    found, length = room, len(prefix)
    return found


def _floor(room: str) -> int:
    return next(i for i, floor in enumerate(FLOORS) if room in floor)


def _reach(module: str) -> set[str]:
    """Every module ``module`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for target in _graph()[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_every_module_has_a_room() -> None:
    """A new room must be placed on a floor on purpose; the package's own ``__init__`` imports nothing."""
    assert not _graph()["p2prec"]
    assert [m for m in _graph() if m != "p2prec" and _room(m) is None] == []


def test_every_import_points_down_a_floor_or_stays_in_its_room() -> None:
    wrong = [f"{m} ({_room(m)}) imports {t} ({_room(t)})" for m, targets in _graph().items() if m != "p2prec"
             for t in sorted(targets) if _room(t) != _room(m) and _floor(_room(t)) >= _floor(_room(m))]
    assert wrong == []


def test_the_real_node_never_imports_the_simulator() -> None:
    wrong = [(m, t) for m, targets in _graph().items() if m.startswith("p2prec.node.")
             for t in targets if t.startswith("p2prec.sim")]
    assert wrong == []


def test_the_simulators_engine_mixing_and_results_never_reach_the_node() -> None:
    """Not even through another module: the simulator must run where no node code could."""
    for module in SIM_CORE:
        assert [t for t in _reach(module) if t.startswith(("p2prec.node", "p2prec.launch"))] == [], module


def test_nothing_below_the_engines_imports_them_or_the_commands() -> None:
    engines = _floor("node")
    above = ("p2prec.node", "p2prec.sim", "p2prec.launch", "p2prec.cli")
    wrong = [(m, t) for m, targets in _graph().items() if m != "p2prec" and _floor(_room(m)) < engines
             for t in targets if t.startswith(above)]
    assert wrong == []


def test_no_module_imports_itself_through_others() -> None:
    circles = [m for m in _graph() if m in _reach(m)]
    assert circles == []
