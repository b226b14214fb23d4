"""mixprec where you already train: Lightning, the Hugging Face Trainer, accelerate, torchtitan-style scripts.

Each host is a module imported on demand (each an optional extra: pip install "mixprec[lightning]", ...):

    from mixprec.integrations.lightning import MixprecPrecision        # Trainer/Fabric(plugins=[...])
    from mixprec.integrations.transformers import prepare_trainer, MixprecCallback
    from mixprec.integrations.accelerate import prepare

This package itself imports no host: only the model converter, which needs nothing beyond mixprec's core:

    model = mixprec.integrations.convert(model, "bf16-mixed")   # mp.prepare + a forward under mp.autocast
"""
from mixprec.integrations.converters import PolicyForward, convert, policy_of, unconvert

__all__ = ["convert", "unconvert", "policy_of", "PolicyForward"]
