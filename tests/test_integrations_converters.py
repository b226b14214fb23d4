"""mixprec.integrations.convert: a model that carries its policy (torchtitan-style model building)."""
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mixprec as mp
import mixprec.integrations as integrations
from helpers import MLP


def test_convert_runs_the_forward_under_the_policy():
    model = MLP()
    original = inspect.signature(model.forward)
    seen = {}
    model.fc2.register_forward_hook(lambda m, i, o: seen.__setitem__("fc2", o.dtype))
    assert integrations.convert(model, "bf16-mixed") is model
    out = model(torch.randn(4, 32))
    assert seen["fc2"] == torch.bfloat16 and out.dtype == torch.float32     # GEMMs in BF16, the head FP32
    assert inspect.signature(model.forward) == original                     # hosts read the signature
    assert integrations.policy_of(model).name == "bf16-mixed"
    assert integrations.convert(model, "bf16-mixed") is model                # idempotent
    with pytest.raises(ValueError, match="already converted"):
        integrations.convert(model, "fp16-mixed")
    integrations.unconvert(model)
    assert "forward" not in model.__dict__ and integrations.policy_of(model) is None
    model(torch.randn(4, 32))
    assert seen["fc2"] == torch.float32


def test_convert_as_a_model_building_step_with_fp8():
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(64, 256), nn.Linear(256, 256), nn.GELU(), nn.LayerNorm(256),
                             nn.Linear(256, 64))

    model = integrations.convert(build(), "fp8-blockwise")
    assert isinstance(model[1], mp.fp8.Float8Linear) and isinstance(model[4], nn.Linear)   # the head stays
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 64, (4, 9))
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and model[1].weight.grad is not None


def test_integrations_package_imports_no_host():
    # What `import mixprec.integrations` runs: its __init__ and the converter, which import mixprec and torch only.
    import ast
    from pathlib import Path
    root = Path(integrations.__file__).parent
    for name in ("__init__.py", "converters.py"):
        tree = ast.parse((root / name).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        hosts = {m for m in imported if m.split(".")[0] in ("lightning", "transformers", "accelerate")}
        assert not hosts, f"{name} imports {hosts}"
        allowed = ("mixprec", "torch", "inspect", "typing", "__future__")
        assert all(m.split(".")[0] in allowed for m in imported), imported
