"""INT8 on a GPU of compute capability 8.0+: torch._int_mm (int32 accumulation) and the Triton GEMM (scaling
in its epilogue) equal the emulation bit for bit, padding included; Int8Linear's int_mm and triton backends
equal emulate on the GPU and the CPU emulation, exactly (the same IEEE FP32 quantization and scaling
everywhere), eager and under inductor."""
import pytest
import torch
from torch import nn

from mixprec.int8 import Int8Config, Int8Linear, accumulate, quantize, resolve_backend
from mixprec.int8.backends import MIN_CAPABILITY
from mixprec.int8.gemm import Operand, mm_nt
from helpers import relative_error
from quantization_cases import extreme_pair, int32_reference
from tolerances import FP32_ORDER_ATOL, FP32_ORDER_RTOL

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _needs_int8():
    if torch.cuda.get_device_capability() < MIN_CAPABILITY:
        pytest.skip("torch._int_mm's INT8 GEMMs: compute capability 8.0+")


def test_auto_picks_the_triton_gemm_on_hopper_and_int_mm_before():
    pytest.importorskip("triton")
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    assert resolve_backend("auto", "cuda") == ("triton" if hopper else "int_mm")


@pytest.mark.parametrize("m,k,n", [(17, 8, 8), (5, 13, 7), (64, 256, 72), (300, 2500, 40), (2048, 1024, 768)])
def test_int_mm_equals_emulation_exactly(m, k, n):
    a, b = (t.cuda() for t in extreme_pair(m, k, n))
    ref = int32_reference(a.cpu(), b.cpu()).float() if m * n * k <= 2 ** 26 else None
    got = accumulate(a, b, backend="int_mm")
    emulated = accumulate(a, b, backend="emulate")          # FP32 GEMMs on the GPU (TF32 keeps codes exact)
    assert torch.equal(got, emulated)
    assert torch.equal(got.cpu(), accumulate(a.cpu(), b.cpu(), backend="emulate"))
    if ref is not None:
        assert torch.equal(got.cpu(), ref)


@pytest.mark.parametrize("m,k,n", [(17, 8, 8), (5, 13, 7), (300, 2500, 40), (2048, 1024, 768), (1000, 4096, 1030)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_gemm_equals_emulation_exactly(m, k, n, out_dtype):
    pytest.importorskip("triton")
    a, b = (t.cuda() for t in extreme_pair(m, k, n))
    g = torch.Generator().manual_seed(m + n)
    sa = torch.exp2(torch.randint(-20, 5, (m, 1), generator=g).float()) * (1 + torch.rand(m, 1, generator=g))
    sb = torch.exp2(torch.randint(-20, 5, (n, 1), generator=g).float()) * (1 + torch.rand(n, 1, generator=g))
    for a_scale, b_scale in ((sa, sb), (sa[0, 0], sb), (sa, sb[0, 0])):
        ops = Operand(a, a_scale.cuda()), Operand(b, b_scale.cuda())
        got = mm_nt(*ops, out_dtype=out_dtype, backend="triton")
        assert torch.equal(got, mm_nt(*ops, out_dtype=out_dtype, backend="int_mm"))
        assert torch.equal(got.cpu(), mm_nt(Operand(a.cpu(), a_scale), Operand(b.cpu(), b_scale),
                                            out_dtype=out_dtype, backend="emulate"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantization_equals_the_cpu_bit_for_bit(dtype):
    x = (torch.randn(300, 520) * torch.exp(torch.randn(300, 1))).to(dtype)
    for gran in ("rowwise", "tensorwise"):
        q_cpu, s_cpu = quantize(x, gran)
        q_gpu, s_gpu = quantize(x.cuda(), gran)
        assert torch.equal(q_gpu.cpu(), q_cpu) and torch.equal(s_gpu.cpu(), s_cpu)


def run(layer, x, dy, autocast):
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.backward(dy.to(y.dtype))
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters()]
    for p in layer.parameters():
        p.grad = None
    return [y.detach()] + grads


@pytest.mark.parametrize("recipe", ["rowwise", "switchback"])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("backend", ["int_mm", "triton"])
def test_int8_linear_gpu_backends_equal_emulate_on_gpu_and_cpu(recipe, autocast, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    linear = nn.Linear(512, 264)
    x, dy = torch.randn(3, 40, 512) * 2, torch.randn(3, 40, 264)
    fast = Int8Linear.from_linear(linear.cuda(), Int8Config(recipe=recipe, backend=backend))
    outs = run(fast, x.cuda(), dy.cuda(), autocast)
    emulated = run(Int8Linear.from_linear(linear, Int8Config(recipe=recipe, backend="emulate")), x.cuda(), dy.cuda(),
                   autocast)
    for name, a, b in zip(("y", "dx", "dW", "db"), outs, emulated):
        if recipe == "switchback" and name == "dW":
            continue   # 16-bit GEMM on the GPU: the same call on both, but not an INT8 product
        assert torch.equal(a, b), name
    # the CPU emulation: the same codes, sums and FP32 scaling (the bias add and BF16 casts are IEEE too)
    linear_cpu = nn.Linear(512, 264)
    with torch.no_grad():
        linear_cpu.weight.copy_(linear.weight.cpu())
        linear_cpu.bias.copy_(linear.bias.cpu())
    on_cpu = run(Int8Linear.from_linear(linear_cpu, Int8Config(recipe=recipe, backend="emulate")), x, dy, autocast)
    for name, a, b in zip(("y", "dx", "dW"), outs, on_cpu):
        if recipe == "switchback" and name == "dW":
            continue
        assert torch.equal(a.cpu(), b), name


@pytest.mark.parametrize("backend", ["int_mm", "triton"])
def test_compiled_equals_eager(backend):
    """Inductor fuses the input's cast to BF16 into the quantization and, by default, skips that rounding
    (its emulate_precision_casts is off): compiled quantizes the FP32 input, so codes move by one where the
    BF16 rounding crossed a half-integer, and dW (exact integer sums) differs from eager's by about half
    the INT8 noise. With emulate_precision_casts on, compiled equals eager bit for bit (dx once rounded to BF16,
    below; db: an FP32 sum in another order)."""
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(512, 256).cuda(), Int8Config(backend=backend))
    x, dy = torch.randn(128, 512, device="cuda"), torch.randn(128, 256, device="cuda")
    eager = run(layer, x, dy, True)
    torch._dynamo.reset()
    with torch._inductor.config.patch(emulate_precision_casts=True):
        emulated = run(torch.compile(layer), x, dy, True)
    for name, a, b in zip(("y", "dx", "dW"), eager, emulated):
        if name == "dx":
            # dx leaves the layer in BF16 and autograd casts it back to FP32; on the GPU Inductor fuses that
            # round trip into int_mm's FP32 scaling and skips it even with emulate_precision_casts: rounded once,
            # it is eager's exactly
            b = b.to(torch.bfloat16).float()
        assert torch.equal(b, a), name
    torch.testing.assert_close(emulated[3], eager[3], rtol=FP32_ORDER_RTOL, atol=FP32_ORDER_ATOL)

    torch._dynamo.reset()
    fused = run(torch.compile(layer), x, dy, True)
    # y and dx are BF16 products under autocast: one BF16 rounding apart at most (the codes that moved
    # change them by far less than that). dW: compiled is no less accurate than eager against the exact
    # product of the BF16 operands (each within the INT8 noise, about 1% here).
    for name, a, b in zip(("y", "dx"), eager, fused):
        torch.testing.assert_close(b, a, rtol=2.0 ** -7, atol=2.0 ** -7 * a.abs().max().item(),
                                   msg=lambda detail, name=name: f"{name}: {detail}")
    exact = dy.bfloat16().double().t() @ x.bfloat16().double()
    assert relative_error(fused[2], exact) <= 1.25 * relative_error(eager[2], exact)
    torch.testing.assert_close(fused[3], eager[3], rtol=FP32_ORDER_RTOL, atol=FP32_ORDER_ATOL)
