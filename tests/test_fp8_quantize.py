"""mixprec.fp8.quantize against an independent float64 reference: scales and codes match exactly."""
import math

import pytest
import torch

from mixprec.formats import get_format
from mixprec.fp8 import GRANULARITIES, dequantize, quantize, scale_from_amax
from mixprec.fp8.quantize import delayed_amax, group_amax, record_amax
from mixprec.fp8.quantize import AMAX_EPS, codes_to_float
from quantization_cases import ref_round, tie_inputs

FORMATS = ("fp8_e4m3", "fp8_e5m2")


def ref_scale(amax64: float, fmt: str, power_of_2: bool) -> float:
    eps = float(torch.tensor(AMAX_EPS, dtype=torch.float32))
    s = max(amax64, eps) / get_format(fmt).max               # float64, rounded once to FP32 below
    if power_of_2:
        return 2.0 ** math.ceil(math.log2(s)) if s != 2.0 ** round(math.log2(s)) else s
    return float(torch.tensor(s, dtype=torch.float64).float())


def groups(shape: tuple[int, int], granularity: str, b: int = 128):
    """Yield (scale index, row slice, column slice) for every scaling group of a 2-D tensor."""
    r, k = shape
    if granularity == "tensorwise":
        yield (), slice(0, r), slice(0, k)
    elif granularity == "rowwise":
        for i in range(r):
            yield (i, 0), slice(i, i + 1), slice(0, k)
    elif granularity == "1x128":
        for i in range(r):
            for t in range(0, k, b):
                yield (i, t // b), slice(i, i + 1), slice(t, t + b)
    else:
        for s in range(0, r, b):
            for t in range(0, k, b):
                yield (s // b, t // b), slice(s, s + b), slice(t, t + b)


def with_outliers(r: int, k: int) -> torch.Tensor:
    x = torch.randn(r, k) * torch.exp(torch.randn(r, k))            # heavy tails: several octaves
    x[torch.randint(0, r, (5,)), torch.randint(0, k, (5,))] *= 1e4  # a few large outliers
    x[:, 7] *= 1e-6                                                 # a tiny channel: subnormal codes
    x[0:3, 128:256] = 0.0                                           # an all-zero 1x128 tile: the eps floor
    return x


def check_exact(x: torch.Tensor, fmt: str, granularity: str, power_of_2: bool = False) -> None:
    q, scale = quantize(x, fmt, granularity, power_of_2=power_of_2)
    assert q.dtype == get_format(fmt).torch_dtype and q.shape == x.shape
    assert scale.dtype == torch.float32
    x64 = x.double()
    expected_codes = torch.empty_like(x64)
    n = 0
    for idx, rows, cols in groups(tuple(x.shape), granularity):
        s = ref_scale(x64[rows, cols].abs().max().item(), fmt, power_of_2)
        assert scale[idx].item() == s, (granularity, idx)
        inv = float(torch.tensor(1.0 / s, dtype=torch.float64).float())    # FP32 reciprocal, rounded once
        expected_codes[rows, cols] = ref_round(x64[rows, cols] * inv, fmt)
        n += 1
    assert scale.numel() == n
    assert torch.equal(q.double(), expected_codes)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("values", ["fp32", "bf16"])
def test_scales_and_codes_equal_float64_reference(fmt, granularity, values):
    x = with_outliers(200, 300)                               # 300 = 2 * 128 + 44: a padded tile
    if values == "bf16":   # short significands: FP32 quotients land on FP8 ties more often
        x = x.bfloat16().float()
    check_exact(x, fmt, granularity)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_power_of_2_scales_exact(fmt, granularity):
    x = with_outliers(130, 260)
    check_exact(x, fmt, granularity, power_of_2=True)
    _, scale = quantize(x, fmt, granularity, power_of_2=True)
    mantissa, _ = torch.frexp(scale)
    assert torch.all(mantissa == 0.5)                         # exact powers of two


def test_non_contiguous_and_bf16_inputs():
    base = with_outliers(300, 200)
    x = base.t()                                              # (200, 300) view, strides (1, 200)
    assert not x.is_contiguous()
    for granularity in GRANULARITIES:
        q, s = quantize(x, "fp8_e4m3", granularity)
        q2, s2 = quantize(x.contiguous(), "fp8_e4m3", granularity)
        assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    xb = with_outliers(64, 256).bfloat16()
    check_exact(xb.float(), "fp8_e4m3", "1x128")
    qb, sb = quantize(xb, "fp8_e4m3", "1x128")
    qf, sf = quantize(xb.float(), "fp8_e4m3", "1x128")
    assert torch.equal(qb.view(torch.uint8), qf.view(torch.uint8)) and torch.equal(sb, sf)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shape", [(200, 300), (256, 384), (128, 256)])   # partial tiles; whole tiles
def test_dequantize_reads_granularity_from_scale_shape(granularity, shape):
    x = with_outliers(*shape)
    q, scale = quantize(x, "fp8_e4m3", granularity)
    x_hat = dequantize(q, scale)
    expected = torch.empty(*shape, dtype=torch.float64)
    for idx, rows, cols in groups(shape, granularity):
        expected[rows, cols] = q[rows, cols].double() * scale[idx].item()
    assert torch.equal(x_hat, expected.float())    # the exact product, rounded once to FP32
    big = x.abs() > 1e-3 * x.abs().max()
    assert ((x_hat - x).abs()[big] <= x.abs()[big] * 2 ** -4 + 1e-30).all()   # E4M3: half an ulp is 2**-4 relative


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_codes_to_float_equals_pytorch_upcast_for_every_code(dtype):
    # all 256 bit patterns: signed zeros, subnormals, the largest values, infinities and NaN
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).reshape(16, 16)
    want, got = codes.float(), codes_to_float(codes)
    assert got.dtype == torch.float32 and got.shape == want.shape
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    assert bool(same.all()), codes.view(torch.uint8)[~same].tolist()
    q = codes.t()      # a non-contiguous view reads the same values
    assert torch.equal(codes_to_float(q).nan_to_num(0.5), q.float().nan_to_num(0.5))


def test_leading_dims_for_row_and_tile_granularity():
    x = torch.randn(3, 5, 200)
    for granularity in ("tensorwise", "rowwise", "1x128"):
        q, scale = quantize(x, "fp8_e4m3", granularity)
        q2, scale2 = quantize(x.reshape(15, 200), "fp8_e4m3", granularity)
        assert torch.equal(q.reshape(15, 200).view(torch.uint8), q2.view(torch.uint8))
        assert torch.equal(scale.reshape(scale2.shape), scale2)
        assert torch.allclose(dequantize(q, scale), dequantize(q2, scale2).reshape(3, 5, 200))


def test_saturating_cast_with_given_amax():
    x = torch.randn(64, 64) * 10
    q, scale = quantize(x, "fp8_e4m3", amax=x.abs().max() / 4)     # a stale amax, 4x too small
    assert torch.isfinite(q.float()).all()
    assert q.float().abs().max().item() == 448.0
    q5, _ = quantize(x, "fp8_e5m2", amax=x.abs().max() / 4)
    assert torch.isfinite(q5.float()).all() and q5.float().abs().max().item() == 57344.0


def test_delayed_scaling_uses_the_history_max():
    """Transformer Engine's DelayedScaling: the scale of each call comes from the largest of the previous
    `length` amaxes (the current one while the history is empty); then the current amax is recorded."""
    history = torch.zeros(3)
    xs = [torch.randn(32, 32) * m for m in (1.0, 4.0, 0.5, 0.25, 0.25)]
    amaxes = [x.abs().max() for x in xs]
    used = []
    for x in xs:
        current = group_amax(x, "tensorwise")
        _, s = quantize(x, "fp8_e4m3", "tensorwise", amax=delayed_amax(history, current))
        record_amax(history, current)
        used.append(s)
    expected_amax = [amaxes[0], amaxes[0], max(amaxes[:2]), max(amaxes[:3]), max(amaxes[1:4])]
    for s, a in zip(used, expected_amax):
        assert torch.equal(s, scale_from_amax(a, "fp8_e4m3"))
    assert torch.equal(history, torch.stack([amaxes[4], amaxes[3], amaxes[2]]))


def test_bad_arguments_name_the_choices():
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="tensorwise, rowwise, 1x128, 128x128"):
        quantize(x, "fp8_e4m3", "per_tile")
    with pytest.raises(ValueError, match="fp8_e4m3, fp8_e5m2"):
        quantize(x, "fp16", "tensorwise")
    with pytest.raises(ValueError, match="choose one of"):
        quantize(x, "fp9", "tensorwise")
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(2, 3, 4), "fp8_e4m3", "128x128")
    with pytest.raises(TypeError):
        quantize(torch.arange(4), "fp8_e4m3")


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp32_products_on_fp8_ties_round_correctly(fmt):
    for _ in range(100):   # a fresh random amax until its scale has such values
        amax = (torch.empty(()).uniform_(1e3, 1e5) * get_format(fmt).max / 448).float()
        tricky = tie_inputs(fmt, amax)
        if tricky.numel() >= 5:
            break
    assert tricky.numel() >= 5                                # the case this test is about does occur
    x = torch.cat([amax.reshape(1), tricky[torch.randperm(tricky.numel())[:127]]]).reshape(1, -1)
    check_exact(x, fmt, "tensorwise")
    check_exact(x, fmt, "1x128")
