"""FSDP2 from a Policy: a MixedPrecisionPolicy per module, and fully_shard applied with them.

    model = mp.prepare(model, policy)                      # the table's rules, as without sharding
    model = mp.distributed.shard_model(model, policy)      # fully_shard: FP32 modules, blocks, root
    with mp.autocast(policy): loss = loss_fn(model(x), y)  # compute precision: autocast and the table

What runs where (policy "bf16-mixed"; the -true recipes alike):
    group                               all-gathered in       reduce-scattered in   computes
    each FP32 module of the table       FP32                  reduce_dtype (FP32)   FP32 (prepare's rules)
      (norms, BatchNorm and its FP32
      buffers, embeddings, the head)
    each block (the ModuleList items)   compute dtype (BF16)  reduce_dtype (FP32)   autocast (BF16 GEMMs)
    the root (what is left)             FP32 if only FP32 modules are left, else the compute dtype

Decisions:
* FSDP2 gathers parameters in the compute dtype (half the bytes) and mp.autocast still decides what each
  op computes in (cast_forward_inputs=False): activations keep the dtypes the table gives them without
  sharding, and a sharded forward computes what the unsharded model computes, bit for bit (FSDP2's hooks
  only reorder the sums of a module input's gradient contributions: 1-ulp FP32 differences). With
  autocast=False FSDP2 casts instead: module inputs to the group's dtype, and FP32 modules cast their output
  back to the compute dtype (the head keeps FP32 logits). Where a policy emulates FP16 (the CPU), compute
  groups gather in FP32, as mp.autocast's emulation expects.
* A module the table keeps in FP32 is a group of its own: a group has one parameter dtype (FSDP2 requires
  it, which is why fully_shard of a bf16-true model fails), and its weights reach it in FP32. Modules that
  share a parameter (a head tied to the embedding) stay in the root group instead.
* master_weights policies (fp16-true, O2): the sharded parameters are the FP32 masters. Half parameters are
  upcast before sharding and gathered in the compute dtype; do not wrap the optimizer in MasterWeights.
* FP8 layers (Float8Linear) sit in their block: their weights are gathered in the compute dtype (BF16) and
  quantized to FP8 in the forward, as without sharding (no FP8 all-gather).
* Loss scaling: under FSDP2 a rank sees only its gradient shard. LossScaler(process_group="default") makes
  every rank skip a step that overflowed on any rank (its contract: found_inf all-reduced with MAX); with
  DTensor gradients, DTensor's own unscale handler reduces found_inf over the mesh as well.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mixprec import _comm, rules
from mixprec.distributed.checks import check_devices, require_initialized
from mixprec.policy import Policy
from mixprec.prepare import find_roles, plan_of
from mixprec.rules import Precision

_HALF = (torch.float16, torch.bfloat16)


def _mixed_precision_policy(**kwargs):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(**kwargs)


def _reduce_dtype(policy: Policy, world: int | None) -> torch.dtype:
    if policy.reduce_dtype in _HALF:
        _comm.half_reduce_warning(policy.reduce_dtype, world, "fsdp_mixed_precision")
    return policy.reduce_dtype


def _compute_dtype(policy: Policy, device_type: str | None = None) -> torch.dtype | None:
    """The dtype FSDP2 gathers compute groups in: the policy's half compute dtype, else the parameters'. Where
    the policy emulates FP16 (the CPU), FP32: mp.autocast rounds to FP16 values itself and computes in FP32
    (FP16 tensors would run PyTorch's slow FP16 CPU kernels instead)."""
    if device_type is not None and policy.emulates_fp16(device_type):
        return None
    return policy.compute_dtype if policy.compute_dtype in _HALF else None


def fsdp_mixed_precision(policy: Policy, module: nn.Module, *, role: str | None = None, name: str = "",
                         autocast: bool = True, device_type: str | None = None, _warn: bool = True):
    """The FSDP2 MixedPrecisionPolicy for `module` under `policy`.

    A module the precision table keeps in FP32 (its rule in mixprec.rules: norms, BatchNorm, embeddings,
    the head, RNN/GRU, nn.MultiheadAttention) gets param_dtype=float32; any other module the policy's
    compute dtype. reduce_dtype is policy.reduce_dtype (FP32 unless the policy says otherwise; a half one
    warns what it costs). `role` ("embedding", "head", "keep_fp32") names what the module is in its model,
    as mp.prepare finds it (shard_model passes it; an nn.Embedding is found without it). `autocast`: True
    when the forward runs under mp.autocast(policy) (module inputs are not cast; mixprec's way); False to
    let FSDP2 cast inputs, and FP32 modules' outputs back to the compute dtype. `device_type`: where the model
    runs; on the CPU an FP16 policy (emulated there) gathers in FP32.
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"fsdp_mixed_precision takes a mixprec Policy; got {type(policy).__name__}")
    if role is None and isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        role = "embedding"
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    reduce = _reduce_dtype(policy, world) if _warn else policy.reduce_dtype
    compute = _compute_dtype(policy, device_type)
    rule = rules.rule_for_module(name, module, role) if policy.fp32_rules else None
    if rule is not None and rule.precision is not Precision.HALF:
        output = None
        if not autocast and compute is not None and rule.precision is not Precision.FP32_OUTPUT:
            output = compute   # the next module (same group) takes the compute dtype; the head's logits stay FP32
        return _mixed_precision_policy(param_dtype=torch.float32, reduce_dtype=reduce, output_dtype=output,
                                       cast_forward_inputs=not autocast)
    return _mixed_precision_policy(param_dtype=compute, reduce_dtype=reduce, cast_forward_inputs=not autocast)


@dataclass
class ShardPlan:
    """What shard_model did: each group's module name ("" is the root) and its MixedPrecisionPolicy."""

    groups: list[tuple[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        def dt(d):
            return "-" if d is None else str(d).removeprefix("torch.")
        rows = [f"{name or '<root>'}: gather {dt(p.param_dtype)}, reduce {dt(p.reduce_dtype)}, "
                f"output {dt(p.output_dtype)}" for name, p in self.groups]
        return "\n".join(rows)


def shard_model(model: nn.Module, policy: Policy, *, mesh: Any = None, blocks: Iterable[nn.Module] | None = None,
                reshard_after_forward: bool = True, autocast: bool = True) -> nn.Module:
    """Apply FSDP2's fully_shard to a (prepared) model, each group with its fsdp_mixed_precision policy.

    Groups, innermost first: every module the table keeps in FP32 (with parameters, not tied to another
    module's), then `blocks` (default: the items of every nn.ModuleList, e.g. transformer blocks), then the
    root. mesh: a 1-D DeviceMesh (default: all ranks, on the model's device type). Returns the model; its
    plan is in `model._mixprec_shard_plan`. Needs an initialized process group and one device type on all ranks.
    """
    require_initialized("shard_model")
    if not isinstance(policy, Policy):
        raise TypeError(f"shard_model takes a mixprec Policy; got {type(policy).__name__}")
    from torch.distributed.fsdp import fully_shard
    device = check_devices(model)
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if policy.reduce_dtype in _HALF:
        _comm.half_reduce_warning(policy.reduce_dtype, mesh.size(), "shard_model")
    if policy.master_weights:
        with torch.no_grad():   # the sharded FP32 parameters are the masters
            for p in model.parameters():
                if p.dtype in _HALF:
                    p.data = p.data.float()

    roles = _roles(model)
    modules = dict(model.named_modules())
    registered: dict[int, set[str]] = {}   # parameter -> the modules that register it (two when tied)
    for n, m in modules.items():
        for p in m.parameters(recurse=False):
            registered.setdefault(id(p), set()).add(n)

    def inside(n: str, unit: str) -> bool:
        return n == unit or n.startswith(unit + ".")

    fp32 = {n for n, m in modules.items() if n and _keeps_fp32(policy, n, m, roles.get(n))}
    fp32 = {n for n in fp32 if not any(inside(n, o) and n != o for o in fp32)}   # outermost only
    units = [u for u in fp32 if any(True for _ in modules[u].parameters())
             and all(inside(n, u) for p in modules[u].parameters() for n in registered[id(p)])]
    if blocks is None:
        block_names = [f"{n}.{i}" if n else str(i) for n, m in modules.items() if isinstance(m, nn.ModuleList)
                       for i in range(len(m))]
    else:
        ids = {id(b): n for n, b in modules.items()}
        missing = [type(b).__name__ for b in blocks if id(b) not in ids]
        if missing:
            raise ValueError(f"blocks must be modules of the model; not found: {', '.join(missing)}")
        block_names = [ids[id(b)] for b in blocks]
    block_names = [b for b in block_names if not any(inside(b, u) for u in units)]

    plan = ShardPlan()
    sharded: set[int] = set()
    order = {n: i for i, n in enumerate(modules)}   # the same order on every rank (no set order)

    def innermost_first(names):
        return sorted(names, key=lambda n: (-n.count("."), order[n]))

    for name in innermost_first(units) + innermost_first(block_names) + [""]:
        module = modules[name]
        own = [p for p in module.parameters() if id(p) not in sharded]
        if name in units:
            mp_policy = fsdp_mixed_precision(policy, module, role=roles.get(name), name=name, autocast=autocast,
                                             device_type=device.type, _warn=False)
        else:
            mp_policy = _group_policy(policy, name, own, registered, modules, roles, autocast, device.type)
        fully_shard(module, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
        sharded.update(id(p) for p in own)
        plan.groups.append((name, mp_policy))
    _check_uniform(modules, plan)
    model.__dict__["_mixprec_shard_plan"] = plan
    return model


def _roles(model: nn.Module) -> dict[str, str]:
    plan = plan_of(model)
    if plan:
        return {p.name: p.role for p in plan if p.role}
    return find_roles(model)


def _keeps_fp32(policy: Policy, name: str, module: nn.Module, role: str | None) -> bool:
    if not policy.fp32_rules:
        return False
    rule = rules.rule_for_module(name, module, role)
    return rule is not None and rule.precision is not Precision.HALF


def _group_policy(policy: Policy, name: str, params: list, registered: dict, modules: dict, roles: dict,
                  autocast: bool, device_type: str):
    """A block's or the root's policy: FP32 when every parameter left to it belongs to modules the table keeps
    in FP32 (the root of a GPT whose head is tied to the embedding: embedding, head, final norm), else
    fsdp_mixed_precision's (the compute dtype)."""
    owners = {n for p in params for n in registered.get(id(p), ())}
    if owners and all(_keeps_fp32(policy, n, modules[n], roles.get(n)) for n in owners):
        compute = _compute_dtype(policy, device_type)
        head = any(roles.get(n) == "head" for n in owners)
        output = None if autocast or compute is None or head or not name else compute
        return _mixed_precision_policy(param_dtype=torch.float32, reduce_dtype=policy.reduce_dtype,
                                       output_dtype=output, cast_forward_inputs=not autocast)
    return fsdp_mixed_precision(policy, modules[name], role=roles.get(name), name=name, autocast=autocast,
                                device_type=device_type, _warn=False)


def _check_uniform(modules: dict, plan: ShardPlan) -> None:
    """Each group must hold one parameter dtype (FSDP2 would fail at the first forward); name the modules."""
    from torch.distributed.fsdp import FSDPModule
    for name, _ in plan.groups:
        module = modules[name]
        dtypes: dict[torch.dtype, list[str]] = {}
        inner = {id(p) for sub in module.modules() if sub is not module and isinstance(sub, FSDPModule)
                 for p in sub.parameters()}
        for pname, p in module.named_parameters():
            if id(p) not in inner:
                dtypes.setdefault(p.dtype, []).append(pname)
        if len(dtypes) > 1:
            listing = "; ".join(f"{d}: {', '.join(ns[:4])}{' ...' if len(ns) > 4 else ''}" for d, ns in dtypes.items())
            raise ValueError(f"shard_model: the group of {name or 'the root'} holds parameters of several dtypes "
                             f"({listing}); FSDP2 gathers a group in one dtype. Keep them in one dtype (prepare with a "
                             "-mixed recipe), or pass blocks= so that each dtype gets its own group")


# ---- bytes on the wire ---------------------------------------------------------------------------------
@dataclass
class WireBytes:
    """Bytes each rank put into FSDP2's and DDP's collectives, by (collective, dtype)."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, op: str, tensor: torch.Tensor) -> None:
        key = (op, str(tensor.dtype).removeprefix("torch."))
        self.counts[key] = self.counts.get(key, 0) + tensor.numel() * tensor.element_size()

    def total(self, op: str | None = None) -> int:
        return sum(v for (o, _), v in self.counts.items() if op is None or o == op)

    def dtypes(self, op: str) -> set[str]:
        return {d for (o, d) in self.counts if o == op}

    def __str__(self) -> str:
        return ", ".join(f"{op} {dt}: {n / 2**20:.2f} MiB" for (op, dt), n in sorted(self.counts.items()))


@contextlib.contextmanager
def measure_wire() -> Iterator[WireBytes]:
    """Count the bytes of every all-gather, reduce-scatter and all-reduce started inside the block, by dtype
    (the input each rank contributes: a shard for an all-gather, the whole unsharded gradient for a
    reduce-scatter, the bucket for an all-reduce). It wraps torch.distributed's functions for the block, as
    PyTorch's own FSDP tests patch them, so it sees FSDP2's collectives and DDP comm hooks' all-reduces (DDP's
    built-in C++ reduction, used when no hook is registered, goes unseen); call it on every rank, around a step:

        with mp.distributed.measure_wire() as wire:
            train_step()
        print(wire)   # all_gather bfloat16: ..., reduce_scatter float32: ...
    """
    wire = WireBytes()
    names = {"all_gather_single": ("all_gather", 1), "reduce_scatter_single": ("reduce_scatter", 1),
             "all_reduce": ("all_reduce", 0)}
    originals = {n: getattr(dist, n) for n in names}

    def wrap(fn_name):
        op, position = names[fn_name]
        original = originals[fn_name]

        def counted(*args, **kwargs):
            tensor = kwargs.get("input", kwargs.get("input_tensor", kwargs.get("tensor")))
            if tensor is None and len(args) > position:
                tensor = args[position]
            if isinstance(tensor, torch.Tensor):
                wire.add(op, tensor)
            return original(*args, **kwargs)
        return counted

    for n in names:
        setattr(dist, n, wrap(n))
    try:
        yield wire
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)
