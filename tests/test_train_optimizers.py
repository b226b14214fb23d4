"""The optimizer of a training run (`--optim`, `--rounding`): which AdamW each choice builds, pure-BF16
weight decay that is not rounded away, FP16 masters, and runs with mixprec's AdamW that resume exactly."""
import os
import signal

import pytest
import torch

import mixprec as mp
from mixprec.train import optimizers
from mixprec.train.checkpoint import load_checkpoint
from mixprec.train.config import TrainConfig
from mixprec.train.trainer import Trainer

# The example: a weight of 1.0, lr 2e-3, weight decay 0.1, 100 steps with a zero gradient, so
# that only the decay acts: each step multiplies by 1 - lr*wd, exactly (1 - 2e-4)**100 = 0.980199.
LR, WD, STEPS = 2e-3, 0.1, 100
EXACT = (1 - LR * WD) ** STEPS
# Stochastic rounding is unbiased, but one BF16 weight just below 1.0 moves in steps of 2**-8, so after
# 100 steps its spread is about 2**-8 * sqrt(100 * 0.05) ~ 0.009 (a step down has probability
# ~2e-4 / 2**-8 = 0.05). The mean of N = 4096 such weights has a spread of 0.009 / 64 ~ 1.4e-4; 1e-3 is
# about 7 of those, and 20x smaller than the 0.0198 that rounding to nearest loses.
N_WEIGHTS = 4096
# In FP32 each step rounds twice (the factor 1 - lr*wd and the product), each by at most 2**-24
# relative: 100 steps drift at most 200 * 2**-24 ~ 1.2e-5 from the exact value (measured: 2.6e-6).
FP32_DECAY_RTOL = 200 * 2.0 ** -24
SR_MEAN_ATOL = 1e-3


def _decay(recipe: str, rounding: str | None = None, dtype=torch.bfloat16):
    """(optimizer, model parameter) after STEPS decay-only steps of a weight vector of ones."""
    policy = mp.Policy.from_recipe(recipe)
    weight = torch.nn.Parameter(torch.ones(N_WEIGHTS, dtype=dtype))
    optimizer = optimizers.build_optimizer([{"params": [weight], "weight_decay": WD}], optim="adamw",
                                           rounding=rounding, policy=policy, device=torch.device("cpu"), lr=LR,
                                           betas=(0.9, 0.95), eps=1e-8, seed=0)
    for _ in range(STEPS):
        weight.grad = torch.zeros_like(weight)
        optimizer.step()
    return optimizer, weight


def test_bf16_true_keeps_the_weight_decay_that_torch_adamw_rounds_away():
    """bf16-true defaults to mixprec's AdamW with stochastic rounding: the decay accumulates (mean
    0.9802 against the exact 0.98020); torch's AdamW (--rounding nearest) leaves every weight at 1.0."""
    optimizer, weight = _decay("bf16-true")
    assert isinstance(optimizer, mp.optim.AdamW) and optimizer.param_groups[0]["rounding"] == "stochastic"
    assert weight.dtype == torch.bfloat16
    assert abs(weight.float().mean().item() - EXACT) < SR_MEAN_ATOL
    assert len(weight.unique()) > 1                        # each weight rounds its own way

    optimizer, weight = _decay("bf16-true", rounding="nearest")
    assert type(optimizer) is torch.optim.AdamW
    assert torch.equal(weight, torch.ones_like(weight))   # 1 - 2e-4 rounds back to 1.0 every step

    optimizer, weight = _decay("bf16-true", rounding="kahan")
    assert abs(weight.float().mean().item() - EXACT) < SR_MEAN_ATOL   # the compensation carries the decay


def test_fp16_true_masters_take_the_decay_and_rounding_does_not_apply():
    """fp16-true steps FP32 master weights (mp.MasterWeights) with torch's AdamW: the decay accumulates
    in the masters, and the FP16 weights are the masters rounded to nearest. --rounding is refused."""
    optimizer, weight = _decay("fp16-true", dtype=torch.float16)
    assert isinstance(optimizer, mp.MasterWeights) and type(optimizer.optimizer) is torch.optim.AdamW
    master = optimizer.param_groups[0]["params"][0]
    assert master.dtype == torch.float32
    torch.testing.assert_close(master, torch.full_like(master, EXACT), rtol=FP32_DECAY_RTOL, atol=0)
    assert torch.equal(weight, master.half())
    with pytest.raises(ValueError, match="recipe fp16-true keeps FP32 master weights of its FP16 parameters"):
        TrainConfig(recipe="fp16-true", rounding="stochastic")


@pytest.mark.parametrize("optim, state_dtype", [("adamw-bf16", "bf16"), ("adamw-int8", "int8"),
                                                ("adamw-int4", "int4"), ("adamw-fp8", "fp8")])
def test_low_bit_optims_are_mixprec_adamw_with_that_state(optim, state_dtype):
    weight = torch.nn.Parameter(torch.randn(64, 64))
    optimizer = optimizers.build_optimizer([{"params": [weight]}], optim=optim, rounding=None,
                                           policy=mp.Policy.from_recipe("bf16-mixed"), device=torch.device("cpu"),
                                           lr=1e-3, betas=(0.9, 0.95), eps=1e-8, seed=0)
    assert isinstance(optimizer, mp.optim.AdamW) and optimizer.param_groups[0]["state_dtype"] == state_dtype


def test_adamw_is_torch_adamw_where_nothing_is_rounded():
    for recipe in ("fp32", "bf16-mixed", "fp16-mixed", "fp8-blockwise"):
        assert optimizers.uses_torch_adamw("adamw", None, mp.Policy.from_recipe(recipe)), recipe
    assert not optimizers.uses_torch_adamw("adamw", None, mp.Policy.from_recipe("bf16-true"))
    assert optimizers.describe("adamw", None, mp.Policy.from_recipe("bf16-true")) == (
        "mixprec.optim.AdamW (FP32 moments), stochastic rounding of the half parameters")


@pytest.mark.parametrize("bad, message", [
    (dict(optim="sgd"), "Unknown optim 'sgd'; choose one of: adamw, adamw-bf16, adamw-int8, adamw-int4, adamw-fp8"),
    (dict(recipe="bf16-true", rounding="up"), "Unknown rounding 'up'; choose one of: nearest, stochastic, kahan"),
    (dict(recipe="bf16-mixed", rounding="stochastic"), "recipe bf16-mixed keeps FP32 parameters"),
])
def test_bad_optimizer_choices_name_the_valid_ones(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


@pytest.mark.parametrize("recipe, optim", [("bf16-true", "adamw"), ("fp16-mixed", "adamw-int8")])
def test_runs_with_mixprec_adamw_resume_exactly(tmp_path, recipe, optim):
    """Stochastic rounding and low-bit state are in the checkpoint (the rounding's random stream is a
    function of seed, tensor and step): interrupted and resumed equals uninterrupted, bitwise."""
    sizes = dict(model="gpt", recipe=recipe, optim=optim, n_layer=1, n_head=2, d_model=64, seq_len=32, batch_size=4,
                 eval_batches=1, steps=6, log_every=1, eval_every=6)
    whole = Trainer(TrainConfig(**sizes, out=str(tmp_path / "whole")), progress=False)
    expected = whole.run()
    assert isinstance(whole.optimizer, mp.optim.AdamW)
    cfg = TrainConfig(**sizes, out=str(tmp_path / "split"))

    def interrupt(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, progress=False, on_step=interrupt).run()
    saved = load_checkpoint(cfg.out)
    assert saved["config"]["optim"] == optim
    resumed = Trainer(cfg, resume=saved, progress=False)
    assert resumed.run().train_losses == expected.train_losses
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
