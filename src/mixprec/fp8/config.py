"""Float8Config: which FP8 recipe a model trains with, and how its GEMMs run.

A leaf: it imports only mixprec.formats, so a Policy can hold one without importing the FP8 kernels.
As a Policy's model converter (torchtitan's term) it converts a model in mp.prepare, which reaches
FP8 only through convert_model / describe_model / revert_model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from mixprec.formats import get_format

Recipe = Literal["tensorwise", "rowwise", "blockwise", "delayed"]
Backend = Literal["auto", "emulate", "cublas", "triton"]
RECIPES: tuple[str, ...] = ("tensorwise", "rowwise", "blockwise", "delayed")
BACKENDS: tuple[str, ...] = ("auto", "emulate", "cublas", "triton")

# Per recipe: (forward format, backward format, power-of-2 scales). DeepSeek-V3 (blockwise) uses E4M3
# everywhere; tensorwise/delayed follow Transformer Engine's HYBRID (E5M2 for gradients' range);
# rowwise follows torchao (E4M3, power-of-2 scales so scaling is exact).
_RECIPE_DEFAULTS = {
    "tensorwise": ("fp8_e4m3", "fp8_e5m2", False),
    "rowwise": ("fp8_e4m3", "fp8_e4m3", True),
    "blockwise": ("fp8_e4m3", "fp8_e4m3", False),
    "delayed": ("fp8_e4m3", "fp8_e5m2", False),
}


@dataclass(frozen=True, kw_only=True)
class Float8Config:
    """An FP8 training recipe: formats, scale granularity and the backend that runs the GEMMs.

    Formats and power-of-2 scaling default from the recipe (see _RECIPE_DEFAULTS); pass them to
    override. `min_features` is the size under which `convert` keeps a Linear in high precision:
    quantization overhead outweighs the FP8 GEMM's gain on small layers.
    """

    recipe: Recipe = "blockwise"
    backend: Backend = "auto"
    forward_format: str | None = None
    backward_format: str | None = None
    power_of_2_scales: bool | None = None
    amax_history_len: int = 1024       # delayed scaling: Transformer Engine's default history
    min_features: int = 256
    block_size: int = 128              # DeepSeek-V3's tile: 1x128 activations, 128x128 weights
    # Forward GEMM of the tensorwise/rowwise/delayed recipes accumulates without periodic FP32
    # promotion (torchao's default: ~10% faster); the gradient GEMMs always promote.
    fast_accum: bool = True
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"Unknown FP8 recipe {self.recipe!r}; choose one of: {', '.join(RECIPES)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown FP8 backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")
        fwd, bwd, pow2 = _RECIPE_DEFAULTS[self.recipe]
        for name, default in (("forward_format", fwd), ("backward_format", bwd)):
            value = getattr(self, name) or default
            fmt = get_format(value)
            if not fmt.name.startswith("fp8"):
                raise ValueError(f"{name} must be an FP8 format (fp8_e4m3, fp8_e5m2), got {value!r}")
            object.__setattr__(self, name, fmt.name)
        if self.power_of_2_scales is None:
            object.__setattr__(self, "power_of_2_scales", pow2)
        if self.amax_history_len < 1:
            raise ValueError(f"amax_history_len must be >= 1, got {self.amax_history_len}")
        if self.block_size < 16 or self.block_size % 16:
            raise ValueError(f"block_size must be a multiple of 16, got {self.block_size}")

    # ---- the model converter seam (mp.prepare, mp.explain, mp.unprepare) -------------------------
    def convert_model(self, model: nn.Module) -> nn.Module:
        """Swap the model's eligible Linear layers for Float8Linear (mixprec.fp8.convert)."""
        from mixprec.fp8.convert import convert
        return convert(model, self)

    def describe_model(self, model: nn.Module) -> str:
        """Which Linear layers run in FP8 and why the others do not."""
        from mixprec.fp8.convert import describe
        return describe(model)

    def revert_model(self, model: nn.Module) -> nn.Module:
        """Back to nn.Linear (same Parameters): undoes convert_model."""
        from mixprec.fp8.convert import unconvert
        return unconvert(model)
