"""StabilityGuard (CPU): a skip equals never having seen the batch, NaN never reaches the optimizer state or the
windows, the sigma rule and ZClip fire where a plain reference says, SPAM's reset, lower_lr, abort, the loss
scaler's overflows stay the scaler's, the embedding gradient shrink, and torch.compile."""
import math
import statistics
from collections import deque

import pytest
import torch
import torch.nn.functional as F

import mixprec as mp
from helpers import MLP, TinyGPT, regression_task
from mixprec.stability import Rung, StabilityAbort, StabilityGuard, ZClip, shrink_embedding_grad

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: threads only contend

X, Y = regression_task()


BAD = 9            # the batch made to spike (after the warm-up of a window of 8)


def _batch(step, spike=False):
    i = torch.arange(step * 16, step * 16 + 16) % len(X)
    f = 1e3 if spike else 1.0   # inputs and targets x1e3: the MLP's LayerNorm alone would undo scaled inputs
    return X[i] * f, Y[i] * f


def _optimizer(kind, params):
    if kind == "torch":                  # foreach, no found_inf: the select path
        return torch.optim.AdamW(params, lr=1e-3)
    if kind == "torch-fused":            # skips in its kernel through found_inf
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    if kind == "masters":                # BF16 parameters, FP32 masters stepped by a foreach AdamW
        return mp.MasterWeights(torch.optim.AdamW(params, lr=1e-3))
    return mp.optim.AdamW(params, lr=1e-3, state_dtype="int8")   # fc2 (4096 elements) holds int8 codes


def _state_tensors(opt):
    return [(k, v) for st in opt.state.values() for k, v in sorted(st.items()) if isinstance(v, torch.Tensor)]


def _assert_same(m1, o1, m2, o2):
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(mp.master_params(o1), mp.master_params(o2)):   # the FP32 masters under MasterWeights
        assert torch.equal(a, b)
    s1, s2 = _state_tensors(o1), _state_tensors(o2)
    assert [k for k, _ in s1] == [k for k, _ in s2] and s1
    for (k, a), (_, b) in zip(s1, s2):
        assert a.dtype == b.dtype and torch.equal(a, b), k


def _train(kind, recipe, steps, *, spike_at=None, drop=None, guard=True, nan_at=None, **guard_kw):
    torch.manual_seed(0)
    policy = mp.Policy.from_recipe(recipe)
    model = mp.prepare(MLP(), policy)
    opt = _optimizer(kind, model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(getattr(opt, "optimizer", opt), lambda s: 1.0 / (1 + s))
    scaler = mp.LossScaler(growth_interval=3) if recipe == "fp16-mixed" else None
    kw = dict(window=8, snapshot_every=0, ladder=("skip",), scheduler=sched) | guard_kw
    g = StabilityGuard(model, opt, **kw) if guard else None
    for step in range(steps):
        if step == drop:
            continue
        x, y = _batch(step, spike=step == spike_at)
        with mp.autocast(policy):
            loss = F.mse_loss(model(x), y)
        (scaler.scale(loss) if scaler else loss).backward()
        if step == nan_at:
            model.fc2.weight.grad[3, 5] = math.nan
        if g is not None:
            g.step(loss, scaler=scaler, batch=step)
        else:
            if scaler:
                scaler.unscale_(opt)
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
        opt.zero_grad()
    if g is not None:
        g.flush()
    return model, opt, sched, scaler, g


@pytest.mark.parametrize("kind,recipe", [("torch", "fp32"), ("torch-fused", "fp32"), ("mixprec-int8", "fp32"),
                                         ("torch", "fp16-mixed"), ("mixprec-int8", "fp16-mixed"),
                                         ("masters", "bf16-true")])
def test_skip_equals_a_run_that_never_saw_the_batch(kind, recipe):
    m1, o1, s1, sc1, guard = _train(kind, recipe, 12, spike_at=BAD)
    m2, o2, s2, sc2, _ = _train(kind, recipe, 12, drop=BAD, guard=False)
    _assert_same(m1, o1, m2, o2)   # parameters, moments (int8 codes and scales), step counts
    assert s1.state_dict() == s2.state_dict() and o1.param_groups[0]["lr"] == o2.param_groups[0]["lr"]
    if sc1 is not None:            # scale, growth and hysteresis trackers, overflow counters
        assert sc1.state_dict() == sc2.state_dict()
    assert [e["step"] for e in guard.events] == [BAD] and guard.events[0]["action"] == "skip"
    assert "loss_spike" in guard.events[0]["cause"] and guard.skip_list == [BAD]
    assert guard.counters["skipped"] == 1 and guard.counters["applied"] == 11


@pytest.mark.parametrize("kind", ["torch", "torch-fused", "mixprec-int8"])
def test_nan_gradient_leaves_no_nan_in_the_optimizer_state(kind):
    model, opt, _, _, guard = _train(kind, "bf16-mixed", 5, nan_at=3)
    for _, t in _state_tensors(opt):
        assert not (t.is_floating_point() and not torch.isfinite(t).all())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [(e["step"], e["cause"]) for e in guard.events] == [(3, "nonfinite_grad")]
    assert all(torch.isfinite(w).all() for w in guard.window.values())
    if kind == "torch":   # plain torch AdamW applies it: the moments (and the parameter) go NaN
        model, opt, _, _, _ = _train(kind, "bf16-mixed", 5, nan_at=3, guard=False)
        assert torch.isnan(opt.state[model.fc2.weight]["exp_avg"]).any()
        assert torch.isnan(model.fc2.weight).any()


class _Probe:
    """One parameter whose gradient and loss each step are given: the guard's decisions laid bare."""

    def __init__(self, **guard_kw):
        self.p = torch.nn.Parameter(torch.zeros(4))
        self.opt = torch.optim.SGD([self.p], lr=0.0)
        self.guard = StabilityGuard(torch.nn.ParameterList([self.p]), self.opt, snapshot_every=0, **guard_kw)

    def step(self, loss, norm):
        self.p.grad = torch.tensor([norm, 0.0, 0.0, 0.0])
        self.guard.step(loss, batch=self.guard.iteration)
        return self.p.grad[0].item()


def test_the_window_never_holds_a_non_finite_value():
    probe = _Probe(window=4, ladder=("skip",))
    values = [(1.0, 1.0), (math.nan, 1.0), (1.1, math.inf), (math.inf, math.nan), (0.9, 1.2), (-math.inf, 1.0),
              (1.0, 0.9), (1.2, 1.1), (1.05, 1.0)]
    for loss, norm in values:
        probe.step(loss, norm)
    probe.guard.flush()
    window = probe.guard.window
    assert window["loss"].tolist() == pytest.approx([0.9, 1.0, 1.2, 1.05])      # the last 4 clean steps
    assert window["grad_norm"].tolist() == pytest.approx([1.2, 0.9, 1.1, 1.0])
    assert all(torch.isfinite(w).all() for w in window.values())
    assert [e["step"] for e in probe.guard.events] == [1, 2, 3, 5]


def _reference_sigma(losses_norms, sigma, window, warmup):
    """OLMo-core's rule, written plainly: faulty steps, with the windows of clean values."""
    wl, wn, faults = deque(maxlen=window), deque(maxlen=window), []
    for step, (loss, norm) in enumerate(losses_norms):
        def spike(x, w):
            return len(w) >= warmup and x - statistics.fmean(w) > sigma * statistics.stdev(w)
        bad = not (math.isfinite(loss) and math.isfinite(norm)) or spike(loss, wl) or spike(norm, wn)
        if bad:
            faults.append(step)
        else:
            wl.append(loss)
            wn.append(norm)
    return faults


def test_sigma_rule_fires_where_the_reference_says():
    sigma, window, warmup = 3.0, 12, 6
    gen = torch.Generator().manual_seed(1)
    wl, wn, seq = deque(maxlen=window), deque(maxlen=window), []
    # Values placed against the reference's own window: 2.8 sigma (no spike) and 3.2 sigma (spike) on either
    # signal, a big spike inside the warm-up (not called), a NaN loss; the rest noise around 2 and 1.
    special = {3: ("loss", 50.0), 14: ("loss", 2.8), 17: ("loss", 3.2), 21: ("norm", 2.8), 24: ("norm", 3.2),
               27: ("both", 3.2), 30: ("nan", 0), 33: ("norm", 40.0)}
    for step in range(40):
        loss = 2.0 + 0.1 * torch.randn((), generator=gen).item()
        norm = 1.0 + 0.05 * torch.randn((), generator=gen).item()
        kind, z = special.get(step, (None, 0))
        if kind in ("loss", "both"):
            loss = statistics.fmean(wl) + z * statistics.stdev(wl) if len(wl) >= 2 else 2.0 * z
        if kind in ("norm", "both"):
            norm = statistics.fmean(wn) + z * statistics.stdev(wn)
        if kind == "nan":
            loss = math.nan
        seq.append((loss, norm))
        clean = _reference_sigma(seq, sigma, window, warmup)[-1:] != [step]
        if clean:
            wl.append(loss)
            wn.append(norm)
    expected = _reference_sigma(seq, sigma, window, warmup)
    assert {17, 24, 27, 30, 33} <= set(expected) and not {3, 14, 21} & set(expected)   # and noise's own
    probe = _Probe(sigma=sigma, window=window, warmup=warmup, ladder=("skip",))
    for loss, norm in seq:
        probe.step(loss, norm)
    probe.guard.flush()
    assert [e["step"] for e in probe.guard.events] == expected
    causes = {e["step"]: e["cause"] for e in probe.guard.events}
    assert len(expected) >= 6   # the noise crossed 3 sigma by itself too (step 13)
    assert causes[17] == "loss_spike" and causes[24] == "grad_norm_spike" and causes[30] == "nonfinite_loss"
    assert causes[27] == "loss_spike+grad_norm_spike"


def _reference_zclip(norms, cfg):
    """ZClip written plainly: the clipped norm of each step (None: not clipped), and the final (mean, var)."""
    buf, mean, var, out = [], None, None, []
    for g in norms:
        if mean is None:
            buf.append(g)
            out.append(None)
            if len(buf) == cfg.warmup:
                mean = sum(buf) / cfg.warmup
                var = sum((b - mean) ** 2 for b in buf) / cfg.warmup
            continue
        std = var ** 0.5
        z = (g - mean) / (std + cfg.eps)
        eff = mean + cfg.z_thresh * std if z > cfg.z_thresh else g
        out.append(eff if z > cfg.z_thresh else None)
        mean = cfg.alpha * mean + (1 - cfg.alpha) * eff
        var = cfg.alpha * var + (1 - cfg.alpha) * (eff - mean) ** 2
    return out, (mean, var)


def test_zclip_fires_where_the_reference_says():
    cfg = ZClip(z_thresh=2.5, alpha=0.9, warmup=5)
    gen = torch.Generator().manual_seed(2)
    norms = []
    for step in range(30):
        g = 1.0 + 0.1 * torch.randn((), generator=gen).item()
        if step in (8, 15, 16, 22, 26):      # z = 2.3 (kept) or 2.7 (clipped) against the reference's EMA
            mean, var = _reference_zclip(norms, cfg)[1]
            g = mean + (2.7 if step != 15 else 2.3) * var ** 0.5
        if step == 3:
            g = 9.0                          # inside the warm-up: not clipped
        norms.append(g)
    expected = _reference_zclip(norms, cfg)[0]
    assert [i for i, e in enumerate(expected) if e is not None] == [8, 16, 22, 26]
    probe = _Probe(signals=("grad_norm",), sigma=1e6, zclip=cfg, ladder=("skip",))
    got = [probe.step(1.0, g) for g in norms]
    probe.guard.flush()
    assert [r["step"] for r in probe.guard.history if r["clipped"]] == [8, 16, 22, 26]
    for g, e, out in zip(norms, expected, got):
        assert out == pytest.approx(g if e is None else e, rel=1e-5)   # FP32 on the device vs FP64 here
    assert probe.guard.events == []   # clipping is not a fault


def test_clip_rung_and_max_norm_share_the_guards_norm():
    probe = _Probe(window=6, sigma=3.0, ladder=("clip", "skip"), escalate_after=1, max_norm=5.0)
    got = [probe.step(1.0, 1.0 + 0.01 * (i % 3)) for i in range(6)] + [probe.step(1.0, 4.0), probe.step(1.0, 7.0)]
    probe.guard.flush()
    ev = probe.guard.events
    assert [(e["step"], e["action"]) for e in ev] == [(6, "clip"), (7, "skip")]   # a run of 2 reaches skip
    w = torch.tensor([1.0 + 0.01 * (i % 3) for i in range(6)])
    assert got[6] == pytest.approx((w.mean() + 3.0 * w.std()).item(), rel=1e-5)   # clipped to the threshold
    assert probe.guard.history[6]["skipped"] is False and probe.guard.history[7]["skipped"] is True
    probe.step(1.0, 6.0)
    probe.guard.flush()
    assert probe.guard.events[-1]["step"] == 8 and probe.guard.events[-1]["action"] == "skip"


def test_reset_rung_zeroes_the_state_of_the_parameters_that_spiked():
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = StabilityGuard(model, opt, window=8, ladder=("reset",), snapshot_every=0)
    for step in range(10):
        x, y = _batch(step)
        F.mse_loss(model(x), y).backward()
        if step == 9:
            before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
            model.fc1.weight.grad.mul_(1e4)      # this parameter's gradient spikes, the others do not
            params = {id(p): p.clone() for p in model.parameters()}
        guard.step(1.0, batch=step)
        opt.zero_grad()
    guard.flush()
    assert guard.events[-1]["action"] == "reset" and guard.events[-1]["step"] == 9
    for p in model.parameters():
        assert torch.equal(p, params[id(p)])                         # the step was skipped
        for k, v in opt.state[p].items():
            expect = torch.zeros_like(v) if p is model.fc1.weight else before[id(p)][k]
            assert torch.equal(v, expect), k                          # moments and step count reset (SPAM)


def test_lower_lr_rung_lowers_the_lr_for_n_steps_from_the_next_step():
    probe = _Probe(window=4, ladder=(Rung(action="lower_lr", lr_factor=0.5, lr_steps=2),))
    probe.opt.param_groups[0]["lr"] = 0.1
    deltas = []
    for step in range(10):
        before = probe.p[0].item()
        probe.step(1.0, 50.0 if step == 5 else 1.0)
        deltas.append(round(before - probe.p[0].item(), 6))
    # The fault's record arrives at step 6 (one step late): steps 6 and 7 at lr 0.05; step 5 not applied.
    assert deltas == [0.1] * 5 + [0.0, 0.05, 0.05, 0.1, 0.1]
    assert probe.opt.param_groups[0]["lr"] == 0.1


def test_abort_after_the_ladder_runs_out():
    probe = _Probe(window=4, ladder=("skip", Rung(action="abort", after=3)))
    for step in range(3):
        probe.step(1.0, 1.0)
    with pytest.raises(StabilityAbort, match=r"abort rung was reached\. 3 faulty step\(s\) in a row"):
        for _ in range(5):
            probe.step(math.nan, 1.0)
    assert probe.guard.iteration == 6   # raised at the start of the step after the third NaN


def test_fp16_overflow_is_the_scalers_skip_not_a_spike():
    torch.manual_seed(0)
    policy = mp.Policy.from_recipe("fp16-mixed")
    model = mp.prepare(MLP(), policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = mp.LossScaler()
    guard = StabilityGuard(model, opt, window=4, ladder=("skip",), snapshot_every=0)
    for step in range(8):
        x, y = _batch(step)
        with mp.autocast(policy):
            loss = F.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if step == 6:
            model.fc3.weight.grad[0, 0] = math.inf     # an FP16 overflow: the scaler backs off and skips
        guard.step(loss, scaler=scaler, batch=step)
        opt.zero_grad()
    guard.flush()
    assert guard.events == [] and guard.skip_list == []
    assert scaler.get_scale() == 2.0**15 and scaler.num_skipped_steps == 1
    assert [r["overflow"] for r in guard.history] == [False] * 6 + [True, False]
    assert guard.window["loss"].numel() == 4 and guard.counters["overflows"] == 1


def test_embedding_shrink_scales_only_the_embedding_gradient():
    idx = torch.randint(0, 64, (2, 16))
    models = []
    for alpha in (None, 0.5, 0.1):
        torch.manual_seed(0)
        model = TinyGPT()
        handle = shrink_embedding_grad(model.tok, alpha=alpha) if alpha else None
        out = model(idx)
        out.square().mean().backward()
        models.append((model, out, handle))
    (ref, ref_out, _), (half, half_out, handle), (tenth, tenth_out, _) = models
    assert torch.equal(half_out, ref_out) and torch.equal(tenth_out, ref_out)    # the forward is untouched
    # alpha = 0.5 is a power of two: the scaled gradient is exact, whatever the order of the sums
    assert torch.equal(half.tok.weight.grad, 0.5 * ref.tok.weight.grad)
    torch.testing.assert_close(tenth.tok.weight.grad, 0.1 * ref.tok.weight.grad, rtol=1e-6, atol=0)
    for (name, a), b in zip(ref.named_parameters(), half.parameters()):
        if name != "tok.weight":
            assert torch.equal(a.grad, b.grad), name
    handle.remove()
    half.zero_grad()
    half(idx).square().mean().backward()
    assert torch.equal(half.tok.weight.grad, ref.tok.weight.grad)
    with pytest.raises(ValueError, match="alpha must be in"):
        shrink_embedding_grad(ref.tok, alpha=0.0)


def test_embedding_clip_is_apart_from_the_total():
    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = StabilityGuard(model, opt, embedding_max_norm=1e-3, snapshot_every=0, ladder=("skip",))
    model(torch.randint(0, 64, (2, 16))).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    guard.step(1.0)
    emb = torch.linalg.vector_norm(torch.stack([grads["tok.weight"].norm(), grads["pos.weight"].norm()]))
    for name, p in model.named_parameters():
        factor = 1e-3 / (emb.item() + 1e-6) if name in ("tok.weight", "pos.weight") else 1.0
        torch.testing.assert_close(p.grad, grads[name] * factor, rtol=1e-6, atol=0)


def test_the_guard_adds_no_graph_break_to_a_compiled_model():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyGPT(layers=1)
    shrink_embedding_grad(model.tok, alpha=0.1)
    compiled = torch.compile(model, fullgraph=True, backend="eager")   # fullgraph: a break would raise
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = StabilityGuard(model, opt, window=4, ladder=("skip",), snapshot_every=0)
    from torch._dynamo.utils import counters
    counters.clear()
    for step in range(2):
        idx = torch.randint(0, 64, (2, 16))
        loss = F.cross_entropy(compiled(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        guard.step(loss, batch=step)
        opt.zero_grad()
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(ladder=("skip", "explode")), "Unknown ladder action 'explode'; choose one of: clip, skip"),
    (dict(ladder=(Rung(action="skip", after=2),)), "first rung must act on the first faulty step"),
    (dict(ladder=("skip", Rung(action="rollback", after=1))), "increasing run lengths"),
    (dict(ladder=("skip", "rollback"), snapshot_every=0), "snapshot_every=0 takes no snapshots"),
    (dict(window=8, warmup=9), r"warmup \(9\) cannot exceed window \(8\)"),
    (dict(signals=("loss", "lr")), "Unknown signal 'lr'"),
    (dict(sigma=-1), "sigma must be a positive finite number"),
    (dict(zclip="yes"), "zclip must be None, a z threshold"),
])
def test_bad_settings_name_the_choices(kwargs, match):
    model = MLP()
    with pytest.raises((ValueError, TypeError), match=match):
        StabilityGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_a_fault_on_another_rank_skips_this_one(monkeypatch):
    """process_group: the fault flags are all-reduced with MAX; here the other rank is played by the reduction."""
    import torch.distributed as dist
    calls = []

    def all_reduce(tensor, op=None, group=None):
        assert op == dist.ReduceOp.MAX and group is None
        calls.append(tensor.clone())
        if len(calls) == 7:                  # the peer's loss spiked at step 6
            tensor.copy_(torch.maximum(tensor, torch.tensor([1.0, 1.0])))
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    probe = _Probe(window=4, ladder=("skip",), process_group="default")
    deltas = []
    probe.opt.param_groups[0]["lr"] = 0.1
    for step in range(9):
        before = probe.p[0].item()
        probe.step(1.0 + 0.01 * step, 1.0)
        deltas.append(before != probe.p[0].item())
    probe.guard.flush()
    assert len(calls) == 9 and all(c.tolist() == [0.0, 1.0] for c in calls)   # locally: no fault, not clippable
    assert deltas == [True] * 6 + [False, True, True]
    assert [(e["step"], e["cause"], e["action"]) for e in probe.guard.events] == [(6, "other_rank", "skip")]


def test_per_group_norms_catch_a_spike_the_total_hides():
    small, large = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": [small]}, {"params": [large]}], lr=0.0)
    gen = torch.Generator().manual_seed(3)
    for per_group in (False, True):
        guard = StabilityGuard(torch.nn.ParameterList([small, large]), opt, window=8, per_group=per_group,
                               ladder=("skip",), snapshot_every=0, signals=("grad_norm",))
        for step in range(10):
            noise = 1 + 0.01 * torch.randn(2, generator=gen)
            small.grad = torch.full((3,), 0.01 * noise[0].item() * (100 if step == 8 else 1))   # 0.017 -> 1.7
            large.grad = torch.full((3,), 10.0 * noise[1].item())                              # 17: the total
            guard.step(None, batch=step)
        guard.flush()
        assert [(e["step"], e["cause"]) for e in guard.events] == ([(8, "group_norm_spike")] if per_group else [])
        assert len(guard.history[-1].get("group_norms", [0, 0])) == 2


def test_fused_statistics_equal_the_eager_ones():
    """fuse=True (the CUDA default) compiles the per-step arithmetic; on a ladder that clips, resets and skips,
    with ZClip, per-group norms and max_norm, it decides, records and trains exactly as the eager kernels do."""
    def run(fuse):
        kw = dict(window=8, ladder=("clip", Rung(action="reset", after=2), Rung(action="skip", after=3)), zclip=2.5,
                  per_group=True, max_norm=5.0, fuse=fuse)
        with _no_warning():
            model, opt, *_, guard = _train("torch", "fp32", 16, spike_at=BAD, nan_at=12, **kw)
        return model, opt, guard

    m1, o1, eager = run(False)
    m2, o2, fused = run(True)
    assert fused._fuse and set(fused._compiled) == {"verdict", "commit"}   # compiled, not fallen back
    assert [(e["step"], e["cause"], e["action"]) for e in fused.events] == \
        [(e["step"], e["cause"], e["action"]) for e in eager.events] and len(eager.events) >= 2
    for a, b in zip(eager.history, fused.history):
        assert a.keys() == b.keys()
        for k in a:   # the same FP32 arithmetic; reductions may associate differently: 1e-6 relative
            assert a[k] == (b[k] if b[k] is None or isinstance(b[k], bool) else pytest.approx(b[k], rel=1e-6,
                                                                                               nan_ok=True)), k
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fused_statistics_fall_back_to_eager_when_compiling_fails(monkeypatch):
    def broken_compile(fn, **kwargs):
        def call(*args):
            raise torch._dynamo.exc.TorchDynamoException("no C++ compiler")
        return call
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="compiling its per-step statistics failed"):
        *_, fused = _train("torch", "fp32", 12, spike_at=BAD, fuse=True)
    *_, eager = _train("torch", "fp32", 12, spike_at=BAD, fuse=False)
    assert not fused._fuse and [e["step"] for e in fused.events] == [e["step"] for e in eager.events] == [BAD]


class _no_warning:
    """Fails the block if a RuntimeWarning (the guard's fall-back from compiling) was raised in it."""

    def __enter__(self):
        import warnings
        self._catch = warnings.catch_warnings(record=True)
        self._caught = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [w for w in self._caught if issubclass(w.category, RuntimeWarning)], self._caught
