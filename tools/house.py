"""The house rules of ``rlhf_ray/``, measured: its import graph and its sizes.

``python tools/house.py`` prints the import floors (a module stands one floor above the highest
module it imports), any import circle, any import that breaks a layering rule below, any import
of another module's private name, files over 500 lines, functions over 60 lines and the count
of ``# fmt: skip``; it exits 1 if there is a circle, a rule broken or a private import.
``tests/test_house.py`` asserts the same. Every ``import`` counts, also those inside functions:
a lazy import hides a circle from Python, not from a reader.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rlhf_ray"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 60

MAX_ROOT_MODULES = 6  # besides __init__.py: the CLI, errors, the batch types and little else

# Which folders each folder may import (besides itself and the root's errors, types and
# accelerator). A folder not named here may import anything below cli; the rules make the map in
# docs/design.md true: dependencies run one way, from cli down to config.
ROOT_SHARED = ("rlhf_ray.errors", "rlhf_ray.types", "rlhf_ray.accelerator")
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "rlhf_ray.config": ("rlhf_ray.data.sources",),  # the builtin data sets' names
    "rlhf_ray.algo": (),
    "rlhf_ray.observe": (),
    "rlhf_ray.data": ("rlhf_ray.config",),
    "rlhf_ray.rewards": ("rlhf_ray.config", "rlhf_ray.algo", "rlhf_ray.data"),
    "rlhf_ray.models": ("rlhf_ray.config", "rlhf_ray.algo", "rlhf_ray.data"),
    "rlhf_ray.engines": (
        "rlhf_ray.config",
        "rlhf_ray.algo",
        "rlhf_ray.data",
        "rlhf_ray.models",
        "rlhf_ray.observe",
    ),
    "rlhf_ray.workers": (
        "rlhf_ray.config",
        "rlhf_ray.algo",
        "rlhf_ray.data",
        "rlhf_ray.models",
        "rlhf_ray.engines",
        "rlhf_ray.rewards",
        "rlhf_ray.observe",
    ),
}
WHY = {
    "rlhf_ray.config": "config/ imports nothing above it",
    "rlhf_ray.algo": "algo/ is pure math over tensors",
    "rlhf_ray.observe": "observe/ (what a person sees) depends on no other folder",
    "rlhf_ray.data": "data/ sits just above config/",
    "rlhf_ray.rewards": "rewards/ sit below the workers that call them",
    "rlhf_ray.models": "models/ sit below the engines and workers",
    "rlhf_ray.engines": "engines/ sit below the workers",
    "rlhf_ray.workers": "workers/ are plain classes below distributed/, ppo/ and stages/",
}
# (importer prefix, imported prefix, why): imports that would run upward within a folder or
# into the recipes.
FORBIDDEN = [
    ("rlhf_ray.data.tokenization", "rlhf_ray.data.preference", "data/ sits above the tokenizer"),
    ("rlhf_ray.data.tokenization", "rlhf_ray.data.prompts", "data/ sits above the tokenizer"),
    ("rlhf_ray.data.tokenization", "rlhf_ray.data.stage_data", "data/ sits above the tokenizer"),
    ("rlhf_ray.", "rlhf_ray.ppo.loop", "only the PPO recipe's callers may import the PPO loop"),
    ("rlhf_ray.", "rlhf_ray.cli", "nothing imports the CLI"),
]
DRIVER_CALLERS = ("rlhf_ray.ppo.recovery", "rlhf_ray.ppo.replay")
RAY_ALLOWED = ("rlhf_ray.distributed", "rlhf_ray.cli")


@dataclass
class House:
    imports: dict[str, set[str]] = field(default_factory=dict)  # module -> rlhf_ray modules
    private: list[str] = field(default_factory=list)  # "a imports b._name"
    ray_users: list[str] = field(default_factory=list)
    big_files: list[tuple[str, int]] = field(default_factory=list)
    long_functions: list[tuple[str, int]] = field(default_factory=list)
    fmt_skips: int = 0


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The rlhf_ray module ``name`` is (or whose attribute it is)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported(node: ast.AST, here: str, is_package: bool) -> Iterator[tuple[str, list[str]]]:
    """(module, names taken from it) for an import statement."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name, []
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = here.split(".")
            anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
            base = ".".join([*anchor, *([base] if base else [])])
        names = [a.name for a in node.names]
        yield base, names
        for n in names:  # `from pkg import module`
            yield f"{base}.{n}", []


def survey(package: Path = PACKAGE) -> House:
    house = House()
    files = {module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    modules = set(files)
    for name, path in files.items():
        text = path.read_text()
        tree = ast.parse(text)
        house.fmt_skips += text.count("# fmt: skip")
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES:
            house.big_files.append((name, lines))
        targets = house.imports.setdefault(name, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    house.long_functions.append((f"{name}.{node.name}", length))
            for target, names in _imported(node, name, path.name == "__init__.py"):
                if target == "ray" or target.startswith("ray."):
                    house.ray_users.append(name)
                resolved = _resolve(target, modules) if target.startswith("rlhf_ray") else None
                if resolved is None or resolved == name:
                    continue
                targets.add(resolved)
                for n in names:
                    is_module = f"{resolved}.{n}" in modules
                    if n.startswith("_") and not n.startswith("__") and not is_module:
                        house.private.append(f"{name} imports {resolved}.{n}")
    return house


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _folder(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or module in MAY_IMPORT else module


def broken_rules(house: House) -> list[str]:
    out = []
    for importer, targets in sorted(house.imports.items()):
        for target in sorted(targets):
            home, there = _folder(importer), _folder(target)
            allowed = MAY_IMPORT.get(home)
            outside = allowed is not None and there != home
            if outside and not target.startswith((*ROOT_SHARED, *allowed)):
                out.append(f"{importer} imports {target}: {WHY[home]}")
            for src, dst, why in FORBIDDEN:
                if not importer.startswith(src) or not target.startswith(dst):
                    continue
                if dst == "rlhf_ray.ppo.loop" and importer.startswith(DRIVER_CALLERS):
                    continue
                out.append(f"{importer} imports {target}: {why}")
    for user in sorted(set(house.ray_users)):
        if not user.startswith(RAY_ALLOWED):
            out.append(f"{user} imports ray: only distributed/ and cli.py may")
    return out


def root_modules(package: Path = PACKAGE) -> list[str]:
    """The modules loose at the package's root, besides ``__init__.py``."""
    return sorted(p.stem for p in package.glob("*.py") if p.name != "__init__.py")


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Floor 0 imports nothing of ours; each module one above the highest it imports."""
    memo: dict[str, int] = {}

    def floor(v: str, seen: frozenset[str] = frozenset()) -> int:
        if v not in memo:
            below = [floor(w, seen | {v}) for w in graph.get(v, ()) if w not in seen | {v}]
            memo[v] = 1 + max(below, default=-1)
        return memo[v]

    return {v: floor(v) for v in sorted(graph)}


def report(house: House) -> int:
    graph = house.imports
    by_floor: dict[int, list[str]] = {}
    for module, f in floors(graph).items():
        by_floor.setdefault(f, []).append(module.removeprefix("rlhf_ray."))
    arrows = sum(len(t) for t in graph.values())
    print(f"{len(graph)} modules on {len(by_floor)} floors, {arrows} import arrows")
    for f in sorted(by_floor, reverse=True):
        print(f"  floor {f:2d}: {', '.join(by_floor[f])}")
    loose = root_modules()
    print(f"modules at the package root: {len(loose)} ({', '.join(loose)})")
    problems = {
        f"root modules over {MAX_ROOT_MODULES}": loose[MAX_ROOT_MODULES:],
        "import circles": [" <-> ".join(c) for c in cycles(graph)],
        "layering rules broken": broken_rules(house),
        "private names imported across modules": house.private,
    }
    notes = {
        f"files over {MAX_FILE_LINES} lines": [f"{n} ({k})" for n, k in house.big_files],
        f"functions over {MAX_FUNCTION_LINES} lines": [
            f"{n} ({k})" for n, k in house.long_functions
        ],
    }
    for title, items in {**problems, **notes}.items():
        print(f"{title}: {len(items)}")
        for item in items:
            print(f"  {item}")
    print(f"# fmt: skip lines: {house.fmt_skips}")
    return 1 if any(problems.values()) else 0


if __name__ == "__main__":
    sys.exit(report(survey()))
