"""INT8 quantization: codes and scales against a plain NumPy float32 reference, exactly; the SQNR formula."""
import math

import numpy as np
import pytest
import torch

from mixprec.int8 import crest_factor, dequantize, quantize
from mixprec.int8.quantize import AMAX_EPS, float_codes, group_amax

# The rowwise SQNR the module docstring states: rounding to a step of amax/127 leaves uniform noise of
# power step**2/12, so SQNR = 10*log10(12 * 127**2) - 20*log10(crest) = 52.87 dB - crest in dB. For rows
# of 4096 Gaussian values the noise model is close (step << signal), and the measured SQNR of a row
# lies within a fraction of a dB of the prediction: allowed 0.5 dB.
SQNR_FORMULA_DB = 10 * math.log10(12 * 127 ** 2)
SQNR_FORMULA_TOLERANCE_DB = 0.5


def reference(x: torch.Tensor, rowwise: bool = True):
    """The definition in plain NumPy float32 (IEEE-correct division, multiplication and rint):
    scale = amax/127, inv = 1/scale, q = rint(x*inv) (half to even), x_hat = q*scale."""
    a = x.float().numpy().astype(np.float32)
    amax = np.abs(a).max(axis=-1, keepdims=True) if rowwise else np.abs(a).max()
    amax = np.maximum(amax, np.float32(AMAX_EPS)).astype(np.float32)
    scale = (amax / np.float32(127)).astype(np.float32)
    inv = (np.float32(1) / scale).astype(np.float32)
    q = np.rint((a * inv).astype(np.float32))
    return q.astype(np.int8), scale, (q.astype(np.float32) * scale).astype(np.float32)


def random_rows(*shape, dtype=torch.float32):
    # magnitudes over many decades, row by row, and a few exact zeros
    x = torch.randn(*shape) * torch.exp2(torch.randint(-20, 20, (*shape[:-1], 1)).float())
    x[..., 3] = 0.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rowwise", [True, False])
def test_round_trip_matches_plain_reference_exactly(dtype, rowwise):
    x = random_rows(3, 37, 300, dtype=dtype)
    gran = "rowwise" if rowwise else "tensorwise"
    q, scale = quantize(x, gran)
    q_ref, scale_ref, x_hat_ref = reference(x, rowwise)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == ((3, 37, 1) if rowwise else ())
    assert torch.equal(q, torch.from_numpy(q_ref))
    assert torch.equal(scale, torch.from_numpy(np.asarray(scale_ref)).reshape(scale.shape))
    assert torch.equal(dequantize(q, scale), torch.from_numpy(x_hat_ref))
    codes, scale2 = float_codes(x, gran)
    assert torch.equal(codes, q.float()) and torch.equal(scale2, scale)
    assert dequantize(q, scale, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_ties_round_half_to_even_and_codes_are_symmetric():
    # scale = 2**-3 exactly (amax 127 * 2**-3), so x * inv is exact: the halves are ties
    s = 2.0 ** -3
    x = torch.tensor([[127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127]]) * s
    q, scale = quantize(x)
    assert scale.item() == s
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, -127]]
    y = torch.randn(64, 200)
    assert torch.equal(quantize(-y)[0], -quantize(y)[0])
    assert int(quantize(y)[0].min()) >= -127          # -128 never appears


def test_transposed_views_and_given_amax():
    w = torch.randn(48, 80)
    q_t, s_t = quantize(w.t())                          # per column of w
    q_c, s_c = quantize(w.t().contiguous())
    assert torch.equal(q_t, q_c) and torch.equal(s_t, s_c)
    x = torch.randn(4, 64)
    amax = group_amax(x) / 4                             # values past amax saturate at +-127
    q, scale = quantize(x, amax=amax)
    assert int(q.abs().max()) == 127
    assert torch.equal(q, torch.round(x * (1.0 / scale.double()).float()).clamp(-127, 127).to(torch.int8))


def test_zero_rows_and_nonfinite_groups():
    x = torch.randn(4, 32)
    x[1] = 0.0
    x[2, 5] = float("inf")
    x[3, 7] = float("nan")
    q, scale = quantize(x)
    assert torch.equal(q[1], torch.zeros(32, dtype=torch.int8)) and scale[1].item() > 0
    x_hat = dequantize(q, scale)
    assert torch.isfinite(x_hat[:2]).all()
    assert not torch.isfinite(x_hat[2]).all() and torch.isnan(x_hat[3]).all()   # overflow stays visible


def test_sqnr_follows_the_crest_factor_formula():
    x = torch.randn(16, 4096, dtype=torch.float64).float()
    q, scale = quantize(x)
    err = (dequantize(q, scale) - x).double()
    measured = 10 * torch.log10(x.double().pow(2).sum(-1) / err.pow(2).sum(-1))
    predicted = SQNR_FORMULA_DB - 20 * torch.log10(crest_factor(x).double().squeeze(-1))
    assert (measured - predicted).abs().max() < SQNR_FORMULA_TOLERANCE_DB, (measured - predicted)


def test_crest_factor_bounds():
    x = torch.zeros(3, 100)
    x[0] = 1.0                                  # flat: crest 1
    x[1, 0] = 5.0                               # one value: crest sqrt(n)
    c = crest_factor(x)
    assert torch.allclose(c.squeeze(), torch.tensor([1.0, 10.0, 1.0]))   # all-zero row: 1
    assert crest_factor(torch.ones(8, 8), "tensorwise").shape == ()


def test_errors_name_the_choices():
    with pytest.raises(ValueError, match="choose one of: tensorwise, rowwise"):
        quantize(torch.randn(4), "1x128")
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.ones(4, dtype=torch.int32))
