"""Int8Config: which INT8 recipe a model trains with, which of its matmuls run in INT8, and where.

A leaf: it imports nothing of mixprec's, so a Policy can hold one without importing the INT8 layers.
As a Policy's model converter (torchtitan's term) it converts a model in mp.prepare, which reaches
INT8 only through convert_model / describe_model / revert_model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import nn

Recipe = Literal["rowwise", "switchback"]
Backend = Literal["auto", "emulate", "int_mm", "triton"]
RECIPES: tuple[str, ...] = ("rowwise", "switchback")
BACKENDS: tuple[str, ...] = ("auto", "emulate", "int_mm", "triton")
MATMULS: tuple[str, ...] = ("output", "grad_input", "grad_weight")

# Per recipe: (the weight's scale granularity, whether the weight gradient runs in INT8 by default).
# rowwise: torchao's INT8 mixed-precision training, every operand of all three matmuls quantized per
# row along that matmul's reduction dimension. switchback (Wortsman et al., 2023): inputs and output
# gradients per row, the weight with one scale (the same codes serve the forward and, transposed, the
# input gradient), and the weight gradient in 16 bits (its reduction over all tokens is where INT8 hurts).
_RECIPE_DEFAULTS = {
    "rowwise": ("rowwise", True),
    "switchback": ("tensorwise", False),
}


@dataclass(frozen=True, kw_only=True)
class Int8Config:
    """An INT8 training recipe: which matmuls of a Linear layer run in INT8, and the backend.

    recipe:            "rowwise" (torchao) or "switchback" (see _RECIPE_DEFAULTS).
    output, grad_input, grad_weight:
                       per-matmul switches: y = x W^T, dx = dy W, dW = dy^T x run in INT8 when True,
                       in the compute dtype (BF16 under the int8 recipes) when False. grad_weight=None
                       takes the recipe's default (rowwise: INT8, switchback: 16 bits).
    outlier_threshold: a quantization group (a row of an operand along the reduction dimension; the
                       whole weight under switchback) whose crest factor absmax / rms exceeds this is
                       computed in the compute dtype instead (the output rows or columns it touches are
                       recomputed). None: no fallback. Rowwise INT8 keeps an SQNR of about
                       52.9 - 20*log10(crest) dB per group (12 * 127**2 = 52.9 dB), so a threshold t
                       sends the groups that would fall below 52.9 - 20*log10(t) dB to 16 bits (t = 8:
                       34.8 dB), whatever the group's length (a crest factor is at most sqrt(length)).
                       Measured on the GPT (d_model 256, 256 tokens a step, 40 steps): t = 8 triggers
                       on 0-2 % of the operand rows of the output and input-gradient matmuls and 1-55 %
                       of the weight gradient's (reduced over tokens, where gradients are sparse); t = 4
                       on up to 75 %; t = 16 never. Counted per layer (mixprec.int8.outliers).
    min_features:      `convert` keeps Linear layers with in or out features below this in high precision:
                       quantizing costs more than the INT8 GEMM saves on small layers (FP8's default too).
    backend:           "auto" (triton on Hopper and newer GPUs, int_mm on other GPUs of compute capability
                       8.0+ or without the triton package, emulate elsewhere), "emulate"
                       (exact integer products on any device), "int_mm" (torch._int_mm, CUDA) or "triton"
                       (a Triton GEMM that scales in its epilogue, CUDA); all give the same numbers.
    """

    recipe: Recipe = "rowwise"
    output: bool = True
    grad_input: bool = True
    grad_weight: bool | None = None
    outlier_threshold: float | None = None
    min_features: int = 256
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"Unknown INT8 recipe {self.recipe!r}; choose one of: {', '.join(RECIPES)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown INT8 backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")
        if self.grad_weight is None:
            object.__setattr__(self, "grad_weight", _RECIPE_DEFAULTS[self.recipe][1])
        for name in MATMULS:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False; got {getattr(self, name)!r}")
        t = self.outlier_threshold
        if t is not None:
            # absmax >= rms for every group, so a threshold <= 1 would send every group to 16 bits
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not (1 < t < math.inf):
                raise ValueError(f"outlier_threshold must be None or a finite number > 1 (a crest factor "
                                 f"absmax/rms, e.g. 16); got {t!r}")
            object.__setattr__(self, "outlier_threshold", float(t))
        if isinstance(self.min_features, bool) or not isinstance(self.min_features, int) or self.min_features < 1:
            raise ValueError(f"min_features must be a positive integer; got {self.min_features!r}")

    @property
    def weight_granularity(self) -> str:
        """How the weight is scaled: "rowwise" (per row along each matmul's reduction) or "tensorwise"."""
        return _RECIPE_DEFAULTS[self.recipe][0]

    @property
    def int8_matmuls(self) -> tuple[str, ...]:
        """The names of the matmuls that run in INT8 ("output", "grad_input", "grad_weight")."""
        return tuple(name for name in MATMULS if getattr(self, name))

    def describe(self) -> str:
        """One line: the recipe, its INT8 matmuls, the fallback and the backend."""
        gemms = "/".join(self.int8_matmuls) or "none"
        fallback = f", outliers over crest {self.outlier_threshold:g} in 16 bits" if self.outlier_threshold else ""
        return f"INT8 {self.recipe} (INT8 matmuls: {gemms}{fallback}; {self.backend})"

    # ---- the model converter seam (mp.prepare, mp.explain, mp.unprepare) -------------------------
    def convert_model(self, model: nn.Module) -> nn.Module:
        """Swap the model's eligible Linear layers for Int8Linear (mixprec.int8.convert)."""
        from mixprec.int8.convert import convert
        return convert(model, self)

    def describe_model(self, model: nn.Module) -> str:
        """Which Linear layers run in INT8 and why the others do not (with outlier counts, if any)."""
        from mixprec.int8.convert import describe
        return describe(model)

    def revert_model(self, model: nn.Module) -> nn.Module:
        """Back to nn.Linear (same Parameters): undoes convert_model."""
        from mixprec.int8.convert import unconvert
        return unconvert(model)
