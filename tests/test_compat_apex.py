"""apex-style initialize/scale_loss (mixprec.compat.apex): its semantics, written plainly as references, and guard rails."""
import copy

import pytest
import torch
import torch.nn.functional as F

import mixprec as mp
from helpers import MLP
from helpers import regression_task as _task
from tolerances import MIXED_FINAL_LOSS_RTOL


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
    scale = mp.compat.apex.state_dict()["loss_scaler0"]["scale"]
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert mp.compat.apex.state_dict()["loss_scaler0"]["scale"] == scale / 2
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
    saved = mp.compat.apex.state_dict()
    mp.compat.apex.load_state_dict(saved)
    assert mp.compat.apex.state_dict()["loss_scaler0"] == saved["loss_scaler0"]


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


# ---- apex's semantics, written plainly as references -----------------------------------------------
def _pair(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)


def _fp16_exact(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).half().float()


def test_several_optimizers_each_unscale_once_and_the_scale_updates_once_per_iteration():
    """Two losses, two optimizers (a GAN's loop): apex applies each optimizer's true gradient once."""
    lr, scale, steps = 0.125, 4.0, 3
    ref0, ref1 = _pair()
    m0, m1 = _pair()
    o0, o1 = torch.optim.SGD(m0.parameters(), lr=lr), torch.optim.SGD(m1.parameters(), lr=lr)
    [m0, m1], [o0, o1] = mp.initialize([m0, m1], [o0, o1], opt_level="O1", init_scale=scale, growth_interval=1)
    policy = mp.Policy.from_opt_level("O1")
    for it in range(steps):
        x = _fp16_exact(3, 4, seed=it)
        # reference: loss * S, backward, grad / S, SGD step; S grows once per iteration (growth_interval 1)
        expected_grads = []
        for ref in (ref0, ref1):
            ref.zero_grad()
            with mp.autocast(policy):
                loss = (ref(x).float() ** 2).sum()
            (loss * scale).backward()
            grads = [p.grad / scale for p in ref.parameters()]
            expected_grads.append(grads)
            with torch.no_grad():
                for p, g in zip(ref.parameters(), grads):
                    p.add_(g, alpha=-lr)
        scale *= 2
        # the same loop through mp.initialize
        o0.zero_grad(), o1.zero_grad()
        with mp.scale_loss((m0(x).float() ** 2).sum(), o0) as s:
            s.backward()
        with mp.scale_loss((m1(x).float() ** 2).sum(), o1) as s:
            s.backward()
        for m, grads in zip((m0, m1), expected_grads):
            assert all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), grads))
        o0.step()
        o1.step()
        for m, ref in ((m0, ref0), (m1, ref1)):
            assert all(torch.equal(p, q) for p, q in zip(m.parameters(), ref.parameters()))
        assert mp.compat.apex.state_dict()["loss_scaler0"]["scale"] == scale


def test_the_gan_order_steps_each_optimizer_after_its_own_loss():
    m0, m1 = _pair()
    o0, o1 = torch.optim.SGD(m0.parameters(), lr=0.1), torch.optim.SGD(m1.parameters(), lr=0.1)
    [m0, m1], [o0, o1] = mp.initialize([m0, m1], [o0, o1], opt_level="O1", init_scale=4.0, growth_interval=1)
    x = torch.ones(1, 4)
    w0, w1 = m0.weight.detach().clone(), m1.weight.detach().clone()
    with mp.scale_loss(m0(x).float().sum(), o0) as s:
        s.backward()
    o0.step()   # the iteration of o0 ends here: the scale grows
    with mp.scale_loss(m1(x).float().sum(), o1) as s:
        s.backward()
    o1.step()
    assert torch.allclose(w0 - m0.weight, torch.full_like(w0, 0.1))  # lr * grad, grad = 1
    assert torch.allclose(w1 - m1.weight, torch.full_like(w1, 0.1))
    assert mp.compat.apex.state_dict()["loss_scaler0"]["scale"] == 16.0


def test_o2_model_zero_grad_clears_the_gradients():
    """O2: master FP32 weights; zeroing through the model is the common idiom and must reset them."""
    lr, scale = 0.125, 4.0
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    model, opt = mp.initialize(model, torch.optim.SGD(model.parameters(), lr=lr), opt_level="O2",
                               init_scale=scale, growth_interval=1000)
    policy = mp.Policy.from_opt_level("O2")
    masters = [m.detach().clone() for m in mp.master_params(opt)]
    for it in range(3):
        x = _fp16_exact(3, 4, seed=it)
        model.zero_grad()
        # reference: half model's forward, grads of loss * S in half, master.grad = grad / S in FP32
        with mp.autocast(policy):
            loss = (type(model).forward(model, x).float() ** 2).sum()
        half_grads = torch.autograd.grad(loss * scale, list(model.parameters()))
        expected = [g.float() / scale for g in half_grads]
        with mp.scale_loss(model(x).float().pow(2).sum(), opt) as s:
            s.backward()
        got = [m.grad for m in mp.master_params(opt)]
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), (it, got, expected)
        opt.step()
        for m, g in zip(masters, expected):
            m.add_(g, alpha=-lr)
        assert all(torch.equal(a, b) for a, b in zip(mp.master_params(opt), masters))
        assert all(torch.equal(p, m.half()) for p, m in zip(model.parameters(), masters))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_o3_pure_half_trains_as_a_plain_half_loop(dtype):
    """O3: half parameters, no masters, static scale 1 (apex skips unscaling there): a plain half loop."""
    lr = 0.125
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    ref = copy.deepcopy(model)
    model, opt = mp.initialize(model, torch.optim.SGD(model.parameters(), lr=lr), opt_level="O3", dtype=dtype)
    ref = mp.prepare(ref, mp.Policy.from_opt_level("O3", dtype=dtype))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr)
    for it in range(3):
        x = _fp16_exact(2, 4, seed=it)
        ref_opt.zero_grad()
        with mp.autocast(mp.Policy.from_opt_level("O3", dtype=dtype)):
            ref_loss = ref(x).float().mean()
        ref_loss.backward()
        ref_opt.step()
        opt.zero_grad()
        with mp.scale_loss(model(x).float().mean(), opt) as s:
            s.backward()
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()))
        opt.step()
        assert all(p.dtype == dtype and torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_o3_casts_batchnorm_running_statistics_with_its_parameters(dtype):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    model, opt = mp.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), opt_level="O3", dtype=dtype)
    bn = model[1]
    assert bn.weight.dtype == bn.running_mean.dtype == bn.running_var.dtype == dtype
    assert bn.num_batches_tracked.dtype == torch.int64
    before = bn.running_mean.clone()
    with mp.scale_loss(model(torch.randn(2, 3, 8, 8)).float().mean(), opt) as s:
        s.backward()
    opt.step()
    assert not torch.equal(before, bn.running_mean)   # the statistics were updated, in half
    model.eval()
    assert model(torch.randn(1, 3, 8, 8)).isfinite().all()


@pytest.mark.parametrize("opt_level", ["O2", "O3"])
def test_half_models_hand_out_fp32_state_dicts_with_the_masters_values(opt_level):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    model, opt = mp.initialize(model, torch.optim.Adam(model.parameters(), lr=1e-3), opt_level=opt_level)
    for _ in range(3):
        opt.zero_grad()
        with mp.scale_loss(model(torch.randn(4, 4)).float().pow(2).mean(), opt) as s:
            s.backward()
        opt.step()
    state = model.state_dict()
    assert all(v.dtype == torch.float32 for v in state.values())
    if opt_level == "O2":   # the exact FP32 masters, not the half values upcast
        masters = dict(zip(map(id, model.parameters()), mp.master_params(opt)))
        assert torch.equal(state["0.weight"], masters[id(model[0].weight)])
        assert not torch.equal(state["0.weight"], model[0].weight.float())
    # a plain FP32 model of the same class loads it
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    plain.load_state_dict(state)
    # loading it back restores the half model and its masters exactly
    torch.manual_seed(1)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    other, other_opt = mp.initialize(other, torch.optim.Adam(other.parameters(), lr=1e-3), opt_level=opt_level)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), state.values()))


def test_o2_optimizer_state_dict_loads_into_a_plain_torch_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    model, opt = mp.initialize(model, torch.optim.Adam(model.parameters(), lr=1e-3), opt_level="O2",
                               init_scale=2.0**8)   # no overflow: the step runs and creates state
    with mp.scale_loss(model(torch.randn(3, 4)).float().sum(), opt) as s:
        s.backward()
    opt.step()
    state = opt.state_dict()
    plain_model = torch.nn.Linear(4, 2)
    plain_model.load_state_dict(model.state_dict())
    plain = torch.optim.Adam(plain_model.parameters(), lr=1e-3)
    plain.load_state_dict(state)
    assert torch.equal(plain.state[plain_model.weight]["exp_avg"], opt.state[list(mp.master_params(opt))[0]]["exp_avg"])


def test_o0_accepts_float32():
    model = torch.nn.Linear(2, 2)
    model, opt = mp.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), opt_level="O0",
                               dtype=torch.float32)
    assert model.weight.dtype == torch.float32
