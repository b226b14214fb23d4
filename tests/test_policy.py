"""Policy: validation, named recipes, apex opt levels and what it derives."""
import pytest
import torch

import mixprec as mp


def test_recipes_and_policy_validation():
    assert set(mp.recipes()) >= {"fp32", "fp16-mixed", "bf16-mixed", "fp16-true", "bf16-true", "fp8-tensorwise",
                                 "fp8-rowwise", "fp8-blockwise"}
    with pytest.raises(ValueError, match=r"Unknown recipe 'bf16mixed'; choose one of: fp32, fp16-mixed, bf16-mixed"):
        mp.Policy.from_recipe("bf16mixed")
    with pytest.raises(ValueError, match="param_dtype must be one of"):
        mp.Policy(param_dtype=torch.int8)
    with pytest.raises(ValueError, match="master_weights=True needs half-precision parameters"):
        mp.Policy(master_weights=True)
    with pytest.raises(ValueError, match="loss_scale must be 'dynamic', 'none' or a positive number"):
        mp.Policy(loss_scale="auto")
    with pytest.raises(ValueError, match="positive finite"):
        mp.Policy(loss_scale=-1.0)
    assert mp.Policy.from_recipe("fp16-mixed", loss_scale=128).loss_scale == 128.0


def test_opt_levels_semantics():
    o0, o1 = mp.Policy.from_opt_level("O0"), mp.Policy.from_opt_level("O1")
    o2, o3 = mp.Policy.from_opt_level("O2"), mp.Policy.from_opt_level("O3")
    assert o0.compute_dtype == torch.float32 and o0.loss_scale == "none"
    assert o1.param_dtype == torch.float32 and o1.compute_dtype == torch.float16 and o1.loss_scale == "dynamic"
    assert o2.param_dtype == torch.float16 and o2.master_weights and o2.loss_scale == "dynamic" and o2.fp32_rules
    assert o3.param_dtype == torch.float16 and not o3.master_weights and o3.loss_scale == 1.0 and not o3.fp32_rules
    assert mp.Policy.from_opt_level("O2", dtype=torch.bfloat16).loss_scale == "none"
    assert mp.Policy.from_opt_level("O0", dtype=torch.float32) == o0
    with pytest.raises(ValueError, match="choose one of: O0, O1, O2, O3"):
        mp.Policy.from_opt_level("O4")
    with pytest.raises(ValueError, match="torch.float16 or torch.bfloat16"):
        mp.Policy.from_opt_level("O2", dtype=torch.float32)


def test_derived_facts():
    fp16, bf16 = mp.Policy.from_recipe("fp16-mixed"), mp.Policy.from_recipe("bf16-mixed")
    assert fp16.emulates_fp16("cpu") and not fp16.emulates_fp16("cuda")
    assert not bf16.emulates_fp16("cpu")
    assert not fp16.replace(cpu_fp16="native").emulates_fp16("cpu")
    assert mp.Policy.from_recipe("fp32").autocast_enabled is False and bf16.autocast_enabled
    blockwise = mp.Policy.from_recipe("fp8-blockwise")
    assert blockwise.converters == (blockwise.fp8,) and bf16.converters == ()
    assert "FP8 blockwise" in blockwise.describe() and "pure half" in mp.Policy.from_opt_level("O3").describe()


def test_policies_are_frozen_and_replace_validates():
    policy = mp.Policy.from_recipe("bf16-mixed")
    with pytest.raises(Exception):
        policy.compute_dtype = torch.float16
    with pytest.raises(ValueError, match="cpu_fp16 must be"):
        policy.replace(cpu_fp16="fast")
    with pytest.raises(TypeError, match="Float8Config"):
        mp.Policy(fp8="blockwise")
