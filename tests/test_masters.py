"""FP32 master weights (mixprec.masters): gradients follow the model's, zeroing works either way,
state dicts a plain optimizer loads, and DDP averages before the masters read the gradients."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as multiprocessing
import torch.nn.functional as F
from torch import nn

import mixprec as mp
from tolerances import FP16_ULP_RTOL

WORLD = 2


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(n: int, seed: int = 100):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def test_masters_follow_the_model_gradients_and_model_zero_grad():
    policy = mp.Policy.from_recipe("fp16-true")
    model = mp.prepare(_model(), policy)
    opt = mp.MasterWeights(torch.optim.SGD(model.parameters(), lr=0.0))
    x, y = _data(8)
    for _ in range(3):   # the same batch each time: zeroed gradients do not pile up
        model.zero_grad()
        with mp.autocast(policy):
            F.mse_loss(model(x), y).backward()
        grads = [m.grad.clone() for m in mp.master_params(opt)]
        assert all(torch.equal(g, p.grad.float()) for g, p in zip(grads, model.parameters()))
        opt.step()
        assert all(torch.equal(m.grad, g) for m, g in zip(mp.master_params(opt), grads))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert all(m.grad is None for m in mp.master_params(opt))


def test_accumulation_over_micro_batches_sums_in_the_model():
    policy = mp.Policy.from_recipe("fp16-true")
    model = mp.prepare(_model(), policy)
    opt = mp.MasterWeights(torch.optim.SGD(model.parameters(), lr=0.0))
    x, y = _data(8)
    with mp.autocast(policy):
        F.mse_loss(model(x[:4]), y[:4]).backward()
        F.mse_loss(model(x[4:]), y[4:]).backward()
    assert all(torch.equal(m.grad, p.grad.float()) for m, p in zip(mp.master_params(opt), model.parameters()))


def test_state_dict_is_a_torch_optimizers_plus_the_masters():
    policy = mp.Policy.from_recipe("fp16-true")
    model = mp.prepare(_model(), policy)
    opt = mp.MasterWeights(torch.optim.AdamW(model.parameters(), lr=1e-2))
    x, y = _data(8)
    with mp.autocast(policy):
        F.mse_loss(model(x), y).backward()
    opt.step()
    state = opt.state_dict()
    # the first Linear is half (its weight and bias have masters); the head stays FP32 by the table
    assert len(state["master_weights"]) == 2 and state["master_weights"][0].dtype == torch.float32
    plain_model = _model()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    plain.load_state_dict(state)          # a torch optimizer over FP32 parameters loads it
    assert torch.equal(plain.state[plain_model[0].weight]["exp_avg"],
                       opt.state[next(iter(mp.master_params(opt)))]["exp_avg"])
    other = mp.MasterWeights(torch.optim.AdamW(mp.prepare(_model(1), policy).parameters(), lr=1e-2))
    other.load_state_dict(state)
    half = list(mp.master_params(other))[:2]       # the FP32 head is the model's own, not in the state dict
    assert all(torch.equal(a, b) for a, b in zip(half, state["master_weights"]))


def test_refuses_fsdp2_parameters_with_the_way_out():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = nn.Parameter(distribute_tensor(torch.zeros(4, 2, dtype=torch.float16), mesh))
        with pytest.raises(TypeError, match="MixedPrecisionPolicy"):
            mp.MasterWeights(torch.optim.SGD([p], lr=0.1))
    finally:
        dist.destroy_process_group()


# ---- DDP: two gloo processes against one process on the concatenated batch -------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        policy = mp.Policy.from_recipe("fp16-true")
        model = mp.prepare(_model(), policy)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = mp.MasterWeights(torch.optim.SGD(model.parameters(), lr=0.5))
        x, y = _data(8)
        shard = slice(rank * 4, rank * 4 + 4)      # different data per rank
        trace = []
        for _ in range(2):
            opt.zero_grad()
            with mp.autocast(policy):
                F.mse_loss(ddp(x[shard]), y[shard]).backward()
            trace.append([m.grad.clone() for m in mp.master_params(opt)])
            opt.step()
        trace.append([m.detach().clone() for m in mp.master_params(opt)])
        torch.save(trace, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_averages_before_the_masters_take_the_gradients(tmp_path):
    multiprocessing.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    policy = mp.Policy.from_recipe("fp16-true")
    model = mp.prepare(_model(), policy)
    opt = mp.MasterWeights(torch.optim.SGD(model.parameters(), lr=0.5))
    x, y = _data(8)
    reference = []
    for _ in range(2):
        opt.zero_grad()
        with mp.autocast(policy):
            F.mse_loss(model(x), y).backward()
        reference.append([m.grad.clone() for m in mp.master_params(opt)])
        opt.step()
    reference.append([m.detach().clone() for m in mp.master_params(opt)])
    for step, expected in enumerate(reference):
        for rank in ranks:
            for got, want in zip(rank[step], expected):
                # the ranks' FP16 gradients summed in FP16 against one FP16 backward: FP16 rounding apart
                assert torch.allclose(got, want, rtol=FP16_ULP_RTOL * 4, atol=FP16_ULP_RTOL * want.abs().max())
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][step], ranks[1][step]))   # every rank the same


def test_fresh_gradients_after_zero_grad_to_none_always_reach_the_masters():
    """zero_grad(set_to_none=True) frees the half gradients; the next backward allocates new ones, which
    CPython often puts at the freed objects' addresses: the masters must still take every new gradient
    (they once compared id() and version, and kept a stale gradient when an id came back)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).half()
    opt = mp.MasterWeights(torch.optim.SGD(model.parameters(), lr=0.0))
    for it in range(50):
        model.zero_grad(set_to_none=True)
        x = torch.randn(2, 8).half()
        (model(x).float() * (it + 1)).sum().backward()
        opt.sync_grads()
        for p, m in zip(model.parameters(), mp.master_params(opt)):
            assert torch.equal(m.grad, p.grad.float()), it
