"""apex-style initialize/scale_loss, Keras-style LossScaleOptimizer, and their guard rails."""
import pytest
import torch
import torch.nn.functional as F

import mixprec as mp
from small_models import MLP
from tolerances import MIXED_FINAL_LOSS_RTOL


def _task(seed=0, n=512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    w = torch.randn(32, 8, generator=g) / 4
    y = torch.tanh(x @ w) + 0.05 * torch.randn(n, 8, generator=g)
    return x, y


def _train_apex(opt_level, dtype, steps=150, seed=0):
    torch.manual_seed(seed)
    model = MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    if opt_level is not None:
        model, optimizer = mp.initialize(model, optimizer, opt_level=opt_level, dtype=dtype)
    x, y = _task()
    for step in range(steps):
        i = torch.arange(step * 64, step * 64 + 64) % len(x)
        loss = F.mse_loss(model(x[i]).float(), y[i])
        optimizer.zero_grad()
        if opt_level is None:
            loss.backward()
        else:
            with mp.scale_loss(loss, optimizer) as scaled_loss:
                scaled_loss.backward()
        optimizer.step()
    with torch.no_grad():
        return F.mse_loss(model(x).float(), y).item(), model, optimizer


@pytest.mark.parametrize("opt_level", ["O1", "O2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apex_snippet_trains_like_fp32(opt_level, dtype):
    reference, _, _ = _train_apex(None, None)
    final, model, optimizer = _train_apex(opt_level, dtype)
    assert abs(final - reference) / reference < MIXED_FINAL_LOSS_RTOL, (final, reference)
    if opt_level == "O2":  # half model, FP32 masters stepped by the optimizer
        assert model.fc2.weight.dtype == dtype and model.norm.weight.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in mp.master_params(optimizer))


def test_opt_levels_semantics():
    o0, o1 = mp.Policy.from_opt_level("O0"), mp.Policy.from_opt_level("O1")
    o2, o3 = mp.Policy.from_opt_level("O2"), mp.Policy.from_opt_level("O3")
    assert o0.compute_dtype == torch.float32 and o0.loss_scale == "none"
    assert o1.param_dtype == torch.float32 and o1.compute_dtype == torch.float16 and o1.loss_scale == "dynamic"
    assert o2.param_dtype == torch.float16 and o2.master_weights and o2.loss_scale == "dynamic" and o2.fp32_rules
    assert o3.param_dtype == torch.float16 and not o3.master_weights and o3.loss_scale == 1.0 and not o3.fp32_rules
    assert mp.Policy.from_opt_level("O2", dtype=torch.bfloat16).loss_scale == "none"


def test_overflow_skips_the_step_by_itself_and_backs_off():
    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = mp.initialize(model, optimizer, opt_level="O1", loss_scale="dynamic")
    x, y = _task()
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.mse_loss(model(x[:32]).float(), y[:32]) * float("inf")  # an overflowing backward
    with mp.scale_loss(loss, optimizer) as scaled:
        scaled.backward()
    scale = mp.state_dict()["loss_scaler0"]["scale"]
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert mp.state_dict()["loss_scaler0"]["scale"] == scale / 2
    loss = F.mse_loss(model(x[:32]).float(), y[:32])  # the next, finite step runs
    optimizer.zero_grad()
    with mp.scale_loss(loss, optimizer) as scaled:
        scaled.backward()
    optimizer.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_state_dict_round_trip_and_accumulation():
    model = MLP()
    model, optimizer = mp.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), opt_level="O1")
    x, y = _task()
    for micro in range(3):  # gradient accumulation: unscale only after the last micro-batch
        loss = F.mse_loss(model(x[micro * 8:(micro + 1) * 8]).float(), y[:8])
        with mp.scale_loss(loss, optimizer, delay_unscale=micro < 2) as scaled:
            scaled.backward()
    optimizer.step()
    saved = mp.state_dict()
    mp.load_state_dict(saved)
    assert mp.state_dict()["loss_scaler0"] == saved["loss_scaler0"]


def test_bad_input():
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(2, 32)).sum()
    with pytest.raises(RuntimeError, match="mp.initialize"):
        with mp.scale_loss(loss, optimizer):
            pass
    with pytest.raises(ValueError, match="choose one of: O0, O1, O2, O3"):
        mp.initialize(model, optimizer, opt_level="O4")
    model, optimizer = mp.initialize(model, optimizer, opt_level="O1")
    with pytest.raises(RuntimeError, match="already initialized"):
        mp.initialize(model, optimizer, opt_level="O1")
    with pytest.raises(RuntimeError, match="delay_unscale"):
        for _ in range(2):
            with mp.scale_loss(model(torch.randn(2, 32)).float().sum(), optimizer) as scaled:
                scaled.backward()


def test_keras_loss_scale_optimizer():
    torch.manual_seed(0)
    model = MLP()
    opt = mp.LossScaleOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), initial_scale=2.0**15,
                                dynamic_growth_steps=2)
    x, y = _task()
    losses = []
    for step in range(6):
        with mp.autocast("fp16-mixed"):
            loss = F.mse_loss(model(x[:64]), y[:64])
        opt.zero_grad()
        opt.scale_loss(loss).backward()
        opt.step()
        losses.append(loss.item())
    assert opt.loss_scale == 2.0**18  # doubled every 2 finite steps
    assert losses[-1] < losses[0]
