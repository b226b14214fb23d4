"""Int8Linear: nn.Linear whose three matmuls (output, input gradient, weight gradient) run in INT8.

Per call, with x (M, K) (in the compute dtype under autocast), W (N, K), dy (M, N); every INT8
matmul quantizes both operands per row along its own reduction dimension (gemm.py), so each
operand is quantized for each matmul that reads it, as in torchao's INT8 mixed-precision training:

    forward:   y  = mm_nt(Q(x), Q_w(W)) + b          in x's dtype          [output]
               save x and W (the Parameter itself: no copy), as a BF16 linear saves them
    backward:  dx = mm_nt(Q(dy), Q_w(W^T))           in x's dtype          [grad_input]
               dW = mm_nt(Q(dy^T), Q(x^T))           in W's dtype (FP32 masters get FP32 grads)  [grad_weight]
               db = sum(dy) in FP32

Q is rowwise quantization; Q_w is rowwise (recipe "rowwise") or one scale for the tensor ("switchback",
so W's codes transposed serve the input gradient). A matmul switched off in the config runs in the
compute dtype instead (x's dtype: BF16 under the int8 recipes), e.g. SwitchBack's weight gradient.

Outlier fallback (config.outlier_threshold): an operand row whose crest factor absmax / rms exceeds the
threshold is computed in the compute dtype: the output rows (of A) or columns (of B) it touches are
recomputed there, so the rest of the GEMM keeps INT8. Each layer counts, per matmul, the operand
rows that fell back and the rows quantized, in a buffer on the device (see mixprec.int8.outliers);
finding the rows to recompute costs a host sync per GEMM on a GPU, so the fallback is off by default.

The module keeps nn.Linear's parameters and state_dict keys (the counters are non-persistent), so
checkpoints and optimizers carry over; `from_linear` shares the original's Parameter objects.
Autocast is disabled inside the autograd Function (its dtypes are set here).
"""
from __future__ import annotations

import torch
from torch import nn

from mixprec._linear_swap import take_over
from mixprec.int8.backends import resolve_backend
from mixprec.int8.config import MATMULS, Int8Config
from mixprec.int8.gemm import Operand, mm_nt
from mixprec.int8.quantize import crest_factor, float_codes, quantize

_COUNTS = "int8_outlier_counts"


def int8_matmul(a: torch.Tensor, b: torch.Tensor, *, a_granularity: str = "rowwise", b_granularity: str = "rowwise",
                out_dtype: torch.dtype, backend: str, outlier_threshold: float | None = None,
                fallback_dtype: torch.dtype | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b^T with a (M, K) and b (N, K) quantized along K, in `out_dtype` (the definition in gemm.py).

    outlier_threshold: rows of a or b whose crest factor exceeds it are multiplied in `fallback_dtype`
    (default: the wider of a's and b's dtypes; Int8Linear passes the compute dtype) instead, with FP32
    accumulation; `counts` (int64 (2,)), if given, gets += (rows fallen back, rows) of both operands,
    on the device.
    """
    codes = float_codes if backend == "emulate" else quantize   # the same integers; emulate reads them as FP32
    qa, sa = codes(a, a_granularity)
    qb, sb = codes(b, b_granularity)
    if outlier_threshold is None:
        return mm_nt(Operand(qa, sa), Operand(qb, sb), out_dtype=out_dtype, backend=backend)
    out = mm_nt(Operand(qa, sa), Operand(qb, sb), out_dtype=torch.float32, backend=backend)
    hp = fallback_dtype or torch.promote_types(a.dtype, b.dtype)
    over_a = (crest_factor(a, a_granularity) > outlier_threshold).reshape(-1).expand(a.shape[0])
    over_b = (crest_factor(b, b_granularity) > outlier_threshold).reshape(-1).expand(b.shape[0])
    if counts is not None:
        counts[0] += over_a.sum() + over_b.sum()
        counts[1] += a.shape[0] + b.shape[0]
    rows_a, rows_b = over_a.nonzero().reshape(-1), over_b.nonzero().reshape(-1)   # a host sync on GPUs
    if rows_a.numel():
        out[rows_a] = (a[rows_a].to(hp) @ b.to(hp).t()).float()
    if rows_b.numel():
        out[:, rows_b] = (a.to(hp) @ b[rows_b].to(hp).t()).float()
    return out.to(out_dtype)


class _Int8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, config: Int8Config, backend: str, counts):
        w_gran, threshold = config.weight_granularity, config.outlier_threshold
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            if config.output:
                y = int8_matmul(x2, weight, b_granularity=w_gran, out_dtype=x.dtype, backend=backend,
                                outlier_threshold=threshold, fallback_dtype=x.dtype,
                                counts=None if counts is None else counts[0])
            else:
                y = x2 @ weight.to(x.dtype).t()
            if bias is not None:
                y = y + bias.to(x.dtype)
        ctx.save_for_backward(x2, weight)
        ctx.counts = counts
        ctx.meta = (config, backend, x.shape, x.dtype, None if bias is None else bias.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():   # create_graph: the INT8 GEMMs' gradients would carry no graph
            raise RuntimeError("Int8Linear has no second derivative (a backward with create_graph=True, such as "
                               "a gradient penalty); keep the layers it differentiates through in nn.Linear")
        x2, weight = ctx.saved_tensors
        config, backend, x_shape, x_dtype, b_dtype = ctx.meta
        counts, threshold = ctx.counts, config.outlier_threshold
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1])
            if ctx.needs_input_grad[0]:
                if config.grad_input:
                    dx = int8_matmul(dy2, weight.t(), b_granularity=config.weight_granularity, out_dtype=x_dtype,
                                     backend=backend, outlier_threshold=threshold, fallback_dtype=x_dtype,
                                     counts=None if counts is None else counts[1])
                else:
                    dx = dy2.to(x_dtype) @ weight.to(x_dtype)
                dx = dx.reshape(x_shape)
            if ctx.needs_input_grad[1]:
                if config.grad_weight:
                    dw = int8_matmul(dy2.t(), x2.t(), out_dtype=weight.dtype, backend=backend,
                                     outlier_threshold=threshold, fallback_dtype=x_dtype,
                                     counts=None if counts is None else counts[2])
                else:   # 16 bits (the compute dtype), as autocast's linear computes it
                    dw = (dy2.to(x_dtype).t() @ x2).to(weight.dtype)
            if ctx.needs_input_grad[2]:
                db = dy2.sum(0, dtype=torch.float32).to(b_dtype)
        return dx, dw, db, None, None, None


class Int8Linear(nn.Linear):
    """A drop-in nn.Linear that runs its forward and backward matmuls in INT8 (config's switches).

    config: the Int8Config (recipe, switches, outlier threshold, backend); default Int8Config()
    (rowwise, all three matmuls, auto). Under an enabled autocast the input is first cast to autocast's
    dtype (BF16 for the int8 recipes), as autocast's linear does, and the output is in that dtype;
    otherwise the output is in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 config: Int8Config | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_int8(config)

    def _init_int8(self, config: Int8Config | None) -> None:
        self.config = config if config is not None else Int8Config()
        if not isinstance(self.config, Int8Config):
            raise TypeError(f"config must be a mixprec.int8.Int8Config, got {type(self.config).__name__}")
        self._note_device()
        if self.config.outlier_threshold is not None:
            device = self.weight.device if self.weight.device.type != "meta" else None
            # per matmul (output, grad_input, grad_weight): operand rows fallen back to 16 bits, rows quantized
            self.register_buffer(_COUNTS, torch.zeros(len(MATMULS), 2, dtype=torch.int64, device=device),
                                 persistent=False)

    def _note_device(self) -> None:
        # The config's backend resolved for the weight's device whenever the weight moves (here and in
        # _apply) rather than in forward: torch.compile then traces a constant, no CUDA query. None where it
        # does not resolve there; forward then resolves it for the input's device and says what is wrong.
        named = self.config.backend
        try:
            resolved = None if self.weight.device.type == "meta" else resolve_backend(named, self.weight.device)
        except ValueError:
            resolved = None
        self._backend = (named, resolved)   # the name too: a config assigned later is resolved afresh
        if resolved == "triton":
            import mixprec.int8._kernels  # noqa: F401  (loaded here, so that forward traces no import)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half() ...: the counters follow the weight's device but stay int64
        counts = self._buffers.pop(_COUNTS, None)
        out = super()._apply(fn, *args, **kwargs)
        if counts is not None:
            device = self.weight.device if self.weight.device.type != "meta" else counts.device
            self.register_buffer(_COUNTS, counts.to(device), persistent=False)
        if hasattr(self, "config"):
            self._note_device()
        return out

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Int8Config | None = None) -> "Int8Linear":
        """An Int8Linear that takes over `linear` whole: its Parameters (shared, no copy), child modules,
        buffers, hooks and attributes; only the class, and so the forward, changes."""
        new = take_over(cls, linear)
        new._init_int8(config)
        return new

    @property
    def outlier_counts(self) -> torch.Tensor | None:
        """int64 (3, 2) on the device: per matmul (output, grad_input, grad_weight), operand rows computed
        in 16 bits and operand rows quantized since the last reset; None without an outlier threshold."""
        return self._buffers.get(_COUNTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # as autocast's own linear: the input in the autocast dtype (read at half the bytes, and its
            # gradient comes back in that dtype too)
            x = x.to(torch.get_autocast_dtype(device_type))
        named, backend = self._backend
        if backend is None or named != self.config.backend or x.device != self.weight.device:
            backend = resolve_backend(self.config.backend, x.device)
        return _Int8LinearFunction.apply(x, self.weight, self.bias, self.config, backend, self.outlier_counts)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.config.describe()}"
