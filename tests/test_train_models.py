"""The models of `mixprec train`: shapes, variants, and the hand-written parts against references."""
import pytest
import torch
import torch.nn.functional as F

from mixprec.train import models
from mixprec.train.models import CNN, GPT, RMSNorm, Rotary, build_model, model_config
from tolerances import FP32_ORDER_ATOL, FP32_ORDER_RTOL, ROTARY_RELATIVE_ATOL

TINY = dict(n_layer=2, n_head=2, d_model=32, seq_len=16)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("head", ["tied", "separate"])
@pytest.mark.parametrize("attention", ["manual", "sdpa"])
def test_gpt_variants_shapes_and_grads(positions, head, attention):
    model = build_model(model_config("gpt", positions=positions, head=head, attention=attention, **TINY))
    idx = torch.randint(0, 256, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 256)
    F.cross_entropy(logits.reshape(-1, 256), torch.randint(0, 256, (48,))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert (model.lm_head.weight is model.tok_emb.weight) == (head == "tied")
    assert (model.pos_emb is None) == (positions == "rotary")


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_manual_attention_matches_sdpa(positions):
    torch.manual_seed(1)
    manual = build_model(model_config("gpt", attention="manual", positions=positions, **TINY))
    sdpa = build_model(model_config("gpt", attention="sdpa", positions=positions, **TINY))
    sdpa.load_state_dict(manual.state_dict())
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(manual(idx), sdpa(idx), rtol=FP32_ORDER_RTOL, atol=FP32_ORDER_ATOL)


def test_gpt_is_causal():
    model = build_model(model_config("gpt", **TINY))
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    torch.testing.assert_close(model(idx)[:, :10], model(changed)[:, :10], rtol=0, atol=0)
    assert not torch.equal(model(idx)[:, 10:], model(changed)[:, 10:])


def test_rmsnorm_matches_reference():
    norm = RMSNorm(24)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24))
    x = torch.randn(5, 7, 24) * 3
    expected = F.rms_norm(x.double(), (24,), norm.weight.double(), eps=norm.eps).float()
    torch.testing.assert_close(norm(x), expected, rtol=FP32_ORDER_RTOL, atol=FP32_ORDER_ATOL)
    assert type(norm).__name__ == "RMSNorm"  # mixprec's rules find user norms by this name


def test_rotary_depends_on_relative_position_only():
    rotary = Rotary(head_dim=8, seq_len=32)
    q, k = torch.randn(8), torch.randn(8)
    qs, ks = rotary(q.expand(32, 8)), rotary(k.expand(32, 8))   # the same vectors at every position
    dots = qs @ ks.T                                               # dots[m, n] = rot(q, m) . rot(k, n)
    for offset in (0, 3, 7):
        diagonal = torch.diagonal(dots, offset=offset)
        torch.testing.assert_close(diagonal, diagonal[0].expand_as(diagonal), rtol=0, atol=ROTARY_RELATIVE_ATOL)
    torch.testing.assert_close(qs.norm(dim=-1), q.norm().expand(32), rtol=FP32_ORDER_RTOL, atol=FP32_ORDER_ATOL)


def test_cnn_has_batchnorm_and_pooling():
    model = build_model(model_config("cnn", channels=8))
    assert isinstance(model, CNN)
    kinds = {type(m) for m in model.modules()}
    assert {torch.nn.BatchNorm2d, torch.nn.MaxPool2d, torch.nn.AdaptiveAvgPool2d} <= kinds
    assert model(torch.rand(4, 1, 8, 8)).shape == (4, 10)


@pytest.mark.parametrize("cell, rnn_class", [("lstm", torch.nn.LSTM), ("gru", torch.nn.GRU)])
def test_rnn_language_models(cell, rnn_class):
    model = build_model(model_config(cell, d_model=16, hidden=24, n_layer=2, seq_len=16))
    assert isinstance(model.rnn, rnn_class) and model.rnn.num_layers == 2
    assert model(torch.randint(0, 256, (3, 16))).shape == (3, 16, 256)


def test_sizes_not_applying_to_a_model_are_refused_naming_those_that_do():
    assert model_config("cnn", n_layer=None, channels=4).channels == 4      # None: not given
    assert model_config("gru", d_model=16).cell == "gru"
    with pytest.raises(ValueError, match="--n-layer does not apply to --model cnn; its sizes are: --channels"):
        model_config("cnn", n_layer=7, channels=4)
    with pytest.raises(ValueError, match="--positions does not apply to --model lstm; its sizes are: --n-layer, "
                                         "--d-model, --seq-len, --hidden"):
        model_config("lstm", positions="rotary")


@pytest.mark.parametrize("bad, message", [
    (dict(name="mlp"), "Unknown model 'mlp'; choose one of: gpt, cnn, lstm, gru"),
    (dict(name="gpt", positions="alibi"), "Unknown positions 'alibi'; choose one of: learned, rotary"),
    (dict(name="gpt", d_model=30, n_head=4), "multiple of n_head"),
    (dict(name="gpt", attention="flash"), "choose one of: manual, sdpa"),
])
def test_bad_sizes_name_the_choices(bad, message):
    with pytest.raises(ValueError, match=message):
        model_config(**bad)


def test_manual_attention_is_the_core_op():
    import mixprec as mp
    q, k, v = (torch.randn(2, 2, 8, 4) for _ in range(3))
    assert torch.equal(models.manual_attention(q, k, v), mp.ops.attention(q, k, v, causal=True))


@pytest.mark.parametrize("head", ["tied", "separate"])
def test_gpt_with_targets_returns_the_fused_head_loss(head, monkeypatch):
    """model(idx, targets) is mp.ops.head_cross_entropy on the final hidden states: in FP32 the same loss
    (mean and sum) and gradients as cross_entropy on the logits."""
    import mixprec as mp
    calls = []
    fused = mp.ops.head_cross_entropy
    monkeypatch.setattr(mp.ops, "head_cross_entropy", lambda *a, **k: calls.append(a[1]) or fused(*a, **k))
    model = build_model(model_config("gpt", head=head, **TINY))
    idx, targets = torch.randint(0, 256, (3, 16)), torch.randint(0, 256, (3, 16))
    loss = model(idx, targets)
    assert calls == [model.lm_head]
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = F.cross_entropy(model(idx).reshape(-1, 256).double(), targets.reshape(-1))
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=FP32_ORDER_RTOL, atol=FP32_ORDER_ATOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=FP32_ORDER_RTOL, atol=FP32_ORDER_ATOL, msg=name)
    with torch.no_grad():
        total = model(idx, targets, reduction="sum")
    torch.testing.assert_close(total.double(), expected.detach() * targets.numel(), rtol=FP32_ORDER_RTOL,
                               atol=FP32_ORDER_ATOL)
