"""The APIs users know from the literature: apex.amp (`apex`) and Keras' LossScaleOptimizer (`keras`).

apex's `initialize` and `scale_loss` are also reachable as `mp.initialize` and `mp.scale_loss`.
"""
from mixprec.compat import apex, keras

__all__ = ["apex", "keras"]
