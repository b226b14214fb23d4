"""Data-parallel training on torch.distributed's engines (DDP, FSDP2, torch.distributed.checkpoint, torchrun),
driven by one Policy. No communication layer of its own: hooks and policies for PyTorch's.

    # DDP: gradients averaged in policy.reduce_dtype (FP32 for half gradients)
    model = DDP(mp.prepare(model, policy)); mp.prepare(model, policy)   # registers fp32_allreduce_hook
    model.register_comm_hook(state=None, hook=mp.distributed.fp32_allreduce_hook)   # or by hand
    # FSDP2: a MixedPrecisionPolicy per module (FP32 modules of the table in their own groups, reduce in FP32)
    model = mp.distributed.shard_model(mp.prepare(model, policy), policy)
    mp.distributed.fsdp_mixed_precision(policy, module)   # the MixedPrecisionPolicy of one module
    # loss scaling agreed across ranks (one MAX all-reduce of found_inf a step, no host sync)
    scaler = mp.LossScaler(process_group="default")      # every rank skips what overflowed on any rank
    # checkpoints: reshard onto any number of ranks; mixprec's low-bit optimizer states included
    mp.distributed.save_checkpoint(path, model, optimizer, scaler=scaler, extra={"step": step})
    mp.distributed.load_checkpoint(path, model, optimizer, scaler=scaler)

Cross-rank contract of LossScaler(process_group=...): found_inf of every rank is all-reduced with MAX before
the step decision, so all ranks skip the same steps and keep bit-identical scales; an inf in one rank's
shard only is enough. None keeps found_inf local: enough under DDP (its averaged gradients carry any rank's
inf to all) and under FSDP2 with DTensor gradients (DTensor's unscale handler reduces found_inf itself), not
for gradients a rank holds alone (sharded optimizers, model parallelism, tensors outside FSDP).
"""
from mixprec._comm import allreduce_hook_in, fp32_allreduce_hook
from mixprec.distributed.checkpoint import checkpoint_bytes, load_checkpoint, save_checkpoint
from mixprec.distributed.checks import (agree, check_devices, model_device, per_rank_batch, rank_slice,
                                        require_initialized, world_size)
from mixprec.distributed.fsdp import ShardPlan, WireBytes, fsdp_mixed_precision, measure_wire, shard_model
from mixprec.distributed.launch import (DATA_PARALLEL, Ranks, close_ranks, init_ranks, launch, loss_scaler,
                                        parallelize)

__all__ = [
    # DDP
    "fp32_allreduce_hook", "allreduce_hook_in",
    # FSDP2
    "fsdp_mixed_precision", "shard_model", "ShardPlan", "measure_wire", "WireBytes",
    # checkpoints
    "save_checkpoint", "load_checkpoint", "checkpoint_bytes",
    # cross-rank agreement and checks
    "agree", "check_devices", "model_device", "per_rank_batch", "rank_slice", "require_initialized", "world_size",
    # starting ranks (mixprec train --nproc N)
    "launch", "init_ranks", "close_ranks", "Ranks", "parallelize", "loss_scaler", "DATA_PARALLEL",
]
