"""The cublas backend's plumbing on the CPU: operands padded along K and scales laid out as torch._scaled_mm
checks them (aten/src/ATen/native/cuda/ScaledBlas.cpp, both the older check and the newer one that wants
the K tiles of a 128x128 scale padded to a multiple of 4), computing the same product as emulate.

torch._scaled_mm is replaced by a stand-in that applies those checks and the documented semantics
(a row-major, b column-major, dequantization scales); test_fp8_cuda.py runs the real one."""
import pytest
import torch

from mixprec.fp8 import gemm
from mixprec.fp8.gemm import Operand, mm_nt
from mixprec.fp8.recipes import GRANULARITY, quantize_pair
from tolerances import FP32_ORDER_RTOL


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _size_stride(scale: torch.Tensor, dim: int, size: int, stride: int) -> bool:
    return scale.size(dim) == size and (size == 1 or scale.stride(dim) == stride)


def _kind(t: torch.Tensor, scale: torch.Tensor) -> str:
    """Which scaling torch._scaled_mm recognises for operand t (R, K) with K contiguous; raises otherwise."""
    r, k = t.shape
    tiles = _ceil(k, 128)
    if scale.numel() == 1:
        return "tensorwise"
    if scale.shape == (r, 1) and scale.is_contiguous():
        return "rowwise"
    if scale.dim() == 2 and _size_stride(scale, 0, r, 1) and _size_stride(scale, 1, tiles, r):
        return "1x128"
    if scale.dim() == 2 and _size_stride(scale, 1, tiles, 1):
        old = _size_stride(scale, 0, _ceil(r, 128), tiles)
        new = _size_stride(scale, 0, _ceil(r, 128), -(-tiles // 4) * 4)
        if old and new:
            return "128x128"
    raise AssertionError(f"torch._scaled_mm would refuse scale {tuple(scale.shape)} strides {scale.stride()} "
                         f"for an operand {tuple(t.shape)}")


def _expand(scale: torch.Tensor, kind: str, shape: tuple[int, int]) -> torch.Tensor:
    if kind in ("tensorwise", "rowwise"):
        return scale.reshape(-1, 1) if kind == "rowwise" else scale.reshape(())
    rows = 1 if kind == "1x128" else 128
    return scale.repeat_interleave(rows, 0).repeat_interleave(128, 1)[:shape[0], :shape[1]]


def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum=False):
    assert a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and b.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    assert a.is_contiguous() and b.t().is_contiguous(), "a row-major, b column-major"
    assert a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0
    kinds = (_kind(a, scale_a), _kind(b.t(), scale_b.t()))
    allowed = {("tensorwise", "tensorwise"), ("rowwise", "rowwise"), ("1x128", "128x128"), ("128x128", "1x128"),
               ("1x128", "1x128")}
    assert kinds in allowed, kinds
    a_hat = a.float() * _expand(scale_a, kinds[0], tuple(a.shape))
    b_hat = b.t().float() * _expand(scale_b.t(), kinds[1], tuple(b.t().shape))
    return (a_hat.double() @ b_hat.double().t()).to(out_dtype)


@pytest.mark.parametrize("recipe", ["blockwise", "tensorwise", "rowwise"])
@pytest.mark.parametrize("m,n,k", [(1000, 768, 256), (256, 272, 304), (384, 128, 1664)])
def test_cublas_operands_and_scale_layouts(monkeypatch, recipe, m, n, k):
    """Every GEMM of a linear layer (forward, input grad, weight grad): K of 256 (2 tiles: padded to 4),
    304 (a partial tile), 1664 (13 tiles), and M = 1000 tokens as the weight gradient's K."""
    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    act, wgt = GRANULARITY[recipe]
    pow2 = recipe == "rowwise"
    x, w, dy = torch.randn(m, k), torch.randn(n, k) * 0.05, torch.randn(m, n)
    xa, xt = quantize_pair(x, "fp8_e4m3", act, backend="emulate", power_of_2=pow2)
    wa, wt = quantize_pair(w, "fp8_e4m3", wgt, backend="emulate", power_of_2=pow2)
    da, dt = quantize_pair(dy, "fp8_e4m3", act, backend="emulate", power_of_2=pow2)
    for lhs, rhs in ((xa, wa), (da, wt), (dt, xt)):
        got = mm_nt(lhs, rhs, out_dtype=torch.float32, backend="cublas")
        ref = mm_nt(lhs, rhs, out_dtype=torch.float32, backend="emulate")
        # the stand-in sums in float64, emulate in FP32: a norm-wise FP32 summation-order difference; a
        # wrong scale layout or padding is off by O(1)
        assert got.shape == ref.shape
        assert ((got - ref).norm() / ref.norm()).item() <= FP32_ORDER_RTOL


def test_layouts_of_triton_scales_need_no_copy():
    """The Triton kernels write 1x128 scales outer-dim-major already: the layout step must not copy them."""
    s_buffer = torch.rand(4, 1000)                       # (K/128, R) as the kernel writes it
    op = Operand(torch.zeros(1000, 512, dtype=torch.float8_e4m3fn), s_buffer.t(), "1x128")
    assert gemm._scale_layout(op, is_b=False, k_tiles=4).data_ptr() == s_buffer.data_ptr()
    assert gemm._scale_layout(op, is_b=True, k_tiles=4).data_ptr() == s_buffer.data_ptr()


def test_bad_shapes_name_emulate():
    a = Operand(torch.zeros(32, 64, dtype=torch.float8_e4m3fn), torch.ones(()), "tensorwise")
    b = Operand(torch.zeros(24, 64, dtype=torch.float8_e4m3fn), torch.ones(()), "tensorwise")   # N = 24
    with pytest.raises(ValueError, match="backend='emulate'"):
        mm_nt(a, b, out_dtype=torch.float32, backend="cublas")
