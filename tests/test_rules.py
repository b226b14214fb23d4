"""The precision table as data: built-in rows, user rules, their precedence and the op table."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixprec import rules
from mixprec.rules import Precision


@pytest.fixture(autouse=True)
def _clean_registry():
    rules.reset()
    yield
    rules.reset()


def test_builtin_rows_match_what_they_say():
    assert rules.rule_for_module("ln", nn.LayerNorm(4), None).precision is Precision.FP32_IN_KERNEL
    assert rules.rule_for_module("bn", nn.BatchNorm2d(4), None).precision is Precision.FP32_IN_KERNEL
    assert rules.rule_for_module("lrn", nn.LocalResponseNorm(2), None).precision is Precision.FP32_CAST_BACK
    assert rules.rule_for_module("blocks.0.wo", nn.Linear(4, 4), "keep_fp32").precision is Precision.FP32
    assert rules.rule_for_module("emb", nn.Embedding(4, 4), "embedding").precision is Precision.FP32
    assert rules.rule_for_module("lm_head", nn.Linear(4, 4), "head").precision is Precision.FP32_OUTPUT
    assert rules.rule_for_module("gru", nn.GRU(4, 4), None).precision is Precision.FP32
    assert rules.rule_for_module("lstm", nn.LSTM(4, 4), None).precision is Precision.HALF
    assert rules.rule_for_module("fc", nn.Linear(4, 4), None).precision is Precision.HALF
    assert rules.rule_for_module("act", nn.GELU(), None) is None
    for rule in (*rules.BUILTIN_MODULE_RULES, *rules.BUILTIN_OP_RULES):
        assert rule.why, rule.what                     # every row says why
    table = rules.op_table()
    assert table[F.softmax].precision is Precision.FP32 and table[F.cross_entropy].precision is Precision.FP32
    assert table[F.layer_norm].precision is Precision.FP32_IN_KERNEL
    assert rules.op_table(builtin=False) == {}


def test_user_rules_come_first_and_reset_forgets_them():
    class Whitening(nn.Module):
        pass

    rules.keep_fp32("blocks.0.mlp", torch.erf)
    rules.register_norm(Whitening)
    rules.allow_half(F.softmax)
    assert rules.rule_for_module("x", Whitening(), None).precision is Precision.FP32_CAST_BACK
    assert rules.rule_for_module("blocks.0.mlp", nn.Sequential(), None).precision is Precision.FP32
    assert rules.op_table()[torch.erf].precision is Precision.FP32
    assert rules.op_table()[F.softmax].precision is Precision.HALF        # overrides the built-in row
    assert set(rules.op_table(builtin=False)) == {torch.erf, F.softmax}
    assert [r.what for r in rules.user_op_rules()] == ["softmax", "erf"]  # newest first
    rules.reset()
    assert rules.op_table()[F.softmax].precision is Precision.FP32 and torch.erf not in rules.op_table()
    assert rules.rule_for_module("x", Whitening(), None) is None


def test_bad_targets_are_refused():
    with pytest.raises(TypeError, match="nn.Module class, a module name or a matcher"):
        rules.keep_fp32(3)
    with pytest.raises(TypeError, match="register_norm takes nn.Module classes"):
        rules.register_norm("RMSNorm")


def test_a_matcher_sees_name_module_and_role():
    seen = []
    rules.keep_fp32(lambda name, module, role: seen.append((name, role)) or name == "b")
    assert rules.rule_for_module("b", nn.Identity(), "head").what == "<lambda>"
    assert ("b", "head") in seen


class LlamaRMSNorm(nn.Module):          # as Hugging Face writes it
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class T5LayerNorm(LlamaRMSNorm):
    pass


class LayerNorm2d(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))


class AdaLayerNorm(nn.Module):         # a norm conditioned by a Linear: not a plain norm
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, 2 * d)


class Normalizer(nn.Module):           # named like one, but not *Norm
    pass


def test_hand_written_norms_are_found_by_what_they_are():
    for module in (LlamaRMSNorm(8), T5LayerNorm(8), LayerNorm2d(8)):
        assert rules.rule_for_module("n", module, None).precision is Precision.FP32_CAST_BACK, module
    assert rules.rule_for_module("n", AdaLayerNorm(8), None) is None
    assert rules.rule_for_module("n", Normalizer(), None) is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_kernels_compute_in_fp32_from_half_inputs(device, dtype):
    """The evidence behind FP32_IN_KERNEL, measured: on half inputs with FP32 parameters (as mp.prepare keeps
    a norm's), each kernel's output is the FP32 computation rounded once (within one ulp of the half format);
    computing the same norm in the half dtype, as a hand-written norm would, is far off. CUDA kernels that
    refuse mixed dtypes (layer_norm) are upcast by torch.autocast (its FP32 list), which the test checks."""
    torch.manual_seed(0)
    x = (torch.randn(8, 64, 4, 4, device=device) * 4 + 200).to(dtype)     # an offset mean: variance cancels
    w, b = torch.rand(64, device=device) + 0.5, torch.randn(64, device=device)
    cases = {
        "layer_norm": lambda t, w, b: F.layer_norm(t.permute(0, 2, 3, 1), (64,), w, b),
        "group_norm": lambda t, w, b: F.group_norm(t, 8, w, b),
        "batch_norm": lambda t, w, b: F.batch_norm(t, None, None, w, b, True),
        "instance_norm": lambda t, w, b: F.instance_norm(t, weight=w, bias=b),
        "rms_norm": lambda t, w, b: F.rms_norm(t.permute(0, 2, 3, 1), (64,), w),
    }
    ulp = torch.finfo(dtype).eps
    for name, fn in cases.items():
        try:
            got = fn(x, w, b)
        except RuntimeError as error:    # a CUDA kernel without mixed dtypes: then torch.autocast upcasts it
            assert device == "cuda" and "expected scalar type" in str(error), (name, error)
            with torch.autocast("cuda", dtype=dtype):
                assert fn(x, w, b).dtype == torch.float32, name
            continue
        assert got.dtype == dtype, name
        reference = fn(x.float(), w, b)
        error = ((got.float() - reference) / reference.abs().clamp(min=1.0)).abs().max().item()
        assert error <= ulp, (name, error)
    last = x.permute(0, 2, 3, 1)
    centered = last - last.mean(-1, keepdim=True)
    half_norm = centered / (centered.square().mean(-1, keepdim=True) + 1e-5).sqrt() * w.to(dtype) + b.to(dtype)
    reference = F.layer_norm(last.float(), (64,), w, b)
    assert ((half_norm.float() - reference) / reference.abs().clamp(min=1.0)).abs().max().item() > 8 * ulp
