"""The quantize kernels' scales on an NVIDIA GPU: the fast division paths in PTX that kernels._scale
uses equal correctly rounded division for every FP32 amax."""
import pytest
import torch

from mixprec.fp8.quantize import AMAX_EPS, get_fp8_format

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
kernels = pytest.importorskip("mixprec.fp8._kernels")

pytestmark = pytest.mark.cuda


@triton.jit
def _scale_mismatches_kernel(count_ptr, FMAX: tl.constexpr, POW2: tl.constexpr, EPS: tl.constexpr,
                             BLOCK: tl.constexpr):
    # amax = every FP32 bit pattern from +0 to +inf; counts where the PTX scales differ from tl.div_rn's
    bits = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    amax = bits.to(tl.float32, bitcast=True)
    s_fast, inv_fast = kernels._scale(amax, FMAX, POW2, EPS, True)
    s_ref, inv_ref = kernels._scale(amax, FMAX, POW2, EPS, False)
    differ = ((s_fast.to(tl.int32, bitcast=True) != s_ref.to(tl.int32, bitcast=True))
              | (inv_fast.to(tl.int32, bitcast=True) != inv_ref.to(tl.int32, bitcast=True)))
    tl.atomic_add(count_ptr, tl.sum((differ & (bits <= 0x7F800000)).to(tl.int32)), sem="relaxed")


@pytest.mark.parametrize("power_of_2", [False, True])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_kernel_scales_equal_correctly_rounded_division_for_every_amax(fmt, power_of_2):
    """The kernels' scales (the fast paths of div.rn and rcp.rn in PTX) equal tl.div_rn's correctly
    rounded divisions for all 2^31 non-negative FP32 amaxes, infinity included."""
    count = torch.zeros(1, dtype=torch.int32, device="cuda")
    block = 1024
    _scale_mismatches_kernel[(0x7F800000 // block + 1,)](count, FMAX=get_fp8_format(fmt).max, POW2=power_of_2,
                                                         EPS=AMAX_EPS, BLOCK=block)
    assert count.item() == 0
