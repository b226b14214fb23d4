"""FP8 fast paths on a GPU of compute capability 8.9+: Triton quantization equals the PyTorch path bit for
bit; cuBLAS FP8 GEMMs (cublas and triton backends) equal emulate within FP32 accumulation-order
tolerances; Float8Linear on every backend, eager and under inductor."""
import pytest
import torch
from torch import nn

from mixprec.fp8 import Float8Config, Float8Linear, quantize, resolve_backend
from mixprec.fp8.gemm import mm_nt
from mixprec.fp8.recipes import GRANULARITY, quantize_pair
from helpers import relative_error
from quantization_cases import tie_tensor
from tolerances import (BF16_OUTPUT_RTOL, FP8_COMPILED_VS_EAGER_GRAD_RTOL, FP8_FAST_ACCUM_VS_EMULATE_RTOL,
                        FP8_GEMM_VS_EMULATE_RTOL)

pytestmark = pytest.mark.cuda
RECIPES = ("blockwise", "tensorwise", "rowwise", "delayed")


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.fixture(autouse=True)
def _needs_fp8():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9+")


def test_auto_picks_triton_on_hopper():
    assert resolve_backend("auto", "cuda") == "triton"


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("granularity", ["1x128", "128x128", "tensorwise", "rowwise"])
@pytest.mark.parametrize("layout", ["transposed", "odd_bf16_pow2", "bf16", "ties"])
def test_triton_quantization_equals_pytorch_bit_for_bit(fmt, granularity, layout):
    odd = layout == "odd_bf16_pow2"
    power_of_2 = odd
    r, k = (1000, 1300) if odd else (512, 768)          # odd: partial tiles on both dims
    x = torch.randn(r, k, device="cuda") * torch.exp(torch.randn(r, k, device="cuda"))
    x[:, 3] *= 1e4
    x[:, 7] *= 1e-6                                       # subnormal codes, signed zeros
    x[5] = 0.0                                            # an all-zero row and column: the amax floor
    x[:, 11] = 0.0
    if layout == "ties":                                  # products on FP8 ties: the round-to-odd step decides
        x = tie_tensor(fmt, r, k).cuda()
    elif layout != "transposed":                         # BF16: kernels may use the hardware FP8 cast
        x = x.bfloat16()
    else:
        x = x.t().contiguous().t()                        # column-major: strided loads
    a_t, at_t = quantize_pair(x, fmt, granularity, backend="triton", power_of_2=power_of_2)
    a_ref, at_ref = quantize_pair(x, fmt, granularity, backend="cublas", power_of_2=power_of_2)
    for got, ref in ((a_t, a_ref), (at_t, at_ref)):
        assert same_bytes(got.q, ref.q)
        assert torch.equal(got.scale, ref.scale)
    q, s = quantize(x.cpu(), fmt, granularity, power_of_2=power_of_2)     # and the CPU reference
    assert same_bytes(a_t.q.cpu(), q) and torch.equal(a_t.scale.cpu(), s)


@pytest.mark.parametrize("recipe", ["blockwise", "tensorwise", "rowwise"])
@pytest.mark.parametrize("fast_accum", [False, True])
def test_cublas_gemms_equal_emulate(recipe, fast_accum):
    if fast_accum and recipe == "blockwise":
        pytest.skip("blockwise GEMMs always promote")
    m, n, k = 1024, 768, 2048
    act, wgt = GRANULARITY[recipe]
    pow2 = recipe == "rowwise"
    x = torch.randn(m, k, device="cuda")
    w = torch.randn(n, k, device="cuda") * 0.02
    dy = torch.randn(m, n, device="cuda")
    xa, xt = quantize_pair(x, "fp8_e4m3", act, backend="cublas", power_of_2=pow2)
    wa, wt = quantize_pair(w, "fp8_e4m3", wgt, backend="cublas", power_of_2=pow2)
    bwd = "fp8_e5m2" if recipe == "tensorwise" else "fp8_e4m3"
    da, dt = quantize_pair(dy, bwd, act, backend="cublas", power_of_2=pow2)
    tol = FP8_FAST_ACCUM_VS_EMULATE_RTOL if fast_accum else FP8_GEMM_VS_EMULATE_RTOL
    for a, b in ((xa, wa), (da, wt), (dt, xt)):        # forward, input grad, weight grad
        for out_dtype in (torch.float32, torch.bfloat16):
            got = mm_nt(a, b, out_dtype=out_dtype, backend="cublas", fast_accum=fast_accum)
            ref = mm_nt(a, b, out_dtype=torch.float32, backend="emulate")
            bound = tol if out_dtype == torch.float32 else tol + BF16_OUTPUT_RTOL
            error = relative_error(got, ref)
            assert got.dtype == out_dtype and error <= bound, (recipe, out_dtype, error)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("backend", ["cublas", "triton"])
def test_float8_linear_backends_equal_emulate(recipe, backend):
    torch.manual_seed(0)
    base = nn.Linear(1024, 768, device="cuda")
    x = torch.randn(4, 250, 1024, device="cuda")     # M = 1000 tokens: not a multiple of 16 or 128
    dy = torch.randn(4, 250, 768, device="cuda")
    results = {}
    for b in ("emulate", backend):
        layer = Float8Linear.from_linear(base, Float8Config(recipe=recipe, backend=b, fast_accum=False))
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        results[b] = (y.detach(), xi.grad, base.weight.grad.clone(), base.bias.grad.clone())
        base.weight.grad = base.bias.grad = None
    for name, got, ref in zip(("y", "dx", "dW", "db"), results[backend], results["emulate"]):
        assert relative_error(got, ref) <= FP8_GEMM_VS_EMULATE_RTOL, (name, relative_error(got, ref))


@pytest.mark.parametrize("recipe", ["blockwise", "tensorwise", "rowwise"])
def test_inductor_compiled_model_matches_eager(recipe):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2048, bias=False), nn.GELU(), nn.Linear(2048, 1024, bias=False)).cuda()
    for i in (0, 2):
        model[i] = Float8Linear.from_linear(model[i], Float8Config(recipe=recipe, fast_accum=False))
    x = torch.randn(2048, 1024, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_eager = model(x)
    y_eager.float().pow(2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)     # no graph break around the FP8 layers
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = compiled(x)
    y.float().pow(2).mean().backward()
    assert y.dtype == torch.bfloat16
    assert relative_error(y, y_eager) <= FP8_GEMM_VS_EMULATE_RTOL + 2 * BF16_OUTPUT_RTOL   # y rounded twice
    for p, g in zip(model.parameters(), grads):
        assert relative_error(p.grad, g) <= FP8_COMPILED_VS_EAGER_GRAD_RTOL, relative_error(p.grad, g)


@pytest.mark.parametrize("granularity", ["1x128", "128x128", "tensorwise", "rowwise"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("backend, dtype", [("cublas", torch.float32), ("triton", torch.bfloat16)])
def test_inductor_compiled_quantization_equals_eager(granularity, fmt, backend, dtype):
    """Quantization compiled by inductor gives eager's codes and scales: the cublas backend's (PyTorch
    ops, which inductor fuses and may reorder) and the triton backend's custom ops on BF16 input."""
    torch._dynamo.reset()
    x = (torch.randn(1024, 768, device="cuda") * torch.exp(torch.randn(1024, 768, device="cuda"))).to(dtype)

    def pair(t):
        t = t * 1.0        # the input made by a kernel inductor writes, as in a model
        a, at = quantize_pair(t, fmt, granularity, backend=backend, power_of_2=False)
        return a.q, a.scale, at.q, at.scale

    eager = pair(x)
    compiled = torch.compile(pair, fullgraph=True)(x)
    for name, got, ref in zip(("q", "scale", "qT", "scaleT"), compiled, eager):
        if got.dtype == torch.float32:
            assert torch.equal(got, ref), (name, (got != ref).float().mean().item())
        else:
            differ = got.view(torch.uint8) != ref.view(torch.uint8)
            sample = [(float(v), float(g), float(r)) for v, g, r in
                      zip(x[differ][:4] if name == "q" else x.t()[differ][:4], got[differ][:4].float(),
                          ref[differ][:4].float())]
            assert not differ.any(), (name, differ.float().mean().item(), sample)
