"""mixprec: mixed precision training for PyTorch (FP16, BF16, FP8) made safe and automatic."""
from mixprec import compat, diagnostics, distributed, formats, fp8, ops, optim, rules
from mixprec.compat.apex import initialize, scale_loss
from mixprec.context import autocast
from mixprec.diagnostics import diagnose
from mixprec.explain import explain
from mixprec.masters import MasterWeights, master_params
from mixprec.policy import Policy, recipes
from mixprec.prepare import prepare, unprepare
from mixprec.scaler import LossScaler
from mixprec.stability import StabilityGuard, shrink_embedding_grad

__version__ = "0.1.0"

__all__ = [
    # the policy: what computes in which precision
    "Policy", "recipes", "explain", "rules", "formats",
    # applying it
    "prepare", "unprepare", "autocast", "ops",
    # loss scaling and master weights
    "LossScaler", "MasterWeights", "master_params",
    # apex's API (the rest of it, and Keras', in mixprec.compat)
    "initialize", "scale_loss", "compat",
    # FP8 training and low-precision optimizers
    "fp8", "optim",
    # stability for large runs, diagnostics and data-parallel training
    "StabilityGuard", "shrink_embedding_grad", "diagnose", "diagnostics", "distributed",
    # a model-building step for training scripts (mixprec.integrations.convert, loaded on first use)
    "convert",
    "__version__",
]


def __getattr__(name: str):
    if name == "convert":   # lives with the integrations, whose package is imported only when used
        from mixprec.integrations import convert
        return convert
    raise AttributeError(f"module 'mixprec' has no attribute {name!r}")
