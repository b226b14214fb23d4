"""Detection on the device: gradient norms (one foreach norm), the sliding windows of the sigma rule, and
ZClip's EMA. Every function here runs on device tensors and never reads a value back to the host.

Sigma rule (OLMo-core's skip rule, made NaN-proof):
    window: the last `size` values of a signal from clean steps (NaN, inf, faulty and overflowed steps never
            enter; each signal keeps its own ring, so a non-finite value of one cannot block another)
    mean, std = mean and sample std (n - 1) of the window;   warm = n >= warmup
    spike     = warm and x - mean > sigma * std             (x finite; the window before x is added)
"""
from __future__ import annotations

import torch

from mixprec.stability.ladder import ZClip


def grad_norms(params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per-tensor L2 norms (FP32, on `device`) of the gradients of `params`; 0 where a parameter has none.

    One torch._foreach_norm per (device, dtype) with FP32 accumulation (BF16/FP16 gradients are not summed in
    their own precision). A norm is inf/NaN exactly when its gradient holds an inf/NaN, or when its sum of
    squares passes FP32's range (|g| ~ 1.8e19: a gradient Adam's FP32 v could not hold either)."""
    groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
    for k, p in enumerate(params):
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            g = g.coalesce()._values()
        groups.setdefault((g.device, g.dtype), []).append((k, g))
    norms: list[torch.Tensor | None] = [None] * len(params)
    for items in groups.values():
        out = torch._foreach_norm([g for _, g in items], 2.0, dtype=torch.float32)
        for (k, _), n in zip(items, out):
            norms[k] = n.to(device, non_blocking=True)
    if not params:
        return torch.zeros(0, device=device)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([zero if n is None else n for n in norms])


def segment_norms(per_tensor: torch.Tensor, segment_of: torch.Tensor, segments: int) -> torch.Tensor:
    """L2 norms of sets of tensors: segment_of[k] in [0, segments] names tensor k's set (`segments`: none).
    segment_of is a device tensor built once, so nothing is copied from the host per step."""
    squares = torch.zeros(segments + 1, dtype=per_tensor.dtype, device=per_tensor.device)
    return squares.index_add_(0, segment_of, per_tensor.square())[:segments].sqrt()


def decide(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, warm: torch.Tensor, sigma: float,
           watched: torch.Tensor, loss: torch.Tensor | None, total: torch.Tensor, overflow: torch.Tensor,
           groups: slice | None) -> dict[str, torch.Tensor]:
    """The step's verdict from its signals x = [loss, N, group norms..., tensor norms...] and their windows.

        spike_s        = warm_s and finite(x_s) and x_s - mean_s > sigma * std_s
        nonfinite_loss = loss not finite;  nonfinite_grad = N not finite and no overflow (FP16 is the scaler's)
        fault          = nonfinite_loss or nonfinite_grad or a watched spike (gradient spikes ignored on overflow)
        clippable      = a gradient-norm spike alone (the clip rung can clip it; NaN or a loss spike it cannot)
    """
    no = torch.zeros((), dtype=torch.bool, device=x.device)
    spikes = warm & torch.isfinite(x) & (x - mean > sigma * std)
    loss_spike = spikes[0] & watched[0]
    norm_spike = spikes[1] & watched[1] & ~overflow
    group_spike = (spikes[groups].any() if groups is not None else no) & ~overflow
    nonfinite_loss = ~torch.isfinite(loss) if loss is not None else no
    nonfinite_grad = ~torch.isfinite(total) & ~overflow
    return {"spikes": spikes, "loss_spike": loss_spike, "norm_spike": norm_spike, "group_spike": group_spike,
            "nonfinite_loss": nonfinite_loss, "nonfinite_grad": nonfinite_grad,
            "fault": nonfinite_loss | nonfinite_grad | loss_spike | norm_spike | group_spike,
            "clippable": norm_spike & ~nonfinite_loss & ~nonfinite_grad & ~loss_spike}


class Window:
    """Rings of the last `size` accepted values of `signals` signals (FP32), with their counts."""

    def __init__(self, signals: int, size: int, device: torch.device) -> None:
        self.size = size
        self.values = torch.zeros(signals, size, dtype=torch.float32, device=device)
        self.count = torch.zeros(signals, dtype=torch.int64, device=device)   # valid entries, <= size
        self.pos = torch.zeros(signals, dtype=torch.int64, device=device)     # next slot to write
        self._cols = torch.arange(size, device=device)

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and sample standard deviation of each signal's valid entries (0 where fewer than 2)."""
        valid = self._cols[None, :] < self.count[:, None]
        n = self.count.to(torch.float32)
        mean = torch.where(valid, self.values, 0.0).sum(1) / n.clamp(min=1.0)
        dev = torch.where(valid, self.values - mean[:, None], 0.0)
        std = (dev.square().sum(1) / (n - 1.0).clamp(min=1.0)).sqrt()
        return mean, std

    def push(self, x: torch.Tensor, accept: torch.Tensor) -> None:
        """Append x[s] to signal s's ring where accept[s] (and x[s] is finite); a select, never a branch."""
        accept = accept & torch.isfinite(x)
        slot = self.pos[:, None]
        old = self.values.gather(1, slot).squeeze(1)
        self.values.scatter_(1, slot, torch.where(accept, x, old)[:, None])
        self.pos.copy_(torch.where(accept, (self.pos + 1) % self.size, self.pos))
        self.count.copy_(torch.where(accept, (self.count + 1).clamp(max=self.size), self.count))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "count": self.count, "pos": self.pos}

    def ordered(self) -> list[torch.Tensor]:
        """Each signal's valid entries, oldest first (host copies; a sync)."""
        out = []
        for values, count, pos in zip(self.values.cpu(), self.count.tolist(), self.pos.tolist()):
            order = [(pos - count + i) % self.size for i in range(count)]
            out.append(values[order].clone())
        return out


class ZClipState:
    """ZClip's statistics on the device (see ladder.ZClip for the rule)."""

    def __init__(self, cfg: ZClip, device: torch.device) -> None:
        self.cfg = cfg
        self.buffer = torch.zeros(cfg.warmup, dtype=torch.float32, device=device)   # warm-up norms
        self.count = torch.zeros((), dtype=torch.int64, device=device)             # of them, <= warmup
        self.mean = torch.zeros((), dtype=torch.float32, device=device)
        self.var = torch.zeros((), dtype=torch.float32, device=device)

    def threshold(self, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clip?, threshold mean + z*std, z-score) for this step's norm; clip is False during warm-up."""
        std = self.var.sqrt()
        z = (norm - self.mean) / (std + self.cfg.eps)
        clip = (self.count >= self.cfg.warmup) & torch.isfinite(norm) & (z > self.cfg.z_thresh)
        return clip, self.mean + self.cfg.z_thresh * std, z

    def update(self, effective: torch.Tensor, accept: torch.Tensor) -> None:
        """Take a clean step's effective (clipped) norm into the warm-up buffer or the EMA."""
        cfg = self.cfg
        accept = accept & torch.isfinite(effective)
        warming = self.count < cfg.warmup
        slot = self.count.clamp(max=cfg.warmup - 1).reshape(1)
        old = self.buffer.index_select(0, slot)
        self.buffer.index_copy_(0, slot, torch.where(accept & warming, effective.reshape(1), old))
        count = torch.where(accept & warming, self.count + 1, self.count)
        start = accept & warming & (count == cfg.warmup)
        mean0 = self.buffer.mean()
        var0 = (self.buffer - mean0).square().mean()          # population variance, as ZClip's warm-up
        ema_mean = cfg.alpha * self.mean + (1 - cfg.alpha) * effective
        ema_var = cfg.alpha * self.var + (1 - cfg.alpha) * (effective - ema_mean).square()
        ema = accept & ~warming
        self.mean.copy_(torch.where(start, mean0, torch.where(ema, ema_mean, self.mean)))
        self.var.copy_(torch.where(start, var0, torch.where(ema, ema_var, self.var)))
        self.count.copy_(count)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"buffer": self.buffer, "count": self.count, "mean": self.mean, "var": self.var}
