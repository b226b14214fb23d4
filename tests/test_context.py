"""mp.autocast: the compute-precision context (torch.autocast plus the table's op rows)."""
import pytest
import torch
import torch.nn.functional as F

import mixprec as mp
from mixprec.context import active_policy


def test_the_active_policy_is_the_innermost_block():
    outer, inner = mp.Policy.from_recipe("bf16-mixed"), mp.Policy.from_recipe("fp16-mixed")
    assert active_policy() is None
    with mp.autocast(outer):
        assert active_policy() is outer
        with mp.autocast(inner):
            assert active_policy() is inner and torch.get_autocast_dtype("cpu") == torch.float16
        assert active_policy() is outer and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert active_policy() is None and not torch.is_autocast_enabled("cpu")
    with pytest.raises(RuntimeError):
        with mp.autocast(outer):
            raise RuntimeError("a failing forward")
    assert active_policy() is None and not torch.is_autocast_enabled("cpu")


def test_fp32_and_disabled_blocks_change_nothing():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    for block in (mp.autocast("fp32"), mp.autocast("bf16-mixed", enabled=False)):
        with block:
            assert not torch.is_autocast_enabled("cpu") and active_policy() is None
            assert (x @ w).dtype == torch.float32


@pytest.mark.parametrize("recipe,dtype", [("bf16-mixed", torch.bfloat16), ("fp16-mixed", torch.float16)])
def test_gemms_in_half_and_the_op_rows_in_fp32(recipe, dtype):
    x = torch.randn(4, 8)
    with mp.autocast(recipe):
        y = F.linear(x, torch.randn(8, 8))
        probs = torch.softmax(y, dim=-1)
        normed = F.layer_norm(y, (8,))
    emulated = recipe == "fp16-mixed"      # FP16 on the CPU: FP32 tensors holding FP16 values
    assert y.dtype == (torch.float32 if emulated else dtype)
    assert torch.equal(y.float(), y.float().to(dtype).float())
    assert probs.dtype == torch.float32                      # softmax: FP32 compute and output
    assert normed.dtype == (torch.float32 if emulated else dtype)   # a norm: FP32 compute, cast back


def test_recipe_names_and_bad_input():
    with mp.autocast("bf16-mixed"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown recipe"):
        with mp.autocast("bf16"):
            pass
    with pytest.raises(TypeError, match="Policy or a recipe name"):
        with mp.autocast(torch.bfloat16):
            pass
    with pytest.raises(ValueError, match="choose one of: cpu, cuda"):
        with mp.autocast("bf16-mixed", device_type="tpu"):
            pass


def test_op_rules_option_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="Unknown op_rules 'fast'; choose one of: auto, intercept, autocast"):
        with mp.autocast("bf16-mixed", op_rules="fast"):
            pass
    with pytest.raises(ValueError, match="op_rules='autocast' needs CUDA"):
        with mp.autocast("bf16-mixed", device_type="cpu", op_rules="autocast"):
            pass
    try:
        mp.rules.keep_fp32(torch.tanh)
        with pytest.raises(ValueError, match="registered by the user \\(tanh\\)"):
            with mp.autocast("bf16-mixed", device_type="cuda", op_rules="autocast"):
                pass
    finally:
        mp.rules.reset()
