"""The house's floors, checked from the source: every import of a library module goes down.

Reads every ``import`` / ``from ... import`` in the AST of every module under ``src/moeformer``,
function-local ones included, and checks them against the layer order in ``pyproject.toml``
(``[tool.importlinter]``, which ``make lint`` runs with ``lint-imports``; README, "Architecture").
A package (``moe``, ``train``, ...) or top-level module (``config``, ``inference``, ...) may import
only the floors below its own; independent siblings (``refusal | inspect``) not each other. The
remaining violations are the contract's ``ignore_imports``, read from the same file, so the ratchet
is one list: removing an import means removing its line, and any new upward import fails here.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "moeformer"
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]
LAYERS = next(c for c in CONTRACTS if c["id"] == "layers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported moeformer module, line) for every import in the file, at any depth."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # `from moeformer.moe import losses` imports the module moeformer.moe.losses
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists():
                    found.append((candidate, node.lineno))
    return [(target, line) for target, line in found if target == "moeformer" or target.startswith("moeformer.")]


def floor(module: str) -> str | None:
    """The top-level package or module under moeformer that ``module`` lives in (None: the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def all_imports() -> list[tuple[str, str, int]]:
    return [(module_name(p), target, line) for p in sorted(PACKAGE.rglob("*.py")) for target, line in imports(p)]


def ranks() -> dict[str, int]:
    """Floor name -> height (0 is the bottom); independent siblings share one height."""
    out = {}
    for height, layer in enumerate(reversed(LAYERS["layers"])):
        for name in layer.split("|"):
            out[name.strip()] = height
    return out


def ignored() -> set[tuple[str, str]]:
    return {tuple(part.strip() for part in rule.split("->")) for rule in LAYERS.get("ignore_imports", [])}


def test_every_module_is_on_a_floor():
    floors = {floor(module_name(p)) for p in PACKAGE.rglob("*.py")} - {None}
    assert floors <= set(ranks()), f"not in pyproject's layers: {sorted(floors - set(ranks()))}"


def test_every_import_goes_down():
    height, allowed = ranks(), ignored()
    wrong = []
    for source, target, line in all_imports():
        here, there = floor(source), floor(target)
        if here is None or there is None or here == there or (source, target) in allowed:
            continue  # the root package re-exports the public API; a floor may import itself
        if height[there] >= height[here]:
            wrong.append(f"{source} (line {line}) -> {target}: {here} may not import {there}")
    assert not wrong, "imports that go up or sideways:\n" + "\n".join(wrong)


def test_no_import_cycle_between_floors():
    """Counting function-local imports; the listed remaining violations are left out."""
    allowed = ignored()
    edges: dict[str, set[str]] = {}
    for source, target, _ in all_imports():
        here, there = floor(source), floor(target)
        if here and there and here != there and (source, target) not in allowed:
            edges.setdefault(here, set()).add(there)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_the_ratchet_lists_only_imports_that_exist():
    """A remaining violation that was fixed must leave the list (import-linter says the same)."""
    present = {(source, target) for source, target, _ in all_imports()}
    stale = sorted(f"{s} -> {t}" for s, t in ignored() - present)
    assert not stale, f"fixed, remove from ignore_imports: {stale}"


def test_the_low_floors_import_no_application_or_cli():
    """layers/ moe/ models/ data/ decode/ evaluate/ import none of train, inference, interop, refusal,
    inspect or a CLI module, at module level or in a function, beyond the listed violations."""
    low = {"layers", "moe", "models", "data", "decode", "evaluate"}
    high = {"train", "inference", "interop", "refusal", "inspect", "__main__"}
    allowed = ignored()
    wrong = [
        f"{source} (line {line}) -> {target}"
        for source, target, line in all_imports()
        if floor(source) in low
        and (floor(target) in high or (floor(target) or "").startswith("cli"))
        and (source, target) not in allowed
    ]
    assert not wrong, "\n".join(wrong)


def test_the_readme_diagram_is_the_contract():
    """README's "Architecture" block lists the same floors, top to bottom, as the layers contract."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Architecture", 1)[1].split("```", 2)[1]
    drawn = [" | ".join(part.strip() for part in line.split("  ")[0].split("|")) for line in block.strip().splitlines()]
    assert drawn == [" | ".join(part.strip() for part in layer.split("|")) for layer in LAYERS["layers"]]
