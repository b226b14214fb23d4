import math

import pytest
import torch

from mixprec import formats
from mixprec.formats import FORMATS, round_to


def _edge_and_random(n=200_000):
    # Random magnitudes across every format's range, random bit patterns (all of FP32), and edges.
    mags = torch.cat([torch.randn(n // 10) * 10.0 ** e for e in range(-10, 10, 2)])
    bits = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32).view(torch.float32)
    edges = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 448.0, 464.0, 480.0, 57344.0,
                          61440.0, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-14, 2.0**-9, 2.0**-10, 2.0**-16,
                          2.0**-17, float("inf"), -float("inf"), float("nan")])
    return torch.cat([mags, bits, edges])


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp8_e5m2", "fp8_e4m3"])
def test_round_to_matches_native_cast(name):
    # Native casts are IEEE round-to-nearest-even; round_to must agree bit for bit (without saturation).
    f = FORMATS[name]
    x = _edge_and_random()
    got = round_to(x, name, saturate=False)
    want = x.to(f.torch_dtype).float()
    if name == "fp8_e4m3":  # the native E4M3fn cast sends overflow to NaN, round_to to inf: compare in range
        keep = x.abs() < 464.0
        got, want = got[keep], want[keep]
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    assert same.all(), x[~same][:5]
    assert torch.equal(torch.signbit(got[got == 0]), torch.signbit(want[want == 0]))


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp8_e5m2", "fp8_e4m3"])
def test_fast_round_to_equals_reference(name):
    x = _edge_and_random()
    for saturate in (False, True):
        a = formats.fast_round_to(x, name, saturate=saturate)
        b = round_to(x, name, saturate=saturate)
        assert torch.equal(torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0))


def test_saturation_and_overflow():
    x = torch.tensor([1e6, -1e6, 500.0, 449.0])
    assert round_to(x, "fp8_e4m3").tolist() == [448.0, -448.0, 448.0, 448.0]  # E4M3 saturates by default
    assert round_to(x, "fp16").tolist() == [math.inf, -math.inf, 500.0, 449.0]
    assert round_to(x, "fp16", saturate=True).tolist() == [65504.0, -65504.0, 500.0, 449.0]


@pytest.mark.parametrize("name", list(FORMATS))
def test_format_constants(name):
    f = FORMATS[name]
    if f.torch_dtype is not None:
        fi = torch.finfo(f.torch_dtype)
        assert f.max == fi.max and f.min_normal == fi.tiny and f.eps == fi.eps
        assert f.min_subnormal == fi.smallest_normal * fi.eps if hasattr(fi, "smallest_normal") else True
    # the smallest subnormal survives rounding, half of it (a tie to even zero) does not
    assert round_to(torch.tensor([f.min_subnormal]), f).item() == f.min_subnormal
    assert round_to(torch.tensor([f.min_subnormal / 2]), f).item() == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match="choose one of: fp32, fp16, bf16, fp8_e4m3, fp8_e5m2"):
        formats.get_format("fp12")
    with pytest.raises(TypeError, match="floating-point"):
        round_to(torch.arange(4), "fp16")
