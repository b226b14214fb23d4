"""The training loop: resumed == uninterrupted (bitwise on the CPU), Ctrl-C saves first, atomic
checkpoints, metrics, and the small-gradient task."""
import copy
import json
import os
import signal

import pytest
import torch

from mixprec.train import checkpoint
from mixprec.train.checkpoint import load_checkpoint, save_checkpoint
from mixprec.train.config import TrainConfig
from mixprec.train.metrics import read_metrics
from mixprec.train.trainer import Trainer
from tolerances import COMPILED_VS_EAGER_BF16_LOSS_RTOL, COMPILED_VS_EAGER_LOSS_RTOL

TINY_GPT = dict(model="gpt", n_layer=1, n_head=2, d_model=32, seq_len=32, batch_size=4, eval_batches=2)


def _config(tmp_path, name, **changes):
    fields = dict(TINY_GPT, steps=8, log_every=1, eval_every=3, out=str(tmp_path / name))
    fields.update(changes)
    return TrainConfig(**fields)


def _interrupt_at(step_to_stop):
    def on_step(step):
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered to the handler the trainer installs
    return on_step


@pytest.mark.parametrize("recipe", ["fp32", "bf16-mixed", "fp16-mixed"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, recipe):
    whole = Trainer(_config(tmp_path, "whole", recipe=recipe), progress=False)
    expected = whole.run()

    cfg = _config(tmp_path, "split", recipe=recipe)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, progress=False, on_step=_interrupt_at(3)).run()
    saved = load_checkpoint(cfg.out)
    assert saved["step"] == 3 and len(saved["train_losses"]) == 3
    resumed = Trainer(cfg, resume=saved, progress=False)
    got = resumed.run()

    assert got.train_losses == expected.train_losses            # bitwise, every step
    assert got.val_curve == expected.val_curve
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    if recipe == "fp16-mixed":
        assert resumed.scaler.state_dict() == whole.scaler.state_dict()
    steps = [r["step"] for r in read_metrics(cfg.out) if "train_loss" in r]
    assert steps == list(range(1, 9))                            # one record per step, none twice


def test_resumed_lstm_and_cnn_continue_exactly(tmp_path):
    for model, sizes in (("lstm", dict(d_model=16, hidden=16, seq_len=16)), ("cnn", dict(channels=4))):
        fields = dict(model=model, batch_size=4, eval_batches=2, steps=6, log_every=2, eval_every=6, **sizes)
        whole = Trainer(TrainConfig(**fields, out=str(tmp_path / f"{model}-whole")), progress=False).run()
        cfg = TrainConfig(**fields, out=str(tmp_path / f"{model}-split"))
        with pytest.raises(KeyboardInterrupt):
            Trainer(cfg, progress=False, on_step=_interrupt_at(2)).run()
        got = Trainer(cfg, resume=load_checkpoint(cfg.out), progress=False).run()
        assert got.train_losses == whole.train_losses, model


def test_checkpoint_holds_everything_to_continue(tmp_path):
    cfg = _config(tmp_path, "run", recipe="fp16-mixed", steps=2)
    Trainer(cfg, progress=False).run()
    state = load_checkpoint(cfg.out)
    assert {"config", "step", "model", "optimizer", "scaler", "rng", "train_losses", "val_curve"} <= set(state)
    assert state["config"]["recipe"] == "fp16-mixed" and state["step"] == 2
    assert state["scaler"]["scale"] > 0 and state["optimizer"]["state"]
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["recipe"] == "fp16-mixed"


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"step": 1, "payload": torch.arange(4)})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, {"step": 2, "payload": torch.arange(8)})
    monkeypatch.undo()
    state = load_checkpoint(tmp_path)
    assert state["step"] == 1 and torch.equal(state["payload"], torch.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]   # no temporary file left behind


def test_background_checkpoint_holds_the_state_at_save_time(tmp_path, monkeypatch):
    """The loop goes on changing parameters in place while the thread writes: the file must hold the
    values of the moment save() was called, and a failed write surfaces at the next wait()."""
    writer = checkpoint.CheckpointWriter(tmp_path)
    weight = torch.randn(64, 64)
    expected = weight.clone()
    losses = [1.0, 2.0]
    writer.save({"step": 5, "model": {"w": weight}, "train_losses": losses})
    weight.add_(1.0)                  # the next optimizer step, while the write may still be running
    losses.append(3.0)
    writer.wait()
    state = load_checkpoint(tmp_path)
    assert state["step"] == 5 and torch.equal(state["model"]["w"], expected) and state["train_losses"] == [1.0, 2.0]

    def full_disk(directory, state):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_checkpoint", full_disk)
    writer.save({"step": 6})
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    writer.wait()                     # reported once
    assert load_checkpoint(tmp_path)["step"] == 5


def test_snapshot_copies_a_tied_weight_once():
    weight = torch.randn(8, 4)
    copy_ = checkpoint.snapshot({"model": {"tok_emb.weight": weight, "lm_head.weight": weight}, "step": 3})
    tied = copy_["model"]
    assert tied["tok_emb.weight"] is tied["lm_head.weight"] and tied["tok_emb.weight"] is not weight
    assert torch.equal(tied["tok_emb.weight"], weight) and copy_["step"] == 3


@pytest.mark.cuda
def test_background_checkpoint_of_cuda_state_uses_pinned_buffers(tmp_path):
    writer = checkpoint.CheckpointWriter(tmp_path)
    weight = torch.randn(256, 256, device="cuda")
    for step in (1, 2):
        expected = weight.cpu()
        writer.save({"step": step, "model": {"w": weight}})
        buffer = writer._pinned[("model", "w")]
        assert buffer.is_pinned()
        if step == 1:
            first_buffer = buffer
        weight.mul_(-1.0)             # the next optimizer step, on the GPU stream
        writer.wait()
        state = load_checkpoint(tmp_path)
        assert state["step"] == step and torch.equal(state["model"]["w"], expected)
    assert buffer is first_buffer      # reused, not allocated again


def test_small_grad_task_leaves_fp32_training_unchanged(tmp_path):
    """The loss factor (2**-14), Adam's eps and the clip threshold scale together by a power of 2: FP32
    runs the same trajectory bit for bit, so only the recipes' handling of small gradients differs."""
    default = Trainer(_config(tmp_path, "default", recipe="fp32", steps=5), progress=False).run()
    small = Trainer(_config(tmp_path, "small", recipe="fp32", steps=5, task="small-grad"), progress=False).run()
    assert small.train_losses == default.train_losses


def test_training_reduces_the_loss(tmp_path):
    summary = Trainer(_config(tmp_path, "learn", recipe="fp32", steps=30, lr=1e-2, eval_every=30),
                      progress=False).run()
    assert summary.final_train_loss < summary.train_losses[0] - 1.0  # from ~5.5 nats (uniform bytes) downward
    assert summary.peak_memory_bytes > sum(p.numel() * 4 for p in Trainer(
        _config(tmp_path, "size", steps=1), progress=False).model.parameters())


def test_progress_off_a_terminal_prints_whole_lines_at_an_interval():
    import io

    from mixprec.train.progress import Progress

    log = io.StringIO()                                # not a terminal: isatty() is False
    bar = Progress(total=4, initial=0, desc="gpt fp32", stream=log, interval=3600.0)
    for step in range(4):
        bar.set_fields({"loss": f"{5 - step:.3f}", "tokens/s": "1,000", "scale": "-"})
        bar.update()
    bar.write("step 4: validation loss 1.5000")
    bar.close()
    bar.close()
    assert log.getvalue().splitlines() == [          # within the interval: only the message and the final line
        "gpt fp32: step 4: validation loss 1.5000",
        "gpt fp32: step 4/4 (100%), 0:00 elapsed, loss 2.000, tokens/s 1,000, scale -"]

    log = io.StringIO()
    bar = Progress(total=3, initial=1, desc="gpt fp32", stream=log, interval=0.0)
    bar.update()
    bar.update()
    bar.close()                                      # step 3 was just printed: not again
    assert [line.split(",")[0] for line in log.getvalue().splitlines()] == ["gpt fp32: step 2/3 (67%)",
                                                                            "gpt fp32: step 3/3 (100%)"]
    quiet = io.StringIO()
    bar = Progress(total=2, initial=0, desc="x", stream=quiet, enabled=False, interval=0.0)
    bar.update()
    bar.write("hidden")
    bar.close()
    assert quiet.getvalue() == ""


def test_underflow_probe_runs_fp8_layers_in_fp32():
    """The probe's gradients are FP32 ones: an FP8-converted model probes as its plain twin."""
    import mixprec as mp
    from mixprec.train.models import build_model
    from mixprec.train.underflow import probe_underflow

    cfg = TrainConfig(model="gpt", n_layer=1, n_head=2, d_model=256, seq_len=16)
    torch.manual_seed(0)
    plain = build_model(cfg.model_config())
    fp8 = mp.prepare(copy.deepcopy(plain), mp.Policy.from_recipe("fp8-blockwise"))
    assert any(type(m).__name__ == "Float8Linear" for m in fp8.modules())
    x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    factor = 2.0 ** -14  # small gradients, so that a good share of them underflows
    assert probe_underflow(fp8, x, y, loss_factor=factor) == probe_underflow(plain, x, y, loss_factor=factor)
    assert any(type(m).__name__ == "Float8Linear" for m in fp8.modules())   # the model itself is untouched


def test_metrics_go_to_tensorboard_when_installed(tmp_path, monkeypatch):
    """TensorBoard is optional (not installed here): a stand-in writer checks what MetricsLog sends it."""
    from mixprec.train import metrics

    scalars = []

    class Writer:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")

    monkeypatch.setattr(metrics, "_tensorboard_writer", lambda directory: Writer())
    Trainer(_config(tmp_path, "tb", recipe="fp16-mixed", steps=2, log_every=2, eval_every=2), progress=False).run()
    tags = {tag for tag, _, step in scalars[:-1] if step == 2}
    assert {"train_loss", "tokens_per_s", "lr", "loss_scale", "skipped_steps", "val_loss"} <= tags
    assert scalars[-1] == "closed"


def test_compiled_training_follows_the_eager_trajectory(tmp_path):
    eager = Trainer(_config(tmp_path, "eager", recipe="fp32", steps=4, eval_every=4), progress=False)
    expected = eager.run()
    compiled = Trainer(_config(tmp_path, "compiled", recipe="fp32", steps=4, eval_every=4, compile=True),
                       progress=False)
    got = compiled.run()
    assert compiled.forward_model is not compiled.model                      # the steps ran compiled
    assert got.train_losses == pytest.approx(expected.train_losses, rel=COMPILED_VS_EAGER_LOSS_RTOL)
    assert got.final_val_loss == pytest.approx(expected.final_val_loss, rel=COMPILED_VS_EAGER_LOSS_RTOL)
    # the checkpoint holds the model's own keys (no "_orig_mod." prefix): eager runs can resume from it
    assert set(load_checkpoint(compiled.out)["model"]) == set(eager.model.state_dict())


def test_compiled_bf16_training_keeps_the_precision_rules(tmp_path):
    sizes = dict(d_model=64, seq_len=64, batch_size=8, steps=4, eval_every=4)
    runs = {(recipe, compiled): Trainer(_config(tmp_path, f"{recipe}-{compiled}", recipe=recipe, compile=compiled,
                                                **sizes), progress=False, save_checkpoints=False).run().train_losses
            for recipe, compiled in (("bf16-mixed", False), ("bf16-mixed", True), ("fp32", True))}
    compiled, eager = runs[("bf16-mixed", True)], runs[("bf16-mixed", False)]
    assert compiled == pytest.approx(eager, rel=COMPILED_VS_EAGER_BF16_LOSS_RTOL)
    assert compiled != runs[("fp32", True)]          # autocast and the rules reached the compiled graph


@pytest.mark.cuda
@pytest.mark.parametrize("model", ["gpt", "cnn", "lstm"])
def test_cuda_trainer_without_the_function_mode_trains_identically(tmp_path, model):
    """On CUDA the trainer leaves the op rows to torch.autocast (op_rules="autocast"): the same losses,
    bit for bit, as with mp.autocast's function mode applying them."""
    sizes = dict(TINY_GPT, d_model=64, seq_len=64) if model == "gpt" else dict(model=model, batch_size=8)
    losses = {}
    for op_rules in ("autocast", "intercept"):
        cfg = TrainConfig(**sizes, recipe="bf16-mixed", device="cuda", steps=4, log_every=1, eval_every=4,
                          out=str(tmp_path / op_rules))
        trainer = Trainer(cfg, progress=False, save_checkpoints=False)
        assert trainer.op_rules == "autocast"        # the trainer's choice on CUDA
        trainer.op_rules = op_rules
        summary = trainer.run()
        losses[op_rules] = (summary.train_losses, summary.final_val_loss)
    assert losses["autocast"] == losses["intercept"]


@pytest.mark.cuda
def test_cuda_peak_memory_leaves_out_the_first_steps_one_time_work(tmp_path):
    """The FP8 kernels autotune on the first step, and Triton's benchmarking allocates a 256 MB scratch
    buffer (to flush the L2 cache): one-time work, not the memory training takes."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9+")
    triton = pytest.importorskip("triton")
    from mixprec.fp8 import _kernels as kernels
    for kernel in vars(kernels).values():
        if isinstance(kernel, triton.runtime.Autotuner):
            kernel.cache.clear()             # tuned again in this run, whatever ran before in the process
    cfg = TrainConfig(**dict(TINY_GPT, d_model=256), recipe="fp8-blockwise", device="cuda", steps=3, log_every=1,
                      eval_every=3, out=str(tmp_path / "fp8"))
    summary = Trainer(cfg, progress=False, save_checkpoints=False).run()
    assert 0 < summary.peak_memory_bytes < 128 * 2**20      # a 1-layer d=256 model trains in tens of MiB
