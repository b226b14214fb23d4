"""mixprec: mixed precision training for PyTorch (FP16, BF16, FP8) made safe and automatic."""
from mixprec import formats
from mixprec.fp8.config import Float8Config
from mixprec.policy import Policy, opt_levels, recipes

__version__ = "0.1.0"

__all__ = ["Float8Config", "Policy", "formats", "opt_levels", "recipes", "__version__"]
