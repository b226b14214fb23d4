"""Float8Linear: nn.Linear whose three GEMMs (forward, input gradient, weight gradient) run in FP8.

Per call, with x (M, K), W (N, K) and the recipe's formats and granularities (recipes.py):

    forward:   (x_q, x^T_q) = quantize_pair(x);  (W_q, W^T_q) = quantize_pair(W)
               y = mm_nt(x_q, W_q) + b                  in x's dtype (under autocast, x is first cast to its dtype)
               save x^T_q, W^T_q for the backward       (FP8: a quarter of FP32's memory)
    backward:  (dy_q, dy^T_q) = quantize_pair(dy)
               dx = mm_nt(dy_q, W^T_q)                  in x's dtype
               dW = mm_nt(dy^T_q, x^T_q)                in W's dtype (FP32 master weights get FP32 grads)
               db = sum(dy) in FP32

The module keeps nn.Linear's parameters (`weight`, `bias`) and state_dict keys, so checkpoints and
optimizers carry over; `from_linear` shares the original's Parameter objects. Autocast is disabled
inside the autograd Function (its dtypes are set here, not by autocast's cast lists).
"""
from __future__ import annotations

import torch
from torch import nn

from mixprec._linear_swap import take_over
from mixprec.fp8.backends import fp8_gemm_supported, resolve_backend
from mixprec.fp8.config import Float8Config
from mixprec.fp8.gemm import Operand, mm_nt
from mixprec.fp8.recipes import GRANULARITY, quantize_pair


_HISTORIES = ("amax_history_input", "amax_history_weight", "amax_history_grad_output")


class _Float8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, recipe: str, fwd_fmt: str, bwd_fmt: str, power_of_2: bool, block: int,
                backend: str, fast_accum: bool, hist_x, hist_w, hist_dy):
        act_gran, w_gran = GRANULARITY[recipe]
        common = dict(backend=backend, power_of_2=power_of_2, block_size=block)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            xa, xt = quantize_pair(x2, fwd_fmt, act_gran, history=hist_x, **common)
            wa, wt = quantize_pair(weight, fwd_fmt, w_gran, history=hist_w, **common)
            # cuBLAS's blockwise kernels promote every 128 of K by construction; fast_accum is for the others
            fast = fast_accum and act_gran != "1x128"
            y = mm_nt(xa, wa, out_dtype=x.dtype, backend=backend, fast_accum=fast, block_size=block)
            if bias is not None:
                y = y + bias.to(x.dtype)
        ctx.save_for_backward(xt.q, xt.scale, wt.q, wt.scale, hist_dy)
        ctx.meta = (act_gran, w_gran, bwd_fmt, common, x.shape, x.dtype, weight.dtype,
                    None if bias is None else bias.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():   # create_graph: the saved FP8 operands carry no graph to x and W
            raise RuntimeError("Float8Linear has no second derivative (a backward with create_graph=True, such "
                               "as a gradient penalty); keep the layers it differentiates through in nn.Linear")
        xt_q, xt_s, wt_q, wt_s, hist_dy = ctx.saved_tensors
        act_gran, w_gran, bwd_fmt, common, x_shape, x_dtype, w_dtype, b_dtype = ctx.meta
        backend, block = common["backend"], common["block_size"]
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1])
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                dya, dyt = quantize_pair(dy2, bwd_fmt, act_gran, history=hist_dy, **common)
                if ctx.needs_input_grad[0]:
                    dx = mm_nt(dya, Operand(wt_q, wt_s, w_gran), out_dtype=x_dtype, backend=backend,
                               block_size=block).reshape(x_shape)
                if ctx.needs_input_grad[1]:
                    dw = mm_nt(dyt, Operand(xt_q, xt_s, act_gran), out_dtype=w_dtype, backend=backend,
                               block_size=block)
            if ctx.needs_input_grad[2]:
                db = dy2.sum(0, dtype=torch.float32).to(b_dtype)   # no FP32 copy of dy
        return dx, dw, db, None, None, None, None, None, None, None, None, None, None


class Float8Linear(nn.Linear):
    """A drop-in nn.Linear that runs its forward and both backward GEMMs in FP8.

    config: the Float8Config (recipe, formats, backend); default Float8Config() (blockwise, auto).
    Under an enabled autocast the input is first cast to autocast's dtype (BF16 for the FP8 recipes),
    as autocast's linear does, and the output is in that dtype; otherwise the output is in the input's
    dtype. Delayed scaling keeps its amax histories in non-persistent buffers (not in
    the state_dict, whose keys stay nn.Linear's).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 config: Float8Config | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_fp8(config)

    def _init_fp8(self, config: Float8Config | None) -> None:
        self.config = config if config is not None else Float8Config()
        if not isinstance(self.config, Float8Config):
            raise TypeError(f"config must be a mixprec.fp8.Float8Config, got {type(self.config).__name__}")
        self._note_device()
        if self.config.recipe == "delayed":
            device = self.weight.device if self.weight.device.type != "meta" else None
            for name in _HISTORIES:
                self.register_buffer(name, torch.zeros(self.config.amax_history_len, dtype=torch.float32,
                                                       device=device), persistent=False)

    def _note_device(self) -> None:
        # Whether the weight's device runs FP8 GEMMs, looked up whenever the weight moves (here and in
        # _apply) rather than in forward: torch.compile then traces a plain bool, no CUDA query.
        self._fp8_capable = self.weight.device.type != "meta" and fp8_gemm_supported(self.weight.device)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half(), to_empty() ...: delayed scaling's amax histories follow the weight's
        # device but stay FP32 (an FP16 history records amaxes above 65504 as inf, and the scale as 0).
        histories = {n: self._buffers.pop(n) for n in _HISTORIES if self._buffers.get(n) is not None}
        out = super()._apply(fn, *args, **kwargs)
        for name, history in histories.items():
            device = self.weight.device if self.weight.device.type != "meta" else history.device
            self.register_buffer(name, history.to(device), persistent=False)
        if hasattr(self, "config"):
            self._note_device()
        return out

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Float8Config | None = None) -> "Float8Linear":
        """A Float8Linear that takes over `linear` whole: its Parameters (shared, no copy), child modules,
        buffers, hooks and attributes; only the class, and so the forward, changes."""
        new = take_over(cls, linear)
        new._init_fp8(config)   # after the Parameters arrive: delayed scaling's buffers go to their device
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # as autocast's own linear: the input in the autocast dtype, so that an FP32 input (a norm's
            # output) is read at half the bytes and its gradient comes back in that dtype too
            x = x.to(torch.get_autocast_dtype(device_type))
        capable = self._fp8_capable if x.device == self.weight.device else None
        backend = resolve_backend(cfg.backend, x.device, fp8_capable=capable)
        delayed = cfg.recipe == "delayed"
        return _Float8LinearFunction.apply(
            x, self.weight, self.bias, cfg.recipe, cfg.forward_format, cfg.backward_format,
            bool(cfg.power_of_2_scales), cfg.block_size, backend, cfg.fast_accum,
            self.amax_history_input if delayed else None, self.amax_history_weight if delayed else None,
            self.amax_history_grad_output if delayed else None)

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"{super().extra_repr()}, recipe={cfg.recipe}, formats={cfg.forward_format}/{cfg.backward_format}, "
                f"backend={cfg.backend}")
