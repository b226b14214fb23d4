"""mixprec.int8.convert and the int8 recipes: the same filter as FP8's, mp.prepare / mp.explain /
mp.unprepare through the policy's converter, checkpoints keeping nn.Linear's keys, outlier counts."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec as mp
from mixprec.fp8 import Float8Config, Float8Linear
from mixprec.fp8 import convert as fp8_convert
from mixprec.fp8 import default_filter as fp8_default_filter
from mixprec.int8 import Int8Config, Int8Linear, convert, default_filter, describe, outliers, report, unconvert
from mixprec.train.models import build_model, model_config


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.score_bias = nn.Linear(d, d)          # on the attention score path
        self.gate = nn.Linear(d, 16)               # an MoE router
        self.gate_proj = nn.Linear(d, 4 * d)       # LLaMA's MLP gate projection: converted
        self.down = nn.Linear(4 * d, d)
        self.tiny = nn.Linear(d, 32)               # too small to gain
        self.odd = nn.Linear(d, 1000)              # divisible by 8 (INT8 takes it), not by 16 (FP8 does not)
        self.odder = nn.Linear(d, 1001)            # divisible by neither

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a) + 0 * self.score_bias(h).sum() + 0 * self.gate(h).sum()
        x = x + self.down(F.silu(self.gate_proj(h))) + 0 * self.tiny(h).sum()
        return x + 0 * self.odd(h).sum() + 0 * self.odder(h).sum()


class TinyLM(nn.Module):
    def __init__(self, d: int = 256, vocab: int = 512, tied: bool = False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.block = Block(d)
        self.mha = nn.MultiheadAttention(d, 4, batch_first=True)
        self.out = nn.Linear(d, vocab, bias=False)
        if tied:
            self.out.weight = self.emb.weight

    def forward(self, idx):
        h = self.block(self.emb(idx))
        h = h + self.mha(h, h, h, need_weights=False)[0]
        return self.out(h)


def gpt(n_layer=2, **sizes):
    return build_model(model_config("gpt", d_model=256, n_layer=n_layer, seq_len=32, **sizes))


@pytest.mark.parametrize("make", [lambda: TinyLM(), lambda: TinyLM(tied=True), lambda: gpt(),
                                  lambda: gpt(head="separate"), lambda: TinyLM(d=128)])
def test_default_filter_decides_as_fp8s(make):
    model = make()
    int8_rule, fp8_rule = default_filter(model, Int8Config()), fp8_default_filter(model, Float8Config())
    for name, layer in model.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        ours, theirs = int8_rule(name, layer), fp8_rule(name, layer)
        if theirs is not None and "divisible by 16" in theirs and layer.out_features % 8 == 0:
            assert ours is None   # the one difference: torch._int_mm needs multiples of 8, torch._scaled_mm 16
            continue
        assert (ours is None) == (theirs is None), (name, ours, theirs)
        if ours is not None:
            assert ours.replace("8 (INT8", "16 (FP8") == theirs, (name, ours, theirs)


def test_convert_records_its_decisions():
    model = convert(TinyLM(), Int8Config())
    d = {r.name: r for r in report(model)}
    for name in ("block.qkv", "block.proj", "block.gate_proj", "block.down", "block.odd"):
        assert d[name].int8 and isinstance(model.get_submodule(name), Int8Linear), name
    kept = {"out": "output head", "block.score_bias": "score path", "block.gate": "router", "block.tiny": "small",
            "block.odder": "divisible by 8", "mha.out_proj": "MultiheadAttention"}
    for name, why in kept.items():
        assert not d[name].int8 and why in d[name].reason and type(model.get_submodule(name)) is not Int8Linear
    text = describe(model)
    assert "5 of 11 Linear layers in INT8" in text and "converted (rowwise; INT8 output/grad_input/grad_weight)" in text
    assert convert(model, Int8Config()) is model and sum(r.int8 for r in report(model)) == 5   # idempotent
    fp8_model = fp8_convert(TinyLM(), Float8Config(recipe="rowwise"))
    convert(fp8_model, Int8Config())
    assert isinstance(fp8_model.block.qkv, Float8Linear)              # never converted over FP8
    root = convert(nn.Linear(256, 256), Int8Config())
    assert isinstance(root, Int8Linear)
    assert type(unconvert(root)) is nn.Linear


def test_recipes_and_policy_fields():
    assert {"int8-rowwise", "int8-switchback"} <= set(mp.recipes())
    rowwise, switchback = mp.Policy.from_recipe("int8-rowwise"), mp.Policy.from_recipe("int8-switchback")
    assert rowwise.compute_dtype == torch.bfloat16 and rowwise.int8 == Int8Config(recipe="rowwise")
    assert switchback.int8.int8_matmuls == ("output", "grad_input") and switchback.converters == (switchback.int8,)
    assert "INT8 switchback" in switchback.describe()
    with pytest.raises(ValueError, match="fp8 and int8 are both set.*fp8=None or int8=None"):
        rowwise.replace(fp8=Float8Config())
    with pytest.raises(TypeError, match="int8 must be a mixprec.int8.Int8Config or None"):
        mp.Policy(int8="rowwise")
    fp32_int8 = mp.Policy(int8=Int8Config())     # INT8 matmuls, the rest in FP32: no autocast needed
    assert not fp32_int8.autocast_enabled and fp32_int8.converters == (fp32_int8.int8,)


def test_prepare_explain_unprepare_and_checkpoints():
    plain = gpt()
    model = mp.prepare(copy.deepcopy(plain), "int8-rowwise")
    layers = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 8 and type(model.lm_head) is nn.Linear      # 4 per block; the tied head stays
    assert list(model.state_dict()) == list(plain.state_dict())       # nn.Linear's keys, nothing added
    text = mp.explain("int8-rowwise", model)
    assert "INT8 rowwise" in text and "8 of 9 Linear layers in INT8" in text
    assert "8 of 9 Linear layers in INT8" in mp.explain("int8-rowwise", plain)   # on a copy
    assert not any(isinstance(m, Int8Linear) for m in plain.modules())
    # a checkpoint of the INT8 model loads into the plain model and back, value for value
    x = torch.randint(0, 256, (2, 32))
    with mp.autocast("int8-rowwise"):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    fresh = gpt()
    fresh.load_state_dict(model.state_dict())
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    again = mp.prepare(gpt(), "int8-rowwise")
    again.load_state_dict(fresh.state_dict())
    mp.unprepare(model)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert list(model.state_dict()) == list(plain.state_dict())


def test_outlier_counts_reach_describe_and_follow_the_model():
    policy = mp.Policy.from_recipe("int8-rowwise").replace(int8=Int8Config(outlier_threshold=6.0))
    model = mp.prepare(gpt(n_layer=1), policy)
    assert list(model.state_dict()) == list(gpt(n_layer=1).state_dict())   # the counters are not saved
    x = torch.randint(0, 256, (4, 32))
    with mp.autocast(policy):
        model(x).float().logsumexp(-1).mean().backward()
    counts = outliers(model)
    assert set(counts) == {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.0", "blocks.0.mlp.2"}
    for per in counts.values():
        assert all(total > 0 and 0 <= fell <= total for fell, total in per.values())
    assert "outlier fallback (operand rows computed in 16 bits / rows quantized)" in mp.explain(policy, model)
    model.half()
    assert model.blocks[0].attn.qkv.outlier_counts.dtype == torch.int64
    mp.unprepare(model)
    assert outliers(model) == {}
