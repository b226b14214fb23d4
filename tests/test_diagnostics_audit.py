"""The precision audit: which aten op computed in which precision, per module, and which rows of the table
ran in half precision (a hand-written RMSNorm under plain torch.autocast) - and not under mp.autocast."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import mixprec as mp
from helpers import RMSNorm
from mixprec import diagnostics as dg


class NormAfterLinear(nn.Module):
    """A hand-written RMSNorm fed by a Linear: under autocast its input is half precision."""

    def __init__(self, dim=32, classes=8):
        super().__init__()
        self.up = nn.Linear(dim, dim)
        self.norm = RMSNorm(dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, x):
        return self.out(self.norm(self.up(x)))


def _batch():
    return torch.randn(16, 32), torch.randint(0, 8, (16,))


def test_hand_written_rmsnorm_runs_in_bf16_under_torch_autocast_not_under_mixprec():
    torch.manual_seed(0)
    model = NormAfterLinear()
    report = dg.audit(model, _batch(), "bf16-mixed", F.cross_entropy)

    theirs = [r for r in report.flagged("autocast") if r.module == "norm"]
    assert {r.op for r in theirs} >= {"pow", "mean", "rsqrt"}        # the mean of squares in BF16
    assert all(r.computes_in == "bf16" and r.rule.startswith("hand-written norms") for r in theirs)
    assert not [r for r in report.flagged("mixprec") if r.module == "norm"]
    ours = report.ops("mixprec", module="norm", op="mean")
    assert ours and all(r.computes_in == "fp32" for r in ours)
    # the GEMMs themselves run in BF16 on both sides: no row of the table governs them
    assert [r.computes_in for r in report.ops("mixprec", module="up", op="addmm")] == ["bf16"]
    text = str(report)
    assert "torch.autocast" in text and "bf16 !" in text
    assert report.to_dict()["flagged"]["autocast"]


def test_precision_audit_as_a_context_with_prepare_and_mp_autocast():
    torch.manual_seed(0)
    x, y = _batch()
    plain = NormAfterLinear()
    with torch.no_grad(), dg.PrecisionAudit(plain) as trace, torch.autocast("cpu", dtype=torch.bfloat16):
        F.cross_entropy(plain(x), y)
    assert any(r.flagged and r.module == "norm" for r in trace.records)

    policy = mp.Policy.from_recipe("bf16-mixed")
    prepared = mp.prepare(NormAfterLinear(), policy)
    with torch.no_grad(), dg.PrecisionAudit(prepared) as trace, mp.autocast(policy, device_type="cpu"):
        F.cross_entropy(prepared(x), y)
    assert not [r for r in trace.records if r.flagged]
    assert {r.module for r in trace.records} >= {"up", "norm", "out", ""}   # "" : the loss, outside the model


def test_emulated_fp16_counts_as_fp16_and_the_head_row_is_checked():
    torch.manual_seed(0)
    report = dg.audit(NormAfterLinear(), _batch(), "fp16-mixed", F.cross_entropy)
    # mixprec on the CPU emulates FP16 (FP32 tensors holding FP16 values): the GEMMs read as fp16
    assert [r.computes_in for r in report.ops("mixprec", module="up", op="addmm")] == ["fp16"]
    assert [r.computes_in for r in report.ops("autocast", module="up", op="addmm")] == ["fp16"]
    assert not [r for r in report.flagged("mixprec") if r.module == "out"]
    # torch.autocast's head GEMM gives FP16 logits: the head row (FP32 output) is broken there
    assert any(r.module == "out" and r.rule.startswith("output head") for r in report.flagged("autocast"))


def test_hand_written_norm_computes_in_fp32_under_emulated_fp16():
    torch.manual_seed(0)
    report = dg.audit(NormAfterLinear(), _batch(), "fp16-mixed", F.cross_entropy, against_autocast=False)
    assert not report.flagged("mixprec"), report.flagged("mixprec")


def test_diagnose_attaches_the_audit():
    torch.manual_seed(0)
    report = dg.diagnose(NormAfterLinear(), _batch(), F.cross_entropy, policy="bf16-mixed", audit=True,
                         fp8_scaling=False)
    assert report.audit is not None and report.audit.flagged("autocast")
    assert "precision audit" in str(report)
    assert report.to_dict()["audit"]["flagged"]["mixprec"] == []
