"""mixprec: mixed precision training for PyTorch (FP16, BF16, FP8) made safe and automatic."""
from mixprec import formats, ops, rules
from mixprec.autocast import autocast
from mixprec.explain import explain
from mixprec.fp8.config import Float8Config
from mixprec.masters import MasterWeights, master_params
from mixprec.policy import Policy, opt_levels, recipes
from mixprec.prepare import prepare

__version__ = "0.1.0"

__all__ = ["Float8Config", "MasterWeights", "Policy", "autocast", "explain", "formats", "master_params",
           "ops", "opt_levels", "prepare", "recipes", "rules", "__version__"]
