"""Precision diagnostics: where a model's values under- and overflow in each format, which ops ran in which
precision, and the policy that follows.

    report = diagnose(model, batch, loss_fn, formats=("fp16", "bf16", "fp8_e4m3", "fp8_e5m2"),
                      loss_scale=None, policy=None)
    print(report)                    # a table sorted by risk
    report.layers["blocks.0.fc"]     # per module: amax, under/subnormal/overflow fractions per format, SQNR
    policy = report.recommend()      # a Policy: recipe, loss scale, modules kept in FP32 / out of FP8
    save_policy(policy, "policy.json"); load_policy("policy.json")
    report.save_html("diag/")        # report.html, a PNG per tensor kind and per-layer range plots
    report.to_json()
    audit(model, batch, policy, loss_fn)          # which aten op computed in which dtype, vs torch.autocast
    DiagnosisMonitor(model, every=100)            # the statistics during training, read at report time

Modules: stats (device-side counts per format), collect (hooks), run (diagnose, SQNR), report, recommend
(policy and policy files), html (figures), audit, monitor, command (what the CLI and the guard call).
"""
from mixprec.diagnostics.audit import AuditReport, OpRecord, PrecisionAudit, audit
from mixprec.diagnostics.collect import TensorStats
from mixprec.diagnostics.command import describe_range_shifts, event_diagnosis, run_cli_diagnosis
from mixprec.diagnostics.monitor import DiagnosisMonitor
from mixprec.diagnostics.recommend import (HighPrecisionLinear, ModuleOverrides, RecommendedPolicy, load_policy,
                                           recommend, save_policy)
from mixprec.diagnostics.report import DiagnosisReport, ModuleDiagnosis, RangeShift, range_shifts
from mixprec.diagnostics.run import DEFAULT_FORMATS, diagnose
from mixprec.diagnostics.stats import GRANULARITIES, KINDS, edges, fractions, tensor_counts

__all__ = [
    # the diagnosis
    "diagnose", "DiagnosisReport", "ModuleDiagnosis", "TensorStats", "DEFAULT_FORMATS", "KINDS", "GRANULARITIES",
    # the policy it recommends, and policy files
    "recommend", "RecommendedPolicy", "ModuleOverrides", "HighPrecisionLinear", "save_policy", "load_policy",
    # the precision audit
    "audit", "AuditReport", "OpRecord", "PrecisionAudit",
    # during training, and for the command line and the stability guard
    "DiagnosisMonitor", "run_cli_diagnosis", "describe_range_shifts", "event_diagnosis", "range_shifts",
    "RangeShift",
    # statistics primitives
    "edges", "fractions", "tensor_counts",
]
