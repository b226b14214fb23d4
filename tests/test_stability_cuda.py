"""StabilityGuard on CUDA adds no host sync: guarded steps (clean, a spike, a NaN gradient, ZClip, per-group norms,
snapshots) run under torch.cuda.set_sync_debug_mode("error")."""
import math

import pytest
import torch
import torch.nn.functional as F

import mixprec as mp
from helpers import MLP
from mixprec.stability import StabilityGuard

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("kind", ["torch-fused", "mixprec-int8"])
def test_guarded_steps_add_no_host_sync(kind):
    torch.manual_seed(0)
    model = MLP(hidden=256).cuda()
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True) if kind == "torch-fused"
           else mp.optim.AdamW(model.parameters(), lr=1e-3, state_dtype="int8"))
    scaler = mp.LossScaler()
    guard = StabilityGuard(model, opt, window=8, zclip=2.5, per_group=True, ladder=("skip", "rollback"),
                           snapshot_every=2, keep_snapshots=2)
    x, y = torch.randn(64, 32, device="cuda"), torch.randn(64, 8, device="cuda")

    def step(b, spike=False, nan=False):
        f = 1e3 if spike else 1.0
        loss = F.mse_loss(model(x * f), y * f)
        scaler.scale(loss).backward()
        if nan:
            model.fc2.weight.grad[3, 5].fill_(math.nan)   # a kernel: assigning a Python scalar would copy from the host
        guard.step(loss, scaler=scaler, batch=b)
        opt.zero_grad(set_to_none=False)

    for b in range(10):          # warm-up: kernels, pinned buffers of the snapshot ring, the windows
        step(b)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in range(10, 16):
            step(b, spike=b == 12, nan=b == 14)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    guard.flush()
    assert [(e["step"], e["action"]) for e in guard.events] == [(12, "skip")]
    assert guard.counters["overflows"] == 1      # the NaN gradient under a loss scaler: the scaler's skip
    assert all(torch.isfinite(p).all() for p in model.parameters())
