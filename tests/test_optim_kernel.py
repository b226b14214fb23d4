"""The fused Triton AdamW kernel against the pure-PyTorch reference on the CPU (GPU: marked cuda).

Codes, block scales, step counts and FP32/BF16 moments must be equal bit for bit; parameters agree to
FP32 rounding (the bias corrections of late steps use the GPU's approximate exp), which on BF16/FP16
parameters may flip a rounding decision on rare elements.
"""
import copy

import pytest
import torch

import mixprec.optim as mo
from mixprec.optim import _launcher as kernels
from tolerances import OPTIM_KERNEL_FLIP_FRACTION, OPTIM_KERNEL_PARAM_ATOL, OPTIM_KERNEL_PARAM_RTOL
from triton_interpreter import check_in_interpreter, round_casts_like_the_gpu

# Sizes: a tail block, exact blocks, a small tensor (FP32 state), one past a program tile boundary.
SHAPES = [(5000,), (64, 129), (100,), (8192,), (3, 1000, 7)]
CASES = [  # (state_dtype, parameter dtype, rounding, decoupled)
    ("fp32", torch.float32, "nearest", True), ("bf16", torch.float32, "nearest", True),
    ("int8", torch.float32, "nearest", True), ("int4", torch.float32, "nearest", True),
    ("fp8", torch.float32, "nearest", True), ("int8", torch.float32, "nearest", False),
    ("int8", torch.bfloat16, "stochastic", True), ("bf16", torch.bfloat16, "kahan", True),
    ("int4", torch.float16, "stochastic", True), ("fp8", torch.bfloat16, "nearest", True),
    ("fp32", torch.bfloat16, "kahan", True),
]


def _poison(g: torch.Tensor, step: int) -> None:
    """Put NaN, +inf and -inf into a gradient: two in one block, one in the other half of that block (4-bit
    layouts pack value j with value j + 64), and NaN as the last value (the tail block); other places each step."""
    flat = g.view(-1)
    n = flat.numel()
    first = (n // 3 + 517 * step) % (n - 66)
    for offset, value in ((0, float("nan")), (1, float("inf")), (64, -float("inf"))):
        flat[first + offset] = value
    flat[n - 1] = float("nan")


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit-equal codes (1-byte tensors); other tensors equal with NaN in the same places (a NaN's payload is
    the device's: 0x7FFFFFFF from the GPU's arithmetic, 0x7FC00000 or 0xFFC00000 from the CPU's)."""
    if got.dtype.itemsize == 1:
        return torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    nan = torch.isnan(want)
    return torch.equal(torch.isnan(got), nan) and torch.equal(got[~nan], want[~nan])


def _compare_runs(state_dtype, p_dtype, rounding, decoupled, device, steps=3, grad_scale=None, found_inf=None,
                  nonfinite=False):
    """Run the kernel on `device` and the reference on the CPU on the same gradients; return mismatches.

    nonfinite: put NaN and +-inf into every step's gradients (_poison)."""
    cls = mo.AdamW if decoupled else mo.Adam
    gen = torch.Generator().manual_seed(11)
    init = [(torch.randn(s, generator=gen) * 0.5).to(p_dtype) for s in SHAPES]
    fast = [torch.nn.Parameter(p.to(device)) for p in init]
    ref = [torch.nn.Parameter(p.clone()) for p in init]
    kw = dict(lr=1e-2, weight_decay=0.1, state_dtype=state_dtype, rounding=rounding, seed=7)
    opt_fast = cls(fast, backend="auto", **kw)
    opt_ref = cls(ref, backend="torch", **kw)
    # Adam's L2 term feeds the parameters into m and v, so exact codes hold for one step only
    steps = steps if decoupled else 1
    for step in range(steps):
        grads = [(torch.randn(s, generator=gen) * 0.1).to(p_dtype) for s in SHAPES]
        if nonfinite:
            for g in grads:
                _poison(g, step)
        for p, q, g in zip(fast, ref, grads):
            p.grad, q.grad = g.to(device), g.clone()
        scale_kw = {}
        if grad_scale is not None:
            for p, q in zip(fast, ref):
                p.grad.mul_(grad_scale)
                q.grad.mul_(grad_scale)
            scale_kw["grad_scale"] = torch.tensor(grad_scale)
        if found_inf is not None:
            scale_kw["found_inf"] = torch.tensor(found_inf)
        opt_fast.step(**{k: v.to(device) for k, v in scale_kw.items()})
        opt_ref.step(**scale_kw)

    problems = []
    for i, (p, q) in enumerate(zip(fast, ref)):
        sp, sq = opt_fast.state[p], opt_ref.state[q]
        for k, v in sq.items():
            if not isinstance(v, torch.Tensor) or k == "kahan_comp":
                continue
            got = sp[k].cpu()
            if not _same(got, v):
                problems.append(f"tensor {i} {k}: {(got.float() != v.float()).sum().item()} values differ")
        got, want = p.detach().cpu(), q.detach()
        nan = torch.isnan(want)
        if not torch.equal(torch.isnan(got), nan):
            problems.append(f"tensor {i} param: NaN at {torch.isnan(got).sum().item()} places, want {nan.sum().item()}")
        got, want = got[~nan], want[~nan]
        if p_dtype == torch.float32:
            if not torch.allclose(got, want, rtol=OPTIM_KERNEL_PARAM_RTOL, atol=OPTIM_KERNEL_PARAM_ATOL):
                problems.append(f"tensor {i} param: max diff {(got - want).abs().max().item():.3g}")
        else:
            diff = got.float() != want.float()
            ulp = (torch.nextafter(want.abs(), torch.full_like(want, float("inf"))).float()
                   - want.abs().float())
            far = (got.float() - want.float()).abs() > ulp * 1.0001
            if diff.float().mean().item() > OPTIM_KERNEL_FLIP_FRACTION or far.any():
                problems.append(f"tensor {i} param: {diff.sum().item()} differ, {far.sum().item()} by > 1 ulp")
        if nonfinite and not (torch.isfinite(got).all() and all(
                torch.isfinite(t.float()).all() for k, t in sp.items() if k.endswith("absmax"))):
            problems.append(f"tensor {i}: a non-finite value spread beyond its element")
    return problems


def _cuda_case(case):
    state_dtype, p_dtype, rounding, decoupled = case
    return f"{state_dtype}-{str(p_dtype).split('.')[-1]}-{rounding}-{'adamw' if decoupled else 'adam'}"


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=_cuda_case)
def test_kernel_matches_reference(case):
    if not kernels.triton_available():
        pytest.skip("needs triton")
    problems = _compare_runs(*case, device="cuda")
    assert not problems, "\n".join(problems)


@pytest.mark.cuda
@pytest.mark.parametrize("state_dtype", ["int8", "int4"])
def test_kernel_loss_scaler_inputs(state_dtype):
    if not kernels.triton_available():
        pytest.skip("needs triton")
    problems = _compare_runs(state_dtype, torch.float16, "stochastic", True, "cuda", grad_scale=1024.0,
                             found_inf=0.0)
    assert not problems, "\n".join(problems)
    # found_inf = 1: the kernel writes nothing (parameters, codes, scales, step count all unchanged)
    p = torch.nn.Parameter(torch.randn(10_000, device="cuda"))
    opt = mo.AdamW([p], state_dtype=state_dtype)
    p.grad = torch.randn_like(p)
    opt.step()
    before, state = p.detach().clone(), copy.deepcopy(opt.state[p])
    p.grad = torch.randn_like(p)
    opt.step(grad_scale=torch.tensor(4.0, device="cuda"), found_inf=torch.tensor(1.0, device="cuda"))
    assert torch.equal(p, before)
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(opt.state[p][k], v), k


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=_cuda_case)
def test_kernel_matches_reference_on_nonfinite_gradients(case):
    # NaN, +inf and -inf gradient elements: the kernel stores them as 0 over the block's finite absmax
    # exactly as the reference does (codes and scales bit for bit), its parameters are NaN in the same
    # places, and nothing spreads to another element
    if not kernels.triton_available():
        pytest.skip("needs triton")
    problems = _compare_runs(*case, device="cuda", nonfinite=True)
    assert not problems, "\n".join(problems)


@pytest.mark.cuda
def test_kernel_is_one_launch_per_group():
    if not kernels.triton_available():
        pytest.skip("needs triton")
    # tensors of several sizes (multiples of 16, as in most models), all with int8 state: one launch
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(4096,), (64, 128), (1000, 48), (8192, 3)]]
    opt = mo.AdamW(params, state_dtype="int8")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # compile, build tables
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("fused_adam_kernel" in n for n in names) == 1, names


@pytest.mark.cuda
def test_kernel_step_with_loss_scaler_inputs_needs_no_host_sync():
    if not kernels.triton_available():
        pytest.skip("needs triton")
    import mixprec as mp
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    opt = mo.AdamW(model.parameters(), lr=1e-3, state_dtype="int8")
    scaler = mp.LossScaler(init_scale=2.0 ** 12)
    x = torch.randn(64, 256, device="cuda")

    def iteration(poison: bool, check_sync: bool = True):
        loss = model(x).square().mean() * (float("inf") if poison else 1.0)
        scaler.scale(loss).backward()
        if check_sync:
            torch.cuda.set_sync_debug_mode("error")  # any host sync inside the step raises
        try:
            scaler.step(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return scaler.num_skipped_steps   # read after the step: the sync check is over

    iteration(False, check_sync=False)  # the first step compiles the kernel and uploads its tables
    w = model[0].weight.detach().clone()
    assert iteration(True) == 1 and torch.equal(model[0].weight, w)   # skipped on the device
    assert iteration(False) == 1 and not torch.equal(model[0].weight, w)
    assert float(opt.state[model[0].weight]["step"]) == 2.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernel is tested instead")
def test_kernel_matches_reference_in_triton_interpreter():
    # Where triton is installed without a GPU, its interpreter runs the kernel on CPU tensors (slow: small
    # shapes, a few cases), its float casts rounding as the GPU's do (tests/triton_interpreter.py).
    check_in_interpreter(__file__)


def _interpreter_main() -> None:
    """The interpreter check (run in a subprocess with TRITON_INTERPRET=1: the flag is read at import)."""
    round_casts_like_the_gpu()
    mo.AdamW._use_kernel = lambda self, p: self.backend != "torch"   # the launcher on CPU tensors
    kernels.triton_available.cache_clear()
    kernels.triton_available = lambda: True
    SHAPES[:] = [(5000,), (64, 129), (100,), (2048,)]
    problems = []
    for case in [CASES[i] for i in (2, 3, 4, 6, 7, 8)]:
        problems += [f"{_cuda_case(case)}: {p}" for p in _compare_runs(*case, device="cpu", steps=2)]
    problems += _compare_runs("int8", torch.float16, "stochastic", True, "cpu", steps=2, grad_scale=1024.0,
                              found_inf=0.0)
    problems += _compare_runs("int4", torch.float32, "nearest", True, "cpu", steps=1, grad_scale=4.0, found_inf=1.0)
    for case in [CASES[i] for i in (2, 3, 4, 6, 7)]:   # NaN and +-inf gradients
        problems += [f"{_cuda_case(case)} nonfinite: {p}" for p in _compare_runs(*case, device="cpu", steps=2,
                                                                                 nonfinite=True)]
    print("\n".join(problems) if problems else "all equal")


if __name__ == "__main__":
    _interpreter_main()
