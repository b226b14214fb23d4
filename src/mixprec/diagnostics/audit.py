"""The precision audit: which aten op computed in which dtype, in which module, under a policy, and where a
row of the precision table (mixprec.rules) ran in half precision anyway; beside plain torch.autocast.

    report = audit(model, batch, policy, loss_fn)      # forward and loss, on copies of the model
    print(report)                                       # the flagged ops, mixprec | torch.autocast
    report.flagged("autocast")                          # [OpRecord, ...]

Each aten op of the forward pass and the loss (a TorchDispatchMode) is recorded with the module that ran
it (forward hooks keep a stack) and the precision of its floating inputs and outputs: the dtype, "fp16"
for an FP32 tensor holding emulated FP16 values (mp.autocast on the CPU), or with exact_values=True the
narrowest format that holds the values exactly (comparable across devices; the test helpers' trace).

A record is flagged when a row of the table governs it and it computed in half precision:
- inside a module whose row says FP32 (hand-written norms, embeddings, RNN/GRU, modules the user keeps in
  FP32): any op with a half floating input;
- inside the output head (half GEMM inputs, FP32 accumulation and output): a GEMM with a half output;
- an op of an FP32 op row (softmax, log_softmax, the losses, logsumexp, cumsum, norms) with a half input.
Rows that compute in FP32 inside the kernel (built-in norms) take half inputs by design: never flagged.
Casts, views and other data movement carry no precision decision and are not recorded.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from mixprec import rules
from mixprec._tensors import is_logical_fp16
from mixprec.context import autocast as mp_autocast
from mixprec.formats import round_to
from mixprec.policy import Policy
from mixprec.prepare import find_roles, prepare
from mixprec.rules import Precision

__all__ = ["AuditReport", "OpRecord", "PrecisionAudit", "audit", "precision_of"]

# Ops that only move, cast, create or compare data: no precision decision of their own.
IGNORED = frozenset({
    "_to_copy", "to", "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "clone", "detach",
    "alias", "slice", "select", "split", "split_with_sizes", "unsqueeze", "squeeze", "copy_", "empty", "empty_like",
    "zeros", "ones", "ones_like", "zeros_like", "arange", "lift_fresh", "full", "full_like", "scalar_tensor",
    "_local_scalar_dense", "unbind", "contiguous", "as_strided", "new_empty", "new_zeros", "new_ones", "fill_",
    "zero_", "_reshape_alias", "tril", "triu", "logical_not", "bitwise_not", "masked_fill", "where", "eq", "lt",
    "gt", "ge", "le", "ne", "_unsafe_index", "index", "copy", "set_", "resize_", "bernoulli_", "rand", "randn",
    "rand_like", "randn_like", "_efficientzerotensor", "isnan", "isinf", "isfinite", "abs", "amax", "max", "min",
    "sign", "copysign", "bitwise_and", "bitwise_or", "__rshift__", "__lshift__", "_foreach_copy_", "empty_strided",
    "cat", "stack", "flip", "roll", "gather", "index_select", "narrow", "unfold", "repeat", "constant_pad_nd",
    "nonzero", "sort", "topk", "argmax", "argmin", "view_as_real", "view_as_complex", "_unsafe_split",
    "embedding",   # a lookup: the table's embedding row is about its FP32 weights and output
})
GEMM_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "_convolution",
                      "mkldnn_convolution", "cudnn_convolution", "_scaled_mm"})

# aten op -> the torch function whose op row governs it (the rows name torch functions; aten is lower)
_ATEN_TO_FUNCTION = {
    "_softmax": "softmax", "softmax": "softmax", "_log_softmax": "log_softmax", "log_softmax": "log_softmax",
    "nll_loss_forward": "nll_loss", "nll_loss2d_forward": "nll_loss", "nll_loss": "nll_loss",
    "mse_loss": "mse_loss", "l1_loss": "l1_loss", "smooth_l1_loss": "smooth_l1_loss", "huber_loss": "huber_loss",
    "binary_cross_entropy": "binary_cross_entropy",
    "binary_cross_entropy_with_logits": "binary_cross_entropy_with_logits", "kl_div": "kl_div",
    "native_layer_norm": "layer_norm", "native_group_norm": "group_norm", "native_batch_norm": "batch_norm",
    "_native_batch_norm_legit": "batch_norm", "_native_batch_norm_legit_no_training": "batch_norm",
    "_fused_rms_norm": "rms_norm", "logsumexp": "logsumexp", "cumsum": "cumsum", "linalg_vector_norm": "vector_norm",
    "norm": "norm",
}
_HALF = ("fp16", "bf16")


def _emulated_fp16(t: torch.Tensor) -> bool:
    """An FP32 tensor holding emulated FP16 values (mixprec._tensors' mark). aten sees views the torch
    functions made (F.linear's transposed weight): a view of a marked tensor counts, unless it is the
    same-geometry alias by which mixprec._tensors.unmarked upcasts one to FP32 explicitly."""
    if is_logical_fp16(t):
        return True
    base = t._base
    if base is None or not is_logical_fp16(base):
        return False
    return (t.shape, t.stride(), t.storage_offset()) != (base.shape, base.stride(), base.storage_offset())


def precision_of(t: torch.Tensor, exact_values: bool = False) -> str:
    """"fp32", "fp16", "bf16", "fp8_e4m3", ... for a tensor: its dtype, "fp16" for emulated FP16 values; with
    exact_values, the narrowest of bf16/fp16/fp32 holding an FP32 tensor's values exactly."""
    if not t.is_floating_point():
        return "int"
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
    if t.dtype in names and t.dtype != torch.float32:
        return names[t.dtype]
    if t.dtype != torch.float32:
        return str(t.dtype).replace("torch.", "").replace("float8_e4m3fn", "fp8_e4m3").replace("float8_e5m2", "fp8_e5m2")
    if _emulated_fp16(t):
        return "fp16"
    if exact_values:
        x = t.detach()
        finite = x[torch.isfinite(x)]
        if finite.numel():
            if torch.equal(round_to(finite, "bf16"), finite):   # BF16 first: its values in FP16's range are FP16 too
                return "bf16"
            if torch.equal(round_to(finite, "fp16"), finite):
                return "fp16"
    return "fp32"


_WIDTH = ["fp8_e4m3", "fp8_e5m2", "bf16", "fp16", "fp32", "fp64"]


def _widest(precisions: tuple[str, ...]) -> str:
    known = [p for p in precisions if p in _WIDTH]
    return max(known, key=_WIDTH.index) if known else "-"


@dataclass(frozen=True)
class OpRecord:
    """One aten op: where it ran, in what precision, which row of the table governs it, and whether it broke it."""

    module: str
    module_class: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    rule: str | None = None       # the row that governs it ("hand-written norms ...", "softmax, log_softmax")
    flagged: bool = False

    @property
    def computes_in(self) -> str:
        """The precision the op computed in: its widest floating input (PyTorch's promotion)."""
        return _widest(self.inputs or self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "class": self.module_class, "op": self.op, "inputs": list(self.inputs),
                "outputs": list(self.outputs), "computes_in": self.computes_in, "rule": self.rule,
                "flagged": self.flagged}


class PrecisionAudit(TorchDispatchMode):
    """Records every compute op of the enclosed code with its module path (a TorchDispatchMode + hooks).

        with PrecisionAudit(model) as trace:
            loss_fn(model(x), y)
        trace.records
    """

    def __init__(self, model: nn.Module, *, exact_values: bool = False, head: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.exact_values = exact_values
        self.stack: list[str] = []
        self.records: list[OpRecord] = []
        self._handles: list[Any] = []
        roles = find_roles(model, head)
        self._modules = dict(model.named_modules())
        self._module_rules = {}
        for name, module in self._modules.items():
            rule = rules.rule_for_module(name, module, roles.get(name))
            if rule is not None and rule.precision is not Precision.HALF:
                self._module_rules[name] = rule
        self._op_rules: dict[str, rules.OpRule] = {}
        for rule in rules.op_rules():
            for fn in rule.functions:
                name = getattr(fn, "__name__", "")
                for aten, function in _ATEN_TO_FUNCTION.items():
                    if function == name:
                        self._op_rules.setdefault(aten, rule)

    def __enter__(self) -> "PrecisionAudit":
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self.stack.append(n)))
            self._handles.append(module.register_forward_hook(lambda m, a, o, n=name: self._pop()))
        return super().__enter__()

    def _pop(self) -> None:
        if self.stack:
            self.stack.pop()   # returns None: a forward hook's return value would replace the output

    def __exit__(self, *exc: Any) -> Any:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return super().__exit__(*exc)

    def _governing(self, op: str, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> tuple[str | None, bool]:
        half_in = _widest(inputs or outputs) in _HALF    # computed in half: no floating input wider than half
        for name in reversed(self.stack):        # the innermost module with an FP32 row
            rule = self._module_rules.get(name)
            if rule is None:
                continue
            if rule.precision is Precision.FP32_IN_KERNEL:
                return rule.what, False
            if rule.precision is Precision.FP32_OUTPUT:
                return rule.what, op in GEMM_OPS and any(p in _HALF for p in outputs)
            return rule.what, half_in
        rule = self._op_rules.get(op)
        if rule is not None:
            return rule.what, half_in and rule.precision is not Precision.FP32_IN_KERNEL
        return None, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = func.overloadpacket.__name__
        if op in IGNORED:
            return out
        with _disable_current_modes():
            ins = tuple(precision_of(a, self.exact_values) for a in tree_leaves((args, kwargs or {}))
                        if isinstance(a, torch.Tensor) and a.is_floating_point())
            outs = tuple(precision_of(o, self.exact_values) for o in tree_leaves(out)
                         if isinstance(o, torch.Tensor) and o.is_floating_point())
        if not ins and not outs:
            return out
        module = self.stack[-1] if self.stack else ""
        rule, flagged = self._governing(op, ins, outs)
        cls = type(self._modules[module]).__name__ if module in self._modules else ""
        self.records.append(OpRecord(module, cls, op, ins, outs, rule, flagged))
        return out


def _summary(records: list[OpRecord]) -> dict[tuple[str, str], Counter]:
    """(module, op) -> Counter of the precisions it computed in."""
    out: dict[tuple[str, str], Counter] = {}
    for r in records:
        out.setdefault((r.module, r.op), Counter())[r.computes_in] += 1
    return out


@dataclass
class AuditReport:
    """The ops of the forward pass and loss under mixprec (mp.prepare + mp.autocast) and, beside them,
    under plain torch.autocast with the same compute dtype."""

    policy: Policy
    mixprec: list[OpRecord]
    autocast: list[OpRecord] = field(default_factory=list)

    def flagged(self, which: str = "mixprec") -> list[OpRecord]:
        """The records that broke a row of the table: which is "mixprec" or "autocast"."""
        if which not in ("mixprec", "autocast"):
            raise ValueError(f"Unknown audit side {which!r}; choose one of: mixprec, autocast")
        return [r for r in getattr(self, which) if r.flagged]

    def ops(self, which: str = "mixprec", module: str | None = None, op: str | None = None) -> list[OpRecord]:
        return [r for r in getattr(self, which) if (module is None or r.module == module) and (op is None or r.op == op)]

    def side_by_side(self) -> list[list[str]]:
        """Rows governed by the table: module, op, row, precision under mixprec, under torch.autocast."""
        ours, theirs = _summary(self.mixprec), _summary(self.autocast)
        governed: dict[tuple[str, str], str] = {}
        flags: dict[tuple[str, str], list[bool]] = {}
        for side, records in enumerate((self.mixprec, self.autocast)):
            for r in records:
                if r.rule is None:
                    continue
                governed.setdefault((r.module, r.op), r.rule)
                flags.setdefault((r.module, r.op), [False, False])[side] |= r.flagged
        fmt = lambda c: ", ".join(f"{p}x{n}" if n > 1 else p for p, n in sorted(c.items())) if c else "-"  # noqa: E731
        rows = []
        for key, rule in governed.items():
            f = flags[key]
            rows.append([key[0] or "<top>", key[1], rule, fmt(ours.get(key, Counter())) + (" !" if f[0] else ""),
                         fmt(theirs.get(key, Counter())) + (" !" if f[1] else "")])
        return rows

    def __str__(self) -> str:
        from mixprec.diagnostics.report import _format_table
        lines = [f"precision audit under {self.policy.name or self.policy.describe()} (forward and loss): "
                 f"{len(self.flagged('mixprec'))} op(s) of the table in half precision with mixprec, "
                 f"{len(self.flagged('autocast'))} with torch.autocast ('!' marks them)"]
        rows = self.side_by_side()
        if rows:
            lines.append(_format_table(["module", "op", "row of the table", "mixprec", "torch.autocast"], rows))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.name or self.policy.describe(),
                "flagged": {"mixprec": [r.to_dict() for r in self.flagged("mixprec")],
                            "autocast": [r.to_dict() for r in self.flagged("autocast")]},
                "side_by_side": [dict(zip(["module", "op", "rule", "mixprec", "autocast"], row))
                                 for row in self.side_by_side()]}


def _run(model: nn.Module, batch: Any, loss_fn: Callable | None) -> None:
    from mixprec.diagnostics.run import forward_and_loss
    forward_and_loss(model, batch, loss_fn)


def audit(model: nn.Module, batch: Any, policy: Policy | str, loss_fn: Callable | None = None, *,
          against_autocast: bool = True, exact_values: bool = False, head: str | None = None) -> AuditReport:
    """Which op computed in which precision under `policy`, on copies of the model (it is not modified).

    mixprec side: mp.prepare(copy, policy) under mp.autocast(policy) on the batch's device. torch.autocast
    side (against_autocast): an unprepared FP32 copy under torch.autocast(device, dtype=policy.compute_dtype).
    batch and loss_fn as mp.diagnose takes them; forward and loss only, under torch.no_grad.
    """
    from mixprec.diagnostics.run import _device_of, fp32_copy
    if isinstance(policy, str):
        policy = Policy.from_recipe(policy)
    device = _device_of(model, batch)
    ours = prepare(fp32_copy(model), policy)
    with torch.no_grad(), PrecisionAudit(ours, exact_values=exact_values, head=head) as trace, \
            mp_autocast(policy, device_type=device.type):
        _run(ours, batch, loss_fn)
    report = AuditReport(policy, trace.records)
    del ours
    if against_autocast:
        plain = fp32_copy(model)
        enabled = policy.compute_dtype != torch.float32
        with torch.no_grad(), PrecisionAudit(plain, exact_values=exact_values, head=head) as trace, \
                torch.autocast(device.type, dtype=policy.compute_dtype, enabled=enabled):
            _run(plain, batch, loss_fn)
        report.autocast = trace.records
    return report
