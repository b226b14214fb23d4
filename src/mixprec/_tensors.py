"""Tensor helpers the core shares: mapping over nested arguments, FP32 upcasts, and FP16 emulation.

FP16 emulation, on devices without fast FP16 kernels (the CPU):

PyTorch's FP16 CPU kernels are ~27x slower than FP32 on the development machines, so FP16 policies
on the CPU keep tensors in FP32 but hold every half-precision value to what FP16 can represent:

- GEMM-like ops (autocast's lower-precision list) round their inputs to FP16, compute in FP32 (like
  a tensor core: FP16 products, FP32 accumulation) and round their output to FP16;
- a tensor that is "logically FP16" carries a mark; an op whose floating inputs are all logically
  FP16 yields a logically FP16 output (PyTorch's type promotion), rounded to FP16;
- every rounding also rounds the gradient flowing back through it, so activation and weight
  gradients are FP16 values as they would be natively.

The result equals native FP16 up to the order of FP32 accumulation, at FP32 speed.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from mixprec.formats import fast_round_to

_MARK = "_mixprec_logical_fp16"


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """Apply fn to every floating-point tensor in a (nested) tuple/list/dict of arguments."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, o) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    return obj


def to_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in FP32; an explicit upcast, so an emulated FP16 tensor loses its mark."""
    return unmarked(x) if x.dtype == torch.float32 else x.float()


def logical_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a tensor stands for: FP16 for an emulated (logically FP16) FP32 tensor."""
    return torch.float16 if is_logical_fp16(x) else x.dtype


class _RoundFP16(torch.autograd.Function):
    """Round to FP16 values in the forward pass and round the incoming gradient in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return fast_round_to(x, "fp16")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return fast_round_to(grad, "fp16")


def to_fp16_values(x: torch.Tensor) -> torch.Tensor:
    """A logically-FP16 FP32 tensor holding x rounded to FP16 (gradients rounded too)."""
    if is_logical_fp16(x):
        return x
    if x.dtype == torch.float16:  # a real FP16 tensor (e.g. an fp16-true parameter): exact upcast
        y = x.float()
    else:
        y = _RoundFP16.apply(x) if x.requires_grad else fast_round_to(x, "fp16")
    return mark(y)


def mark(x: torch.Tensor) -> torch.Tensor:
    setattr(x, _MARK, True)
    return x


def is_logical_fp16(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and getattr(x, _MARK, False)


def unmarked(x: torch.Tensor) -> torch.Tensor:
    """An alias of x without the mark: an explicit upcast to FP32 of a logically-FP16 tensor."""
    if not is_logical_fp16(x):
        return x
    with torch._C.DisableTorchFunction():   # inside mp.autocast the emulation would mark the view again
        return x.view_as(x)


def round_in_place(x: torch.Tensor) -> torch.Tensor:
    """Round a logically-FP16 tensor that an in-place op wrote to FP16 values (its mark stays valid)."""
    with torch.no_grad():
        x.data.copy_(fast_round_to(x.data, "fp16"))   # .data: a value fix-up, not a new op for autograd
    return x


def round_output(out: Any) -> Any:
    """Round (and mark) every floating tensor of an op's output."""
    if isinstance(out, torch.Tensor):
        if out.is_floating_point() and out.dtype == torch.float32:
            return to_fp16_values(out)
        return out
    if isinstance(out, (tuple, list)):
        return type(out)(round_output(o) for o in out)
    return out


def mark_output(out: Any) -> Any:
    """Mark without rounding: for ops that cannot create new values (views, concatenation, relu, ...)."""
    if isinstance(out, torch.Tensor):
        if out.is_floating_point() and out.dtype == torch.float32:
            mark(out)
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            mark_output(o)
    return out


def _tensor_method(name: str):
    return getattr(torch.Tensor, name)


# Ops whose outputs are selections, rearrangements or exact transforms of their inputs' values:
# FP16 inputs give FP16-representable outputs, so they need a mark but no rounding pass.
EXACT_OPS = frozenset(
    [_tensor_method(n) for n in (
        "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t", "contiguous", "__getitem__",
        "expand", "expand_as", "repeat", "narrow", "select", "squeeze", "unsqueeze", "flatten", "unflatten",
        "split", "chunk", "unbind", "detach", "clone", "relu", "neg", "abs", "__neg__", "masked_fill",
        "roll", "flip", "movedim", "unfold", "gather", "index_select", "max", "min", "amax", "amin")
     if hasattr(torch.Tensor, n)]
    + [torch.cat, torch.stack, torch.split, torch.chunk, torch.transpose, torch.permute, torch.reshape,
       torch.flatten, torch.squeeze, torch.unsqueeze, torch.relu, torch.nn.functional.relu, torch.abs, torch.neg,
       torch.where, torch.roll, torch.flip, torch.gather, torch.index_select, torch.narrow, torch.max,
       torch.min, torch.amax, torch.amin, torch.nn.functional.max_pool1d, torch.nn.functional.max_pool2d,
       torch.nn.functional.max_pool3d, torch.nn.functional.pad, torch.nn.functional.embedding]
)
