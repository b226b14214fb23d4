"""The INT8 GEMM: the emulation equals the GPU kernel's definition (int32 accumulation, then FP32
scaling) exactly, written out plainly here; the int_mm path's padding, run through torch._int_mm on the CPU."""
import pytest
import torch

from mixprec.int8 import accumulate, mm_nt, quantize
from mixprec.int8.gemm import EXACT_FP32_TERMS, MAX_K, Operand
from mixprec.int8.quantize import float_codes
from quantization_cases import extreme_pair, int32_reference


def codes(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


@pytest.mark.parametrize("m,k,n,extreme", [(5, 16, 7, False), (33, 1024, 24, True), (9, 2500, 11, True),
                                           (3, 3000, 4, False)])
def test_emulated_accumulation_is_int32_exactly(m, k, n, extreme):
    a, b = extreme_pair(m, k, n) if extreme else (codes(m, k), codes(n, k))
    ref = int32_reference(a, b)
    if extreme and k > EXACT_FP32_TERMS:
        assert ref.abs().max() > 2 ** 24 and not torch.equal(ref.float().to(torch.int64), ref.to(torch.int64))
    got = accumulate(a, b, backend="emulate")
    assert got.dtype == torch.float32
    assert torch.equal(got, ref.float())                  # float32(int32 sum): one rounding, to nearest even
    assert torch.equal(accumulate(a.float(), b.float(), backend="emulate"), ref.float())   # FP32 codes
    assert torch.equal(accumulate(a.t().contiguous().t(), b, backend="emulate"), ref.float())   # strides


@pytest.mark.parametrize("m,k,n", [(5, 13, 7), (17, 8, 8), (40, 30, 9)])
def test_int_mm_path_pads_to_its_rules_exactly(m, k, n):
    # torch._int_mm runs on the CPU too (slowly): the padding for M > 16, K % 8, N % 8 is checked here
    a, b = codes(m, k), codes(n, k)
    try:
        got = accumulate(a, b, backend="int_mm")
    except RuntimeError as e:   # a build without the CPU kernel
        pytest.skip(f"torch._int_mm on the CPU: {e}")
    assert torch.equal(got, int32_reference(a, b).float())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b_gran", ["rowwise", "tensorwise"])
def test_mm_nt_is_the_kernel_definition(out_dtype, b_gran):
    x, w = torch.randn(20, 72) * 3, torch.randn(24, 72) / 7
    (qa, sa), (qb, sb) = quantize(x), quantize(w, b_gran)
    out = mm_nt(Operand(qa, sa), Operand(qb, sb), out_dtype=out_dtype, backend="emulate")
    acc = int32_reference(qa, qb).float()                 # int32 -> FP32, then
    ref = acc * sa                                        # times A's row scale (FP32), then
    ref = ref * (sb.reshape(1, -1) if b_gran == "rowwise" else sb)   # times B's scale, then
    assert torch.equal(out, ref.to(out_dtype))            # the output dtype
    fa, fb = float_codes(x), float_codes(w, b_gran)
    assert torch.equal(mm_nt(Operand(*fa), Operand(*fb), out_dtype=out_dtype, backend="emulate"), out)


def test_accumulator_limits():
    assert 127 ** 2 * MAX_K < 2 ** 31 <= 127 ** 2 * (MAX_K + 1)
    assert 128 ** 2 * EXACT_FP32_TERMS <= 2 ** 24
    with pytest.raises(ValueError, match="overflow its int32 accumulator"):
        accumulate(torch.zeros(1, MAX_K + 1, dtype=torch.int8), torch.zeros(1, MAX_K + 1, dtype=torch.int8),
                   backend="emulate")
    with pytest.raises(TypeError, match="INT8 codes"):
        accumulate(torch.zeros(2, 8, dtype=torch.int32), torch.zeros(2, 8, dtype=torch.int8), backend="emulate")
    with pytest.raises(ValueError, match="choose one of: emulate, int_mm"):
        accumulate(codes(2, 8), codes(2, 8), backend="cublas")
