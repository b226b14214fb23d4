"""Stability tools from large runs: a guard that detects loss and gradient spikes on the device and skips,
clips, resets, lowers the LR or rolls back (StabilityGuard), and GLM-130B's embedding gradient shrink.

    guard = mp.StabilityGuard(model, optimizer, sigma=6.0, window=128, ladder=("skip", "rollback"))
    guard.step(loss, scaler=scaler, batch=batch_id)       # instead of scaler.step(opt); scaler.update()
    mp.shrink_embedding_grad(model.tok_emb, alpha=0.1)

guard.py has the step's algorithm, ladder.py the rungs, apply.py how a skip needs no host sync, snapshot.py
the rollback ring.
"""
from mixprec.stability.embedding import shrink_embedding_grad
from mixprec.stability.guard import GuardStep, StabilityAbort, StabilityGuard
from mixprec.stability.ladder import ACTIONS, Rung, ZClip

__all__ = ["StabilityGuard", "GuardStep", "StabilityAbort", "Rung", "ZClip", "ACTIONS", "shrink_embedding_grad"]
