"""What each FP8 recipe quantizes how, and the one quantization step every Float8Linear tensor takes.

Every tensor of a linear layer is a GEMM operand twice, along each of its dimensions (see gemm.py):
x along K (forward) and along M (weight gradient), W along K and along N (input gradient), dy along
N and along M. `quantize_pair` returns both operands of one tensor; on the triton backend one kernel
writes both (after an amax pass for tensorwise and rowwise scales).

    recipe      x, W format   dy format   x, dy granularity   W granularity   scales
    blockwise   E4M3          E4M3        1x128 tiles         128x128 blocks  current      (DeepSeek-V3)
    tensorwise  E4M3          E5M2        tensor              tensor          current      (TE HYBRID, torchao)
    rowwise     E4M3          E4M3        row                 row             current, 2^k (torchao)
    delayed     E4M3          E5M2        tensor              tensor          amax history (TE DelayedScaling)

Along the other dimension: 1x128 tiles of x^T are 128x1 tiles of x (quantized from x itself, not
requantized); 128x128 blocks and tensorwise scales are the same for the transpose, so its codes are the
transposed codes; a row of x^T is a column of x.
"""
from __future__ import annotations

import torch

from mixprec.fp8.gemm import Operand
from mixprec.fp8.quantize import delayed_amax, group_amax, quantize, record_amax

# recipe -> (granularity of activations and output gradients, granularity of weights)
GRANULARITY = {
    "blockwise": ("1x128", "128x128"),
    "tensorwise": ("tensorwise", "tensorwise"),
    "rowwise": ("rowwise", "rowwise"),
    "delayed": ("tensorwise", "tensorwise"),
}


def quantize_pair(x: torch.Tensor, fmt: str, granularity: str, *, backend: str, power_of_2: bool,
                  block_size: int = 128, history: torch.Tensor | None = None) -> tuple[Operand, Operand]:
    """Quantize a 2-D tensor x (R, C) along C and x^T (C, R) along R: (Operand of x, Operand of x^T).

    history: delayed scaling's amax history (tensorwise only): the scale comes from its max and x's
    current amax is recorded in it (in place).
    """
    used_amax = None
    if history is not None:
        current = _tensor_amax(x, backend)
        used_amax = delayed_amax(history, current)
    # the Triton kernels' tiles are 128 wide; block_size means nothing to tensorwise and rowwise scales
    triton_kernel = granularity in ("tensorwise", "rowwise") or block_size == 128
    if backend == "triton" and triton_kernel and not (granularity == "rowwise" and history is not None):
        from mixprec.fp8 import _kernels as kernels
        if granularity == "1x128":
            (q, s), (qt, st) = kernels.quantize_1x128_t(x, fmt, power_of_2=power_of_2)
        elif granularity == "128x128":
            (q, s), (qt, st) = kernels.quantize_128x128_t(x, fmt, power_of_2=power_of_2)
        elif granularity == "rowwise":
            (q, s), (qt, st) = kernels.quantize_rowwise_t(x, fmt, power_of_2=power_of_2)
        else:
            (q, s), (qt, st) = kernels.quantize_tensor_t(x, fmt, power_of_2=power_of_2, amax=used_amax)
    else:
        q, s = quantize(x, fmt, granularity, block_size=block_size, power_of_2=power_of_2, amax=used_amax)
        if granularity in ("1x128", "rowwise"):      # a different grouping along the other dimension
            # eager: one transposing copy, then every pass of quantize reads contiguous memory
            xt = x.t() if torch.compiler.is_compiling() else x.t().contiguous()
            qt, st = quantize(xt, fmt, granularity, block_size=block_size, power_of_2=power_of_2)
        else:                                        # same groups: transpose codes and scales
            qt, st = q.t().contiguous(), s.t()
    if history is not None:
        record_amax(history, current)
    return Operand(q, s, granularity), Operand(qt, st, granularity)


def _tensor_amax(x: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        from mixprec.fp8 import _kernels as kernels
        return kernels.tensor_amax(x)
    return group_amax(x, "tensorwise")
