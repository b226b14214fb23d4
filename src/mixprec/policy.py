"""Policy: which dtypes a model keeps, computes and reduces in; named recipes and apex's opt levels."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal, Union

import torch

from mixprec.fp8.config import Float8Config
from mixprec.int8.config import Int8Config

LossScale = Union[Literal["dynamic", "none"], float]
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_HALF = (torch.float16, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPES.get(dtype, str(dtype))


@dataclass(frozen=True, kw_only=True)
class Policy:
    """How a model trains in mixed precision.

    param_dtype:    the dtype the model's parameters are stored in (FP32 for "-mixed" recipes).
    compute_dtype:  the dtype matmuls and convolutions run in (the precision table keeps the rest).
    reduce_dtype:   the dtype gradients are summed in across ranks (FP32: sums of halves lose bits).
    master_weights: keep FP32 copies of half parameters for the optimizer step (apex O2).
    loss_scale:     "dynamic", "none", or a fixed float (static scaling).
    fp8:            a Float8Config to run large Linear layers' GEMMs in FP8, or None.
    int8:           an Int8Config to run large Linear layers' matmuls in INT8, or None (not with fp8).
    fp32_rules:     enforce the precision table (norms, softmax, losses, embeddings, head, RNN in FP32);
                    False only for apex O3's "pure half".
    cpu_fp16:       FP16 on the CPU: "emulate" (round to FP16 values, compute in FP32: fast and exact
                    up to accumulation order) or "native" (PyTorch's FP16 CPU kernels, ~27x slower).
    name:           the recipe or opt level this policy came from, for display.
    """

    param_dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32
    master_weights: bool = False
    loss_scale: LossScale = "none"
    fp8: Float8Config | None = None
    int8: Int8Config | None = None
    fp32_rules: bool = True
    cpu_fp16: Literal["emulate", "native"] = "emulate"
    name: str | None = None

    def __post_init__(self) -> None:
        for field in ("param_dtype", "compute_dtype", "reduce_dtype"):
            value = getattr(self, field)
            if value not in _DTYPES:
                raise ValueError(f"{field} must be one of torch.float32, torch.float16, torch.bfloat16; got {value!r}")
        if self.master_weights and self.param_dtype == torch.float32:
            raise ValueError("master_weights=True needs half-precision parameters (param_dtype float16 or "
                             "bfloat16); FP32 parameters are their own masters")
        if isinstance(self.loss_scale, bool) or not (
                self.loss_scale in ("dynamic", "none") or isinstance(self.loss_scale, (int, float))):
            raise ValueError(f"loss_scale must be 'dynamic', 'none' or a positive number; got {self.loss_scale!r}")
        if isinstance(self.loss_scale, (int, float)):
            if not (self.loss_scale > 0 and self.loss_scale != float("inf")):
                raise ValueError(f"a static loss_scale must be a positive finite number; got {self.loss_scale!r}")
            object.__setattr__(self, "loss_scale", float(self.loss_scale))
        if self.fp8 is not None and not isinstance(self.fp8, Float8Config):
            raise TypeError(f"fp8 must be a mixprec.fp8.Float8Config or None; got {type(self.fp8).__name__}")
        if self.int8 is not None and not isinstance(self.int8, Int8Config):
            raise TypeError(f"int8 must be a mixprec.int8.Int8Config or None; got {type(self.int8).__name__}")
        if self.fp8 is not None and self.int8 is not None:
            raise ValueError("fp8 and int8 are both set; a Linear layer runs in one of them: set fp8=None or int8=None")
        if self.cpu_fp16 not in ("emulate", "native"):
            raise ValueError(f"cpu_fp16 must be 'emulate' or 'native'; got {self.cpu_fp16!r}")

    # ---- derived facts -------------------------------------------------------------------------
    @property
    def autocast_enabled(self) -> bool:
        """Whether compute runs below the parameters' precision (autocast casts on the fly)."""
        # INT8 layers quantize whatever autocast says (they need none): Policy(int8=...) with FP32 compute
        # runs INT8 matmuls and everything else in FP32
        return self.compute_dtype in _HALF or self.fp8 is not None

    def emulates_fp16(self, device_type: str) -> bool:
        """Whether FP16 compute is emulated on this device type (the CPU, with cpu_fp16="emulate")."""
        return device_type == "cpu" and self.compute_dtype == torch.float16 and self.cpu_fp16 == "emulate"

    @property
    def converters(self) -> tuple:
        """The model converters this policy applies in prepare() (its FP8 or INT8 config), in order."""
        return tuple(c for c in (self.fp8, self.int8) if c is not None)

    def replace(self, **changes) -> "Policy":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        scale = self.loss_scale if isinstance(self.loss_scale, str) else f"static {self.loss_scale:g}"
        parts = [f"params {_dtype_name(self.param_dtype)}", f"compute {_dtype_name(self.compute_dtype)}",
                 f"reduce {_dtype_name(self.reduce_dtype)}", f"loss scale {scale}"]
        if self.master_weights:
            parts.append("FP32 master weights")
        if self.fp8 is not None:
            parts.append(f"FP8 {self.fp8.recipe} ({self.fp8.backend})")
        if self.int8 is not None:
            parts.append(self.int8.describe())
        if not self.fp32_rules:
            parts.append("precision table off (pure half)")
        return ", ".join(parts)

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def from_recipe(cls, name: str, **overrides) -> "Policy":
        """A named recipe (see `recipes()`), optionally with fields overridden."""
        if name not in _RECIPES:
            raise ValueError(f"Unknown recipe {name!r}; choose one of: {', '.join(_RECIPES)}")
        policy = _RECIPES[name]()
        return policy.replace(**overrides) if overrides else policy

    @classmethod
    def from_opt_level(cls, opt_level: str, dtype: torch.dtype = torch.float16, **overrides) -> "Policy":
        """apex.amp's opt levels.

        O0: FP32 throughout.  O1: FP32 weights, ops patched to half by allow/deny lists (autocast),
        dynamic loss scale.  O2: model cast to half with norms kept FP32, FP32 master weights, dynamic
        loss scale.  O3: pure half, no masters, static loss scale 1 (apex's default for O3).
        BF16 needs no loss scaling (its range is FP32's), so with dtype=bfloat16 the scale is "none".
        """
        if opt_level not in _OPT_LEVELS:
            raise ValueError(f"Unknown opt_level {opt_level!r}; choose one of: {', '.join(_OPT_LEVELS)}")
        if dtype not in _HALF and not (opt_level == "O0" and dtype == torch.float32):
            raise ValueError(f"dtype must be torch.float16 or torch.bfloat16 (or torch.float32 for O0); got {dtype!r}")
        policy = _OPT_LEVELS[opt_level](dtype)
        return policy.replace(**overrides) if overrides else policy


def _fp8(recipe: str) -> Callable[[], Policy]:
    # FP8 GEMMs for large Linear layers; the rest of the model computes in BF16 with FP32 weights.
    return lambda: Policy(compute_dtype=torch.bfloat16, fp8=Float8Config(recipe=recipe), name=f"fp8-{recipe}")


def _int8(recipe: str) -> Callable[[], Policy]:
    # INT8 matmuls for large Linear layers; the rest of the model computes in BF16 with FP32 weights.
    return lambda: Policy(compute_dtype=torch.bfloat16, int8=Int8Config(recipe=recipe), name=f"int8-{recipe}")


_RECIPES: dict[str, Callable[[], Policy]] = {
    "fp32": lambda: Policy(name="fp32"),
    "fp16-mixed": lambda: Policy(compute_dtype=torch.float16, loss_scale="dynamic", name="fp16-mixed"),
    "bf16-mixed": lambda: Policy(compute_dtype=torch.bfloat16, name="bf16-mixed"),
    # FP16 parameters underflow small updates, so fp16-true keeps FP32 masters and scales the loss.
    "fp16-true": lambda: Policy(param_dtype=torch.float16, compute_dtype=torch.float16, master_weights=True,
                                loss_scale="dynamic", name="fp16-true"),
    # Pure BF16: pair it with mp.optim.AdamW(rounding="stochastic") or pass master_weights=True.
    "bf16-true": lambda: Policy(param_dtype=torch.bfloat16, compute_dtype=torch.bfloat16, name="bf16-true"),
    # The 2018 paper's failure case: FP16 compute with the loss scale fixed at 1.
    "fp16-noscale": lambda: Policy(compute_dtype=torch.float16, loss_scale="none", name="fp16-noscale"),
    "fp8-tensorwise": _fp8("tensorwise"),
    "fp8-rowwise": _fp8("rowwise"),
    "fp8-blockwise": _fp8("blockwise"),
    "int8-rowwise": _int8("rowwise"),
    "int8-switchback": _int8("switchback"),
}

_OPT_LEVELS: dict[str, Callable[[torch.dtype], Policy]] = {
    "O0": lambda d: Policy(name="O0"),
    "O1": lambda d: Policy(compute_dtype=d, loss_scale="dynamic" if d == torch.float16 else "none", name="O1"),
    "O2": lambda d: Policy(param_dtype=d, compute_dtype=d, master_weights=True,
                           loss_scale="dynamic" if d == torch.float16 else "none", name="O2"),
    "O3": lambda d: Policy(param_dtype=d, compute_dtype=d, loss_scale=1.0 if d == torch.float16 else "none",
                           fp32_rules=False, name="O3"),
}


def recipes() -> list[str]:
    """The names `Policy.from_recipe` accepts."""
    return list(_RECIPES)


def opt_levels() -> list[str]:
    """The apex opt levels `Policy.from_opt_level` accepts."""
    return list(_OPT_LEVELS)
