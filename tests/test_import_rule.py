"""DESIGN.md's import rule, read from the source: a module never imports one of a higher layer.

    formats <- {rules, policy, _tensors} <- ops <- {context, prepare, scaler, masters}
    <- {explain, stability, diagnostics, distributed, compat} <- integrations <- {train, cli}

fp8/, int8/ and optim/ import only formats, _tensors and _linear_swap (and themselves); the core reaches FP8 only
through the leaf mixprec.fp8.config that a Policy holds. Imports inside functions count too.
"""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mixprec"

LAYERS = {
    "formats": 0,
    "rules": 1, "policy": 1, "_tensors": 1, "_linear_swap": 1,
    "ops": 2,
    "context": 3, "prepare": 3, "scaler": 3, "masters": 3, "_comm": 3,
    "explain": 4, "stability": 4, "diagnostics": 4, "distributed": 4, "compat": 4,
    "integrations": 5,
    "train": 6, "cli": 6, "__main__": 6, "__init__": 6,
}
LEAVES = {"fp8", "int8", "optim"}          # import only formats, _tensors, _linear_swap and themselves
CORE_MAY_IMPORT = {"mixprec.fp8.config", "mixprec.int8.config"}   # a Policy holds a Float8Config or Int8Config


def _unit(module: str) -> str:
    """mixprec.ops.head_loss -> ops; mixprec.policy -> policy."""
    return module.split(".")[1] if module.count(".") >= 1 else "__init__"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "mixprec":   # a sub-module, or a name of the package itself
                names.update(f"mixprec.{a.name}" if (SRC / a.name).exists() or (SRC / f"{a.name}.py").exists()
                             else "mixprec.__init__" for a in node.names)
    return {n for n in names if n.startswith("mixprec.")}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        dotted = "mixprec." + ".".join(path.relative_to(SRC).with_suffix("").parts)
        yield dotted.removesuffix(".__init__") if dotted != "mixprec.__init__" else "mixprec.__init__", path


@pytest.mark.parametrize("module,path", list(_modules()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_no_upward_import(module, path):
    unit = _unit(module)
    for imported in _imports(path):
        target = _unit(imported)
        if target == unit:
            continue
        if unit in LEAVES:
            assert target in ("formats", "_tensors", "_linear_swap"), \
                f"{module} imports {imported}: {unit}/ imports only formats, _tensors and _linear_swap"
            continue
        if target in LEAVES:
            allowed = imported in CORE_MAY_IMPORT or LAYERS.get(unit, 6) >= LAYERS["compat"]
            assert allowed, f"{module} (layer {LAYERS[unit]}) imports {imported}: the core reaches {target}/ only " \
                            f"through the policy's converter"
            continue
        assert target in LAYERS, f"{module} imports {imported}, a unit the import rule does not place"
        assert LAYERS[target] <= LAYERS[unit], f"{module} (layer {LAYERS[unit]}) imports {imported} " \
                                               f"(layer {LAYERS[target]})"


def test_every_unit_is_placed():
    units = {_unit(m) for m, _ in _modules()}
    assert units <= set(LAYERS) | LEAVES, units - set(LAYERS) - LEAVES
