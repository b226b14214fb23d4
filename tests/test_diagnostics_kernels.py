"""The Triton range-statistics kernel (mixprec.diagnostics._kernels) against the PyTorch path of
RangeAccumulator.add, exactly (torch.equal on counts, amax and min_nonzero).

Where triton is installed without a GPU, TRITON_INTERPRET=1 runs the kernel on CPU tensors
(tests/triton_interpreter.py): FP32, BF16 and FP16 inputs; every boundary value and its FP32 neighbours,
zeros, subnormals, the largest finite values, infinities and NaNs; every BF16 and FP16 bit pattern; random
values over all binades; sizes that are no multiple of the block, one element and none (no launch);
two calls into the same buffers; the op's schema and fake implementation; and the monitor on a compiled
model (aot_eager), whose graph holds the op. On a GPU the cuda-marked tests below run the compiled kernel.
Without triton in the environment the interpreter test is skipped.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from triton_interpreter import check_in_interpreter, round_casts_like_the_gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernel is tested instead")
def test_range_stats_kernel_equals_pytorch_path_in_triton_interpreter():
    check_in_interpreter(__file__)


def _special_values() -> torch.Tensor:
    """FP32: every boundary, its neighbours up and down, zeros, subnormals, the largest finite values,
    infinities and NaNs (several payloads), with both signs."""
    from mixprec.diagnostics.stats import BOUNDARIES
    b = torch.tensor(BOUNDARIES[:-1], dtype=torch.float32)
    up = torch.nextafter(b, torch.tensor(math.inf))
    down = torch.nextafter(b, torch.tensor(0.0))
    big = torch.finfo(torch.float32).max
    g = torch.Generator().manual_seed(3)
    subnormals = torch.randint(1, 2**23, (300,), generator=g, dtype=torch.int32).view(torch.float32)
    nans = torch.tensor([0x7F800001, 0x7FC00000, 0x7FFFFFFF, -1, -0x400000], dtype=torch.int32).view(torch.float32)
    few = torch.tensor([0.0, 2.0**-149, 2.0**-148, 3 * 2.0**-149, 2.0**-126 - 2.0**-149, 2.0**-126, 1.0, big,
                        torch.nextafter(torch.tensor(big), torch.tensor(0.0)).item(), math.inf])
    v = torch.cat([b, up, down, subnormals, few])
    return torch.cat([v, -v, nans])


def _random_values(n: int, seed: int) -> torch.Tensor:
    """Magnitudes over every binade and past both ends (to zero and to inf), random signs and mantissas."""
    g = torch.Generator().manual_seed(seed)
    e = torch.empty(n).uniform_(-155, 130, generator=g)
    return torch.exp2(e.floor()) * (1 + torch.rand(n, generator=g)) * torch.randn(n, generator=g).sign()


def _all_bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def _accumulated(xs, op, **kwargs):
    """A CPU RangeAccumulator fed xs, through `op` (the kernel) or the PyTorch path (op None)."""
    from mixprec.diagnostics.stats import RangeAccumulator
    acc = RangeAccumulator(device="cpu", **kwargs)
    acc._op = op
    for x in xs:
        acc.add(x)
    return acc


def _differences(label, got, ref) -> list[str]:
    out = []
    names = ["counts", "amax", "min_nonzero"] + (["fp8"] if ref.fp8 is not None else []) \
        + (["int8"] if ref.int8 is not None else [])
    for name in names:
        g, r = getattr(got, name), getattr(ref, name)
        if g.dtype != r.dtype or not torch.equal(g, r):
            if name == "counts":
                bins = (g != r).nonzero().flatten().tolist()
                detail = f"bins {bins[:8]}: {g[bins[:8]].tolist()} != {r[bins[:8]].tolist()}"
            else:
                detail = f"{g.tolist()} != {r.tolist()}"
            out.append(f"{label} {name}: {detail}")
    return out


def _exact_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Small integers everywhere and a power-of-two number of outputs: every value of the forward and
    backward passes is exact in FP32, so a compiled graph computes the same bits as eager."""
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-2, 3, p.shape, generator=g).float())
    x = torch.randint(-2, 3, (8, 16), generator=g).float()
    y = torch.randint(-4, 5, (8, 4), generator=g).float()
    return model, x, y


def _monitored_stats(model, x, y, compile_backend=None):
    """The monitor's statistics over three steps (two sampled), the model compiled with compile_backend
    if given; no optimizer step, so the weights stay small integers."""
    from mixprec import diagnostics as dg
    monitor = dg.DiagnosisMonitor(model, every=2)
    run = torch.compile(model, backend=compile_backend) if compile_backend else model
    for _ in range(3):
        F.mse_loss(run(x), y).backward()
        monitor.step()
        model.zero_grad()
    stats = monitor.collector.read()
    monitor.close()
    return {k: (s.numel, s.counts, s.amax, s.min_nonzero) for k, s in stats.items()}, monitor


def _interpreter_main() -> None:
    """Run in a subprocess with TRITON_INTERPRET=1 (see the test above)."""
    from mixprec.diagnostics import _kernels as kernels
    from mixprec.diagnostics import stats

    round_casts_like_the_gpu()   # the interpreter's BF16 -> FP32 loses subnormals; the GPU's widening is exact
    op = kernels.range_stats_
    problems = []
    special = _special_values()
    rand = _random_values(20_011, seed=1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cases = [("special", special.to(dtype)), ("random", rand.to(dtype)), ("1 element", rand[:1].to(dtype)),
                 ("2049 elements", rand[:2049].to(dtype)), ("4097 elements", rand[-4097:].to(dtype))]
        if dtype != torch.float32:
            cases.append(("every bit pattern", _all_bit_patterns(dtype)))
        for label, x in cases:
            problems += _differences(f"{dtype} {label}", _accumulated([x], op), _accumulated([x], None))
        # two calls into the same buffers, the first with a larger amax and the second with a smaller minimum
        xs = [rand[:3000].to(dtype) * 4, rand[3000:7001].to(dtype).reshape(1, -1, 1) * 0.25]
        problems += _differences(f"{dtype} two calls", _accumulated(xs, op), _accumulated(xs, None))

    xs = [rand[:4096].reshape(64, 64).t(), rand[:999].double(), special.reshape(-1, 1)[::3]]   # strided, FP64
    problems += _differences("strided and FP64", _accumulated(xs, op), _accumulated(xs, None))
    kw = {"fp8_formats": ("fp8_e4m3", "fp8_e5m2"), "whatif": True, "int8": True}   # the what-ifs stay PyTorch's
    xs = [rand[:3000].reshape(20, 150)]
    problems += _differences("with the what-ifs", _accumulated(xs, op, **kw), _accumulated(xs, None, **kw))

    # an empty tensor leaves the buffers unchanged and launches nothing
    acc = _accumulated([rand[:100]], op)
    before = [t.clone() for t in (acc.counts, acc.amax, acc.min_nonzero)]
    launch, kernels._range_stats_kernel = kernels._range_stats_kernel, None   # a launch would raise
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            op(torch.empty(0, 5, dtype=dtype), acc.counts, acc.amax, acc.min_nonzero)
            acc.add(torch.empty(0, dtype=dtype))
    except Exception as err:
        problems.append(f"empty tensor: {type(err).__name__}: {err}")
    finally:
        kernels._range_stats_kernel = launch
    if not all(torch.equal(a, b) for a, b in zip((acc.counts, acc.amax, acc.min_nonzero), before)):
        problems.append("empty tensor: the buffers changed")

    acc = _accumulated([], None)
    try:
        torch.library.opcheck(op, (rand[:3000].bfloat16(), acc.counts, acc.amax, acc.min_nonzero),
                              test_utils=("test_schema", "test_faketensor"))
    except Exception as err:
        problems.append(f"range_stats_: {type(err).__name__}: {err}")

    # the monitor on a compiled model, its hooks traced into the graph with the kernel in it, against eager
    torch._dynamo.reset()
    ref, _ = _monitored_stats(*_exact_model())
    resolve = stats._range_op
    stats._range_op = lambda device: op      # the kernel on CPU tensors, as on CUDA
    try:
        got, monitor = _monitored_stats(*_exact_model(), compile_backend="aot_eager")
        if any(a._op is not op for a in monitor.collector.acc.values()):
            problems.append("compiled monitor: an accumulator without the kernel")
    finally:
        stats._range_op = resolve
    if got != ref:
        problems.append(f"compiled monitor: {sorted(k for k in ref.keys() | got.keys() if got.get(k) != ref.get(k))}"
                        f" differ")
    print("\n".join(problems) if problems else "all equal")


# ---- on a GPU -----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_pytorch_path_on_cuda(dtype):
    pytest.importorskip("triton")
    from mixprec.diagnostics.stats import RangeAccumulator
    xs = [torch.cat([_random_values(2**22 + 5, seed=2), _special_values()]).to(dtype),
          _random_values(17 * 200_003, seed=3).to(dtype).reshape(-1, 17).t(),   # strided
          _all_bit_patterns(dtype) if dtype != torch.float32 else _random_values(1, seed=4)]
    kernel, reference = RangeAccumulator(device="cuda"), RangeAccumulator(device="cuda")
    assert kernel._op is not None
    reference._op = None
    for x in xs:
        kernel.add(x.cuda())
        reference.add(x.cuda())
    assert _differences(str(dtype), kernel, reference) == []


@pytest.mark.cuda
def test_compiled_monitor_counts_equal_eager_on_cuda():
    pytest.importorskip("triton")
    torch._dynamo.reset()
    model, x, y = _exact_model()
    ref, _ = _monitored_stats(model.cuda(), x.cuda(), y.cuda())
    model, x, y = _exact_model()
    got, monitor = _monitored_stats(model.cuda(), x.cuda(), y.cuda(), compile_backend="inductor")
    assert all(a._op is not None for a in monitor.collector.acc.values())
    assert got == ref


if __name__ == "__main__":
    _interpreter_main()
