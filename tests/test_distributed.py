"""mixprec.distributed in one process: the Policy -> MixedPrecisionPolicy mapping, what mp.prepare does on a DDP
module, shard_model's groups, the sharded optimizer state's save layout, and the errors for bad input.
(Several ranks: test_distributed_ranks.py.)"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import mixprec as mp
import mixprec.distributed as mpd
from mixprec.optim import sharded
from mixprec.optim.blockwise import dequantize_blockwise
from mixprec.optim.codes import get_state_format
from mixprec.prepare import preparation
from helpers import TinyCNN, TinyGPT


def _quiet_fsdp():
    warnings.filterwarnings("ignore", message=".*view tensor.*")


# ---- the policy mapping ---------------------------------------------------------------------------------
@pytest.mark.parametrize("module,role,param_dtype", [
    (nn.Linear(4, 4), None, torch.bfloat16), (nn.Conv2d(1, 2, 3), None, torch.bfloat16),
    (nn.LayerNorm(4), None, torch.float32), (nn.BatchNorm2d(4), None, torch.float32),
    (nn.Embedding(8, 4), None, torch.float32), (nn.Linear(4, 8), "head", torch.float32),
    (nn.GRU(4, 4), None, torch.float32), (nn.LSTM(4, 4), None, torch.bfloat16)])
def test_fsdp_mixed_precision_follows_the_table(module, role, param_dtype):
    policy = mp.Policy.from_recipe("bf16-mixed")
    mpp = mpd.fsdp_mixed_precision(policy, module, role=role)
    assert mpp.param_dtype == param_dtype and mpp.reduce_dtype == torch.float32
    assert mpp.output_dtype is None and mpp.cast_forward_inputs is False   # mp.autocast decides activations


def test_fsdp_mixed_precision_without_autocast_casts_inputs_and_fp32_outputs_back():
    policy = mp.Policy.from_recipe("bf16-mixed")
    norm = mpd.fsdp_mixed_precision(policy, nn.LayerNorm(4), autocast=False)
    head = mpd.fsdp_mixed_precision(policy, nn.Linear(4, 8), role="head", autocast=False)
    block = mpd.fsdp_mixed_precision(policy, nn.Linear(4, 4), autocast=False)
    assert norm.cast_forward_inputs and norm.output_dtype == torch.bfloat16
    assert head.param_dtype == torch.float32 and head.output_dtype is None   # FP32 logits
    assert block.param_dtype == torch.bfloat16 and block.cast_forward_inputs


def test_fsdp_mixed_precision_of_other_policies():
    linear, norm = nn.Linear(4, 4), nn.LayerNorm(4)
    fp32 = mp.Policy.from_recipe("fp32")
    assert mpd.fsdp_mixed_precision(fp32, linear).param_dtype is None
    o3 = mp.Policy.from_opt_level("O3", dtype=torch.bfloat16)          # the table off: all in the compute dtype
    assert mpd.fsdp_mixed_precision(o3, norm).param_dtype == torch.bfloat16
    fp16 = mp.Policy.from_recipe("fp16-mixed")                        # FP16 is emulated on the CPU: gather FP32
    assert mpd.fsdp_mixed_precision(fp16, linear).param_dtype == torch.float16
    assert mpd.fsdp_mixed_precision(fp16, linear, device_type="cpu").param_dtype is None
    assert mpd.fsdp_mixed_precision(fp16, linear, device_type="cuda").param_dtype == torch.float16
    with pytest.raises(TypeError, match="mixprec Policy"):
        mpd.fsdp_mixed_precision("bf16-mixed", linear)


def test_a_half_reduce_dtype_is_allowed_with_a_warning_that_states_its_cost():
    policy = mp.Policy.from_recipe("bf16-mixed", reduce_dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match=r"reduce_dtype=torch.bfloat16 .* 8 significant bits.*torch.float32"):
        mpp = mpd.fsdp_mixed_precision(policy, nn.Linear(4, 4))
    assert mpp.reduce_dtype == torch.bfloat16


# ---- DDP: what mp.prepare registers ---------------------------------------------------------------------
def test_prepare_on_ddp_registers_the_reduction_the_policy_asks_for(one_rank):
    half = DistributedDataParallel(mp.prepare(TinyGPT(), "bf16-true"))
    assert mp.prepare(half, "bf16-true") is half
    assert half._mixprec_reduce_hook == "float32_allreduce_hook"
    assert mp.prepare(half, "bf16-true") is half                    # idempotent: DDP takes one hook
    assert preparation(half.module).policy.name == "bf16-true"

    fp32_grads = DistributedDataParallel(mp.prepare(TinyGPT(), "bf16-mixed"))
    mp.prepare(fp32_grads, "bf16-mixed")                              # FP32 gradients: DDP's default is FP32
    assert not hasattr(fp32_grads, "_mixprec_reduce_hook")

    compressed = mp.Policy.from_recipe("bf16-mixed", reduce_dtype=torch.bfloat16)
    ddp = DistributedDataParallel(mp.prepare(TinyGPT(), compressed))
    with pytest.warns(UserWarning, match="8 significant bits"):
        mp.prepare(ddp, compressed)
    assert ddp._mixprec_reduce_hook == "bfloat16_allreduce_hook"


def test_the_fp32_hook_averages_a_half_bucket_in_fp32(one_rank):
    class Bucket:
        def __init__(self, t):
            self.t = t

        def buffer(self):
            return self.t

    x = torch.randn(1000).to(torch.bfloat16)
    bucket = x.clone()
    out = mpd.fp32_allreduce_hook(None, Bucket(bucket)).wait()
    assert out is bucket and torch.equal(bucket, x)                  # one rank: the average is the value


def test_prepare_refuses_a_ddp_module_it_would_cast_behind_ddps_back(one_rank):
    ddp = DistributedDataParallel(TinyGPT())
    with pytest.raises(ValueError, match=r"Prepare first, then wrap: model = DDP\(mp.prepare\(model, policy\)\)"):
        mp.prepare(ddp, "bf16-true")
    mp.prepare(ddp, "bf16-mixed")                                     # FP32 parameters stay: allowed
    assert ddp.module.tok.weight.dtype == torch.float32


# ---- FSDP2: shard_model's groups ------------------------------------------------------------------------
def test_shard_model_groups_fp32_modules_apart_and_keeps_a_tied_head_in_the_root(one_rank):
    _quiet_fsdp()
    model = TinyGPT()
    model.lm_head.weight = model.tok.weight                           # tied, as GPT-2
    policy = mp.Policy.from_recipe("bf16-true")
    mpd.shard_model(mp.prepare(model, policy), policy)
    groups = {name: p.param_dtype for name, p in model._mixprec_shard_plan.groups}
    assert "tok" not in groups and "lm_head" not in groups            # tied: neither alone
    assert groups[""] == torch.float32                                # the root holds them, FP32 as the table says
    assert groups["pos"] == groups["norm"] == groups["blocks.0.norm1"] == torch.float32
    assert groups["blocks.0"] == torch.bfloat16
    with mp.autocast(policy):                                         # the bf16-true model runs sharded
        logits = model(torch.randint(0, 64, (2, 8)))
    assert logits.dtype == torch.float32


def test_shard_model_with_master_weights_shards_fp32_masters(one_rank):
    _quiet_fsdp()
    policy = mp.Policy.from_recipe("fp16-true")
    model = mpd.shard_model(mp.prepare(TinyCNN(), policy), policy)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(TypeError, match="MasterWeights does not shard"):
        mp.MasterWeights(torch.optim.AdamW(model.parameters()))


def test_shard_model_names_the_modules_of_a_group_with_two_dtypes(one_rank):
    policy = mp.Policy.from_recipe("bf16-true")
    model = mp.prepare(TinyCNN(), policy)
    model.conv2.float()                                               # one convolution back in FP32
    with pytest.raises(ValueError, match=r"the group of the root .*torch.bfloat16: conv1.weight.*torch.float32: "
                                         r"conv2.weight"):
        mpd.shard_model(model, policy)


def test_prepare_refuses_a_model_already_sharded(one_rank):
    _quiet_fsdp()
    policy = mp.Policy.from_recipe("bf16-mixed")
    model = mpd.shard_model(TinyCNN(), policy)
    with pytest.raises(ValueError, match=r"Prepare first, then shard: mp.distributed.shard_model\(mp.prepare"):
        mp.prepare(model, "bf16-true")


# ---- the optimizer state of DTensor parameters ----------------------------------------------------------
@pytest.mark.parametrize("state_dtype", ["int8", "int4", "fp8", "bf16"])
def test_sharded_state_saves_as_dtensors_and_loads_into_a_plain_parameter(one_rank, state_dtype):
    _quiet_fsdp()
    policy = mp.Policy.from_recipe("bf16-mixed")
    model = mpd.shard_model(nn.Sequential(nn.Linear(96, 80)), policy)
    weight = model[0].weight
    opt = mp.optim.AdamW(model.parameters(), lr=1e-2, state_dtype=state_dtype, min_quant_numel=256)
    for _ in range(2):
        model(torch.randn(4, 96)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    saved = opt.state_dict()["state"][0]
    fmt = get_state_format(state_dtype)
    if fmt.quantized:
        assert sharded.is_dtensor(saved["exp_avg_codes"]) and saved["exp_avg_codes"].shape == weight.shape
        assert saved["shards"] == 1
    live = opt.state[weight]
    # into a plain parameter of the same shape: the moments exactly as the sharded state decodes them
    plain = nn.Parameter(weight.full_tensor().detach().clone())
    loaded = sharded.from_saved({k: (v.full_tensor() if sharded.is_dtensor(v) else v) for k, v in saved.items()},
                                plain, fmt, "nearest")
    for key in ("exp_avg", "exp_avg_sq"):
        if fmt.quantized:
            code = fmt.m_code if key == "exp_avg" else fmt.v_code
            want = dequantize_blockwise(live[key + "_codes"], live[key + "_absmax"], code, fmt.block, plain.numel())
            got = dequantize_blockwise(loaded[key + "_codes"], loaded[key + "_absmax"], code, fmt.block,
                                       plain.numel())
            assert torch.equal(loaded[key + "_codes"], live[key + "_codes"])   # one shard: the same blocks
        else:
            want, got = live[key].reshape(-1), loaded[key].reshape(-1)
        assert torch.equal(got, want)
    assert torch.equal(loaded["step"], live["step"])


def test_materialize_state_creates_the_state_a_checkpoint_loads_into():
    params = [nn.Parameter(torch.randn(64, 80)), nn.Parameter(torch.randn(3))]
    opt = mp.optim.AdamW(params, state_dtype="int8", min_quant_numel=256)
    opt.materialize_state()
    assert opt.state[params[0]]["state_dtype"] == "int8" and opt.state[params[1]]["state_dtype"] == "fp32"
    assert float(opt.state[params[0]]["step"]) == 0.0 and torch.equal(params[0], params[0])


# ---- bad input ------------------------------------------------------------------------------------------
def test_without_a_process_group_the_error_says_how_to_start_one():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"shard_model needs an initialized process group: call "
                                           r"torch.distributed.init_process_group\('gloo'\)"):
        mpd.shard_model(TinyCNN(), mp.Policy.from_recipe("bf16-mixed"))
    with pytest.raises(RuntimeError, match="parallelize needs an initialized process group"):
        mpd.parallelize(TinyCNN(), mp.Policy.from_recipe("bf16-mixed"), "ddp")
    with pytest.raises(RuntimeError, match="inside ranks started by torchrun"):
        mpd.init_ranks("cpu")


def test_a_batch_the_world_does_not_divide():
    assert mpd.per_rank_batch(12, 4) == 3
    with pytest.raises(ValueError, match=r"a global batch of 10 does not split evenly over 3 ranks \(10 % 3 = 1\): "
                                         r"use a batch size that is a multiple of 3 \(9 or 12\), or a number of "
                                         r"ranks that divides 10 \(e.g. 2\)"):
        mpd.per_rank_batch(10, 3)
    with pytest.raises(ValueError, match="positive integer; got 0"):
        mpd.per_rank_batch(0, 2)


def test_mixed_devices_are_named():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
    with pytest.raises(ValueError, match=r"on several devices: cpu \(2 tensors\), meta \(2 tensors\)"):
        mpd.model_device(model)


def test_ranks_on_different_device_types_are_named(one_rank, monkeypatch):
    def gather(out, obj, group=None):   # what rank 1 on a GPU would report
        out[:] = [obj, "cuda"]
    monkeypatch.setattr(dist, "all_gather_object", gather)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match=r"different device types \(rank 0: cpu, rank 1: cuda\)"):
        mpd.check_devices(TinyCNN())


def test_checkpoint_bad_input(tmp_path):
    model = TinyCNN()
    masters = mp.MasterWeights(torch.optim.AdamW(mp.prepare(TinyCNN(), "fp16-true").parameters()))
    with pytest.raises(TypeError, match="do not take MasterWeights"):
        mpd.save_checkpoint(tmp_path / "c", model, masters)
    with pytest.raises(FileNotFoundError, match="no .metadata file"):
        mpd.load_checkpoint(tmp_path / "missing", model)
    with pytest.raises(TypeError, match="JSON-serializable"):
        mpd.save_checkpoint(tmp_path / "c", model, extra={"bad": object()})
    with pytest.raises(ValueError, match="Unknown data parallelism 'zero'; choose one of: ddp, fsdp2"):
        mpd.loss_scaler(mp.Policy.from_recipe("fp16-mixed"), "zero")


def test_checkpoint_round_trip_in_one_process(tmp_path):
    # No process group: DCP saves and loads in this process (a plain model, mixprec's int8 state, a scaler).
    torch.manual_seed(0)
    model = TinyCNN()
    opt = mp.optim.AdamW(model.parameters(), lr=1e-2, state_dtype="int8", min_quant_numel=256)
    scaler = mp.LossScaler(init_scale=2.0**10, growth_interval=1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        mpd.save_checkpoint(tmp_path / "c", model, opt, scaler=scaler, extra={"step": 1})
        torch.manual_seed(1)
        model2 = TinyCNN()
        opt2 = mp.optim.AdamW(model2.parameters(), lr=1e-2, state_dtype="int8", min_quant_numel=256)
        scaler2 = mp.LossScaler()
        assert mpd.load_checkpoint(tmp_path / "c", model2, opt2, scaler=scaler2) == {"step": 1}
    assert scaler2.get_scale() == scaler.get_scale() == 2.0**11
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n
    for p, q in zip(model.parameters(), model2.parameters()):
        for k, v in opt.state[p].items():
            assert (torch.equal(v, opt2.state[q][k]) if isinstance(v, torch.Tensor) else v == opt2.state[q][k]), k
