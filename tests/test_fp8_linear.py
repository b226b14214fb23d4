"""Float8Linear (emulate backend, CPU): accuracy against FP32, the recipes' plumbing, nn.Linear parity."""
import pytest
import torch
from torch import nn

import mixprec as mp
from mixprec.fp8 import Float8Config, Float8Linear, dequantize, quantize
from tolerances import FP32_ORDER_ATOL, FP32_ORDER_RTOL, FP8_BLOCKWISE_SQNR_DB

RECIPES = ("blockwise", "tensorwise", "rowwise", "delayed")


def sqnr_db(approx: torch.Tensor, ref: torch.Tensor) -> float:
    return (10 * torch.log10(ref.double().pow(2).sum() / (approx.double() - ref.double()).pow(2).sum())).item()


def outlier_inputs(m: int = 256, k: int = 512, n: int = 384):
    """Activations with a few huge channels (LLM outlier features) and output gradients with a few huge
    tokens; one scale for the whole tensor pushes the rest into FP8's subnormal range."""
    x = torch.randn(m, k)
    x[:, torch.randperm(k)[:4]] *= 1e4
    dy = torch.randn(m, n)
    dy[torch.randperm(m)[:4]] *= 1e4
    return x, dy


def fp8_vs_fp32(recipe: str, x: torch.Tensor, dy: torch.Tensor, linear: nn.Linear):
    fp8 = Float8Linear.from_linear(linear, Float8Config(recipe=recipe, backend="emulate"))
    x8 = x.clone().requires_grad_()
    y8 = fp8(x8)
    y8.backward(dy)
    dw8 = linear.weight.grad.clone()
    linear.weight.grad = None
    x32 = x.clone().requires_grad_()
    y32 = linear(x32)
    y32.backward(dy)
    dw32 = linear.weight.grad.clone()
    linear.weight.grad = None
    return [sqnr_db(y8, y32), sqnr_db(x8.grad, x32.grad), sqnr_db(dw8, dw32)]


def test_blockwise_sqnr_and_beats_tensorwise_on_outliers():
    x, dy = outlier_inputs()
    linear = nn.Linear(512, 384)
    blockwise = fp8_vs_fp32("blockwise", x, dy, linear)
    tensorwise = fp8_vs_fp32("tensorwise", x, dy, linear)
    for name, b, t in zip(("output", "input grad", "weight grad"), blockwise, tensorwise):
        assert b >= FP8_BLOCKWISE_SQNR_DB, (name, b)
        assert b > t + 1.0, (name, b, t)     # at least 1 dB better: the reason blockwise exists


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_computes_its_documented_gemms(recipe):
    # y = Q(x) Q(W)^T, dx = Q(dy) Q(W), dW = Q(dy^T) Q(x^T)^T with the recipe's formats/granularities,
    # written out here with quantize/dequantize; same FP32 matmuls, so equal to FP32 summation order.
    cfg = Float8Config(recipe=recipe, backend="emulate")
    act, wgt = {"blockwise": ("1x128", "128x128"), "rowwise": ("rowwise", "rowwise")}.get(
        recipe, ("tensorwise", "tensorwise"))
    pow2 = cfg.power_of_2_scales
    linear = nn.Linear(200, 272, bias=True)
    layer = Float8Linear.from_linear(linear, cfg)
    x = torch.randn(3, 50, 200).requires_grad_()
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    def dq(t, fmt, gran):
        return dequantize(*quantize(t, fmt, gran, power_of_2=pow2))

    x2, dy2, w = x.detach().reshape(150, 200), dy.reshape(150, 272), linear.weight.detach()
    fwd, bwd = cfg.forward_format, cfg.backward_format
    y_ref = dq(x2, fwd, act) @ dq(w, fwd, wgt).t() + linear.bias.detach()
    w_t = dq(w, fwd, wgt).t() if wgt != "rowwise" else dq(w.t(), fwd, wgt)
    dx_ref = dq(dy2, bwd, act) @ w_t.t()
    dw_ref = dq(dy2.t(), bwd, act) @ dq(x2.t(), fwd, act).t()
    close = dict(rtol=FP32_ORDER_RTOL, atol=FP32_ORDER_ATOL)
    torch.testing.assert_close(y.reshape(150, 272), y_ref, **close)
    torch.testing.assert_close(x.grad.reshape(150, 200), dx_ref, **close)
    torch.testing.assert_close(linear.weight.grad, dw_ref, **close)
    torch.testing.assert_close(linear.bias.grad, dy2.sum(0), **close)


def test_drop_in_for_nn_linear():
    linear = nn.Linear(64, 48)
    layer = Float8Linear.from_linear(linear, Float8Config(recipe="blockwise"))
    assert layer.weight is linear.weight and layer.bias is linear.bias        # shared, not copied
    assert isinstance(layer, nn.Linear)
    assert list(layer.state_dict()) == list(linear.state_dict()) == ["weight", "bias"]
    fresh = Float8Linear(64, 48, config=Float8Config(recipe="delayed"))
    fresh.load_state_dict(linear.state_dict())
    assert torch.equal(fresh.weight, linear.weight)
    assert list(fresh.state_dict()) == ["weight", "bias"]                    # histories are not persistent
    no_bias = Float8Linear(64, 48, bias=False)
    assert no_bias.bias is None and no_bias(torch.randn(5, 64)).shape == (5, 48)
    assert "recipe=blockwise" in repr(layer)


def test_output_dtype_follows_autocast_else_input():
    layer = Float8Linear(128, 256, config=Float8Config(recipe="tensorwise"))
    x = torch.randn(4, 128, requires_grad=True)
    assert layer(x).dtype == torch.float32
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    assert x.grad.dtype == torch.float32
    assert layer.weight.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
def test_autocast_casts_the_input_first_as_autocast_linear_does(recipe):
    # an FP32 input under BF16 autocast is quantized from its BF16 rounding (as nn.Linear under autocast
    # multiplies that rounding): the same output and weight gradient as a BF16 input, bit for bit
    layer = Float8Linear(256, 128, config=Float8Config(recipe=recipe))
    x = (torch.randn(8, 256) * 3).requires_grad_()
    x16 = x.detach().bfloat16().requires_grad_()
    outs, grads = [], []
    for inp in (x, x16):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(inp)
        y.float().pow(2).sum().backward()
        outs.append(y)
        grads.append(layer.weight.grad.clone())
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, x16.grad.float())


def test_delayed_recipe_keeps_amax_histories():
    layer = Float8Linear(128, 128, config=Float8Config(recipe="delayed", amax_history_len=4))
    xs = [torch.randn(8, 128) * s for s in (1.0, 3.0)]
    for x in xs:
        x.requires_grad_()
        layer(x).sum().backward()
    h = layer.amax_history_input
    assert torch.equal(h[:2], torch.stack([xs[1].detach().abs().max(), xs[0].detach().abs().max()]))
    assert h[2:].eq(0).all()
    assert torch.equal(layer.amax_history_weight[0], layer.weight.detach().abs().max())
    assert layer.amax_history_grad_output[0] == 1.0 and layer.amax_history_grad_output[1] == 1.0  # d(sum)/dy


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_works_under_torch_compile(backend):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
    model[0] = Float8Linear.from_linear(model[0], Float8Config(recipe="blockwise"))
    model[2] = Float8Linear.from_linear(model[2], Float8Config(recipe="tensorwise"))
    x = torch.randn(64, 128)
    y_eager = model(x)
    y_eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=FP32_ORDER_RTOL, atol=FP32_ORDER_ATOL)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=FP32_ORDER_RTOL, atol=FP32_ORDER_ATOL)


def test_bad_backend_and_recipe_name_the_way_out():
    x = torch.randn(4, 64)
    for backend in ("cublas", "triton"):
        layer = Float8Linear(64, 64, config=Float8Config(backend=backend))
        with pytest.raises(ValueError, match="backend='emulate'"):
            layer(x)
    with pytest.raises(ValueError, match="tensorwise, rowwise, blockwise, delayed"):
        Float8Config(recipe="block")
    with pytest.raises(ValueError, match="auto, emulate, cublas, triton"):
        Float8Config(backend="cudnn")
    with pytest.raises(ValueError, match="FP8 format"):
        Float8Config(forward_format="bf16")
    with pytest.raises(TypeError):
        Float8Linear.from_linear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("recipe", RECIPES)
def test_backward_saves_input_and_weight_in_fp8(recipe):
    """What autograd keeps between forward and backward: FP8 codes (a quarter of FP32) plus small scales."""
    layer = Float8Linear(256, 384, config=Float8Config(recipe=recipe, backend="emulate"))
    x = torch.randn(512, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    big = [t for t in saved if t.numel() >= 256 * 128]
    assert sorted(t.numel() for t in big) == [256 * 384, 256 * 512]     # x^T and W^T, nothing else large
    assert all(t.dtype in fp8 for t in big), [t.dtype for t in big]
    assert sum(t.numel() * t.element_size() for t in saved) < 0.3 * 4 * (x.numel() + layer.weight.numel())
    y.sum().backward()


@pytest.mark.parametrize("cast", ["to", "half", "prepare"])
def test_delayed_scaling_state_stays_fp32_whatever_the_module_dtype(cast):
    f = Float8Linear(32, 16, config=Float8Config(recipe="delayed", backend="emulate"))
    if cast == "prepare":   # a pure-FP16 policy casts the model's parameters and buffers
        holder = torch.nn.Sequential(f)
        mp.prepare(holder, mp.Policy.from_recipe("fp16-true", fp32_rules=False))
    else:
        f = f.to(torch.float16) if cast == "to" else f.half()
    assert f.weight.dtype == torch.float16
    assert all(getattr(f, n).dtype == torch.float32 for n in
               ("amax_history_input", "amax_history_weight", "amax_history_grad_output"))
    x = torch.randn(8, 32) * 1e5          # above FP16's largest value 65504
    f(x)
    assert f(x).isfinite().all()
    assert f.amax_history_input[0] == x.abs().amax()


def test_a_second_derivative_raises_instead_of_dropping_terms():
    """The saved FP8 operands carry no graph to x and W: a gradient penalty through the layer would lose its
    second-order terms silently (its weight-gradient contribution came out 4x off), so it raises."""
    layer = Float8Linear.from_linear(nn.Linear(128, 64), Float8Config(recipe="rowwise"))
    x = torch.randn(8, 128, requires_grad=True)
    with pytest.raises(RuntimeError, match="Float8Linear has no second derivative"):
        torch.autograd.grad(layer(x).pow(2).mean(), x, create_graph=True)
    (grad,) = torch.autograd.grad(layer(x).pow(2).mean(), x)   # a first derivative as before
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
