"""Quantization codes, block-wise storage and rounding of mixprec.optim (CPU, exact where deterministic)."""
import math

import pytest
import torch

from mixprec.optim import blockwise, codes, rounding

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: threads only contend


MINIFLOATS = [codes.INT8_M, codes.INT8_V, codes.INT4_M, codes.INT4_V]


@pytest.mark.parametrize("code", MINIFLOATS, ids=lambda c: c.name)
def test_minifloat_table_shape(code):
    table = code.table()
    assert table.numel() == 2 ** code.bits
    mags = table[: 2 ** (code.exp_bits + code.man_bits)]
    assert torch.all(mags[1:] > mags[:-1]), "magnitudes must increase with the code"
    assert mags[-1].item() == code.max_value
    if code.subnormals:
        assert mags[0].item() == 0.0
    else:  # the second moment's codes have no zero: the smallest value is the lowest binade's start
        assert mags[0].item() == code.min_normal > 0
    if code.signed:
        assert torch.equal(table[2 ** (code.bits - 1):], -mags)


@pytest.mark.parametrize("code", MINIFLOATS, ids=lambda c: c.name)
def test_minifloat_encode_is_nearest_table_entry(code):
    table = code.table()
    top = code.max_value
    # random values over the whole range, log-spread magnitudes, exact table entries and midpoints
    n = 100_000
    u = torch.cat([
        (torch.rand(n) * 2 - 1) * top * 1.1,
        torch.sign(torch.randn(n)) * top * torch.exp2(-torch.rand(n) * 24),
        table, (table[1:] + table[:-1]) / 2,
        torch.tensor([0.0, -0.0, top, 2 * top, 1e-30]),
    ])
    if not code.signed:
        u = u.abs()
    got = code.encode(u)
    assert got.dtype == torch.uint8
    # every entry encodes to its own code (the signed codes' -0 included)
    assert torch.equal(code.encode(table), torch.arange(2 ** code.bits, dtype=torch.uint8))
    dist_got = (code.decode(got) - u.clamp(-top, top)).abs()
    for chunk in range(0, u.numel(), 20_000):  # nearest entry (in chunks: the distance matrix is large)
        uc = u[chunk:chunk + 20_000].clamp(-top, top)
        best = (table[None, :] - uc[:, None]).abs().amin(dim=1)
        assert torch.equal(dist_got[chunk:chunk + 20_000], best), code.name


@pytest.mark.parametrize("code", MINIFLOATS, ids=lambda c: c.name)
def test_minifloat_round_to_nearest_even_on_ties(code):
    mags = code.table()[: 2 ** (code.exp_bits + code.man_bits)]
    mid = (mags[1:] + mags[:-1]) / 2
    got = code.encode(mid).long() & (2 ** (code.exp_bits + code.man_bits) - 1)
    assert torch.all(got % 2 == 0), "ties go to the even code (the one whose last mantissa bit is 0)"


def test_no_zero_codes_never_round_small_values_to_zero():
    for code in (codes.INT8_V, codes.INT4_V):
        tiny = torch.tensor([0.0, 1e-30, code.min_normal / 3])
        assert torch.all(code.decode(code.encode(tiny)) == code.min_normal)
    v = codes.FP8_V
    assert torch.all(v.decode(v.encode(torch.tensor([0.0, 1e-12]))) == v.min_value)


def test_fp8_code_is_the_hardware_format():
    x = torch.randn(10_000) * 100
    q = codes.FP8_M.encode(x)
    assert q.dtype == torch.float8_e4m3fn
    assert torch.equal(q.float(), x.clamp(-448, 448).to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("name", ["int8", "int4", "fp8"])
def test_blockwise_roundtrip(name):
    fmt = codes.get_state_format(name)
    n = 5 * fmt.block + 37  # a partial tail block
    x = torch.randn(n) * torch.exp(torch.randn(n))
    for code in (fmt.m_code, fmt.v_code):
        xs = x if code.signed else x.abs()
        q, absmax = blockwise.quantize_blockwise(xs, code, fmt.block)
        nblocks = -(-n // fmt.block)
        assert q.numel() == nblocks * fmt.block * fmt.bits // 8
        assert torch.equal(absmax, torch.nn.functional.pad(xs, (0, nblocks * fmt.block - n)).view(nblocks, -1)
                           .abs().amax(1))
        back = blockwise.dequantize_blockwise(q, absmax, code, fmt.block, n)
        # every value decodes to the table entry nearest to it (after scaling), so the error is at most
        # half the largest gap of the table (or the distance to the smallest value for no-zero codes)
        mags = code.decode(torch.arange(256, dtype=torch.int32).to(torch.uint8)).abs().unique() \
            if name != "fp8" else None
        scale = absmax.clamp(min=codes.MIN_BLOCK_ABSMAX) / code.max_value
        per_value_scale = scale.repeat_interleave(fmt.block)[:n]
        err = (back - xs).abs() / per_value_scale
        if mags is not None:
            mags = mags[mags <= code.max_value]
            bound = max(((mags[1:] - mags[:-1]) / 2).max().item(), mags[0].item())
        else:
            bound = 16.0  # E4M3: half of the largest gap (256 .. 288 .. 448: gaps of 32)
        assert err.max().item() <= bound * (1 + 1e-6)
        # the block's largest value is exact up to FP32 rounding of the scale
        assert torch.allclose(back.abs().view(-1)[:n].max(), xs.abs().max(), rtol=1e-6)


def test_pack_4bit_layout_and_roundtrip():
    block = 128
    c = torch.randint(0, 16, (3 * block,), dtype=torch.uint8)
    packed = blockwise.pack_4bit(c, block)
    assert packed.numel() == c.numel() // 2
    # byte j of a block holds value j (low nibble) and value j + 64 (high nibble)
    assert packed[5].item() == c[5].item() | (c[64 + 5].item() << 4)
    assert packed[64 + 3].item() == c[128 + 3].item() | (c[128 + 64 + 3].item() << 4)
    assert torch.equal(blockwise.unpack_4bit(packed, block), c)


def test_state_bytes_per_param():
    assert codes.get_state_format("int8").bytes_per_param() <= 2.05
    assert codes.get_state_format("fp8").bytes_per_param() <= 2.05
    assert codes.get_state_format("int4").bytes_per_param() <= 1.1
    assert codes.get_state_format("bf16").bytes_per_param() == 4
    assert codes.get_state_format("fp32").bytes_per_param() == 8


def _mix32_python(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_mix32_matches_uint32_arithmetic():
    xs = torch.randint(0, 2 ** 32, (1000,), dtype=torch.int64)
    got = rounding.mix32(xs)
    assert got.tolist() == [_mix32_python(int(x)) for x in xs]
    assert rounding.mix32(12345) == _mix32_python(12345)


def _unit(bits):
    return bits.double() / 2 ** 32


def test_random_bits_are_uniform_and_reproducible():
    key = rounding.stream_key(seed=7, tensor_id=3, step=11, stream=0)
    bits = rounding.random_bits(key, 200_000)
    assert torch.equal(bits, rounding.random_bits(key, 200_000))
    assert 0 <= bits.min() and bits.max() < 2 ** 32
    for r in (_unit(bits), (bits & 0xFFFF).double() / 2 ** 16, (bits >> 16).double() / 2 ** 16):
        hist = torch.histc(r.float(), bins=10, min=0, max=1) / r.numel()
        assert (hist - 0.1).abs().max() < 0.005  # 20k samples a bin: std 0.0007
    low, high = (bits & 0xFFFF).double(), (bits >> 16).double()  # the halves BF16 state uses for m and v
    assert abs(torch.corrcoef(torch.stack([low, high]))[0, 1]) < 0.01
    other = rounding.random_bits(rounding.stream_key(seed=7, tensor_id=3, step=12, stream=0), 200_000)
    assert abs(torch.corrcoef(torch.stack([_unit(bits), _unit(other)]))[0, 1]) < 0.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_neighbours_and_unbiased(dtype):
    x = torch.randn(4000) * torch.exp2(torch.randint(-20, 10, (4000,)).float())
    if dtype == torch.float16:
        x = x.clamp(-60000, 60000)
    a = x.abs()
    # the two neighbours of |x| in dtype, through nextafter (independent of the implementation's bit steps)
    n = a.to(dtype)
    down = torch.where(n.float() > a, torch.nextafter(n, torch.zeros_like(n)), n).float()
    up = torch.nextafter(down.to(dtype), torch.full_like(n, float("inf"))).float()
    gap = up - down
    reps = 200
    total = torch.zeros_like(x, dtype=torch.float64)
    for i in range(reps):
        r = rounding.random_bits(rounding.stream_key(1, 0, i, 0), x.numel())
        y = rounding.stochastic_round(x, dtype, r).float()
        assert torch.all((y.abs() == down) | (y.abs() == up)) and torch.all(torch.sign(y) * torch.sign(x) >= 0)
        total += y.double()
    bias = ((total / reps).float() - x) / gap
    # unbiased: each mean of 200 draws within 6 sigma (sigma <= gap / (2 sqrt(200))), and no drift overall
    assert bias.abs().max() <= 6 * 0.5 / reps ** 0.5
    assert abs(bias.mean().item()) < 0.01


def test_stochastic_round_exact_values_and_saturation():
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, 65504.0, 70000.0])
    r = torch.full(x.shape, 2 ** 32 - 1, dtype=torch.int64)  # the largest draw: rounds up whenever it can
    y = rounding.stochastic_round(x[:4], torch.bfloat16, r[:4])
    assert torch.equal(y.float(), x[:4]) and torch.signbit(y[1])
    h = rounding.stochastic_round(x[4:], torch.float16, r[4:]).float()
    assert h.tolist() == [65504.0, 65504.0]  # past the largest finite value it saturates


def test_kahan_add_keeps_small_updates():
    p = torch.ones(1000, dtype=torch.bfloat16)
    comp = torch.zeros_like(p)
    for _ in range(1000):
        p, comp = rounding.kahan_add(p, torch.full((1000,), -1e-4), comp)
    total = p.float() + comp.float()
    assert torch.allclose(total, torch.full_like(total, 0.9), rtol=1e-3)
    assert (p.float() - 0.9).abs().max() <= 2 ** -8  # the stored value is within an ulp of the truth


# ---- non-finite values: one NaN or inf must not reach its block's other values ----

@pytest.mark.parametrize("name", ["int8", "int4", "fp8"])
def test_blockwise_stores_nonfinite_as_zero_over_the_finite_absmax(name):
    fmt = codes.get_state_format(name)
    b = fmt.block
    n = 4 * b + 37                      # blocks 0-3 and a tail block
    x = torch.randn(n) * torch.exp(torch.randn(n))
    bad = {3: float("nan"), 4: float("inf"), 3 + b // 2: -float("inf"),   # block 0: both halves (4-bit pairs)
           2 * b + 7: float("nan")}                                      # block 2
    for i, val in bad.items():
        x[i] = val
    x[3 * b:4 * b] = float("nan")       # block 3: nothing finite
    x[-1] = float("inf")                # the tail block
    finite = torch.isfinite(x)
    for code in (fmt.m_code, fmt.v_code):
        xs = x if code.signed else torch.where(torch.isnan(x), x, x.abs())
        zeroed = torch.where(finite, xs, torch.zeros(()))
        q, absmax = blockwise.quantize_blockwise(xs, code, fmt.block)
        q0, absmax0 = blockwise.quantize_blockwise(zeroed, code, fmt.block)
        # the contract: bit for bit the quantization of the same values with the non-finite ones set to 0
        assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(absmax, absmax0)
        # the absmax, written plainly: the largest finite magnitude of each block (0 for block 3)
        plain = [max([abs(v) for v in xs[k:k + b].tolist() if math.isfinite(v)], default=0.0)
                 for k in range(0, n, b)]
        assert absmax.tolist() == plain and absmax[3].item() == 0.0
        back = blockwise.dequantize_blockwise(q, absmax, code, fmt.block, n)
        assert torch.isfinite(back).all()
        # a value that was non-finite decodes as a stored 0 does: 0 (no-zero codes: their smallest value)
        zero_code = code.decode(code.encode(torch.zeros(1)))
        scale = absmax.clamp(min=codes.MIN_BLOCK_ABSMAX).repeat_interleave(b)[:n] / code.max_value
        assert torch.equal(back[~finite], (zero_code * scale)[~finite])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_keeps_nan_and_infinities(dtype):
    # NaN patterns: the CPU's (0x7FC00000, 0xFFC00000), the GPU's (0x7FFFFFFF), and others whose low half
    # is all ones, which adding random bits would carry into the exponent or the sign (BF16 gave -0.0 / 0.0)
    nans = torch.tensor([0x7FC00000, 0xFFC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FC0FFFF, 0x7F80FFFF], dtype=torch.int64)
    nans = torch.where(nans >= 2 ** 31, nans - 2 ** 32, nans).to(torch.int32).view(torch.float32)
    x = torch.cat([nans, torch.tensor([float("inf"), -float("inf")])])
    assert torch.isnan(x[:6]).all()
    xs = x.repeat(1000)
    r = rounding.random_bits(rounding.stream_key(3, 1, 5, 0), xs.numel())
    r[: x.numel()] = 2 ** 32 - 1        # the largest draw too
    y = rounding.stochastic_round(xs, dtype, r).float().view(1000, -1)
    assert torch.isnan(y[:, :6]).all()
    assert (y[:, 6] == float("inf")).all() and (y[:, 7] == -float("inf")).all()
