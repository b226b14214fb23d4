"""Outside models: Hugging Face Llama, GPT-2, T5, ResNet and ViT under mp.prepare + mp.autocast on the CPU.

Tiny configs with random weights (built from their *Config classes: no downloads, no network). For each model
and for bf16-mixed and fp16-mixed (FP16 emulated on the CPU): it trains (a fixed batch, AdamW, the model's own
`labels=` loss), mp.explain / plan_of name the roles, the precision audit (helpers.PrecisionTrace: every aten
op's input/output precision per module) shows the table enforced, and mp.unprepare gives the model back.
"""
import copy

import pytest
import torch
from helpers import GEMM_OPS, PrecisionTrace

import mixprec as mp
from mixprec.prepare import PrecisionForward, plan_of
from mixprec.rules import Precision

transformers = pytest.importorskip(
    "transformers", reason="the outside-model tests need Hugging Face transformers (pip install 'mixprec[test]')")
from transformers.pytorch_utils import Conv1D

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: threads only contend

RECIPES = ("bf16-mixed", "fp16-mixed")
HALF = {"bf16-mixed": "bf16", "fp16-mixed": "fp16"}
DTYPE = {"bf16-mixed": "bfloat16", "fp16-mixed": "float16"}
VOCAB, CLASSES = 128, 10


# ---- the models: tiny configs, random weights, dropout off (a fixed batch must show a falling loss) -----------

def _llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def _gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    return transformers.GPT2LMHeadModel(config)


def _t5():
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(config)


def _resnet():
    config = transformers.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                       layer_type="basic", num_labels=CLASSES)
    return transformers.ResNetForImageClassification(config)


def _vit():
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, num_labels=CLASSES,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.ViTForImageClassification(config)


BUILD = {"llama": _llama, "gpt2": _gpt2, "t5": _t5, "resnet": _resnet, "vit": _vit}
MODELS = tuple(BUILD)


def _build(name):
    torch.manual_seed(0)
    return BUILD[name]()


def _batch(name):
    g = torch.Generator().manual_seed(1)
    if name in ("llama", "gpt2"):
        ids = torch.randint(0, VOCAB, (4, 16), generator=g)
        return {"input_ids": ids, "labels": ids}
    if name == "t5":
        return {"input_ids": torch.randint(2, VOCAB, (4, 12), generator=g),
                "labels": torch.randint(2, VOCAB, (4, 8), generator=g)}
    return {"pixel_values": torch.randn(8, 3, 32, 32, generator=g),
            "labels": torch.randint(0, CLASSES, (8,), generator=g)}


def _perturb(model):
    """Fresh random values in every parameter (norm weights of ones and biases of zeros read as BF16 values
    in the trace, which would blur what a check sees): the audit then tells FP32 from half exactly."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-2)


# ---- what the table should say about each model's modules ------------------------------------------------

# model -> (embedding modules it must name, the head, hand-written norm class, built-in norm class)
EXPECTED = {
    "llama": ({"model.embed_tokens"}, "lm_head", "LlamaRMSNorm", None),
    "gpt2": ({"transformer.wte", "transformer.wpe"}, "lm_head", None, torch.nn.LayerNorm),
    "t5": ({"shared",   # (encoder/decoder.embed_tokens too where they are modules of their own, as in 5.x)
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",    # T5's position embeddings
            "decoder.block.0.layer.0.SelfAttention.relative_attention_bias"}, "lm_head", "T5LayerNorm", None),
    "resnet": (set(), "classifier.1", None, torch.nn.BatchNorm2d),
    "vit": ({"vit.embeddings"}, "classifier", None, torch.nn.LayerNorm),   # position embeddings as parameters
}


def _explain_rows(text):
    """mp.explain's per-module table -> {module: {"class", "role", "computes in", "params"}}."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("module ") and "computes in" in line)
    header, dashes = lines[start], lines[start + 1]
    spans, pos = [], 0
    for dash in dashes.split("  "):
        spans.append((pos, pos + len(dash)))
        pos += len(dash) + 2
    names = [header[a:b].strip() for a, b in spans]
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = [line[a:b if i < len(spans) - 1 else None].strip() for i, (a, b) in enumerate(spans)]
        rows[cells[0]] = dict(zip(names[1:], cells[1:]))
    return rows


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", MODELS)
def test_explain_and_plan_name_the_roles(name, recipe):
    model = mp.prepare(_build(name), recipe)
    plans = {p.name: p for p in plan_of(model)}
    rows = _explain_rows(mp.explain(recipe, model))
    modules = dict(model.named_modules())
    embeddings, head, hand_norm, builtin_norm = EXPECTED[name]

    found = {n for n, p in plans.items() if p.role == "embedding"}
    assert found == {n for n, m in modules.items() if isinstance(m, torch.nn.Embedding)} | embeddings
    for n in found:
        assert plans[n].precision is Precision.FP32 and plans[n].param_dtype == torch.float32
        assert rows[n]["role"] == "embedding" and rows[n]["computes in"] == "FP32 compute and output"
    assert [n for n, p in plans.items() if p.role == "head"] == [head]
    assert plans[head].precision is Precision.FP32_OUTPUT and plans[head].param_dtype == torch.float32
    assert rows[head]["role"] == "head" and rows[head]["computes in"].startswith("FP32 weights; half GEMM inputs")

    norms = [n for n, m in modules.items() if type(m).__name__.endswith("Norm") or isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    for n in norms:
        kind = type(modules[n]).__name__
        expected = Precision.FP32_CAST_BACK if kind == hand_norm else Precision.FP32_IN_KERNEL
        assert hand_norm is None or kind == hand_norm
        assert builtin_norm is None or isinstance(modules[n], builtin_norm)
        assert plans[n].precision is expected, (n, plans[n])
        assert all(p.dtype == torch.float32 for p in modules[n].parameters())   # norms' parameters FP32
        assert rows[n]["class"] == kind and rows[n]["params"] == "float32"
        assert rows[n]["computes in"] == expected.describe()
    if hand_norm is not None:   # matched by class name, not registered: the forward is a PrecisionForward
        assert all(isinstance(modules[n].__dict__.get("forward"), PrecisionForward) for n in norms)

    # Linear / Conv (and GPT-2's Conv1D, which no rule names: its addmm follows autocast) compute in half
    gemm_layers = [n for n, m in modules.items() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, Conv1D))
                   and plans[n].role is None]
    assert gemm_layers
    for n in gemm_layers:
        assert plans[n].precision in (None, Precision.HALF) and plans[n].param_dtype == torch.float32
        assert rows[n]["computes in"] == DTYPE[recipe], (n, rows[n])

    if name == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight   # tied: one FP32 tensor for both roles
        conv1d = [n for n, m in modules.items() if isinstance(m, Conv1D)]
        assert len(conv1d) == 8 and all(rows[n]["class"] == "Conv1D" for n in conv1d)
    if name == "t5":   # Hugging Face's _keep_in_fp32_modules: the feed-forward output projections
        assert "wo" in set(model._keep_in_fp32_modules)
        wo = {n for n in modules if n.endswith("DenseReluDense.wo")}
        assert len(wo) == 4 and {n for n, p in plans.items() if p.role == "keep_fp32"} == wo
        for n in wo:
            assert plans[n].precision is Precision.FP32 and rows[n]["role"] == "keep_fp32"
            assert rows[n]["computes in"] == "FP32 compute and output" and rows[n]["params"] == "float32"


# ---- the precision audit -----------------------------------------------------------------------------------

def _trace(name, recipe):
    model = mp.prepare(_build(name), recipe)
    _perturb(model)
    with PrecisionTrace(model) as trace, mp.autocast(recipe, device_type="cpu"):
        out = model(**_batch(name))
    assert out.logits.dtype == torch.float32 and out.loss.dtype == torch.float32
    return model, trace


# The convolutions after HF ResNet's in-place `hidden_state += residual`
_AFTER_IN_PLACE_ADD = {"resnet.encoder.stages.1.layers.0.layer.0.convolution",
                       "resnet.encoder.stages.1.layers.0.shortcut.convolution"}


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", MODELS)
def test_precision_audit_shows_the_table(name, recipe):
    half = HALF[recipe]
    model, trace = _trace(name, recipe)
    modules = dict(model.named_modules())
    plans = {p.name: p for p in plan_of(model)}
    embeddings, head, hand_norm, _ = EXPECTED[name]

    # attention / MLP projections and convolutions (Linear, Conv2d, GPT-2's Conv1D): half GEMM inputs and output
    roled = [n for n, p in plans.items() if p.role is not None and n]   # their whole subtree is FP32
    layers = [n for n, m in modules.items() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, Conv1D))
              and plans[n].role is None and not any(n.startswith(r + ".") for r in roled)]
    for layer in layers:
        gemms = [r for r in trace.records if r[0] == layer and r[1] in GEMM_OPS]
        assert gemms, layer
        for _, op, ins, outs in gemms:   # every operand, the bias of addmm included, read as half values
            assert set(ins) == {half}, (layer, op, ins, outs)
        assert trace.outputs[layer] == (half,), (layer, trace.outputs[layer])
    if name == "gpt2":
        conv1d = [n for n, m in modules.items() if isinstance(m, Conv1D)]
        assert {op for m, op, _, _ in trace.records if m in conv1d and op in GEMM_OPS} == {"addmm"}

    # norms compute in FP32 from FP32 parameters
    norm_rows = (Precision.FP32_CAST_BACK, Precision.FP32_IN_KERNEL)
    norms = [n for n in modules if plans[n].precision in norm_rows]
    assert norms
    for norm in norms:
        ops = [r for r in trace.records if r[0] == norm]
        if hand_norm is not None:   # LlamaRMSNorm, T5LayerNorm: every op of the module outputs FP32
            assert ops and all(outs == ("fp32",) for _, _, _, outs in ops), (norm, ops)
            assert ops[-1][1:3] == ("mul", ("fp32", "fp32")), (norm, ops)   # the FP32 weight times FP32 values
        else:   # nn.LayerNorm / BatchNorm2d: FP32 weight and bias (and statistics); layer_norm's result in FP32,
            # batch_norm's in the input's dtype (its kernels take half inputs and compute in FP32), or FP32
            # where FP16 is emulated (FP32 storage, rounded after the kernel)
            kernel = [r for r in ops if "layer_norm" in r[1] or "batch_norm" in r[1]]
            assert kernel, (norm, ops)
            for _, op, ins, outs in kernel:
                assert set(ins[1:]) == {"fp32"} and set(outs[1:]) <= {"fp32"}, (norm, op, ins, outs)
                assert outs[0] in ({"fp32"} if "layer_norm" in op else {"fp32", ins[0]}), (norm, op, ins, outs)
        assert all(p.dtype == torch.float32 for p in modules[norm].parameters())

    # embeddings (token and position) compute and return FP32
    ran = [p.name for p in plans.values() if p.role == "embedding" and p.name in trace.outputs]
    assert bool(ran) == bool(embeddings)
    for n in ran:
        assert trace.outputs[n] == ("fp32",), (n, trace.outputs[n])

    # the head: half GEMM inputs, FP32 accumulation and logits; the loss on them in FP32
    assert trace.ops(head, "mm") == [((half, half), ("fp32",))]
    assert trace.outputs[head] == ("fp32",)
    assert trace.ops("", "_log_softmax") == [(("fp32",), ("fp32",))]
    assert all(outs == ("fp32",) for _, op, _, outs in trace.records if "softmax" in op)  # attention's too

    if name == "t5":   # keep_fp32: the wo GEMMs read FP32 weights (no half cast) and return FP32
        for n in (n for n in modules if n.endswith("DenseReluDense.wo")):
            (ins, outs), = trace.ops(n, "mm")
            assert ins[1] == "fp32" and outs == ("fp32",) and trace.outputs[n] == ("fp32",), (n, ins, outs)
            assert modules[n].weight.dtype == torch.float32
    if name == "vit":   # position embeddings (bare parameters: their module has the embedding role) in FP32
        (ins, outs), = trace.ops("vit.embeddings", "add")
        assert ins == ("fp32", "fp32") and outs == ("fp32",)
        assert model.vit.embeddings.position_embeddings.dtype == torch.float32


def test_emulated_fp16_in_place_add_rounds_like_native_fp16():
    _, trace = _trace("resnet", "fp16-mixed")
    convs = [r for r in trace.records if r[1] in GEMM_OPS and r[0] in _AFTER_IN_PLACE_ADD]
    assert convs and all(set(ins) == {"fp16"} for _, _, ins, _ in convs), convs


def test_vit_position_embeddings_stay_fp32_like_gpt2s():
    gpt2, vit = mp.prepare(_build("gpt2"), "bf16-true"), mp.prepare(_build("vit"), "bf16-true")
    assert gpt2.transformer.wpe.weight.dtype == torch.float32
    assert vit.vit.embeddings.position_embeddings.dtype == torch.float32


# ---- training ----------------------------------------------------------------------------------------------

STEPS = 12


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", MODELS)
def test_trains_under_prepare_and_autocast(name, recipe):
    policy = mp.Policy.from_recipe(recipe)
    model = mp.prepare(_build(name), policy)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = mp.LossScaler.for_policy(policy)     # dynamic for fp16-mixed, off for bf16-mixed
    batch = _batch(name)
    losses = []
    for _ in range(STEPS):
        with mp.autocast(policy, device_type="cpu"):
            out = model(**batch)
        assert out.loss.dtype == torch.float32 and out.logits.dtype == torch.float32
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 for p in model.parameters())   # -mixed: FP32 parameters throughout
    if name == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight   # still tied after training


# ---- unprepare ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", MODELS)
def test_unprepare_gives_the_model_back(name, recipe):
    model = _build(name)
    reference = copy.deepcopy(model)
    classes = [(n, type(m)) for n, m in model.named_modules()]
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    model = mp.prepare(model, recipe)
    assert any(isinstance(m.__dict__.get("forward"), PrecisionForward) for m in model.modules())
    model = mp.unprepare(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert [(n, type(m)) for n, m in model.named_modules()] == classes
    assert {k: v.dtype for k, v in model.state_dict().items()} == dtypes
    assert plan_of(model) == []
    if name == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight
    model.eval()
    reference.eval()
    batch = _batch(name)
    with torch.no_grad():   # -mixed recipes round no parameter: the same model, the same outputs
        assert torch.equal(model(**batch).logits, reference(**batch).logits)
