"""mixprec: mixed precision training for PyTorch (FP16, BF16, FP8) made safe and automatic."""
from mixprec import formats, fp8, ops, optim, rules
from mixprec.autocast import autocast
from mixprec.compat import LossScaleOptimizer, initialize, load_state_dict, scale_loss, state_dict
from mixprec.explain import explain
from mixprec.fp8.config import Float8Config
from mixprec.masters import MasterWeights, master_params
from mixprec.policy import Policy, opt_levels, recipes
from mixprec.prepare import prepare
from mixprec.scaler import LossScaler

__version__ = "0.1.0"

__all__ = ["Float8Config", "LossScaleOptimizer", "LossScaler", "MasterWeights", "Policy", "autocast", "explain",
           "formats", "fp8", "initialize", "load_state_dict", "master_params", "ops", "opt_levels", "optim", "prepare", "recipes",
           "rules", "scale_loss", "state_dict", "__version__"]
