"""mixprec.distributed on several CPU ranks (gloo, forked processes): DDP's FP32 reduction hook, FSDP2 from a
Policy at parity with unsharded training, one rank's inf skipping every rank, distributed checkpoints with
every optimizer state dtype resumed on 2 and on 1 rank.

Unsharded references run the global batch as the ranks' chunks, one backward each with loss / world (what
data parallelism computes: BatchNorm normalizes per rank's chunk; gradients are averaged).
"""
from __future__ import annotations

import math
import os
import socket
import tempfile
import traceback
import warnings

import pytest
import torch
import torch._dynamo  # imported before the ranks fork, so that no rank imports them again
import torch.distributed as dist
import torch.distributed.checkpoint  # (fully_shard reaches dynamo: 2-5 s an import on a small CPU)
import torch.multiprocessing
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

import mixprec as mp
import mixprec.distributed as mpd
from mixprec.fp8 import Float8Config
from mixprec.fp8.linear import Float8Linear
from helpers import TinyCNN, TinyGPT

# ---- running ranks ---------------------------------------------------------------------------------------
# Ranks are forked from the test process (the DataLoader's pattern: one intra-op thread per rank), so a rank
# starts in milliseconds instead of importing torch again; each run meets on a free port (bound to port 0). A
# rank's return value comes back through a file; a rank's exception fails the test with its traceback.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    torch.set_num_threads(1)   # ranks share a small CPU; and libgomp's pool does not survive a fork
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> list:
    """fn(rank, world, *args) on `world` forked gloo ranks; returns each rank's (torch.save-able) result."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            torch.multiprocessing.start_processes(_entry, args=(world, free_port(), out_dir, fn, args), nprocs=world,
                                                  join=True, start_method="fork")
        except Exception as e:
            errors = []
            for name in sorted(os.listdir(out_dir)):
                if name.endswith(".err"):
                    with open(os.path.join(out_dir, name)) as f:
                        errors.append(f.read())
            raise AssertionError("a rank failed:\n" + "\n".join(errors)) from e
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


# ---- tolerances (each with its origin) -------------------------------------------------------------------
# DDP + fp32_allreduce_hook vs one process on the full batch, bf16-true: the hook rounds the average of the
# ranks' BF16 gradients once, the single process rounds the full batch's gradient once, so they differ by up
# to an ulp of BF16 (2**-8 relative) in some elements; over 10 AdamW steps the losses agreed within 1.1e-4
# relative (measured), asserted at a quarter of a BF16 ulp (9.8e-4).
DDP_LOSS_RTOL = 2.0 ** -10
# FSDP2 vs unsharded, bf16-mixed: FSDP2's hooks on module inputs reorder the sums of gradient contributions
# (1-ulp FP32 differences, e.g. in the embeddings' gradients), which AdamW's normalization grows: losses
# within 2e-3 absolute over 10 steps (measured 5e-4 for the GPT; the CNN matched bit for bit).
FSDP_LOSS_ATOL = 2e-3
# FSDP2 with FP8 layers: the sharded model quantizes its BF16-gathered weight, the reference its FP32 weight
# (a BF16 rounding before E4M3's 3-bit mantissa flips some codes): losses within 1e-2 absolute over 6 steps
# (measured 4.5e-3 here, 0.1 % of the loss; 6.7e-3 with mixprec's AdamW).
FP8_LOSS_ATOL = 1e-2
# bf16-true under FSDP2 with int8 state: block scales per shard and BF16 rounding of the averaged gradient
# differ from the reference: losses within 2e-3 absolute over 10 steps (measured 6e-4).
BF16_TRUE_LOSS_ATOL = 2e-3
# Resume on 1 rank from 2: the whole batch in one backward (another summation order), and low-bit state
# requantized in the new blocks: loss trajectory within 2e-3 absolute over 3 steps (measured 3.1e-4 with
# bf16-true, 2.3e-5 with fp16-mixed).
RESHARD_LOSS_ATOL = 2e-3

VOCAB, SEQ = 64, 16


@pytest.fixture(autouse=True)
def _quiet_single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the ranks run: CPU kernels sum in the same order (embedding backward)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*view tensor.*")   # FSDP2 on the head's output view
        yield
    torch.set_num_threads(threads)


def _gpt_batch(step: int, n: int = 4):
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def _cnn_batch(step: int, n: int = 8):
    g = torch.Generator().manual_seed(2000 + step)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _loss(model, policy, x, y):
    with mp.autocast(policy):
        out = model(x)
    return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))


def _policy(recipe: str) -> mp.Policy:
    if recipe == "fp8-emulated":   # FP8 GEMMs emulated on the CPU; layers of 64 features convert
        return mp.Policy.from_recipe("fp8-tensorwise", fp8=Float8Config(recipe="tensorwise", backend="emulate",
                                                                         min_features=32))
    return mp.Policy.from_recipe(recipe)


def _model(kind: str, policy: mp.Policy):
    torch.manual_seed(0)
    model = TinyGPT(dim=64) if kind == "gpt" else TinyCNN()
    return mp.prepare(model, policy)


def _reference(kind, recipe, steps, world, make_opt):
    """Unsharded training on the ranks' chunks (see the module docstring); losses per step and chunk."""
    policy = _policy(recipe)
    model = _model(kind, policy)
    opt = make_opt(model.parameters())
    batch = _gpt_batch if kind == "gpt" else _cnn_batch
    losses = []
    for step in range(steps):
        x, y = batch(step)
        chunk = []
        for xc, yc in zip(x.chunk(world), y.chunk(world)):
            loss = _loss(model, policy, xc, yc)
            (loss / world).backward()
            chunk.append(loss.detach())
        opt.step()
        opt.zero_grad()
        losses.append(torch.stack(chunk))
    return torch.stack(losses)


# ---- DDP -----------------------------------------------------------------------------------------------
def _ddp_rank(rank, world, steps):
    policy = _policy("bf16-true")
    model = _model("gpt", policy)
    ddp = DistributedDataParallel(model)
    assert mp.prepare(ddp, policy) is ddp            # registers the hook: BF16 gradients, FP32 reduce_dtype
    assert mp.prepare(ddp, policy) is ddp            # idempotent (DDP would refuse a second hook)
    opt = mp.optim.AdamW(ddp.parameters(), lr=1e-2, rounding="stochastic")
    losses = []
    for step in range(steps):
        x, y = (mpd.rank_slice(t) for t in _gpt_batch(step))
        with mpd.measure_wire() as wire:
            loss = _loss(ddp, policy, x, y)
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "hook": ddp._mixprec_reduce_hook, "wire": dict(wire.counts)}


def _single_process(steps):
    policy = _policy("bf16-true")
    model = _model("gpt", policy)
    opt = mp.optim.AdamW(model.parameters(), lr=1e-2, rounding="stochastic")
    losses = []
    for step in range(steps):
        loss = _loss(model, policy, *_gpt_batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_ddp_with_the_fp32_hook_matches_one_process_on_the_full_batch():
    results = run_ranks(_ddp_rank, 2, 10)
    for r in results:
        assert r["hook"] == "float32_allreduce_hook"
        assert {dtype for (op, dtype) in r["wire"]} == {"float32"}      # BF16 buckets summed in FP32
    ddp_losses = (results[0]["losses"] + results[1]["losses"]) / 2     # the full batch's mean loss
    torch.testing.assert_close(ddp_losses, _single_process(10), rtol=DDP_LOSS_RTOL, atol=0)


class _Bucket:
    """What the hook reads of DDP's GradBucket."""

    def __init__(self, tensor):
        self.tensor = tensor

    def buffer(self):
        return self.tensor


def _allreduce_rank(rank, world):
    g = torch.Generator().manual_seed(rank)
    n = 1 << 14
    # Gradient-like values over 6 binades (magnitudes span < 2**9, so FP32 holds any sum of four exactly).
    x = (torch.randn(n, generator=g) * torch.empty(n).uniform_(-6, 0, generator=g).exp()).to(torch.bfloat16)
    half = x.clone()
    half.div_(world)                 # DDP's default for a BF16 bucket: divide, then sum in BF16
    dist.all_reduce(half)
    hooked = x.clone()
    mpd.fp32_allreduce_hook(None, _Bucket(hooked)).wait()
    return x, half, hooked


def test_bf16_allreduce_error_that_the_fp32_hook_removes():
    world = 4                        # with 2 ranks a BF16 sum rounds once, as the hook does: nothing to remove
    results = run_ranks(_allreduce_rank, world)
    values = torch.stack([r[0] for r in results]).double()
    exact = values.mean(0)
    want = exact.to(torch.bfloat16)  # the correctly rounded average
    half, hooked = results[0][1], results[0][2]
    for r in results:                # every rank ends with the same bucket
        assert torch.equal(r[1], half) and torch.equal(r[2], hooked)
    assert torch.equal(hooked, want)                            # FP32 sum, one rounding: exact to the last bit
    nonzero = exact != 0

    def relative_error(result):
        return ((result.double() - exact).abs() / exact.abs())[nonzero]

    # Rounding the average once errs by at most half an ulp: 2**-8 relative (BF16 has 8 significant bits).
    assert relative_error(hooked).max() <= 2.0 ** -8
    # BF16 partial sums round at every hop: measured 19 % of the averages off by more than BF16's own
    # rounding, and averages that cancel (small against their summands) off by up to 380 %.
    half_error = relative_error(half)
    assert (half != want).float().mean() > 0.2
    assert (half_error > 2.0 ** -8).float().mean() > 0.1
    assert half_error.max() > 0.5


# ---- FSDP2 ---------------------------------------------------------------------------------------------
class _Collectives:
    """Records the dtype of every reduce-scatter and all-gather FSDP2 starts (PyTorch's tests patch the same)."""

    def __init__(self):
        self.reduce_scatter, self.all_gather = [], []

    def __enter__(self):
        self.originals = dist.reduce_scatter_single, dist.all_gather_single

        def reduce_scatter(*args, **kwargs):
            self.reduce_scatter.append(kwargs.get("input", args[1] if len(args) > 1 else None).dtype)
            return self.originals[0](*args, **kwargs)

        def all_gather(*args, **kwargs):
            self.all_gather.append((args[1] if len(args) > 1 else kwargs["input_tensor"]).dtype)
            return self.originals[1](*args, **kwargs)

        dist.reduce_scatter_single, dist.all_gather_single = reduce_scatter, all_gather
        return self

    def __exit__(self, *exc):
        dist.reduce_scatter_single, dist.all_gather_single = self.originals


def _fsdp_rank(rank, world, kind, recipe, steps, state_dtype):
    policy = _policy(recipe)
    model = mpd.shard_model(_model(kind, policy), policy)
    opt = (mp.optim.AdamW(model.parameters(), lr=1e-2, state_dtype=state_dtype, rounding="stochastic",
                          min_quant_numel=256)
           if state_dtype else torch.optim.AdamW(model.parameters(), lr=1e-2))
    batch = _gpt_batch if kind == "gpt" else _cnn_batch
    losses = []
    with _Collectives() as seen:
        for step in range(steps):
            x, y = (mpd.rank_slice(t) for t in batch(step))
            with mpd.measure_wire() as wire:
                loss = _loss(model, policy, x, y)
                loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
    groups = {name: (p.param_dtype, p.reduce_dtype) for name, p in model._mixprec_shard_plan.groups}
    buffers = {n: b.dtype for n, b in model.named_buffers() if b.is_floating_point()}
    fp8 = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    return {"losses": torch.stack(losses), "reduce_scatter": set(seen.reduce_scatter),
            "all_gather": set(seen.all_gather), "groups": groups, "buffers": buffers, "fp8": fp8,
            "wire": dict(wire.counts), "fsdp": isinstance(model, FSDPModule)}


@pytest.mark.parametrize("kind", ["gpt", "cnn"])
def test_fsdp2_with_the_mapped_policy_reduces_in_fp32_at_parity_with_unsharded(kind):
    steps = 10
    results = run_ranks(_fsdp_rank, 2, kind, "bf16-mixed", steps, None)
    reference = _reference(kind, "bf16-mixed", steps, 2, lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    for r in results:
        assert r["reduce_scatter"] == {torch.float32}                     # every gradient summed in FP32
        assert r["all_gather"] == {torch.bfloat16, torch.float32}         # blocks in BF16, FP32 modules in FP32
    groups = results[0]["groups"]
    fp32_groups = {"tok", "pos", "norm", "lm_head", "blocks.0.norm1", "blocks.1.norm2"} if kind == "gpt" \
        else {"bn1", "bn2", "fc"}
    for name in fp32_groups:
        assert groups[name] == (torch.float32, torch.float32), name
    if kind == "gpt":
        assert groups["blocks.0"] == (torch.bfloat16, torch.float32)
    else:
        assert groups[""] == (torch.bfloat16, torch.float32)              # the convolutions, in the root group
        assert set(results[0]["buffers"].values()) == {torch.float32}     # BatchNorm's statistics stay FP32
    # FSDP2 gathers BF16 weights where autocast would cast them: the first forward is the unsharded one, bit
    # for bit; then FSDP2's hooks on module inputs change the order in which autograd sums an input's gradient
    # contributions (1-ulp FP32 differences), which AdamW's normalization grows over the steps.
    sharded = torch.stack([r["losses"] for r in results], 1)
    assert torch.equal(sharded[0], reference[0])
    torch.testing.assert_close(sharded, reference, rtol=0, atol=FSDP_LOSS_ATOL)


def test_fsdp2_trains_a_bf16_true_model_with_int8_state_on_dtensors():
    # The failures: fully_shard of a bf16-true model ("uniform original parameter dtype"), and
    # mp.optim.AdamW's low-bit state on DTensor parameters ("mixed torch.Tensor and DTensor").
    steps = 10
    results = run_ranks(_fsdp_rank, 2, "gpt", "bf16-true", steps, "int8")
    reference = _reference("gpt", "bf16-true", steps, 2,
                           lambda ps: mp.optim.AdamW(ps, lr=1e-2, state_dtype="int8", rounding="stochastic",
                                                     min_quant_numel=256))
    for r in results:
        assert r["reduce_scatter"] == {torch.float32}
        assert r["groups"]["blocks.0"] == (torch.bfloat16, torch.float32)
    sharded = torch.stack([r["losses"] for r in results], 1)
    torch.testing.assert_close(sharded, reference, rtol=0, atol=BF16_TRUE_LOSS_ATOL)


def test_fsdp2_fp8_layers_gather_bf16_weights_and_quantize_them():
    steps = 6
    results = run_ranks(_fsdp_rank, 2, "gpt", "fp8-emulated", steps, None)
    reference = _reference("gpt", "fp8-emulated", steps, 2, lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    r = results[0]
    assert r["fsdp"] and "blocks.0.fc" in r["fp8"] and "lm_head" not in r["fp8"]
    assert r["groups"]["blocks.0"] == (torch.bfloat16, torch.float32)   # FP8 layers' weights gathered in BF16
    assert r["reduce_scatter"] == {torch.float32}
    # Bytes on the wire per step and rank: each rank sends its half of the blocks' BF16 weights twice (forward,
    # and again for the backward after resharding) and reduce-scatters every gradient in FP32.
    names = dict(TinyGPT(dim=64).named_parameters())
    block_numel = sum(p.numel() for n, p in names.items() if n.startswith("blocks.") and "norm" not in n)
    assert r["wire"][("all_gather", "bfloat16")] == 2 * (block_numel // 2) * 2
    assert r["wire"][("reduce_scatter", "float32")] == 4 * sum(p.numel() for p in names.values())
    sharded = torch.stack([x["losses"] for x in results], 1)
    torch.testing.assert_close(sharded, reference, rtol=0, atol=FP8_LOSS_ATOL)


# ---- an inf on one rank ----------------------------------------------------------------------------------
def _inf_rank(rank, world, process_group, bad_step):
    policy = _policy("fp16-mixed")
    model = mpd.shard_model(_model("gpt", policy), policy)
    opt = mp.optim.AdamW(model.parameters(), lr=1e-2)   # takes found_inf: skips on the device, no host sync
    scaler = mp.LossScaler(init_scale=2.0**10, growth_interval=2, process_group=process_group)
    target = model.blocks[0].qkv.weight          # rank 1's shard of it gets the inf
    trace = {"ran": [], "scale": [], "changed": []}
    for step in range(5):
        x, y = (mpd.rank_slice(t) for t in _gpt_batch(step))
        scaler.scale(_loss(model, policy, x, y)).backward()
        if rank == 1 and step == bad_step:
            target.grad._local_tensor[0, 0] = math.inf
        before = [p._local_tensor.clone() for p in model.parameters()]
        skipped = scaler.num_skipped_steps
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        trace["ran"].append(scaler.num_skipped_steps == skipped)
        trace["scale"].append(scaler.get_scale())
        trace["changed"].append(any(not torch.equal(a, p._local_tensor) for a, p in zip(before, model.parameters())))
    return trace


@pytest.mark.parametrize("process_group", ["default", None])
def test_an_inf_on_one_rank_only_skips_the_step_on_every_rank(process_group):
    # "default": LossScaler's contract (found_inf all-reduced with MAX). None: under FSDP2 the gradients are
    # DTensors, and DTensor's own unscale handler already reduces found_inf (MAX) over the mesh.
    bad = 2
    traces = run_ranks(_inf_rank, 2, process_group, bad)
    for trace in traces:
        assert trace["ran"] == [step != bad for step in range(5)]
        assert trace["changed"] == trace["ran"]                 # parameters unchanged by the skipped step
    assert traces[0]["scale"] == traces[1]["scale"]             # scales agree at every step
    assert traces[0]["scale"][bad] == traces[0]["scale"][bad - 1] / 2


# ---- the stability guard across ranks --------------------------------------------------------------------
def _guard_rank(rank, world, bad_step):
    policy = _policy("bf16-mixed")
    model = DistributedDataParallel(_model("gpt", policy))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = mp.StabilityGuard(model, opt, window=4, ladder=("skip",), snapshot_every=0, process_group="default")
    changed = []
    for step in range(6):
        x, y = (mpd.rank_slice(t) for t in _gpt_batch(step))
        loss = _loss(model, policy, x, y)
        loss.backward()
        seen = torch.full_like(loss, math.nan) if rank == 1 and step == bad_step else loss   # rank 1's fault alone
        before = [p.detach().clone() for p in model.parameters()]
        guard.step(seen, batch=step)
        opt.zero_grad()
        changed.append(any(not torch.equal(a, p) for a, p in zip(before, model.parameters())))
    guard.flush()
    return {"changed": changed, "events": [(e["step"], e["cause"], e["action"]) for e in guard.events],
            "params": [p.detach().clone() for p in model.parameters()]}


def test_a_fault_on_one_rank_makes_every_rank_skip_the_step():
    """StabilityGuard(process_group=...): a non-finite loss seen on rank 1 alone skips the step on both ranks
    (one all-reduce of the fault flags), so the DDP replicas stay identical."""
    bad = 3
    results = run_ranks(_guard_rank, 2, bad)
    for r in results:
        assert r["changed"] == [step != bad for step in range(6)]
    assert results[1]["events"] == [(bad, "nonfinite_loss", "skip")]
    assert results[0]["events"] == [(bad, "other_rank", "skip")]
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)


def _shrink_rank(rank, world, alpha):
    grads = {}
    for shrink in (False, True):
        policy = _policy("bf16-mixed")
        model = _model("gpt", policy)
        if shrink:
            mp.shrink_embedding_grad(model.tok, alpha)
        model = mpd.shard_model(model, policy)
        x, y = (mpd.rank_slice(t) for t in _gpt_batch(0))
        _loss(model, policy, x, y).backward()
        grads[shrink] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    return grads


def test_the_embedding_shrink_scales_the_sharded_embeddings_gradient_alone():
    """mp.shrink_embedding_grad on an embedding that FSDP2 shards: its gathered gradient is alpha times the
    unshrunk one, every other gradient is unchanged. The embedding's gradient sums the scaled per-token
    gradients (alpha * g_i rounded each, then summed) where the reference scales the sum: FP32 rounding
    apart, to 1e-6 of the largest element."""
    alpha = 0.1
    for grads in run_ranks(_shrink_rank, 2, alpha):
        plain, shrunk = grads[False], grads[True]
        for name in plain:
            if name == "tok.weight":
                torch.testing.assert_close(shrunk[name], alpha * plain[name], rtol=0,
                                           atol=1e-6 * alpha * plain[name].abs().max().item())
            else:
                assert torch.equal(shrunk[name], plain[name]), name


# ---- distributed checkpoints ---------------------------------------------------------------------------
# Every state dtype in one optimizer: a parameter group each (norms, under min_quant_numel, keep FP32).
STATE_DTYPES = {"blocks.0.": "int8", "blocks.1.": "int4", "tok.": "fp8", "pos.": "fp8", "lm_head.": "bf16"}


def _ckpt_setup(recipe, rounding, sharded=True):
    policy = _policy(recipe)
    model = _model("gpt", policy)
    if sharded:
        model = mpd.shard_model(model, policy)
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        dtype = next((d for prefix, d in STATE_DTYPES.items() if name.startswith(prefix)), "fp32")
        groups.setdefault(dtype, []).append(p)
    opt = mp.optim.AdamW([{"params": ps, "state_dtype": d} for d, ps in groups.items()], lr=1e-2,
                         rounding=rounding, min_quant_numel=256)
    scaler = mpd.loss_scaler(policy, "fsdp2", init_scale=2.0**12, growth_interval=2)
    return policy, model, opt, scaler


def _full(sd):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in sd.items()}


def _ckpt_train(policy, model, opt, scaler, start, stop):
    losses = []
    for step in range(start, stop):
        x, y = (mpd.rank_slice(t) for t in _gpt_batch(step))
        loss = _loss(model, policy, x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


SAVE_AT, STOP = 4, 7


def _ckpt_first(rank, world, recipe, rounding, path):
    setup = _ckpt_setup(recipe, rounding)
    losses = _ckpt_train(*setup, 0, SAVE_AT)
    mpd.save_checkpoint(path, setup[1], setup[2], scaler=setup[3], extra={"step": SAVE_AT})
    losses += _ckpt_train(*setup, SAVE_AT, STOP)
    return {"losses": torch.stack(losses), "model": _full(setup[1].state_dict()), "scale": setup[3].get_scale(),
            "state_dtypes": sorted({st["state_dtype"] for st in setup[2].state.values()})}


def _ckpt_resume(rank, world, recipe, rounding, path, sharded):
    setup = _ckpt_setup(recipe, rounding, sharded)
    extra = mpd.load_checkpoint(path, setup[1], setup[2], scaler=setup[3])
    losses = _ckpt_train(*setup, extra["step"], STOP)
    return {"losses": torch.stack(losses), "model": _full(setup[1].state_dict()), "scale": setup[3].get_scale()}


@pytest.mark.parametrize("recipe,rounding", [("fp16-mixed", "nearest"), ("bf16-true", "stochastic")])
def test_dcp_resume_on_2_ranks_is_bitwise_and_on_1_rank_follows_the_trajectory(tmp_path, recipe, rounding):
    path = str(tmp_path / "ckpt")
    first = run_ranks(_ckpt_first, 2, recipe, rounding, path)
    assert first[0]["state_dtypes"] == ["bf16", "fp32", "fp8", "int4", "int8"]
    again = run_ranks(_ckpt_resume, 2, recipe, rounding, path, True)
    for a, b in zip(first, again):       # same number of ranks: every bit of the run continues
        assert torch.equal(a["losses"][SAVE_AT:], b["losses"])
        assert a["scale"] == b["scale"]
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), k
    # One rank, the model unsharded: the same trajectory (the whole batch in one backward; block scales redone).
    single = run_ranks(_ckpt_resume, 1, recipe, rounding, path, False)[0]
    whole_batch = (first[0]["losses"] + first[1]["losses"]) / 2
    torch.testing.assert_close(single["losses"], whole_batch[SAVE_AT:], rtol=0, atol=RESHARD_LOSS_ATOL)
