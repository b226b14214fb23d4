"""prepare(): parameter casts, roles, idempotence, master weights, policies and bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec as mp
from mixprec.prepare import PrecisionForward, find_roles, plan_of
from helpers import MLP, TinyCNN, TinyGPT, trace_forward


def test_true_recipes_cast_params_but_keep_the_table_in_fp32():
    model = mp.prepare(TinyGPT(), "bf16-true")
    assert model.blocks[0].qkv.weight.dtype == torch.bfloat16
    for kept in (model.tok.weight, model.pos.weight, model.norm.weight, model.blocks[0].norm1.weight,
                 model.lm_head.weight):
        assert kept.dtype == torch.float32
    cnn = mp.prepare(TinyCNN(), "fp16-true")
    assert cnn.conv1.weight.dtype == torch.float16 and cnn.bn1.weight.dtype == torch.float32
    assert cnn.bn1.running_mean.dtype == torch.float32


def test_head_roles():
    assert plan_of(mp.prepare(TinyGPT(), "bf16-mixed"))  # the plan is recorded
    roles = find_roles(TinyGPT())
    assert roles["lm_head"] == "head" and roles["tok"] == roles["pos"] == "embedding"
    tied = TinyGPT()
    tied.lm_head.weight = tied.tok.weight
    tied.extra = torch.nn.Linear(32, 32)  # registered last, but the tied Linear is the head
    assert find_roles(tied)["lm_head"] == "head"
    model = mp.prepare(MLP(), "bf16-mixed", head="fc2")
    assert {p.name: p.role for p in plan_of(model)}["fc2"] == "head"
    with pytest.raises(ValueError, match="No module named 'nope'.*fc1"):
        mp.prepare(MLP(), "bf16-mixed", head="nope")


def test_prepare_is_idempotent_and_keeps_state_dict_keys():
    model = TinyGPT()
    keys = list(model.state_dict())
    prepared = mp.prepare(model, "bf16-mixed")
    again = mp.prepare(prepared, mp.Policy.from_recipe("bf16-mixed"))
    assert again is model and list(model.state_dict()) == keys
    assert type(model.norm).__name__ == "RMSNorm"  # the class is untouched: the rule is the instance's forward
    assert isinstance(model.norm.forward, PrecisionForward) and "FP32" in repr(model.norm.forward)
    with pytest.raises(ValueError, match="already prepared"):
        mp.prepare(model, "fp16-mixed")
    clone = copy.deepcopy(model)  # rule forwards survive deepcopy (EMA models), bound to the copy
    assert clone.norm.forward.module is clone.norm
    x = torch.randint(0, 64, (2, 16))
    with mp.autocast("bf16-mixed"):
        assert torch.equal(clone(x), model(x))


def test_fp16_true_with_master_weights_trains():
    torch.manual_seed(0)
    policy = mp.Policy.from_recipe("fp16-true")
    model = mp.prepare(MLP(), policy)
    assert model.fc2.weight.dtype == torch.float16
    optimizer = mp.MasterWeights(torch.optim.Adam(model.parameters(), lr=3e-3))
    scaler = mp.LossScaler.for_policy(policy)
    x = torch.randn(256, 32)
    y = torch.tanh(x[:, :8])
    first = None
    for step in range(60):
        with mp.autocast(policy):
            loss = F.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        half_grad = model.fc2.weight.grad.float()  # autograd accumulates in the model, as for any model
        scaler.unscale_(optimizer)
        master = dict(zip(map(id, model.parameters()), mp.master_params(optimizer)))[id(model.fc2.weight)]
        assert torch.equal(master.grad, half_grad / scaler.get_scale())  # synced, then unscaled in FP32
        torch.nn.utils.clip_grad_norm_(mp.master_params(optimizer), 1.0)
        scaler.step(optimizer)
        scaler.update()
    assert loss.item() < 0.3 * first
    masters = list(mp.master_params(optimizer))
    assert all(m.dtype == torch.float32 for m in masters)
    # the model holds the masters rounded to FP16
    assert torch.equal(model.fc2.weight, masters[[i for i, p in enumerate(model.parameters())
                                                  if p is model.fc2.weight][0]].half())
    state = optimizer.state_dict()
    optimizer.load_state_dict(state)


def test_bad_input():
    class Counts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.zeros(4, dtype=torch.long), requires_grad=False)

    with pytest.raises(ValueError, match="no floating-point parameters"):
        mp.prepare(Counts(), "bf16-mixed")
    with pytest.raises(TypeError, match="nn.Module"):
        mp.prepare("model", "bf16-mixed")
    with pytest.raises(ValueError, match="Unknown recipe"):
        mp.prepare(MLP(), "fp12")
    with pytest.raises(ValueError, match="choose one of: cpu, cuda"):
        with mp.autocast("bf16-mixed", device_type="tpu"):
            pass
    with pytest.raises(TypeError, match="floating-point"):
        mp.formats.round_to(torch.arange(3), "bf16")


@pytest.mark.parametrize("recipe", ["bf16-true", "fp8-blockwise", "fp16-mixed"])
def test_unprepare_restores_the_model(recipe):
    torch.manual_seed(0)
    model = TinyGPT(dim=256) if recipe.startswith("fp8") else TinyGPT()
    reference = copy.deepcopy(model)
    x = torch.randint(0, 64, (2, 16))
    model = mp.prepare(model, recipe)
    assert any(isinstance(m.__dict__.get("forward"), PrecisionForward) for m in model.modules())
    model = mp.unprepare(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert {k: v.dtype for k, v in model.state_dict().items()} == {k: v.dtype for k, v in reference.state_dict().items()}
    if recipe != "bf16-true":    # no values were rounded: the same model
        assert torch.equal(model(x), reference(x))
    with pytest.raises(ValueError, match="was not prepared"):
        mp.unprepare(model)
    mp.prepare(model, "bf16-mixed")   # can be prepared again, under another policy


def test_multihead_attention_keeps_fused_sdpa_in_half_and_upcasts_explicit_weights():
    """need_weights=False runs fused SDPA (softmax and scores@V accumulate in FP32 inside the kernel):
    the module stays in the compute dtype, as under torch.autocast; need_weights=True materialises the
    softmax as plain ops, so the module runs in FP32."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    reference = copy.deepcopy(mha)
    policy = mp.Policy.from_recipe("bf16-mixed")
    model = mp.prepare(nn.ModuleDict({"mha": mha}), policy)
    x = torch.randn(2, 8, 64)
    with mp.autocast(policy, device_type="cpu"):
        fused, _ = model["mha"](x, x, x, need_weights=False)
        explicit, weights = model["mha"](x, x, x)
    expected, expected_weights = reference(x, x, x)
    assert fused.dtype == torch.bfloat16 and explicit.dtype == torch.float32 and weights.dtype == torch.float32
    torch.testing.assert_close(explicit, expected, rtol=1e-5, atol=1e-6)     # FP32 throughout
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
    # BF16 projections and inputs: a few BF16 roundings (2**-8 each) of values of order 1
    torch.testing.assert_close(fused.float(), expected, rtol=0, atol=3e-2)


class _EncoderWithPositions(nn.Module):
    """torchvision's ViT layout: the encoder owns the position embedding and runs the blocks too."""

    def __init__(self, d=32, tokens=5, layers=2):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, d) * 0.02)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True,
                                                               norm_first=True) for _ in range(layers))

    def forward(self, x):
        x = x + self.pos_embedding
        for layer in self.layers:
            x = layer(x)
        return x


class _PatchViT(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, d, 4, stride=4)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        self.encoder = _EncoderWithPositions(d)
        self.heads = nn.Linear(d, 10)

    def forward(self, images):
        x = self.conv_proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


def test_a_module_that_owns_position_embeddings_and_blocks_is_not_run_in_fp32_whole():
    """Bare embedding parameters give their module the embedding role (FP32) only where that module is the
    embedding stage; torchvision's ViT encoder also holds every block, which must stay in half precision.
    The FP32 parameter still makes the position add FP32 (type promotion) and stays FP32 under -true."""
    model = _PatchViT()
    roles = find_roles(model)
    assert "encoder" not in roles and "" not in roles and roles["heads"] == "head"
    stage = nn.Module()
    stage.pos_embed, stage.cls_token = nn.Parameter(torch.zeros(1, 5, 32)), nn.Parameter(torch.zeros(1, 1, 32))
    stage.distillation_token = nn.Parameter(torch.zeros(1, 1, 32))     # DeiT's
    stage.proj = nn.Conv2d(3, 32, 4, stride=4)
    assert find_roles(nn.ModuleDict({"embeddings": stage}))["embeddings"] == "embedding"

    policy = mp.Policy.from_recipe("bf16-mixed")
    mp.prepare(model, policy)
    assert not isinstance(model.encoder.__dict__.get("forward"), PrecisionForward)
    trace = trace_forward(model, torch.randn(2, 3, 8, 8), policy)
    assert trace.outputs["encoder.layers.0.linear1"] == ("bf16",)        # the blocks' GEMMs in BF16
    (ins, outs), = trace.ops("encoder", "add")                           # x + pos_embedding
    assert outs == ("fp32",) and "fp32" in ins

    true = mp.prepare(_PatchViT(), "bf16-true")
    assert true.encoder.pos_embedding.dtype == torch.float32 and true.class_token.dtype == torch.float32
    assert true.encoder.layers[0].linear1.weight.dtype == torch.bfloat16
