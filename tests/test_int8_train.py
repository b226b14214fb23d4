"""The main job's GPT (mixprec.train.models, at d_model 256 so that its block Linear layers have >= 256
features and go INT8) trains under int8-rowwise to within 1 % of bf16-mixed's final loss.

Both runs use the same seed, so the same initial weights and the same batches (mixprec.train.Trainer);
only the precision of the four block Linear layers' matmuls differs (BF16 GEMMs against INT8 ones).
Sized for a 2-core CPU: 1 block, 32-byte context, 8 sequences per step, 40 steps, which takes the
training loss from 5.5 (uniform over bytes) to 2.85-3.14, below the corpus' byte-unigram entropy (3.25).
The final loss is the trainer's: the mean training loss over the last 10 steps.

Measured (torch 2.13, CPU, this setting), final loss bf16-mixed / int8-rowwise / difference:
    seed 0: 2.8500 / 2.8429 / -0.25 %
    seed 1: 3.0036 / 3.0024 / -0.04 %
    seed 2: 3.1070 / 3.1083 / +0.04 %
    seed 3: 3.1388 / 3.1371 / -0.05 %
    seed 4: 2.9771 / 2.9744 / -0.09 %
mean -0.08 %, spread (max - min) 0.29 points, largest |difference| 0.25 % (seed 0), against the 1 %
bound. Each seed takes about 5 s on a 2-core CPU, so the test runs all five.
"""
import math

import pytest
import torch

import mixprec as mp
from mixprec.int8 import Int8Config, Int8Linear
from mixprec.train.config import TrainConfig
from mixprec.train.data import batches_for
from mixprec.train.models import build_model, model_config
from mixprec.train.trainer import Trainer
from tolerances import MIXED_FINAL_LOSS_RTOL

SEEDS = (0, 1, 2, 3, 4)
SETTING = dict(model="gpt", d_model=256, n_layer=1, seq_len=32, batch_size=8, steps=40)


def final_loss(recipe: str, seed: int, out) -> float:
    cfg = TrainConfig(recipe=recipe, seed=seed, eval_every=10 ** 6, eval_batches=1, ckpt_every=0, out=str(out),
                      **SETTING)
    trainer = Trainer(cfg, progress=False, save_checkpoints=False, write_metrics=False)
    n_int8 = sum(isinstance(m, Int8Linear) for m in trainer.model.modules())
    assert n_int8 == (4 if recipe.startswith("int8") else 0)
    summary = trainer.run()
    # meaningful only once the model has learned something: below ln(256) = 5.55 (uniform over bytes)
    # and below the corpus' byte-unigram entropy (3.25 nats), i.e. it uses the context
    assert summary.final_train_loss < trainer.data.corpus.unigram_entropy(), summary.final_train_loss
    return summary.final_train_loss


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_gpt_trains_under_int8_rowwise_within_1pct_of_bf16_mixed(seed, tmp_path):
    bf16 = final_loss("bf16-mixed", seed, tmp_path / "bf16")
    int8 = final_loss("int8-rowwise", seed, tmp_path / "int8")
    assert abs(int8 - bf16) <= MIXED_FINAL_LOSS_RTOL * bf16, (seed, bf16, int8)


def fp32_around(policy: mp.Policy, seed: int, steps: int = 40) -> float:
    """SETTING's run in a plain loop with the trainer's optimizer and schedule (AdamW betas (0.9, 0.95),
    weight decay 0.1, 10 % linear warm-up then cosine decay to 10 %, clip 1.0); the mean loss of the
    last 10 steps."""
    torch.manual_seed(seed)
    model = mp.prepare(build_model(model_config("gpt", d_model=256, n_layer=1, seq_len=32)), policy)
    data = batches_for("gpt", batch_size=8, seq_len=32, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    losses, warmup = [], steps // 10
    for step in range(steps):
        progress = max(0, step - warmup) / (steps - warmup)
        opt.param_groups[0]["lr"] = 2e-3 * (min(1.0, (step + 1) / warmup) if step < warmup else
                                            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        x, y = data.train_batch(step)
        with mp.autocast(policy):
            logits = model(x)
            loss = mp.ops.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == (4 if policy.int8 else 0)
    return sum(losses[-10:]) / 10


def test_int8_matmuls_train_within_1pct_of_the_same_run_without_them():
    """The always-on, CPU-cheap form of the test above: the INT8 matmuls are the only difference and the
    rest of the model computes in FP32 (Policy(int8=...) needs no autocast), so no slow BF16 GEMM runs.

    Measured (this setting), final loss fp32 / INT8 matmuls in FP32 / difference, and a control run of
    fp32 with every initial weight perturbed by a BF16 ulp (2**-9 relative):
        seed 0: 2.8502 / 2.8460 / -0.15 %  (control -0.01 %)
        seed 1: 3.0031 / 3.0036 / +0.02 %  (control +0.01 %)
        seed 2: 3.1068 / 3.1070 / +0.01 %  (control -0.01 %)
    At a constant LR of 2e-3 instead of the decay, seed 0 differed by -2.1 %: both runs drop sharply
    around step 30, the INT8 one a few steps earlier, so at this size the figure depends on the schedule.
    """
    fp32 = fp32_around(mp.Policy.from_recipe("fp32"), seed=0)
    int8 = fp32_around(mp.Policy(int8=Int8Config(), name="int8-in-fp32"), seed=0)
    assert fp32 < 3.25 and abs(int8 - fp32) <= MIXED_FINAL_LOSS_RTOL * fp32, (fp32, int8)
