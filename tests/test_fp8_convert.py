"""mixprec.fp8.convert: which Linear layers go FP8 and why; idempotence; Policy/prepare integration."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec as mp
from mixprec.fp8 import Float8Config, Float8Linear, convert, describe, report


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
        self.odd = nn.Linear(d, 1000)              # 1000 % 16 != 0

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a) + 0 * self.score_bias(h).sum() + 0 * self.gate(h).sum()
        x = x + self.down(F.silu(self.gate_proj(h))) + 0 * self.tiny(h).sum() + 0 * self.odd(h).sum()
        return x


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


def decisions(model):
    return {d.name: d for d in report(model)}


def test_default_filter_keeps_sensitive_and_small_layers():
    model = convert(TinyLM(), Float8Config(recipe="blockwise"))
    d = decisions(model)
    for name in ("block.qkv", "block.proj", "block.gate_proj", "block.down"):
        assert d[name].fp8 and isinstance(model.get_submodule(name), Float8Linear), name
    expected_kept = {"out": "output head", "block.score_bias": "score path", "block.gate": "router",
                     "block.tiny": "small", "block.odd": "divisible by 16", "mha.out_proj": "MultiheadAttention"}
    for name, why in expected_kept.items():
        assert not d[name].fp8 and why in d[name].reason, (name, d[name].reason)
        assert type(model.get_submodule(name)) is not Float8Linear
    assert isinstance(model.emb, nn.Embedding) and isinstance(model.block.norm, nn.LayerNorm)
    table = describe(model)
    assert "block.qkv" in table and "4 of 10 Linear layers in FP8" in table


def test_tied_head_is_kept_whatever_its_name_or_position():
    model = TinyLM(tied=True)
    model.out, model.head_last = nn.Identity(), model.out        # tied, registered last under another name
    model.register_module("late_mlp", nn.Linear(256, 256))       # the last Linear is now an MLP layer
    d = decisions(convert(model, Float8Config()))
    assert "tied" in d["head_last"].reason
    assert not d["late_mlp"].fp8 and "last Linear" in d["late_mlp"].reason


def test_convert_is_idempotent_and_model_still_trains():
    model = TinyLM()
    convert(model, Float8Config(recipe="tensorwise"))
    first = {n: type(m) for n, m in model.named_modules()}
    qkv = model.block.qkv
    convert(model, Float8Config(recipe="tensorwise"))
    assert {n: type(m) for n, m in model.named_modules()} == first and model.block.qkv is qkv
    assert decisions(model)["block.qkv"].reason == "already FP8"
    idx = torch.randint(0, 512, (2, 32))
    loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    assert torch.isfinite(loss) and model.block.qkv.weight.grad.abs().sum() > 0


def test_user_filter_replaces_default_and_bare_linear():
    model = convert(TinyLM(), Float8Config(min_features=16), filter=lambda name, m: name.endswith("tiny"))
    d = decisions(model)
    assert d["block.tiny"].fp8 and not d["block.qkv"].fp8 and "filter" in d["block.qkv"].reason
    bare = convert(nn.Linear(256, 256), Float8Config())
    assert isinstance(bare, Float8Linear) and report(bare)[0].fp8


def test_fp8_recipes_through_policy_prepare_autocast():
    torch.manual_seed(0)
    for recipe in ("fp8-blockwise", "fp8-tensorwise", "fp8-rowwise"):
        policy = mp.Policy.from_recipe(recipe)
        model = mp.prepare(TinyLM(), policy)
        assert isinstance(model.block.down, Float8Linear)
        assert model.block.down.config.recipe == recipe.split("-")[1]
        explained = mp.explain(policy, model)                 # what went FP8 and why, per layer
        assert "block.down" in explained and "4 of 10 Linear layers in FP8" in explained
        idx = torch.randint(0, 512, (2, 32))
        with mp.autocast(policy):
            h = model.block.down(torch.randn(2, 32, 1024))
            loss = F.cross_entropy(model(idx).flatten(0, 1).float(), idx.flatten())
        assert h.dtype == torch.bfloat16          # the autocast dtype of the FP8 recipes
        loss.backward()
        assert torch.isfinite(loss) and model.block.down.weight.grad.dtype == torch.float32


def test_bad_config_and_model_types():
    with pytest.raises(TypeError):
        convert(TinyLM(), config={"recipe": "blockwise"})
    with pytest.raises(TypeError):
        convert("model", Float8Config())


def test_a_converted_linear_keeps_its_children_hooks_and_attributes():
    cfg = Float8Config(min_features=16)
    root = nn.Linear(32, 32)
    root.adapter = nn.Linear(32, 32)      # a child module (e.g. a LoRA adapter registered on the layer)
    root.tag = "kept"
    calls = []
    root.register_forward_hook(lambda m, i, o: calls.append(1))
    converted = convert(root, cfg, filter=lambda name, m: name == "")
    assert isinstance(converted, Float8Linear) and converted.adapter is root.adapter and converted.tag == "kept"
    assert converted.weight is root.weight
    converted(torch.randn(2, 32))
    assert calls == [1]
    assert set(converted.state_dict()) == set(root.state_dict())
    # the same inside a model: the replaced child keeps its own children
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 8))
    model[0].extra = nn.LayerNorm(32)
    convert(model, cfg)
    assert isinstance(model[0], Float8Linear) and isinstance(model[0].extra, nn.LayerNorm)


def test_linear_subclasses_with_their_own_forward_are_not_converted():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(512, 512), nn.Linear(512, 512), nn.Linear(512, 8))
    convert(model, Float8Config(), filter=lambda name, m: True)
    assert type(model[0]) is Scaled and isinstance(model[1], Float8Linear)
    assert "own forward" in [d.reason for d in report(model) if d.name == "0"][0]
