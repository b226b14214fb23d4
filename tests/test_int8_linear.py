"""Int8Linear (emulate backend, CPU): its three matmuls equal the kernel's definition exactly; accuracy
against FP32 clears the rowwise SQNR floor; per-matmul switches, SwitchBack, the outlier fallback."""
import math

import pytest
import torch
from torch import nn

from mixprec.int8 import Int8Config, Int8Linear, crest_factor, outliers, quantize, resolve_backend
from quantization_cases import int32_reference
from tolerances import FP32_ORDER_ATOL, FP32_ORDER_RTOL

# SQNR floor of an INT8 linear against FP32 on Gaussian operands. Rowwise quantization of a group leaves
# 52.9 dB - 20*log10(crest) (12 * 127**2; tests/test_int8_quantize.py checks the formula); Gaussian rows
# of 256-512 values have crest factors near 3.5 and below ~4.5, so each operand keeps >= 39.8 dB; a
# matmul of two quantized operands adds their noise powers (-3 dB): >= 36.8 dB. Floor 35 dB (~2 dB margin).
# (FP8 E4M3's floor for the same test is 25 dB: 3 mantissa bits against INT8's 7 bits under a row scale.)
INT8_ROWWISE_SQNR_DB = 35.0
# The outlier fallback on rows with one spike (crest ~22 along K, ~16 along M): those rows quantized in
# INT8 keep only 52.9 - 20*log10(22) ~ 26 dB, less once the spike dominates; computed in FP32 instead,
# the whole output must gain at least 10 dB.
FALLBACK_GAIN_DB = 10.0


def sqnr_db(approx: torch.Tensor, ref: torch.Tensor) -> float:
    return (10 * torch.log10(ref.double().pow(2).sum() / (approx.double() - ref.double()).pow(2).sum())).item()


def reference_gemm(a, b, b_gran="rowwise", out_dtype=torch.float32):
    """The kernel's definition written out: rowwise codes, int32 sums, (acc * sa) * sb, cast."""
    (qa, sa), (qb, sb) = quantize(a), quantize(b, b_gran)
    sb = sb.reshape(1, -1) if b_gran == "rowwise" else sb
    return ((int32_reference(qa, qb).float() * sa) * sb).to(out_dtype)


def run(layer, x, dy, autocast=False):
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.backward(dy.to(y.dtype))
    return y, x.grad


@pytest.mark.parametrize("recipe", ["rowwise", "switchback"])
@pytest.mark.parametrize("autocast", [False, True])
def test_three_matmuls_equal_the_kernel_definition_exactly(recipe, autocast):
    linear = nn.Linear(40, 24, bias=True)
    layer = Int8Linear.from_linear(linear, Int8Config(recipe=recipe, backend="emulate"))
    x, dy = torch.randn(2, 9, 40) * 4, torch.randn(2, 9, 24)
    y, dx = run(layer, x, dy, autocast)
    dtype = torch.bfloat16 if autocast else torch.float32
    x2, dy2, w = x.reshape(18, 40).to(dtype), dy.reshape(18, 24).to(dtype), linear.weight.detach()
    w_gran = "rowwise" if recipe == "rowwise" else "tensorwise"
    assert y.dtype == dtype and dx.dtype == torch.float32 and linear.weight.grad.dtype == torch.float32
    y_ref = reference_gemm(x2, w, w_gran, dtype) + linear.bias.detach().to(dtype)
    dx_ref = reference_gemm(dy2, w.t(), w_gran, dtype)
    if recipe == "rowwise":
        dw_ref = reference_gemm(dy2.t(), x2.t(), "rowwise", torch.float32)
    else:   # SwitchBack: the weight gradient in 16 bits (the compute dtype), cast to the weight's dtype
        dw_ref = (dy2.t() @ x2).float()
    assert torch.equal(y.reshape(18, 24), y_ref)
    assert torch.equal(dx.reshape(18, 40), dx_ref.float())
    assert torch.equal(linear.weight.grad, dw_ref)
    assert torch.equal(linear.bias.grad, dy2.sum(0, dtype=torch.float32))


def test_switches_pick_each_matmul():
    linear = nn.Linear(32, 16, bias=False)
    x, dy = torch.randn(20, 32), torch.randn(20, 16)
    layer = Int8Linear.from_linear(linear, Int8Config(output=False, grad_weight=False, backend="emulate"))
    y, dx = run(layer, x, dy)
    w = linear.weight.detach()
    assert torch.equal(y, x @ w.t())                                # output in the input's dtype
    assert torch.equal(dx, reference_gemm(dy, w.t()))               # grad_input still INT8
    assert torch.equal(linear.weight.grad, dy.t() @ x)              # grad_weight in the input's dtype
    assert Int8Config(recipe="switchback").int8_matmuls == ("output", "grad_input")
    assert Int8Config(recipe="switchback", grad_weight=True).grad_weight is True


@pytest.mark.parametrize("recipe", ["rowwise", "switchback"])
def test_sqnr_against_fp32_clears_the_floor(recipe):
    linear = nn.Linear(512, 384, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)                              # Gaussian, as trained weights are
    x, dy = torch.randn(256, 512), torch.randn(256, 384)
    layer = Int8Linear.from_linear(linear, Int8Config(recipe=recipe, backend="emulate"))
    y8, dx8 = run(layer, x, dy)
    dw8, linear.weight.grad = linear.weight.grad, None
    y32, dx32 = run(linear, x, dy)
    scores = {"output": sqnr_db(y8, y32), "grad_input": sqnr_db(dx8, dx32),
              "grad_weight": sqnr_db(dw8, linear.weight.grad)}
    floor = {"grad_weight": 100.0 if recipe == "switchback" else INT8_ROWWISE_SQNR_DB}   # FP32 there: exact
    for name, score in scores.items():
        assert score >= floor.get(name, INT8_ROWWISE_SQNR_DB), (recipe, scores)


def spiky_inputs(rows=(3, 50), channel=7):
    """Activations whose rows 3 and 50 carry one value 1000x the rest (crest ~22 along K, and ~16 along
    the tokens for channel 7): the rows quantized per row lose the rest of their values."""
    x = torch.randn(256, 512)
    x[list(rows), channel] = 1000.0
    return x, torch.randn(256, 384)


def test_outlier_fallback_recomputes_rows_and_counts_them():
    x, dy = spiky_inputs()
    assert crest_factor(x)[3].item() > 16 and crest_factor(x.t())[7].item() > 8
    linear = nn.Linear(512, 384, bias=False)
    plain = Int8Linear.from_linear(nn.Linear(512, 384, bias=False), Int8Config(backend="emulate"))
    plain.weight = linear.weight
    fallback = Int8Linear.from_linear(linear, Int8Config(outlier_threshold=8, backend="emulate"))
    assert fallback.outlier_counts.tolist() == [[0, 0]] * 3 and plain.outlier_counts is None
    y_fb, dx_fb = run(fallback, x, dy)
    dw_fb, linear.weight.grad = linear.weight.grad, None
    y_q, dx_q = run(plain, x, dy)
    dw_q, linear.weight.grad = linear.weight.grad, None
    y32, _ = run(lambda t: nn.functional.linear(t, linear.weight), x, dy)
    dw32 = linear.weight.grad
    # output: x's rows 3 and 50 (and no weight row) fell back; they are the FP32 product
    counts = fallback.outlier_counts.tolist()
    assert counts[0] == [2, 256 + 384]
    torch.testing.assert_close(y_fb[[3, 50]], x[[3, 50]] @ linear.weight.detach().t(), rtol=1e-6, atol=1e-5)
    assert sqnr_db(y_fb, y32) > sqnr_db(y_q, y32) + FALLBACK_GAIN_DB
    # grad_weight: channel 7 of x^T (one spike along the tokens) fell back
    assert counts[2][0] >= 1 and counts[2][1] == 384 + 512
    assert sqnr_db(dw_fb, dw32) > sqnr_db(dw_q, dw32) + FALLBACK_GAIN_DB
    # grad_input: dy and W are Gaussian, nothing falls back, and the result is the plain INT8 one
    assert counts[1] == [0, 256 + 512] and torch.equal(dx_fb, dx_q)
    assert outliers(nn.Sequential(fallback))["0"]["output"] == (2, 640)
    outliers(nn.Sequential(fallback), reset=True)
    assert fallback.outlier_counts.sum().item() == 0


def test_nonfinite_gradients_stay_visible():
    layer = Int8Linear.from_linear(nn.Linear(64, 32), Int8Config(backend="emulate"))
    x, dy = torch.randn(24, 64), torch.randn(24, 32)
    dy[5, 3] = float("inf")
    _, dx = run(layer, x, dy)
    assert not torch.isfinite(dx[5]).all() and torch.isfinite(dx[:5]).all()
    assert not torch.isfinite(layer.weight.grad).all()   # a loss scaler or guard sees the overflow


def test_config_and_backend_errors():
    with pytest.raises(ValueError, match="Unknown INT8 recipe 'blockwise'; choose one of: rowwise, switchback"):
        Int8Config(recipe="blockwise")
    with pytest.raises(ValueError, match="choose one of: auto, emulate, int_mm, triton"):
        Int8Config(backend="cublas")
    with pytest.raises(ValueError, match="outlier_threshold must be None or a finite number > 1"):
        Int8Config(outlier_threshold=1.0)
    with pytest.raises(ValueError, match="outlier_threshold"):
        Int8Config(outlier_threshold=math.inf)
    with pytest.raises(TypeError, match="grad_input must be True or False"):
        Int8Config(grad_input=1)
    with pytest.raises(ValueError, match="min_features"):
        Int8Config(min_features=0)
    assert resolve_backend("auto", "cpu") == "emulate"
    for gpu_only in ("int_mm", "triton"):
        with pytest.raises(ValueError, match=f"INT8 backend '{gpu_only}' needs a CUDA GPU.*use backend='emulate'"):
            resolve_backend(gpu_only, "cpu")
    with pytest.raises(TypeError, match="Int8Config"):
        Int8Linear(8, 8, config="rowwise")


def test_triton_backend_without_triton_says_so(monkeypatch):
    from mixprec.int8 import backends
    monkeypatch.setattr(backends, "_TRITON", False)
    with pytest.raises(ValueError, match="INT8 backend 'triton' needs the triton package; use backend='int_mm' or"):
        resolve_backend("triton", "cuda", int8_capable=True)
    monkeypatch.setattr(backends, "_TRITON", True)
    assert resolve_backend("triton", "cuda", int8_capable=True) == "triton"


@pytest.mark.parametrize("capability,has_triton,expected", [((9, 0), True, "triton"), ((10, 0), True, "triton"),
                                                            ((9, 0), False, "int_mm"), ((8, 0), True, "int_mm"),
                                                            ((8, 9), True, "int_mm")])
def test_auto_picks_the_triton_gemm_where_it_was_measured_faster(monkeypatch, capability, has_triton, expected):
    from mixprec.int8 import backends
    monkeypatch.setattr(backends, "_TRITON", has_triton)
    monkeypatch.setattr(backends, "_cuda_capability", lambda index: capability)
    assert resolve_backend("auto", "cuda", int8_capable=True) == expected


def test_a_config_assigned_later_is_resolved_afresh():
    layer = Int8Linear(16, 16, config=Int8Config(backend="emulate"))
    layer(torch.randn(4, 16))
    layer.config = Int8Config(backend="int_mm")   # not runnable on the CPU: the layer must say so, not reuse emulate
    with pytest.raises(ValueError, match="INT8 backend 'int_mm' needs a CUDA GPU"):
        layer(torch.randn(4, 16))


def test_compiled_equals_eager_where_inductor_keeps_eagers_roundings():
    """Under torch.compile (inductor) with emulate_precision_casts, which keeps eager's BF16 roundings inside
    fused kernels, the emulated layer's output and gradients equal eager's bit for bit; the bias gradient is
    an FP32 sum in another order. (By default inductor may quantize an input's unrounded FP32 values where it
    fuses the cast: tests/test_int8_cuda.py bounds that on the GPU.)"""
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(256, 128), Int8Config(backend="emulate"))
    x, dy = torch.randn(64, 256), torch.randn(64, 128)

    def step(module):
        y, dx = run(module, x, dy, autocast=True)
        grads = layer.weight.grad.clone(), layer.bias.grad.clone()
        layer.zero_grad(set_to_none=True)
        return (y.detach(), dx) + grads

    eager = step(layer)
    torch._dynamo.reset()
    with torch._inductor.config.patch(emulate_precision_casts=True):
        compiled = step(torch.compile(layer))
    for name, a, b in zip(("y", "dx", "dW"), eager, compiled):
        assert torch.equal(b, a), name
    torch.testing.assert_close(compiled[3], eager[3], rtol=FP32_ORDER_RTOL, atol=FP32_ORDER_ATOL)


def test_a_second_derivative_raises_instead_of_dropping_terms():
    """The INT8 GEMMs' gradients carry no graph: a gradient penalty through the layer raises, also where the
    incoming gradient is a constant (a bare once_differentiable let that case through without its terms)."""
    layer = Int8Linear.from_linear(nn.Linear(128, 64), Int8Config(backend="emulate"))
    x = torch.randn(8, 128, requires_grad=True)
    with pytest.raises(RuntimeError, match="Int8Linear has no second derivative"):
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)
