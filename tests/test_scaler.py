"""LossScaler against torch.amp.GradScaler (the same steps, bitwise), hand-computed hysteresis/bounds
schedules, and the guard rails of PyTorch's own GradScaler tests (ported as semantics, not code)."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mixprec.policy import Policy
from mixprec.scaler import LossScaler, _unscale_grads_

# GradScaler's arithmetic exactly: no hysteresis (1), no floor (0), no cap (inf).
NO_BOUNDS = dict(hysteresis=1, min_scale=0.0, max_scale=math.inf)
BAD = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
}


# ---- helpers -------------------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(steps: int, batch: int = 8):
    return [(torch.randn(batch, 6), torch.randn(batch, 3)) for _ in range(steps)]


def _inject(params, kind: str, step: int) -> None:
    """Put one inf/NaN into one gradient, at a position that depends on the step."""
    grads = [p.grad for p in params if p.grad is not None]
    grad = grads[step % len(grads)]
    grad.view(-1)[(7 * step) % grad.numel()] = BAD[kind]


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])


def _assert_same(a, b) -> None:
    """Bitwise equality of (params, optimizer state) snapshots."""
    params_a, state_a = a
    params_b, state_b = b
    assert all(torch.equal(x, y) for x, y in zip(params_a, params_b, strict=True))
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert state_a[key].keys() == state_b[key].keys()
        for name in state_a[key]:
            x, y = state_a[key][name], state_b[key][name]
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, (key, name)


def _train(scaler, model, opt, data, bad=None, *, unscale_every=0, clip=None, start=0):
    """The GradScaler loop; returns per step (scale after update, snapshot after the step)."""
    bad = bad or {}
    trace = []
    for step, (x, y) in enumerate(data, start=start):
        opt.zero_grad(set_to_none=True)
        scaler.scale(F.mse_loss(model(x), y)).backward()
        if step in bad:
            _inject(list(model.parameters()), bad[step], step)
        if unscale_every and step % unscale_every == 0:
            scaler.unscale_(opt)
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        trace.append((scaler.get_scale(), _snapshot(model, opt)))
    return trace


def _twins(make_opt):
    model = _mlp()
    twin = copy.deepcopy(model)
    return model, make_opt(model.parameters()), twin, make_opt(twin.parameters())


def _grad_scaler(**kw):
    return torch.amp.GradScaler("cpu", **kw)


STEPPED = "stepped"     # what a _Reporting optimizer's step() returns (a stand-in for a closure's loss)


def _reporting(cls):
    """A subclass of optimizer class `cls` whose step() returns STEPPED, so the caller of scaler.step() sees
    from the return value whether the optimizer ran (torch's optimizers return None without a closure)."""
    class _Reporting(cls):
        def step(self, *args, **kwargs):
            super().step(*args, **kwargs)
            return STEPPED
    _Reporting.__name__ = f"Reporting{cls.__name__}"
    return _Reporting


def _changed(before, model) -> bool:
    """Whether every parameter moved since `before` (a list of parameter copies)."""
    return all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _unchanged(before, model) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


class _CountSyncs(TorchDispatchMode):
    """Counts device-to-host reads (.item(), bool(), float() all reach aten._local_scalar_dense)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


# Steps with an injected inf/NaN in a 30-step run: isolated, back to back, and a run of three.
BAD_STEPS = {1: "inf", 2: "nan", 7: "-inf", 13: "nan", 14: "inf", 15: "inf", 22: "nan"}


# ---- the core test: step by step against torch.amp.GradScaler ------------------------------------------
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("factors", [(2.0, 0.5, 2.0**10), (1.5, 0.3, 1000.0)], ids=["pow2", "odd-factors"])
def test_matches_grad_scaler_bitwise(optimizer, factors):
    growth, backoff, init = factors
    model, opt, ref_model, ref_opt = _twins(OPTIMIZERS[optimizer])
    data = _data(30)
    ours = _train(LossScaler(init_scale=init, growth_factor=growth, backoff_factor=backoff, growth_interval=3,
                             **NO_BOUNDS), model, opt, data, BAD_STEPS, unscale_every=4)
    ref = _train(_grad_scaler(init_scale=init, growth_factor=growth, backoff_factor=backoff, growth_interval=3),
                 ref_model, ref_opt, data, BAD_STEPS, unscale_every=4)
    scales = [s for s, _ in ours]
    assert scales == [s for s, _ in ref]
    moves = {"grew" if b > a else "backed off" for a, b in zip(scales, scales[1:]) if a != b}
    assert moves == {"grew", "backed off"}                     # the sequence exercises both directions
    for (_, a), (_, b) in zip(ours, ref):
        _assert_same(a, b)


def test_matches_grad_scaler_with_real_fp16_overflow():
    """FP16 autocast with a scale far too large: the backward overflows by itself until the scale backs off."""
    model, opt, ref_model, ref_opt = _twins(OPTIMIZERS["adamw"])
    data = _data(20)

    def run(scaler, model, opt):
        trace = []
        for x, y in data:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            before = [p.detach().clone() for p in model.parameters()]
            result = scaler.step(opt)
            scaler.update()
            trace.append((scaler.get_scale(), _snapshot(model, opt), result, _unchanged(before, model)))
        return trace

    scaler = LossScaler(init_scale=2.0**24, growth_interval=4, **NO_BOUNDS)
    ours = run(scaler, model, opt)
    ref = run(_grad_scaler(init_scale=2.0**24, growth_interval=4), ref_model, ref_opt)
    assert [s for s, *_ in ours] == [s for s, *_ in ref]
    assert [t[2] for t in ours] == [t[2] for t in ref] == [None] * len(data)   # AdamW returns None; so do both
    skipped = [t[3] for t in ours]
    assert sum(skipped) >= 3                                   # it really overflowed at the start
    assert scaler.num_skipped_steps == sum(skipped)            # the device counter saw every skip
    for a, b in zip(ours, ref):
        _assert_same(a[1], b[1])


# ---- hysteresis and bounds against hand-computed schedules ---------------------------------------------
# Steps 4, 6-9, 25, 26 overflow. init 8, x2 / x0.5, growth_interval 3, hysteresis 2, bounds [2, 32].
OVERFLOWS = {4, 6, 7, 8, 9, 25, 26}
# Megatron's rule (tracker refilled only on growth): 4 absorbed (h 2->1), 6 backs off (h 0), 7-9 back off
# again (h < 0) down to the floor 2, 9 is at the floor; growth every 3 clean steps from 12, capped at 32.
MEGATRON_SCHEDULE = [8, 8, 16, 16, 16, 8, 4, 2, 2, 2, 2, 4, 4, 4, 8, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32, 16]
# consecutive_hysteresis (refilled after each clean step): 4 and 6 absorbed, 7-9 back off 16 -> 2.
CONSECUTIVE_SCHEDULE = [8, 8, 16, 16, 16, 16, 8, 4, 2, 2, 2, 4, 4, 4, 8, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32, 16]


@pytest.mark.parametrize("consecutive, expected, at_min", [(False, MEGATRON_SCHEDULE, 1),
                                                          (True, CONSECUTIVE_SCHEDULE, 0)])
def test_hysteresis_and_bounds_follow_hand_computed_schedule(consecutive, expected, at_min):
    model = _mlp()
    opt = OPTIMIZERS["adamw"](model.parameters())
    scaler = LossScaler(init_scale=8.0, growth_interval=3, hysteresis=2, min_scale=2.0, max_scale=32.0,
                        consecutive_hysteresis=consecutive)
    bad = {step - 1: "inf" for step in OVERFLOWS}        # the schedule counts steps from 1
    before = _snapshot(model, opt)
    scales = []
    for step, (x, y) in enumerate(_data(len(expected))):
        opt.zero_grad()
        scaler.scale(F.mse_loss(model(x), y)).backward()
        if step in bad:
            _inject(list(model.parameters()), bad[step], step)
        skipped_before = scaler.num_skipped_steps
        result = scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        after = _snapshot(model, opt)
        assert result is None                            # AdamW's own return value, or a skip
        assert scaler.num_skipped_steps - skipped_before == (step in bad)
        if step in bad:
            _assert_same(before, after)                  # absorbed by hysteresis or not, the step is skipped
        else:
            assert not any(torch.equal(a, b) for a, b in zip(before[0], after[0]))   # the step ran
        before = after
    assert scales == expected
    assert scaler.num_skipped_steps == len(OVERFLOWS)
    assert scaler.num_overflows_at_min_scale == at_min


def test_grad_scaler_refuses_to_grow_into_inf_and_so_do_we():
    big = torch.finfo(torch.float32).max / 1.5
    for scaler in (LossScaler(init_scale=big, growth_interval=1, **NO_BOUNDS),
                   _grad_scaler(init_scale=big, growth_interval=1)):
        model = _mlp()
        opt = OPTIMIZERS["sgd"](model.parameters())
        x = torch.randn(4, 6)
        opt.zero_grad()
        scaler.scale(model(x).mean() * 1e-38).backward()     # tiny loss so the scaled grads stay finite
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == torch.tensor(big, dtype=torch.float32).item()


# ---- an inf/NaN at step k: skip that optimizer only, back off once, continue ---------------------------
@pytest.mark.parametrize("kind", ["inf", "nan"])
def test_injected_overflow_skips_only_the_affected_optimizer(kind):
    body, head = nn.Sequential(nn.Linear(6, 16), nn.Tanh()), nn.Linear(16, 3)
    opt_body = _reporting(torch.optim.AdamW)(body.parameters(), lr=1e-2)
    opt_head = _reporting(torch.optim.SGD)(head.parameters(), lr=0.05, momentum=0.9)
    scaler = LossScaler(init_scale=2.0**12, growth_interval=100)
    k = 3
    for step, (x, y) in enumerate(_data(6)):
        for opt in (opt_body, opt_head):
            opt.zero_grad()
        loss = F.mse_loss(head(body(x)), y)
        scaler.scale(loss).backward()
        if step == k:
            _inject(list(body.parameters()), kind, step)
        before_body, before_head = _snapshot(body, opt_body), _snapshot(head, opt_head)
        scale_before, skipped_before = scaler.get_scale(), scaler.num_skipped_steps
        ran_body, ran_head = scaler.step(opt_body), scaler.step(opt_head)
        scaler.update()
        assert ran_body == (None if step == k else STEPPED) and ran_head == STEPPED
        assert scaler.num_skipped_steps - skipped_before == (step == k)
        assert not any(torch.equal(a, b) for a, b in zip(before_head[0], _snapshot(head, opt_head)[0]))
        if step == k:
            _assert_same(before_body, _snapshot(body, opt_body))       # params and AdamW state untouched
            assert scaler.get_scale() == scale_before * 0.5            # one backoff
        else:
            assert not any(torch.equal(a, b) for a, b in zip(before_body[0], _snapshot(body, opt_body)[0]))
            assert scaler.get_scale() == scale_before
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in [*body.parameters(), *head.parameters()])
    assert scaler.num_skipped_steps == 1


def test_two_optimizers_two_losses_match_grad_scaler():
    """PyTorch's 'multiple' case: two losses sharing a graph, two optimizers, unscale_ on one of them."""
    def build():
        torch.manual_seed(1)
        body, head = nn.Sequential(nn.Linear(6, 16), nn.Tanh()), nn.Linear(16, 3)
        return body, head, torch.optim.SGD(body.parameters(), lr=0.05, momentum=0.9), \
            torch.optim.AdamW(head.parameters(), lr=1e-2)

    data = _data(12)

    def run(scaler):
        body, head, opt0, opt1 = build()
        trace = []
        for step, (x, y) in enumerate(data):
            opt0.zero_grad()
            opt1.zero_grad()
            hidden = body(x)
            out = head(hidden)
            losses = scaler.scale([F.mse_loss(out, y), out.pow(2).mean() + hidden.abs().mean()])
            assert isinstance(losses, list)
            torch.autograd.backward(losses)
            if step == 4:
                _inject(list(body.parameters()), "inf", step)    # only opt0 skips
            if step == 8:
                _inject(list(head.parameters()), "nan", step)    # only opt1 skips
            if step % 2:
                scaler.unscale_(opt0)
            scaler.step(opt0)
            scaler.step(opt1)
            scaler.update()
            trace.append((scaler.get_scale(), _snapshot(body, opt0), _snapshot(head, opt1)))
        return trace

    ours = run(LossScaler(init_scale=2.0**8, growth_interval=3, **NO_BOUNDS))
    ref = run(_grad_scaler(init_scale=2.0**8, growth_interval=3))
    assert [t[0] for t in ours] == [t[0] for t in ref]
    for a, b in zip(ours, ref):
        _assert_same(a[1], b[1])
        _assert_same(a[2], b[2])


def test_gradient_accumulation_matches_grad_scaler():
    model, opt, ref_model, ref_opt = _twins(OPTIMIZERS["adamw"])
    micro = [_data(3, batch=4) for _ in range(8)]

    def run(scaler, model, opt):
        trace = []
        for step, batches in enumerate(micro):
            opt.zero_grad()
            for i, (x, y) in enumerate(batches):
                scaler.scale(F.mse_loss(model(x), y) / len(batches)).backward()
                if (step, i) == (5, 1):
                    _inject(list(model.parameters()), "inf", step)   # then more accumulates on top of it
            scaler.step(opt)
            scaler.update()
            trace.append((scaler.get_scale(), _snapshot(model, opt)))
        return trace

    ours = run(LossScaler(init_scale=2.0**10, growth_interval=2, **NO_BOUNDS), model, opt)
    ref = run(_grad_scaler(init_scale=2.0**10, growth_interval=2), ref_model, ref_opt)
    assert [s for s, _ in ours] == [s for s, _ in ref]
    assert ours[5][0] == ours[4][0] / 2
    for a, b in zip(ours, ref):
        _assert_same(a[1], b[1])


def test_gradient_penalty_matches_grad_scaler():
    """PyTorch's gradient-penalty recipe: autograd.grad of the scaled loss, unscaled by hand, then a penalty."""
    model, opt, ref_model, ref_opt = _twins(OPTIMIZERS["adamw"])
    data = _data(8)

    def run(scaler, model, opt):
        trace = []
        for step, (x, y) in enumerate(data):
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            grads = torch.autograd.grad(scaler.scale(loss), list(model.parameters()), create_graph=True)
            inv_scale = 1.0 / scaler.get_scale()
            penalty = torch.stack([(g * inv_scale).pow(2).sum() for g in grads]).sum().sqrt()
            scaler.scale(loss + penalty).backward()
            if step == 3:
                _inject(list(model.parameters()), "inf", step)
            scaler.step(opt)
            scaler.update()
            trace.append((scaler.get_scale(), _snapshot(model, opt)))
        return trace

    ours = run(LossScaler(init_scale=2.0**10, growth_interval=2, **NO_BOUNDS), model, opt)
    ref = run(_grad_scaler(init_scale=2.0**10, growth_interval=2), ref_model, ref_opt)
    assert [s for s, _ in ours] == [s for s, _ in ref]
    for (_, a), (_, b) in zip(ours, ref):
        _assert_same(a, b)


def test_unscale_before_clipping_clips_the_true_gradients():
    model = _mlp()
    plain = copy.deepcopy(model)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    F.mse_loss(plain(x), y).backward()
    scaler = LossScaler(init_scale=2.0**14)
    scaler.scale(F.mse_loss(model(x), y)).backward()
    scaler.unscale_(model_opt := torch.optim.SGD(model.parameters(), lr=0.1))
    # A power-of-two scale commutes exactly with every linear step of the backward: unscaled == unscaled.
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), plain.parameters()))
    norm = nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    assert norm == nn.utils.clip_grad_norm_(plain.parameters(), 0.1)
    assert norm > 0.1                                          # so the clip did something
    scaler.step(model_opt)                                      # no second unscale: grads stay clipped
    torch.optim.SGD(plain.parameters(), lr=0.1).step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))


def test_clipping_after_unscale_matches_grad_scaler():
    model, opt, ref_model, ref_opt = _twins(OPTIMIZERS["sgd"])
    data = _data(12)
    ours = _train(LossScaler(init_scale=2.0**10, growth_interval=3, **NO_BOUNDS), model, opt, data,
                  {5: "inf"}, unscale_every=1, clip=0.05)
    ref = _train(_grad_scaler(init_scale=2.0**10, growth_interval=3), ref_model, ref_opt, data,
                 {5: "inf"}, unscale_every=1, clip=0.05)
    assert [s for s, _ in ours] == [s for s, _ in ref]
    for (_, a), (_, b) in zip(ours, ref):
        _assert_same(a, b)


# ---- guard rails (PyTorch's GradScaler errors) ---------------------------------------------------------
def _scaled_backward(scaler, model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.scale(model(torch.randn(4, 6)).pow(2).mean()).backward()
    return opt


def test_second_unscale_raises():
    scaler, model = LossScaler(), _mlp()
    opt = _scaled_backward(scaler, model)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) has already been called on this optimizer"):
        scaler.unscale_(opt)


def test_unscale_after_step_raises():
    scaler, model = LossScaler(), _mlp()
    opt = _scaled_backward(scaler, model)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) is being called after step\(\)"):
        scaler.unscale_(opt)


def test_second_step_raises_and_update_resets():
    scaler, model = LossScaler(), _mlp()
    opt = _scaled_backward(scaler, model)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match=r"step\(\) has already been called on this optimizer since the last"):
        scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    scaler.scale(model(torch.randn(4, 6)).pow(2).mean()).backward()
    scaler.unscale_(opt)          # a new iteration: allowed again
    before = [p.detach().clone() for p in model.parameters()]
    assert scaler.step(opt) is None                            # SGD's return value: it ran
    assert _changed(before, model)
    scaler.update()
    assert scaler.num_skipped_steps == 0


def test_closure_raises_when_enabled_and_runs_when_disabled():
    scaler, model = LossScaler(), _mlp()
    opt = _scaled_backward(scaler, model)
    closure = lambda: model(torch.randn(4, 6)).sum()              # noqa: E731
    with pytest.raises(RuntimeError, match="Closure use is not supported"):
        scaler.step(opt, closure=closure)
    with pytest.raises(RuntimeError, match="Closure use is not supported"):
        scaler.step(opt, closure)
    calls = []
    off = LossScaler(enabled=False)
    loss = torch.tensor(0.5)
    assert off.step(opt, closure=lambda: calls.append(1) or loss) is loss    # the closure's loss, via SGD.step
    assert calls == [1]


def test_fp16_gradients_raise():
    scaler, model = LossScaler(), _mlp().half()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.scale(model(torch.randn(4, 6, dtype=torch.float16)).float().pow(2).mean()).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(opt)
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.step(opt)


def test_methods_before_scale_and_update_without_step_raise():
    scaler, model = LossScaler(), _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for call in (lambda: scaler.unscale_(opt), lambda: scaler.step(opt), lambda: scaler.update()):
        with pytest.raises(RuntimeError, match=r"before scale\(\)"):
            call()
    scaler.scale(torch.randn(()))
    with pytest.raises(RuntimeError, match="no inf checks"):
        scaler.update()


@pytest.mark.parametrize("kwargs, bad", [
    (dict(init_scale=0.0), "init_scale"), (dict(init_scale=math.inf), "init_scale"),
    (dict(growth_factor=1.0), "growth_factor"), (dict(backoff_factor=1.0), "backoff_factor"),
    (dict(backoff_factor=0.0), "backoff_factor"), (dict(growth_interval=0), "growth_interval"),
    (dict(growth_interval=2.5), "growth_interval"), (dict(hysteresis=0), "hysteresis"),
    (dict(min_scale=-1.0), "min_scale"), (dict(max_scale=0.0), "max_scale"),
    (dict(init_scale=2.0**30), "init_scale"), (dict(init_scale=0.5), "init_scale"),
])
def test_bad_arguments_name_the_value(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        LossScaler(**kwargs)


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="process_group"):
        LossScaler(process_group="world")
    with pytest.raises(TypeError, match="scale"):
        LossScaler().scale(3.0)
    with pytest.raises(TypeError, match="scale"):
        LossScaler().scale([torch.randn(()), "loss"])
    with pytest.raises(TypeError, match="floating-point losses; got a torch.int64"):
        LossScaler().scale(torch.tensor(3))
    with pytest.raises(TypeError, match="Policy"):
        LossScaler.for_policy("fp16-mixed")


# ---- several losses, sparse gradients, update(new_scale) -----------------------------------------------
def test_scale_keeps_structure_and_multiplies_exactly():
    scaler = LossScaler(init_scale=2.0**5)
    a, b, c = torch.randn(()), torch.randn(3), torch.randn(2, dtype=torch.float16)
    out = scaler.scale((a, [b, (c,)]))
    assert isinstance(out, tuple) and isinstance(out[1], list) and isinstance(out[1][1], tuple)
    assert torch.equal(out[0], a * 32) and torch.equal(out[1][0], b * 32)
    assert out[1][1][0].dtype == torch.float16 and torch.equal(out[1][1][0], c * 32)


def test_sparse_fp16_gradient_is_coalesced_before_the_inf_check():
    # PyTorch's sparse case: duplicate indices whose sum overflows FP16 only once coalesced.
    param = nn.Parameter(torch.randn(4, 2).half())
    opt = torch.optim.SGD([param], lr=0.1)
    values = torch.tensor([[30000.0, 1.0], [40000.0, 2.0], [3.0, 4.0]], dtype=torch.float16)
    param.grad = torch.sparse_coo_tensor(torch.tensor([[0, 0, 2]]), values, (4, 2), check_invariants=True)
    found = _unscale_grads_(opt, torch.tensor(0.5), allow_fp16=True)
    assert found[torch.device("cpu")].item() == 1.0
    assert param.grad.is_coalesced()
    # Duplicates whose sum is finite: no inf, values unscaled.
    values = torch.randn(3, 2).half()
    param.grad = torch.sparse_coo_tensor(torch.tensor([[0, 0, 2]]), values, (4, 2), check_invariants=True)
    found = _unscale_grads_(opt, torch.tensor(0.25), allow_fp16=True)
    assert found[torch.device("cpu")].item() == 0.0
    expected = torch.sparse_coo_tensor(torch.tensor([[0, 0, 2]]), values, (4, 2), check_invariants=True).coalesce()._values() * 0.25
    assert torch.equal(param.grad._values(), expected)


def test_sparse_fp32_gradients_match_grad_scaler():
    def run(scaler):
        torch.manual_seed(3)
        emb = nn.Embedding(20, 4, sparse=True)
        opt = torch.optim.SGD(emb.parameters(), lr=0.1)
        trace = []
        for step in range(6):
            opt.zero_grad()
            idx = torch.randint(0, 20, (10,), generator=torch.Generator().manual_seed(step))
            scaler.scale(emb(idx).pow(2).sum()).backward()
            if step == 3:
                emb.weight.grad._values()[0, 0] = math.inf
            before = emb.weight.detach().clone()
            result = scaler.step(opt)
            scaler.update()
            trace.append((scaler.get_scale(), emb.weight.detach().clone(), result,
                          not torch.equal(before, emb.weight)))
        return trace

    scaler = LossScaler(init_scale=2.0**6, growth_interval=2, **NO_BOUNDS)
    ours, ref = run(scaler), run(_grad_scaler(init_scale=2.0**6, growth_interval=2))
    assert [t[0] for t in ours] == [t[0] for t in ref]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(ours, ref))
    assert [t[2] for t in ours] == [t[2] for t in ref] == [None] * 6
    assert [t[3] for t in ours] == [True, True, True, False, True, True]
    assert scaler.num_skipped_steps == 1


def test_update_with_new_scale():
    scaler, model = LossScaler(), _mlp()
    opt = _scaled_backward(scaler, model)
    scaler.step(opt)
    scaler.update(new_scale=3.0)
    assert scaler.get_scale() == 3.0
    opt = _scaled_backward(scaler, model)
    scaler.step(opt)
    scaler.update(new_scale=torch.tensor([5.0]))
    assert scaler.get_scale() == 5.0
    opt = _scaled_backward(scaler, model)
    scaler.step(opt)
    with pytest.raises(ValueError, match="new_scale"):
        scaler.update(new_scale=-1.0)
    with pytest.raises(ValueError, match="new_scale"):
        scaler.update(new_scale=torch.ones(2))


# ---- no host sync in the step path ---------------------------------------------------------------------
@pytest.mark.parametrize("optimizer, step_syncs", [("adamw-fused", 0), ("sgd-fused", 0), ("sgd", 1)])
def test_no_host_sync_in_the_step_path(optimizer, step_syncs):
    """scale/unscale_/update never read a device value; step reads found_inf once, and not at all for
    optimizers that skip on the device (torch's fused ones). Plain SGD itself reads nothing."""
    model = _mlp()
    opt = OPTIMIZERS[optimizer](model.parameters())
    scaler = LossScaler(init_scale=2.0**10, growth_interval=2, hysteresis=2, warn_interval=1000)
    for step, (x, y) in enumerate(_data(6)):
        opt.zero_grad()
        with _CountSyncs() as scale_syncs:
            loss = scaler.scale(F.mse_loss(model(x), y))
        loss.backward()
        if step in (2, 3):
            _inject(list(model.parameters()), "inf", step)
        with _CountSyncs() as other_syncs:
            if step % 2:
                scaler.unscale_(opt)
        before, skipped_before = [p.detach().clone() for p in model.parameters()], scaler.num_skipped_steps
        with _CountSyncs() as step_sync:
            result = scaler.step(opt)
        with _CountSyncs() as update_syncs:
            scaler.update()
        assert (scale_syncs.count, other_syncs.count, update_syncs.count) == (0, 0, 0)
        assert step_sync.count == step_syncs
        assert result is None                           # what SGD returns; a skip returns None too
        skipped = step in (2, 3)
        assert scaler.num_skipped_steps - skipped_before == skipped
        assert (_unchanged if skipped else _changed)(before, model)
    assert scaler.num_skipped_steps == 2


def test_fused_adamw_skips_on_device_and_keeps_state():
    model = _mlp()
    opt = OPTIMIZERS["adamw-fused"](model.parameters())
    scaler = LossScaler(init_scale=2.0**10)
    for step, (x, y) in enumerate(_data(4)):
        opt.zero_grad()
        scaler.scale(F.mse_loss(model(x), y)).backward()
        if step == 2:
            _inject(list(model.parameters()), "nan", step)
        before, skipped_before = _snapshot(model, opt), scaler.num_skipped_steps
        result = scaler.step(opt)
        scaler.update()
        if step == 2:
            _assert_same(before, _snapshot(model, opt))      # step counters undone by the fused kernel too
        else:
            assert not any(torch.equal(a, b) for a, b in zip(before[0], _snapshot(model, opt)[0]))
        assert result is None                                # what the fused AdamW returns, skipped or not
        assert scaler.num_skipped_steps - skipped_before == (step == 2)
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


# ---- what step() returns: opt.step()'s return value, None when skipped (GradScaler's convention) ---------
def _mixprec_adamw(params):
    from mixprec.optim import AdamW
    return AdamW(params, lr=1e-2, weight_decay=0.1)


def _reporting_mixprec_adamw(params):
    from mixprec.optim import AdamW
    return _reporting(AdamW)(params, lr=1e-2, weight_decay=0.1)


# (optimizer, skips on the device itself, what its step() returns when it runs)
RETURNING = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), False, None),
    "reporting-sgd": (lambda p: _reporting(torch.optim.SGD)(p, lr=0.05, momentum=0.9), False, STEPPED),
    "reporting-adamw": (lambda p: _reporting(torch.optim.AdamW)(p, lr=1e-2), False, STEPPED),
    "mixprec-adamw": (_mixprec_adamw, True, None),
    "reporting-mixprec-adamw": (_reporting_mixprec_adamw, True, STEPPED),
    "reporting-sgd-fused": (lambda p: _reporting(torch.optim.SGD)(p, lr=0.05, momentum=0.9, fused=True), True,
                            STEPPED),
}


@pytest.mark.parametrize("optimizer", list(RETURNING))
def test_step_returns_what_the_optimizer_returns_and_none_when_skipped(optimizer):
    """The plain path returns opt.step()'s value when it ran and None when skipped; an optimizer that skips on
    the device is always called, so its value comes back either way. Both as torch.amp.GradScaler does."""
    from mixprec.scaler import _takes_found_inf
    make, on_device, value = RETURNING[optimizer]
    model = _mlp()
    twin = copy.deepcopy(model)
    opt, ref_opt = make(model.parameters()), make(twin.parameters())
    assert _takes_found_inf(opt) == on_device
    scaler, ref = LossScaler(init_scale=2.0**10, **NO_BOUNDS), _grad_scaler(init_scale=2.0**10)
    bad = {1: "inf", 3: "nan"}
    for step, (x, y) in enumerate(_data(5)):
        results, skipped_before = [], scaler.num_skipped_steps
        for s, m, o in ((scaler, model, opt), (ref, twin, ref_opt)):
            o.zero_grad()
            s.scale(F.mse_loss(m(x), y)).backward()
            if step in bad:
                _inject(list(m.parameters()), bad[step], step)
            if step == 2:
                s.unscale_(o)                               # the unscaled stage takes the same paths
            before = [p.detach().clone() for p in m.parameters()]
            results.append(s.step(o))
            s.update()
            assert (_unchanged if step in bad else _changed)(before, m)
        expected = value if step not in bad or on_device else None
        assert results[0] == results[1] == expected, (step, results)
        assert scaler.num_skipped_steps - skipped_before == (step in bad)
    assert scaler.num_skipped_steps == len(bad)
    _assert_same(_snapshot(model, opt), _snapshot(twin, ref_opt))


@pytest.mark.parametrize("optimizer", ["sgd", "reporting-sgd", "mixprec-adamw", "reporting-mixprec-adamw"])
def test_disabled_step_returns_what_the_optimizer_returns(optimizer):
    make, _, value = RETURNING[optimizer]
    model = _mlp()
    opt = make(model.parameters())
    for scaler in (LossScaler(enabled=False), LossScaler.for_policy(Policy.from_recipe("fp32"))):
        opt.zero_grad()
        F.mse_loss(model(torch.randn(4, 6)), torch.randn(4, 3)).backward()
        before = [p.detach().clone() for p in model.parameters()]
        assert scaler.step(opt) == value
        scaler.update()
        assert _changed(before, model) and scaler.num_skipped_steps == 0


# ---- enabled=False, static scaling, BF16, min_scale warning --------------------------------------------
def test_disabled_is_a_pass_through():
    model = _mlp()
    twin = copy.deepcopy(model)
    opt, twin_opt = OPTIMIZERS["adamw"](model.parameters()), OPTIMIZERS["adamw"](twin.parameters())
    scaler = LossScaler(enabled=False)
    for x, y in _data(4):
        opt.zero_grad()
        twin_opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        assert scaler.scale(loss) is loss
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        scaler.unscale_(opt)
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
        assert scaler.step(opt) is None                             # AdamW's return value (the twin shows it ran)
        scaler.update()
        F.mse_loss(twin(x), y).backward()
        twin_opt.step()
        _assert_same(_snapshot(model, opt), _snapshot(twin, twin_opt))
    assert not scaler.is_enabled() and scaler.get_scale() == 1.0 and scaler.state_dict() == {}
    assert scaler.num_skipped_steps == 0
    scaler.load_state_dict({})                                  # no-op


def test_static_scale_never_moves_but_still_skips_and_counts():
    model = _mlp()
    opt = _reporting(torch.optim.SGD)(model.parameters(), lr=0.05, momentum=0.9)
    scaler = LossScaler(init_scale=2.0**8, growth_interval=2, dynamic=False)
    bad = {1: "inf", 4: "nan", 5: "inf"}
    for step, (x, y) in enumerate(_data(9)):
        opt.zero_grad()
        scaler.scale(F.mse_loss(model(x), y)).backward()
        if step in bad:
            _inject(list(model.parameters()), bad[step], step)
        before, skipped_before = _snapshot(model, opt), scaler.num_skipped_steps
        assert scaler.step(opt) == (None if step in bad else STEPPED)
        scaler.update()
        assert scaler.num_skipped_steps - skipped_before == (step in bad)
        if step in bad:
            _assert_same(before, _snapshot(model, opt))
        else:
            assert not any(torch.equal(a, b) for a, b in zip(before[0], _snapshot(model, opt)[0]))
        assert scaler.get_scale() == 256.0
    assert scaler.num_skipped_steps == 3
    assert scaler.num_overflows_at_min_scale == 3               # a static scale cannot back off
    assert not scaler.is_dynamic()


def test_bf16_loss_turns_scaling_off_with_one_notice():
    model = _mlp().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in _data(3):
            opt.zero_grad()
            loss = F.mse_loss(model(x.bfloat16()), y.bfloat16())
            assert scaler.scale(loss) is loss
            loss.backward()
            before = [p.detach().clone() for p in model.parameters()]
            assert scaler.step(opt) is None                      # SGD's return value
            scaler.update()
            assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    notices = [w for w in caught if "BF16 has FP32's exponent range" in str(w.message)]
    assert len(notices) == 1 and "the loss is bfloat16" in str(notices[0].message)
    assert not scaler.is_enabled()


def test_bf16_autocast_region_and_policy_turn_scaling_off():
    model = _mlp()
    scaler = LossScaler()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,)))   # FP32 under autocast
        with pytest.warns(UserWarning, match="bfloat16 autocast region"):
            assert scaler.scale(loss) is loss
    assert not scaler.is_enabled()
    with pytest.warns(UserWarning, match="BF16 has FP32's exponent range"):
        from_policy = LossScaler.for_policy(Policy.from_recipe("bf16-mixed", loss_scale="dynamic"))
    assert not from_policy.is_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # no notice when the policy asks for none
        assert not LossScaler.for_policy(Policy.from_recipe("bf16-mixed")).is_enabled()
        fp32 = LossScaler()
        fp32.scale(F.mse_loss(model(torch.randn(4, 6)), torch.randn(4, 3)))   # FP32 loss: scaling stays on
        assert fp32.is_enabled()


def test_for_policy():
    dynamic = LossScaler.for_policy(Policy.from_recipe("fp16-mixed"), hysteresis=2)
    assert dynamic.is_enabled() and dynamic.is_dynamic() and dynamic.get_scale() == 2.0**16
    assert dynamic.state_dict()["hysteresis"] == 2 and dynamic.get_growth_interval() == 2000
    assert not LossScaler.for_policy(Policy.from_recipe("fp32")).is_enabled()
    assert not LossScaler.for_policy(Policy.from_recipe("fp16-noscale")).is_enabled()
    static = LossScaler.for_policy(Policy.from_opt_level("O3"))          # apex O3: static scale 1
    assert static.is_enabled() and not static.is_dynamic() and static.get_scale() == 1.0
    static = LossScaler.for_policy(Policy(compute_dtype=torch.float16, loss_scale=128.0))
    assert not static.is_dynamic() and static.get_scale() == 128.0


def test_overflow_at_min_scale_warns_every_interval_and_counts():
    model = _mlp()
    opt = OPTIMIZERS["sgd"](model.parameters())
    scaler = LossScaler(init_scale=4.0, min_scale=1.0, growth_interval=1000, warn_interval=5)
    start = _snapshot(model, opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, (x, y) in enumerate(_data(10)):
            opt.zero_grad()
            scaler.scale(F.mse_loss(model(x), y)).backward()
            _inject(list(model.parameters()), "nan", step)
            scaler.step(opt)
            scaler.update()
    # Scale 4 -> 2 -> 1, then stuck at 1 from the third step on: 8 overflows at the floor.
    assert scaler.get_scale() == 1.0
    assert scaler.num_skipped_steps == 10 and scaler.num_overflows_at_min_scale == 8
    _assert_same(start, _snapshot(model, opt))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2                                    # checked at updates 5 and 10, not every step
    assert messages[0].startswith("LossScaler: 3 iteration(s)") and "min_scale=1" in messages[0]
    assert messages[1].startswith("LossScaler: 5 iteration(s)") and "(8 in all" in messages[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                           # recovered: no warning in the next window
        for x, y in _data(5):
            opt.zero_grad()
            scaler.scale(F.mse_loss(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()


# ---- state_dict ----------------------------------------------------------------------------------------
def test_state_dict_round_trip_equals_the_uninterrupted_run():
    kw = dict(init_scale=2.0**6, growth_interval=3, hysteresis=2, min_scale=4.0, max_scale=2.0**9)
    bad = {2: "inf", 3: "nan", 9: "inf", 10: "inf", 11: "inf", 12: "nan", 13: "inf", 14: "inf", 15: "nan", 20: "inf"}
    data = _data(24)
    model = _mlp()
    resume_model = copy.deepcopy(model)
    whole_scaler = LossScaler(**kw)
    whole = _train(whole_scaler, model, OPTIMIZERS["adamw"](model.parameters()), data, bad)

    first = LossScaler(**kw)
    resume_opt = OPTIMIZERS["adamw"](resume_model.parameters())
    part1 = _train(first, resume_model, resume_opt, data[:11], bad)
    saved = copy.deepcopy((first.state_dict(), resume_model.state_dict(), resume_opt.state_dict()))
    assert saved[0]["_hysteresis_tracker"] != kw["hysteresis"] and saved[0]["_growth_tracker"] == 0  # mid-state

    model2 = _mlp()
    model2.load_state_dict(saved[1])
    opt2 = OPTIMIZERS["adamw"](model2.parameters())
    opt2.load_state_dict(saved[2])
    second = LossScaler()                                        # defaults: everything comes from the state
    second.load_state_dict(saved[0])
    part2 = _train(second, model2, opt2, data[11:], bad, start=11)
    resumed = part1 + part2
    assert [s for s, _ in resumed] == [s for s, _ in whole]
    for (_, a), (_, b) in zip(resumed, whole):
        _assert_same(a, b)
    assert second.stats() == whole_scaler.stats()
    assert second.num_overflows_at_min_scale > 0                 # the counters travelled too


def test_state_dict_loads_after_first_scale_and_interoperates_with_grad_scaler():
    ours = LossScaler(init_scale=2.0**10, growth_interval=7)
    ours.scale(torch.randn(()))                                  # state already on the device
    handed_out = ours.scale_tensor
    ref = _grad_scaler(init_scale=2.0**3, growth_factor=3.0, backoff_factor=0.25, growth_interval=5)
    ours.load_state_dict(ref.state_dict())
    assert ours.scale_tensor is handed_out and handed_out.item() == 8.0      # refilled in place
    assert ours.get_scale() == 8.0 and ours.get_growth_factor() == 3.0 and ours.get_backoff_factor() == 0.25
    assert ours.get_growth_interval() == 5
    back = _grad_scaler()
    back.load_state_dict(ours.state_dict())
    assert back.state_dict() == ref.state_dict()
    with pytest.raises(RuntimeError, match="empty"):
        LossScaler().load_state_dict({})


def test_found_inf_from_several_devices_is_exactly_one():
    """torch's fused optimizers skip only when found_inf == 1.0, so per-device flags combine by max, not sum
    (two CPU keys stand in for two GPUs)."""
    from mixprec.scaler import _OptimizerState
    scaler = LossScaler()
    scaler.scale(torch.randn(()))
    state = _OptimizerState()
    scaler._record(state, {"cuda:0": torch.tensor(1.0), "cuda:1": torch.tensor(1.0)})
    assert state.found_inf.item() == 1.0
    param = nn.Parameter(torch.randn(5))
    param.grad = torch.randn(5)
    opt = torch.optim.AdamW([param], lr=0.1, fused=True)
    before = param.detach().clone()
    opt.grad_scale, opt.found_inf = None, state.found_inf
    opt.step()
    assert torch.equal(param, before)
