"""Optimizer state of sharded parameters (FSDP2's DTensors): a local layout to step, a reshardable one to save.

At run time a DTensor parameter is stepped through its local shard: the gradient's local shard, the
parameter's local shard and a state built for that shard (state.py's layout: dense moments of the shard's
shape, or codes and one absmax per block of the shard's flattened values). No DTensor op runs in the update.

FSDP2 shards dim 0 (Shard(0), torch.chunk's sizes: ceil(rows / shards) rows a rank, the last ones fewer or
none), so a shard's flattened values are one contiguous range of the parameter's flattened values.

In a state dict (what torch.distributed.checkpoint saves) each tensor becomes a DTensor that DCP can reshard:
    exp_avg, exp_avg_sq, kahan_comp     the parameter's shape and placements (as torch.optim's states)
    exp_avg(_sq)_codes                  one code per element, the parameter's shape and placements (uint8;
                                        4-bit codes unpacked, FP8 codes as their bytes)
    exp_avg(_sq)_absmax                 (shards * max_blocks,): each shard's block scales, zero-padded to the
                                        largest shard's block count, Shard(0) on the parameter's shard dim
    shards                              how many shards the scales were computed over
Loading on the same number of shards restores every bit; on another number (or into a plain tensor) each
element is dequantized with the scale of its block in the saved layout, then quantized in the new one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixprec.optim.blockwise import decode_multiplier, num_blocks, pack_4bit, unpack_4bit
from mixprec.optim.codes import NativeFloat8, StateFormat, get_state_format
from mixprec.optim.state import moments_to_state, needs_kahan, state_to_moments

_DENSE = ("exp_avg", "exp_avg_sq")
_QUANTIZED = ("exp_avg_codes", "exp_avg_sq_codes", "exp_avg_absmax", "exp_avg_sq_absmax")


def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor
    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the same storage), or the tensor itself."""
    return t._local_tensor if is_dtensor(t) else t


@dataclass(frozen=True)
class ShardLayout:
    """Where a DTensor parameter's local shard sits in its flattened values."""

    shards: int           # shards along dim 0
    index: int            # this rank's shard
    mesh_dim: int         # the mesh dimension that shards dim 0
    rows_per_shard: int   # ceil(rows / shards)
    row_numel: int        # elements per row (1 for a vector)
    start: int            # first flattened element of the local shard
    numel: int            # elements in the local shard

    @property
    def max_numel(self) -> int:
        return self.rows_per_shard * self.row_numel


def shard_layout(param: torch.Tensor) -> ShardLayout | None:
    """The layout of a DTensor parameter sharded on dim 0 (the other mesh dims replicated); None for a
    plain tensor. Other placements (tensor parallelism's Shard(1), partial values) raise."""
    if not is_dtensor(param):
        return None
    from torch.distributed.tensor import Replicate, Shard
    shard_dims = [i for i, p in enumerate(param.placements) if isinstance(p, Shard)]
    if (any(not isinstance(p, (Shard, Replicate)) for p in param.placements) or len(shard_dims) > 1
            or any(param.placements[i].dim != 0 for i in shard_dims) or param.dim() == 0):
        raise NotImplementedError(f"mixprec AdamW steps DTensor parameters sharded on dim 0 (FSDP2's layout); got "
                                  f"placements {param.placements} for a parameter of shape {tuple(param.shape)}")
    rows = param.shape[0]
    row_numel = math.prod(param.shape[1:])
    if not shard_dims:   # replicated everywhere: one shard holding everything
        return ShardLayout(1, 0, 0, rows, row_numel, 0, param.numel())
    mesh_dim = shard_dims[0]
    shards = param.device_mesh.size(mesh_dim)
    index = param.device_mesh.get_local_rank(mesh_dim)
    per = math.ceil(rows / shards)
    start_row = min(index * per, rows)
    end_row = min(start_row + per, rows)
    layout = ShardLayout(shards, index, mesh_dim, per, row_numel, start_row * row_numel,
                         (end_row - start_row) * row_numel)
    assert local(param).numel() == layout.numel, (local(param).shape, layout)
    return layout


def _codes(fmt: StateFormat, key: str):
    return fmt.m_code if key.startswith("exp_avg_codes") or key == "exp_avg_absmax" else fmt.v_code


def _storage_dtype(code) -> torch.dtype:
    return code.dtype if isinstance(code, NativeFloat8) else torch.uint8


def _like_param(local_value: torch.Tensor, param) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local_value, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def to_saved(state: dict, param: torch.Tensor) -> dict:
    """The state of a DTensor parameter as DTensors DCP can reshard (the module docstring's layout)."""
    layout = shard_layout(param)
    if "state_dtype" not in state:
        return dict(state)
    fmt = get_state_format(state["state_dtype"])
    local_shape = local(param).shape
    out = {}
    for key, value in state.items():
        if key in _DENSE or key == "kahan_comp":
            out[key] = _like_param(value.reshape(local_shape), param)
        elif key.endswith("_codes"):
            q = unpack_4bit(value, fmt.block) if fmt.bits == 4 else value
            q = q.view(torch.uint8)[:layout.numel].reshape(local_shape)
            out[key] = _like_param(q, param)
        elif key.endswith("_absmax"):
            from torch.distributed.tensor import DTensor
            width = num_blocks(layout.max_numel, fmt.block)
            padded = torch.zeros(width, dtype=value.dtype, device=value.device)
            padded[:value.numel()] = value
            out[key] = DTensor.from_local(padded, param.device_mesh, param.placements, run_check=False,
                                          shape=(layout.shards * width,), stride=(1,))
        else:
            out[key] = value
    if fmt.quantized:
        out["shards"] = layout.shards
    return out


def from_saved(saved: dict, param: torch.Tensor, fmt: StateFormat, rounding: str) -> dict:
    """A loaded state (this module's saved layout, state.py's flat layout, or torch.optim's) as the state of
    `param`'s local shard (or of a plain `param`) in layout `fmt`."""
    layout = shard_layout(param)
    p_local = local(param)
    step = torch.as_tensor(saved.get("step", 0.0), dtype=torch.float32).reshape(()).to(p_local.device).clone()
    saved_fmt = get_state_format(saved.get("state_dtype", "fp32"))
    out = None
    if _exact_reload(saved, param, layout, saved_fmt, fmt):
        out = _local_parts(saved, layout, fmt, p_local)
    elif "exp_avg" in saved or "exp_avg_codes" in saved:
        m, v = _full_moments(saved, saved_fmt, param)
        lo, hi = (layout.start, layout.start + layout.numel) if layout is not None else (0, param.numel())
        out = moments_to_state(m[lo:hi].to(p_local.device), v[lo:hi].to(p_local.device), fmt, p_local)
    if out is None:   # no moments yet
        return {"step": step, "state_dtype": fmt.name} if "state_dtype" in saved else {"step": step}
    out["step"] = step
    out["state_dtype"] = fmt.name
    if needs_kahan(p_local, rounding):
        comp = saved.get("kahan_comp")
        out["kahan_comp"] = (torch.zeros_like(p_local) if comp is None
                             else _local_slice(comp, layout, param).to(p_local.device, p_local.dtype).view_as(p_local))
    return out


def _exact_reload(saved: dict, param, layout: ShardLayout | None, saved_fmt: StateFormat, fmt: StateFormat) -> bool:
    """Whether the saved tensors are this shard's own (same layout, same shards): then every bit comes back."""
    if layout is None or saved_fmt is not fmt:
        return False
    keys = _QUANTIZED if fmt.quantized else _DENSE
    if any(not _placed_like(saved.get(k), param) for k in keys):
        return False
    if not fmt.quantized:
        return True
    width = num_blocks(layout.max_numel, fmt.block)
    absmax = saved["exp_avg_absmax"]
    return saved.get("shards") == layout.shards and tuple(absmax.shape) == (layout.shards * width,)


def _placed_like(value, param) -> bool:
    return is_dtensor(value) and value.placements == param.placements and value.device_mesh == param.device_mesh


def _local_parts(saved: dict, layout: ShardLayout, fmt: StateFormat, p_local: torch.Tensor) -> dict:
    if not fmt.quantized:
        dtype = torch.bfloat16 if fmt.name == "bf16" else torch.float32
        return {k: local(saved[k]).to(p_local.device, dtype).reshape(p_local.shape).clone() for k in _DENSE}
    out = {}
    blocks = num_blocks(layout.numel, fmt.block)
    for key in ("exp_avg", "exp_avg_sq"):
        code = fmt.m_code if key == "exp_avg" else fmt.v_code
        q = local(saved[key + "_codes"]).reshape(-1).to(p_local.device)
        pad = blocks * fmt.block - layout.numel
        if pad:   # the tail of the last block holds the code of 0, as quantize_blockwise pads it
            zero = code.encode(torch.zeros(pad, device=p_local.device))
            q = torch.cat([q, zero.view(torch.uint8)])
        q = q.view(_storage_dtype(code))
        out[key + "_codes"] = pack_4bit(q, fmt.block).clone() if fmt.bits == 4 else q.clone()
        out[key + "_absmax"] = local(saved[key + "_absmax"])[:blocks].to(p_local.device).clone()
    return out


def _full(value) -> torch.Tensor:
    """A saved tensor's full value (a DTensor is gathered: every rank calls load_state_dict together)."""
    return value.full_tensor() if is_dtensor(value) else value


def _local_slice(value, layout: ShardLayout | None, param) -> torch.Tensor:
    if is_dtensor(param) and _placed_like(value, param) and value.shape == param.shape:
        return local(value)
    full = _full(value).reshape(-1)
    if layout is None:
        return full
    return full[layout.start:layout.start + layout.numel]


def _full_moments(saved: dict, fmt: StateFormat, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP32 moments of the whole parameter (flat) from a saved state of any layout."""
    numel = param.numel()
    if not fmt.quantized:
        return (_full(saved["exp_avg"]).reshape(-1).float().cpu(), _full(saved["exp_avg_sq"]).reshape(-1).float().cpu())
    if "shards" not in saved:   # state.py's flat layout of a plain tensor: blocks over the whole tensor
        flat = {k: _full(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in saved.items()}
        return state_to_moments(flat, numel)
    shards = int(saved["shards"])
    rows = param.shape[0]
    row_numel = numel // rows if rows else 1
    per_shard = math.ceil(rows / shards) * row_numel
    width = num_blocks(per_shard, fmt.block)
    index = torch.arange(numel)
    shard = index // per_shard
    block = shard * width + (index - shard * per_shard) // fmt.block
    moments = []
    for key in ("exp_avg", "exp_avg_sq"):
        code = fmt.m_code if key == "exp_avg" else fmt.v_code
        q = _full(saved[key + "_codes"]).reshape(-1).cpu().view(_storage_dtype(code))
        scale = decode_multiplier(_full(saved[key + "_absmax"]).cpu().float(), code)
        moments.append(code.decode(q) * scale[block])   # the product dequantize_blockwise computes
    return moments[0], moments[1]
