"""mp.autocast: the compute-precision context, torch.autocast underneath plus the precision table.

torch.autocast's op lists differ between CPU and CUDA (on the CPU, log_softmax of a BF16 tensor
stays BF16, losses and norms differ, FP16 kernels are slow). A TorchFunctionMode applies
`mixprec.rules`' op table on top, identically on every device, and emulates FP16 on the CPU.

The mode acts only where torch.autocast is enabled for the op's device, so code that disables
autocast (a module kept in FP32, an FP8 GEMM's own autograd function) is left alone.

The mode costs host time on every torch call of the block (a Python call each: ~400 per forward of a
12-layer GPT), which an eager GPU loop close to bound by its host turns into step time. On CUDA,
torch.autocast's own lists already compute the built-in op rows in FP32 (rules.CUDA_AUTOCAST_EXCEPTIONS
names the few they do not), so `op_rules="autocast"` leaves them to it there and runs no Python per op.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mixprec import rules
from mixprec._tensors import (EXACT_OPS, is_logical_fp16, logical_dtype, map_tensors, mark_output, round_in_place,
                              round_output, to_fp16_values, to_fp32, unmarked)
from mixprec.ops import FP32_IMPLEMENTATIONS
from mixprec.policy import Policy
from mixprec.rules import Precision

_HALF = (torch.float16, torch.bfloat16)

# autocast's lower-precision ops (GEMM-like), at the torch-function level. Emulated FP16 runs them in
# FP32 on FP16-rounded inputs; the ones CUDA autocasts but the CPU does not are cast here on the CPU.
GEMM_OPS = frozenset([
    F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d, F.prelu, F.scaled_dot_product_attention, torch.matmul, torch.Tensor.matmul,
    torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm,
    torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm, torch.addbmm, torch.einsum,
    torch.tensordot, torch.mv, torch.Tensor.mv, torch.addmv, torch.addr, torch.chain_matmul,
    torch.linalg.multi_dot, torch.linalg.vecdot,
])
_CPU_MISSING_GEMMS = frozenset([torch.mv, torch.Tensor.mv, torch.addmv, torch.addr, torch.chain_matmul,
                                torch.linalg.multi_dot])
# Tensor attributes (.device, .shape, ...) reach the mode as their getters: never emulated.
_ATTRIBUTES = frozenset(getattr(torch.Tensor, n).__get__ for n in ("device", "shape", "dtype", "is_cuda", "requires_grad")
                        if hasattr(getattr(torch.Tensor, n, None), "__get__"))
# Norms whose kernels take half inputs with FP32 parameters (CPU and CUDA, cuDNN too), as torch.autocast
# leaves them; other norms get the same dtype everywhere (CUDA's layer_norm refuses a mix)
MIXED_DTYPE_NORMS = frozenset([F.batch_norm, F.instance_norm])
_TO_FP32 = frozenset([torch.Tensor.float, torch.Tensor.double])
_TO_FP16 = frozenset([torch.Tensor.half])

OP_RULES = ("auto", "intercept", "autocast")


def _first_tensor(args: Any, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):  # the common case, first: this runs for every op
        return args[0]
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    return b
    return None


def cast_back(out: Any, dtype: torch.dtype) -> Any:
    """Return an FP32 result in `dtype` (rounded and marked when that dtype is emulated FP16)."""
    if dtype == torch.float32:
        return out
    return map_tensors(lambda t: t.to(dtype), out)


def _run_without_autocast(device_type: str, func: Callable, args, kwargs):
    with torch.autocast(device_type, enabled=False):
        return func(*args, **kwargs)


class PrecisionMode(TorchFunctionMode):
    """Applies the op rules (and FP16 emulation on the CPU) wherever autocast is enabled."""

    def __init__(self, policy: Policy):
        super().__init__()
        self.compute_dtype = policy.compute_dtype
        self.table = rules.op_table(builtin=policy.fp32_rules)
        self.emulate_cpu = policy.emulates_fp16("cpu")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = self.table.get(func)
        if rule is None and (not self.emulate_cpu or func in _ATTRIBUTES) and func not in _CPU_MISSING_GEMMS:
            return func(*args, **kwargs)
        first = _first_tensor(args, kwargs)
        if first is None or (rule is None and not first.is_cpu):  # off the CPU only the table applies
            return func(*args, **kwargs)
        device_type = first.device.type
        if not torch.is_autocast_enabled(device_type):
            return func(*args, **kwargs)
        emulate = self.emulate_cpu and device_type == "cpu"
        if rule is not None:
            return self._apply_rule(rule.precision, func, args, kwargs, first, device_type, emulate)
        if emulate:
            return self._emulate(func, args, kwargs)
        if device_type == "cpu":  # a GEMM the CPU's autocast misses: cast like CUDA does
            return self._apply_rule(Precision.HALF, func, args, kwargs, first, device_type, emulate)
        return func(*args, **kwargs)

    def _apply_rule(self, precision, func, args, kwargs, first, device_type, emulate):
        if precision is Precision.FP32_IN_KERNEL:
            dtypes = {t.dtype for t in _flat_tensors(args, kwargs) if t.is_floating_point()}
            if len(dtypes) == 1 or func in MIXED_DTYPE_NORMS:   # the kernel computes in FP32 from half inputs
                out = _run_without_autocast(device_type, func, args, kwargs)
                return round_output(out) if emulate and is_logical_fp16(first) else out
            # half input, FP32 weights: not every kernel takes mixed dtypes (CUDA's layer_norm does not)
            precision = Precision.FP32_CAST_BACK
        if precision in (Precision.FP32, Precision.FP32_CAST_BACK, Precision.FP32_OUTPUT):
            in_dtype = logical_dtype(first)
            # an op's own FP32 implementation where mixprec.ops has one (cross entropy: one read of the logits)
            func = FP32_IMPLEMENTATIONS.get(func, func) if precision is Precision.FP32 else func
            out = _run_without_autocast(device_type, func, map_tensors(to_fp32, args), map_tensors(to_fp32, kwargs))
            if precision is Precision.FP32_CAST_BACK and in_dtype != torch.float32:
                out = round_output(out) if emulate else cast_back(out, in_dtype)
            return out
        # HALF: the compute dtype
        if emulate:
            args, kwargs = map_tensors(to_fp16_values, args), map_tensors(to_fp16_values, kwargs)
            return round_output(_run_without_autocast(device_type, func, args, kwargs))
        cast = lambda t: t.to(self.compute_dtype)  # noqa: E731
        return _run_without_autocast(device_type, func, map_tensors(cast, args), map_tensors(cast, kwargs))

    def _emulate(self, func, args, kwargs):
        """FP16 emulation for ops outside the table (see mixprec._tensors)."""
        if func in GEMM_OPS:
            return self._apply_rule(Precision.HALF, func, args, kwargs, None, "cpu", True)
        if func in _TO_FP32:
            return func(unmarked(args[0]), *args[1:], **kwargs)
        if func in _TO_FP16:
            return to_fp16_values(args[0])
        if func is torch.Tensor.to and _requests_fp16(args, kwargs):
            return to_fp16_values(args[0])
        if any(t.dtype == torch.float16 for t in _flat_tensors(args, kwargs)):
            # Real FP16 tensors (a half model's parameters and buffers, which ops like batch_norm update in
            # place): run the op natively in FP16, with the emulated FP16 values given as real ones (exact).
            to_half = lambda t: t.half() if is_logical_fp16(t) else t  # noqa: E731
            return func(*map_tensors(to_half, args), **map_tensors(to_half, kwargs))
        out = func(*args, **kwargs)
        if _inputs_are_logical_fp16(args, kwargs):
            if args and out is args[0] and is_logical_fp16(out) and func not in EXACT_OPS:
                return round_in_place(out)   # x += y: the marked input now holds unrounded values
            return mark_output(out) if func in EXACT_OPS else round_output(out)
        return out


def _requests_fp16(args, kwargs) -> bool:
    return kwargs.get("dtype") is torch.float16 or any(a is torch.float16 for a in args[1:])


def _inputs_are_logical_fp16(args, kwargs) -> bool:
    """PyTorch's promotion: dimensioned tensors decide; all of them must be (logically) FP16."""
    tensors = [t for t in _flat_tensors(args, kwargs) if t.is_floating_point()]
    dimensioned = [t for t in tensors if t.dim() > 0] or tensors
    return bool(dimensioned) and all(is_logical_fp16(t) for t in dimensioned)


def _flat_tensors(args, kwargs) -> Iterator[torch.Tensor]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (b for b in a if isinstance(b, torch.Tensor))


def check_device_supports(policy: Policy, device_type: str) -> None:
    """Raise if the device cannot run the policy's dtypes, naming the way out."""
    if device_type == "cuda" and torch.cuda.is_available():
        if torch.bfloat16 in (policy.compute_dtype, policy.param_dtype) and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name()
            raise ValueError(f"{name} has no BF16 support (compute capability < 8.0); "
                             f"use the 'fp16-mixed' recipe or dtype=torch.float16")


@contextlib.contextmanager
def autocast(policy: Policy | str, *, device_type: str | None = None, enabled: bool = True,
             op_rules: str = "auto") -> Iterator[None]:
    """Run the enclosed forward pass (and loss) under the policy's compute precision.

    `policy` is a Policy or a recipe name. Without `device_type`, autocast is enabled for the CPU
    and, when present, CUDA; each op follows the device of its tensors.

    op_rules: how the op rows of the precision table (softmax, losses, functional norms, ...) apply.
      "auto" (default): "autocast" where CUDA is in use, else "intercept".
      "intercept": a function mode checks every torch call of the block against the table, the same
          way on every device (and emulates FP16 on the CPU). It costs a Python call per op.
      "autocast": torch.autocast's own CUDA lists apply them, with no Python per op; they compute the
          built-in rows in FP32 except rules.CUDA_AUTOCAST_EXCEPTIONS (F.cross_entropy on half logits
          among them: logits of a head mp.prepare set up are FP32, else call mp.ops.cross_entropy).
          Needs CUDA and no op rules registered by the user. CPU tensors in the block follow
          torch.autocast's CPU lists: pass device_type="cpu" for the table on the CPU.
      Module rules (hand-written norms, embeddings, head, RNNs) are mp.prepare's and apply either way.

        with mp.autocast(policy):
            loss = loss_fn(model(x), y)
    """
    if isinstance(policy, str):
        policy = Policy.from_recipe(policy)
    if not isinstance(policy, Policy):
        raise TypeError(f"autocast takes a mixprec Policy or a recipe name; got {type(policy).__name__}")
    if device_type is None:
        devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    elif device_type in ("cpu", "cuda"):
        devices = [device_type]
    else:
        raise ValueError(f"Unknown device_type {device_type!r}; choose one of: cpu, cuda")
    if op_rules not in OP_RULES:
        raise ValueError(f"Unknown op_rules {op_rules!r}; choose one of: {', '.join(OP_RULES)}")
    if not enabled or not policy.autocast_enabled:
        yield
        return
    if op_rules == "auto":
        op_rules = "autocast" if "cuda" in devices and not rules.op_table(builtin=False) else "intercept"
    _check_op_rules(op_rules, devices)
    for d in devices:
        check_device_supports(policy, d)
    with contextlib.ExitStack() as stack:
        for d in devices:
            stack.enter_context(torch.autocast(d, dtype=policy.compute_dtype))
        if op_rules == "intercept":
            stack.enter_context(PrecisionMode(policy))
        _active.append(policy)
        stack.callback(_active.pop)
        yield


# The policies of the enclosing mp.autocast blocks, innermost last. torch.autocast's own state says what
# computes in which dtype; this adds what only mixprec knows (whether FP16 is emulated). A plain list:
# torch.compile traces and guards reads of it, where a ContextVar would break the graph.
_active: list[Policy] = []


def active_policy() -> Policy | None:
    """The policy of the innermost mp.autocast block, or None outside one."""
    return _active[-1] if _active else None


def _check_op_rules(op_rules: str, devices: list[str]) -> None:
    if op_rules == "intercept":
        return
    if "cuda" not in devices:
        raise ValueError(f"op_rules='autocast' needs CUDA (torch.autocast's CPU lists differ from the table); got "
                         f"device_type for {devices}. Use op_rules='intercept'")
    user_rules = rules.op_table(builtin=False)
    if user_rules:
        names = ", ".join(sorted({r.what for r in user_rules.values()}))
        raise ValueError(f"op_rules='autocast' cannot apply op rules registered by the user ({names}): "
                         f"torch.autocast does not know them. Use op_rules='intercept'")
