"""FP8 training: quantization, Float8Linear, conversion of models."""
from mixprec.fp8.config import Float8Config

__all__ = ["Float8Config"]
