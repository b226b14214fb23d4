"""mixprec.optim.AdamW / Adam: the API, state layouts, checkpoints, loss-scaler inputs, bad input (CPU)."""
import copy
import math

import pytest
import torch

import mixprec.optim as mo
from mixprec.optim import blockwise, codes
from tolerances import OPTIM_BIAS_CORRECTION_RTOL, OPTIM_FP32_VS_TORCH_ATOL, OPTIM_FP32_VS_TORCH_RTOL

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: threads only contend


SHAPES = [(96, 80), (5000,), (33,), (64, 129)]  # >= 4096 elements (quantized) and small ones (FP32 state)


def _params(dtype=torch.float32, shapes=SHAPES):
    return [torch.nn.Parameter((torch.randn(s) * 0.5).to(dtype)) for s in shapes]


def _grads(params, gen):
    return [(torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype) for p in params]


def _run(opt, params, steps, seed, **step_kw):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p, g in zip(params, _grads(params, gen)):
            p.grad = g
        opt.step(**step_kw)


@pytest.mark.parametrize("cls,torch_cls,wd", [(mo.AdamW, torch.optim.AdamW, 0.1), (mo.Adam, torch.optim.Adam, 0.01)])
def test_fp32_state_matches_torch(cls, torch_cls, wd):
    a, b = _params(), _params()
    for x, y in zip(a, b):
        y.data.copy_(x.data)
    ours = cls(a, lr=1e-2, weight_decay=wd, state_dtype="fp32")
    ref = torch_cls(b, lr=1e-2, weight_decay=wd)
    _run(ours, a, 20, seed=1)
    _run(ref, b, 20, seed=1)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=OPTIM_FP32_VS_TORCH_RTOL, atol=OPTIM_FP32_VS_TORCH_ATOL)


def test_state_layouts_small_tensors_and_group_overrides():
    p8, p4, small = torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(4096)), \
        torch.nn.Parameter(torch.randn(4095))
    opt = mo.AdamW([{"params": [p8, small]}, {"params": [p4], "state_dtype": "int4"}], state_dtype="int8")
    for p in (p8, p4, small):
        p.grad = torch.randn_like(p)
    opt.step()
    s8, s4, ss = opt.state[p8], opt.state[p4], opt.state[small]
    assert s8["state_dtype"] == "int8" and s8["exp_avg_codes"].dtype == torch.uint8
    assert s8["exp_avg_codes"].numel() == 8192 and s8["exp_avg_absmax"].numel() == 32
    assert s4["state_dtype"] == "int4" and s4["exp_avg_sq_codes"].numel() == 2048  # two codes a byte
    assert s4["exp_avg_sq_absmax"].numel() == 4096 // 128
    assert ss["state_dtype"] == "fp32" and ss["exp_avg"].dtype == torch.float32  # under 4096 elements
    assert float(s8["step"]) == 1.0


@pytest.mark.parametrize("state_dtype,limit", [("int8", 2.05), ("fp8", 2.05), ("int4", 1.1), ("bf16", 4.0)])
def test_state_bytes_per_param_of_a_large_tensor(state_dtype, limit):
    p = torch.nn.Parameter(torch.randn(1024, 1024))
    opt = mo.AdamW([p], state_dtype=state_dtype)
    p.grad = torch.randn_like(p)
    opt.step()
    per_param = opt.state_bytes() / p.numel()
    assert per_param <= limit
    assert per_param == pytest.approx(codes.get_state_format(state_dtype).bytes_per_param())


@pytest.mark.parametrize("state_dtype,p_dtype,rounding", [
    ("fp32", torch.float32, "nearest"), ("bf16", torch.float32, "nearest"), ("int8", torch.float32, "nearest"),
    ("int4", torch.float32, "nearest"), ("fp8", torch.float32, "nearest"),
    ("int8", torch.bfloat16, "stochastic"), ("bf16", torch.bfloat16, "kahan"), ("int4", torch.float16, "stochastic"),
])
def test_checkpoint_continuation_is_bitwise(state_dtype, p_dtype, rounding):
    params = _params(p_dtype)
    opt = mo.AdamW(params, lr=1e-2, weight_decay=0.1, state_dtype=state_dtype, rounding=rounding, seed=5)
    _run(opt, params, 3, seed=1)
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    _run(opt, params, 4, seed=2)

    params2 = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = mo.AdamW(params2, lr=1e-2, weight_decay=0.1, state_dtype=state_dtype, rounding=rounding, seed=0)
    opt2.load_state_dict(saved)   # the seed comes back from the checkpoint
    _run(opt2, params2, 4, seed=2)
    for a, b in zip(params, params2):
        assert torch.equal(a, b)
    for a, b in zip(params, params2):
        sa, sb = opt.state[a], opt2.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_fp32_checkpoint_converts_into_8bit():
    params = _params()
    ref = torch.optim.AdamW(params, lr=1e-2)
    _run(ref, params, 3, seed=1)
    sd = copy.deepcopy(ref.state_dict())
    opt = mo.AdamW(params, lr=1e-2, state_dtype="int8")
    opt.load_state_dict(sd)
    for i, p in enumerate(params):
        st = opt.state[p]
        want_m, want_v = sd["state"][i]["exp_avg"], sd["state"][i]["exp_avg_sq"]
        if p.numel() >= 4096:
            assert st["state_dtype"] == "int8" and "exp_avg" not in st
            q, absmax = blockwise.quantize_blockwise(want_m, codes.INT8_M, 256)
            assert torch.equal(st["exp_avg_codes"], q) and torch.equal(st["exp_avg_absmax"], absmax)
            q, absmax = blockwise.quantize_blockwise(want_v, codes.INT8_V, 256)
            assert torch.equal(st["exp_avg_sq_codes"], q) and torch.equal(st["exp_avg_sq_absmax"], absmax)
        else:
            assert st["state_dtype"] == "fp32" and torch.equal(st["exp_avg"], want_m)
        assert float(st["step"]) == 3.0 and st["step"].dtype == torch.float32
    assert opt.param_groups[0]["state_dtype"] == "int8"
    _run(opt, params, 2, seed=2)  # and it keeps training
    assert float(opt.state[params[0]]["step"]) == 5.0

    # our own FP32-state checkpoint converts as well, in both directions
    opt32 = mo.AdamW(params, lr=1e-2, state_dtype="fp32")
    opt32.load_state_dict(copy.deepcopy(opt.state_dict()))
    m, _ = blockwise.dequantize_blockwise(opt.state[params[0]]["exp_avg_codes"], opt.state[params[0]]["exp_avg_absmax"],
                                          codes.INT8_M, 256, params[0].numel()), None
    assert torch.equal(opt32.state[params[0]]["exp_avg"].reshape(-1), m)


def test_found_inf_skips_everything_and_grad_scale_divides():
    params = _params()
    opt = mo.AdamW(params, lr=1e-2, state_dtype="int8")
    _run(opt, params, 2, seed=1)
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict())
    _run(opt, params, 1, seed=3, found_inf=torch.tensor(1.0), grad_scale=torch.tensor(8.0))
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    after = opt.state_dict()
    for i in state_before["state"]:
        for k, v in state_before["state"][i].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, after["state"][i][k]), k

    # grads scaled by 2**10 with grad_scale=2**10 give the same step as plain grads (power of two: exact)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = mo.AdamW(twin, lr=1e-2, state_dtype="int8")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    gen = torch.Generator().manual_seed(9)
    for p, q, g in zip(params, twin, _grads(params, gen)):
        p.grad, q.grad = g.clone(), g * 1024.0
    opt.step()
    opt2.step(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
    assert all(torch.equal(a, b) for a, b in zip(params, twin))


def test_torch_grad_scaler_drives_it():
    # torch.amp.GradScaler hands grad_scale/found_inf to optimizers with _step_supports_amp_scaling
    model = torch.nn.Linear(128, 64)
    opt = mo.AdamW(model.parameters(), lr=1e-2, state_dtype="int8")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    w0 = model.weight.detach().clone()
    x = torch.randn(32, 128)
    loss = model(x).square().mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(model.weight, w0)
    # an overflowing step is skipped without touching weights or the step count
    w1 = model.weight.detach().clone()
    loss = model(x).square().mean() * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(model.weight, w1) and float(opt.state[model.weight]["step"]) == 1.0
    assert scaler.get_scale() == 2.0 ** 11


def test_bad_input():
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match="state_dtype 'int3'; choose one of: fp32, bf16, int8, int4, fp8"):
        mo.AdamW([p], state_dtype="int3")
    with pytest.raises(ValueError, match="rounding 'up'; choose one of: nearest, stochastic, kahan"):
        mo.AdamW([p], rounding="up")
    with pytest.raises(ValueError, match="state_dtype 'int2'"):
        mo.AdamW([{"params": [p], "state_dtype": "int2"}])
    with pytest.raises(ValueError, match="backend 'cuda'"):
        mo.AdamW([p], backend="cuda")
    with pytest.raises(TypeError, match="complex"):
        mo.AdamW([torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))])
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = mo.AdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_pure_bf16_training_moves_with_stochastic_rounding_and_kahan():
    # the weight-decay case at unit scale: lr*wd = 1e-4 per step is under half a BF16 ulp of 1.0
    for rounding, moves in (("nearest", False), ("stochastic", True), ("kahan", True)):
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = mo.AdamW([p], lr=1e-3, weight_decay=0.1, rounding=rounding)
        for _ in range(100):
            p.grad = torch.zeros_like(p)
            opt.step()
        assert (p.float().mean().item() < 1.0) == moves, rounding


def test_mixprec_loss_scaler_drives_it():
    # mp.LossScaler hands its scale and found_inf to the optimizer, which divides and skips inside the update
    import mixprec as mp
    model = torch.nn.Linear(128, 64)
    twin = torch.nn.Linear(128, 64)
    twin.load_state_dict(model.state_dict())
    opt = mo.AdamW(model.parameters(), lr=1e-2, state_dtype="int8")
    ref = mo.AdamW(twin.parameters(), lr=1e-2, state_dtype="int8")
    scaler = mp.LossScaler(init_scale=2.0 ** 12)
    x = torch.randn(32, 128)
    scaler.scale(model(x).square().mean()).backward()
    scaler.step(opt)
    scaler.update()
    twin(x).square().mean().backward()
    ref.step()
    assert scaler.num_skipped_steps == 0
    # the scale is a power of two, so unscaling inside the update is exact: the same step as unscaled grads
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    # an overflow: nothing moves, the step count stays, the scale backs off
    w = model.weight.detach().clone()
    codes_before = opt.state[model.weight]["exp_avg_codes"].clone()
    scaler.scale(model(x).square().mean() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.num_skipped_steps == 1
    assert torch.equal(model.weight, w) and float(opt.state[model.weight]["step"]) == 1.0
    assert torch.equal(opt.state[model.weight]["exp_avg_codes"], codes_before)
    assert scaler.get_scale() == 2.0 ** 11


@pytest.mark.parametrize("state_dtype", ["int8", "int4"])
def test_works_under_core_master_weights(state_dtype):
    # BF16 model, FP32 masters (mp.MasterWeights): the low-bit AdamW steps the masters exactly as it steps
    # an FP32 copy of the model given the same (upcast) gradients, and the model gets the masters, rounded.
    import mixprec as mp
    torch.manual_seed(3)
    half = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).bfloat16()
    fp32 = copy.deepcopy(half).float()   # the masters' starting values
    opt = mp.MasterWeights(mo.AdamW(half.parameters(), lr=1e-2, weight_decay=0.1, state_dtype=state_dtype))
    ref = mo.AdamW(fp32.parameters(), lr=1e-2, weight_decay=0.1, state_dtype=state_dtype)
    for _ in range(3):
        x = torch.randn(16, 64)
        half(x.bfloat16()).float().square().mean().backward()
        for m, q in zip(mp.master_params(opt), fp32.parameters()):
            q.grad = m.grad.clone()
        opt.step()
        ref.step()
        opt.zero_grad(set_to_none=True)
        for m, q, p in zip(mp.master_params(opt), fp32.parameters(), half.parameters()):
            assert torch.equal(m, q)
            assert torch.equal(p, q.detach().to(torch.bfloat16))
    assert opt.optimizer.state[next(iter(mp.master_params(opt)))]["state_dtype"] == state_dtype  # quantized


def test_bias_correction_is_accurate_where_one_minus_beta_power_cancels():
    from mixprec.optim.reference import one_minus_exp
    t = torch.cat([torch.arange(1, 2001), torch.randint(2001, 10 ** 6, (4000,))]).float()
    for beta in (0.9, 0.95, 0.99, 0.999, 0.9999):
        x = t * torch.tensor(math.log(beta), dtype=torch.float32)
        exact = -torch.expm1(x.double())           # of the FP32 argument: the series' own error only
        got = one_minus_exp(x).double()
        assert ((got - exact).abs() / exact).max().item() <= OPTIM_BIAS_CORRECTION_RTOL, beta
        # the naive 1 - exp(x) fails the bar at beta = 0.999 (1 - 0.999 cancels 10 bits)
        if beta == 0.999:
            naive = (1.0 - torch.exp(x)).double()
            assert ((naive - exact).abs() / exact).max().item() > 100 * OPTIM_BIAS_CORRECTION_RTOL
