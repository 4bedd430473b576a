"""The layers of the package: a module imports only from its own layer or the ones below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spinal_callback"
RANK = {
    "config": 0,
    "atomic": 0,
    "distributed": 0,
    "probe": 1,
    "monitor": 2,
    "outputs": 3,
    "training": 4,
    "integrations": 5,
}
MAY_IMPORT = {
    **{layer: {other for other, rank in RANK.items() if rank <= RANK[layer]} for layer in RANK},
    "demos": {"config", "atomic", "distributed", "probe", "demos"},
    "tools": {"config", "atomic", "distributed", "probe", "monitor", "outputs", "demos", "tools"},
    "board": {layer for layer, rank in RANK.items() if rank <= RANK["training"]} | {"board"},
}


def layer_of(module: str) -> str | None:
    """``spinal_callback.probe.lens`` -> ``probe``; the package itself has no layer."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "spinal_callback" else None


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return [name for name in found if name.startswith("spinal_callback.")]


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py")


def module_name(path: Path) -> str:
    return "spinal_callback." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def test_every_module_belongs_to_a_known_layer() -> None:
    assert {layer_of(module_name(path)) for path in MODULES} <= set(MAY_IMPORT)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_layer_above_its_own(path: Path) -> None:
    module = module_name(path)
    own = layer_of(module)
    assert own is not None
    upward = [name for name in imports_of(path) if layer_of(name) not in MAY_IMPORT[own]]
    assert not upward, f"{module} ({own}) imports {upward}"


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("from spinal_callback.training.runner import Runner\n")
    assert [n for n in imports_of(module) if layer_of(n) not in MAY_IMPORT["probe"]] == [
        "spinal_callback.training.runner"
    ]
