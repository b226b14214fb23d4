"""Cross-rank found_inf: two CPU processes (gloo); only rank 1 sees an inf, and both ranks skip together."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mixprec.scaler import LossScaler

WORLD = 2
STEPS = 5
BAD_STEP = 2      # rank 1 injects an inf into one gradient at this step


def _train(scaler: LossScaler, rank: int) -> dict:
    torch.manual_seed(0)                                   # the same model on both ranks
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = _ReportingAdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(100 + rank)       # different data per rank (a sharded batch)
    trace = {"ran": [], "scale": [], "changed": [], "returned": []}
    for step in range(STEPS):
        opt.zero_grad()
        x, y = torch.randn(4, 5, generator=data), torch.randn(4, 2, generator=data)
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if rank == 1 and step == BAD_STEP:
            model[0].weight.grad[1, 2] = math.inf
        before = [p.detach().clone() for p in model.parameters()]
        skipped_before = scaler.num_skipped_steps
        trace["returned"].append(scaler.step(opt))       # what opt.step returned: "stepped", or None if skipped
        scaler.update()
        trace["ran"].append(scaler.num_skipped_steps == skipped_before)   # the device counter of skipped steps
        trace["scale"].append(scaler.get_scale())
        trace["changed"].append(any(not torch.equal(a, b) for a, b in zip(before, model.parameters())))
    return trace


class _ReportingAdamW(torch.optim.AdamW):
    """AdamW whose step() returns "stepped", so scaler.step's return value tells whether it ran."""

    def step(self, closure=None):
        super().step(closure)
        return "stepped"


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)       # two processes on a small CPU: no oversubscription
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        kw = dict(init_scale=2.0**10, growth_interval=2)
        results = {
            "default": _train(LossScaler(process_group="default", **kw), rank),
            "group": _train(LossScaler(process_group=dist.new_group(list(range(WORLD))), **kw), rank),
            "local": _train(LossScaler(**kw), rank),
        }
        torch.save(results, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_found_inf_is_shared_across_ranks(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    # Scale: grows every 2 clean steps, so 2**10, 2**11 (step 1), backoff at step 2, 2**10 ... on both ranks.
    expected_scale = [2.0**10, 2.0**11, 2.0**10, 2.0**10, 2.0**11]
    for mode in ("default", "group"):
        for rank in range(WORLD):
            trace = results[rank][mode]
            assert trace["ran"] == [step != BAD_STEP for step in range(STEPS)], (mode, rank)
            assert trace["changed"] == trace["ran"], (mode, rank)       # rank 0 skipped although its grads were finite
            assert trace["returned"] == ["stepped" if ran else None for ran in trace["ran"]], (mode, rank)
            assert trace["scale"] == expected_scale, (mode, rank)
    # Without a process group each rank decides alone: rank 0 steps, and the scales drift apart.
    assert results[0]["local"]["ran"] == [True] * STEPS
    assert results[1]["local"]["ran"] == [step != BAD_STEP for step in range(STEPS)]
    for rank in range(WORLD):
        trace = results[rank]["local"]
        assert trace["changed"] == trace["ran"], rank
        assert trace["returned"] == ["stepped" if ran else None for ran in trace["ran"]], rank
    assert results[0]["local"]["scale"] != results[1]["local"]["scale"]
