"""mixprec: mixed precision training for PyTorch (FP16, BF16, FP8) made safe and automatic."""
from mixprec import compat, formats, fp8, ops, optim, rules
from mixprec.compat.apex import initialize, scale_loss
from mixprec.context import autocast
from mixprec.explain import explain
from mixprec.fp8.config import Float8Config
from mixprec.masters import MasterWeights, master_params
from mixprec.policy import Policy, opt_levels, recipes
from mixprec.prepare import prepare
from mixprec.scaler import LossScaler

__version__ = "0.1.0"

__all__ = ["Float8Config", "LossScaler", "MasterWeights", "Policy", "autocast", "compat", "explain",
           "formats", "fp8", "initialize", "master_params", "ops", "opt_levels", "optim", "prepare", "recipes",
           "rules", "scale_loss", "__version__"]
