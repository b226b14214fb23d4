"""`mixprec train` and `compare` lose nothing and never fail silently: existing runs, signals, damaged
checkpoints, bad numbers, diverged runs, bad output paths, and FP8 recipes that convert nothing.

Driven as a user drives the command line: `main(argv)` in this process, or `python -m mixprec` in a
subprocess where a real signal must reach it; exit codes and one-line messages are checked.
"""
import os
import signal
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

import mixprec as mp
from mixprec.train import fp8_coverage
from mixprec.train import trainer as trainer_module
from mixprec.train.checkpoint import CheckpointWriter, load_checkpoint, save_checkpoint
from mixprec.cli import main
from mixprec.train.config import TrainConfig
from mixprec.train.models import build_model
from mixprec.train.trainer import Trainer

COMMON = ["--batch-size", "2", "--eval-batches", "1", "--quiet"]        # flags every model takes
SIZES = ["--batch-size", "2", "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--seq-len", "16",
         "--eval-batches", "1"]
TINY = [*SIZES, "--quiet"]                                                # the GPT's


def _one_line(err: str) -> str:
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def _files(directory) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---- runs never overwrite each other -----------------------------------------------------------
def test_train_into_a_run_refuses_and_loses_nothing_unless_told(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "2", "--out", str(out), *TINY]) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(["train", "--steps", "2", "--lr", "1e-3", "--out", str(out), *TINY]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"--out {out} already holds a run" in err
    assert f"--resume {out}" in err and "--overwrite" in err and "another --out" in err
    assert _files(out) == before                                       # not a byte changed

    assert main(["train", "--steps", "3", "--lr", "1e-3", "--out", str(out), "--overwrite", *TINY]) == 0
    assert load_checkpoint(out)["step"] == 3 and load_checkpoint(out)["config"]["lr"] == 1e-3
    assert not (out / "checkpoint.prev.pt").exists()                   # nothing of the old run is left


def test_compare_into_a_comparison_refuses_unless_told(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--recipes", "fp32", "--steps", "1", "--out", str(out), *TINY]) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(["compare", "--recipes", "bf16-mixed", "--steps", "1", "--out", str(out), *TINY]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"--out {out} already holds a run" in err and "--overwrite" in err and "--resume" not in err
    assert _files(out) == before
    assert main(["compare", "--recipes", "bf16-mixed", "--steps", "1", "--out", str(out), "--overwrite", *TINY]) == 0
    assert not (out / "fp32").exists() and (out / "bf16-mixed" / "metrics.jsonl").is_file()


# ---- signals -------------------------------------------------------------------------------------
def test_sigterm_saves_a_checkpoint_says_where_and_exits_143(tmp_path, capsys):
    """What a scheduler or container does: SIGTERM once training runs; the run can be resumed."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mixprec", "train", *SIZES, "--steps", "100000",
                             "--eval-every", "1", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:   # progress goes to stderr: plain lines, as in a log
            if "validation loss" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    step = load_checkpoint(out)["step"]
    assert last == (f"mixprec train: interrupted by SIGTERM at step {step}: checkpoint saved to "
                    f"{out / 'checkpoint.pt'}; continue with: mixprec train --resume {out}")
    assert main(["train", "--resume", str(out), "--steps", str(step + 2), "--quiet"]) == 0
    assert f"resuming at step {step}" in capsys.readouterr().out


_INTERRUPT_SETUP = """
import os, signal, sys
from mixprec import cli
from mixprec.train import trainer
load = trainer.batches_for
def interrupted(*args, **kwargs):   # the signal arrives while the corpus loads, before training
    os.kill(os.getpid(), signal.{signal})
    return load(*args, **kwargs)
trainer.batches_for = interrupted
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_setup_exits_with_one_line_and_writes_nothing(tmp_path, signum, code):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", _INTERRUPT_SETUP.format(signal=signum.name), "train",
                             "--steps", "4", "--out", str(out), *TINY], capture_output=True, text=True, timeout=120)
    assert result.returncode == code
    assert _one_line(result.stderr) == (f"mixprec train: interrupted by {signum.name} before training started: "
                                        f"nothing was written\n")
    assert not out.exists()


def _signal_after(monkeypatch, step_index: int, times: int) -> None:
    """Send SIGINT `times` times right after training step number `step_index` (a real Ctrl-C)."""
    train_step = Trainer.train_step

    def step(self, index, **kwargs):
        loss = train_step(self, index, **kwargs)
        if index == step_index:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(Trainer, "train_step", step)


def test_second_ctrl_c_while_saving_finishes_the_checkpoint_and_says_so(tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    _signal_after(monkeypatch, 2, times=1)
    write = CheckpointWriter.save

    def save(self, state):
        os.kill(os.getpid(), signal.SIGINT)   # the impatient second Ctrl-C, as the checkpoint is written
        return write(self, state)

    monkeypatch.setattr(CheckpointWriter, "save", save)
    assert main(["train", "--steps", "10", "--out", str(out), *TINY]) == 130
    err = capfd.readouterr().err
    assert "SIGINT received while a checkpoint is being written: finishing the write first" in err
    assert err.splitlines()[-1] == (f"mixprec train: interrupted by SIGINT at step 3: checkpoint saved to "
                                    f"{out / 'checkpoint.pt'}; continue with: mixprec train --resume {out}")
    assert load_checkpoint(out)["step"] == 3


def test_second_ctrl_c_during_a_step_stops_at_once_and_names_the_last_checkpoint(tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    _signal_after(monkeypatch, 3, times=2)   # two Ctrl-C at once, in the fourth step
    assert main(["train", "--steps", "10", "--ckpt-every", "2", "--out", str(out), *TINY]) == 130
    err = capfd.readouterr().err
    assert err.splitlines()[-1] == (f"mixprec train: stopped at once by a second SIGINT after step 3: the last "
                                    f"checkpoint is {out / 'checkpoint.pt'} (step 2); continue with: mixprec train "
                                    f"--resume {out}")
    assert "Traceback" not in err and load_checkpoint(out)["step"] == 2


def test_default_run_checkpoints_within_its_length():
    cfg = TrainConfig()
    assert 0 < cfg.ckpt_every < cfg.steps


# ---- damaged checkpoints -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run with checkpoint.pt at step 4 and checkpoint.prev.pt at step 2."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert main(["train", "--steps", "4", "--ckpt-every", "2", "--out", str(out), *TINY]) == 0
    return _files(out)


def _invert_64_tensor_bytes(path) -> None:
    """Invert 64 bytes in the middle of the largest tensor's data (torch.save writes a zip of records)."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(record.header_offset + 30 + name_length + extra_length + record.file_size // 2)
        data = f.read(64)
        f.seek(-64, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))


DAMAGES = {
    "inverted bytes": (_invert_64_tensor_bytes, "is damaged: the checksum of its model does not match"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "cannot be read"),
    "empty": (lambda p: p.write_bytes(b""), "is empty"),
    "keyless": (lambda p: torch.save({"weights": torch.ones(2)}, p), "is not a mixprec train checkpoint"),
    "missing": (lambda p: p.unlink(), "is missing"),   # a crash between the two renames of a save
}


def _restore(files, out) -> None:
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_falls_back_to_the_previous_one(two_checkpoints, tmp_path, damage, capsys):
    out = tmp_path / "run"
    _restore(two_checkpoints, out)
    harm, symptom = DAMAGES[damage]
    harm(out / "checkpoint.pt")
    assert main(["train", "--resume", str(out), "--steps", "5", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert _one_line(captured.err).startswith(f"mixprec train: warning: {out / 'checkpoint.pt'} {symptom}")
    assert f"using the previous checkpoint, {out / 'checkpoint.prev.pt'} (step 2)" in captured.err
    assert "resuming at step 2" in captured.out
    assert load_checkpoint(out)["step"] == 5


def test_damaged_checkpoint_without_a_good_previous_one_exits_2_naming_it(two_checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    _restore(two_checkpoints, out)
    _invert_64_tensor_bytes(out / "checkpoint.pt")
    (out / "checkpoint.prev.pt").write_bytes(b"")
    assert main(["train", "--resume", str(out), "--steps", "5", "--quiet"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"{out / 'checkpoint.pt'} is damaged" in err and f"{out / 'checkpoint.prev.pt'} is empty" in err


def test_resume_checks_the_loaded_state_against_the_saved_one(two_checkpoints, tmp_path, capsys):
    """A checkpoint whose checksums hold but whose weights change on loading (FP64 values rounded into
    the FP32 model) does not resume."""
    out = tmp_path / "run"
    _restore(two_checkpoints, out)
    state = load_checkpoint(out)
    del state["format"], state["checksums"]
    state["model"] = {k: v.double() + 1e-12 for k, v in state["model"].items()}
    (out / "checkpoint.prev.pt").unlink()
    save_checkpoint(out, state)
    assert main(["train", "--resume", str(out), "--steps", "5", "--quiet"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"--resume {out}: the model state loaded from the checkpoint of step 4 differs from the one saved" in err


# ---- numbers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--lr", "inf"], "lr must be a finite number > 0, e.g. 2e-3; got inf"),
    (["--lr", "nan"], "lr must be a finite number > 0, e.g. 2e-3; got nan"),
    (["--lr", "0"], "lr must be a finite number > 0, e.g. 2e-3; got 0.0"),
    (["--weight-decay=-inf"], "weight_decay must be a finite number >= 0, e.g. 0.1; got -inf"),
    (["--grad-clip", "nan"], "grad_clip must be a finite number > 0, e.g. 1.0; got nan"),
    (["--seed", "-1"], "seed must be an integer in [0, 4294967295] (2**32 - 1); got -1"),
    (["--seed", str(2 ** 32)], "seed must be an integer in [0, 4294967295]"),
    (["--seq-len", "100000", "--batch-size", "16"], "--seq-len 100000 at --batch-size 16 needs more than"),
    (["--model", "lstm", "--hidden", "8", "--d-model", "8", "--batch-size", "1", "--seq-len", "4000000"],
     "--seq-len 4000000 is too long for the corpus: its shortest split has"),
])
def test_bad_numbers_exit_2_before_training(tmp_path, flags, message, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "2", "--out", str(out), *(COMMON if "--model" in flags else TINY), *flags]) == 2
    err = _one_line(capsys.readouterr().err)
    assert message in err
    if "--seq-len" in message:
        assert "or less" in err           # what fits
    assert not out.exists()


def test_seeds_of_compare_are_checked_before_the_first_one_trains(tmp_path, capsys):
    assert main(["compare", "--recipes", "fp32", "--seeds", "0,-1", "--out", str(tmp_path / "c"), *TINY]) == 2
    assert "seed must be an integer in [0, 4294967295]" in _one_line(capsys.readouterr().err)


def test_diverged_run_exits_3_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "fp16-mixed", "--lr", "5", "--steps", "40", "--ckpt-every", "2",
                 "--out", str(out), *TINY]) == 3
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("mixprec train: the run diverged at step ") and "Try a lower --lr (this run's: 5)" in err
    diverged_at = int(err.split("diverged at step ")[1].split(":")[0])
    if (out / "checkpoint.pt").exists():
        saved = load_checkpoint(out)
        assert saved["step"] < diverged_at and f"(step {saved['step']}), is kept as it was" in err
        assert all(torch.isfinite(v).all() for v in saved["model"].values())
    else:
        assert "no checkpoint was saved before it" in err


def test_run_whose_every_step_is_skipped_stops(tmp_path, monkeypatch):
    """The loss stays finite, but every gradient overflows: the loss scaler skips each step and nothing
    trains. The run stops once SKIPPED_IN_A_ROW steps in a row were skipped (8 here, to be quick)."""
    monkeypatch.setattr(trainer_module, "SKIPPED_IN_A_ROW", 8)
    cfg = TrainConfig(model="gpt", recipe="fp16-mixed", n_layer=1, n_head=2, d_model=32, seq_len=16, batch_size=2,
                      eval_batches=1, steps=200, log_every=2, out=str(tmp_path / "run"))
    trainer = Trainer(cfg, progress=False)
    trainer.model.tok_emb.weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(trainer_module.Diverged, match=r"skipped each of the last 8 steps .*: the gradients are inf"):
        trainer.run()
    assert trainer.step == 8 and not (tmp_path / "run" / "checkpoint.pt").exists()


# ---- output paths --------------------------------------------------------------------------------
def _unwritable(tmp_path):
    if os.geteuid() != 0:
        directory = tmp_path / "read-only"
        directory.mkdir()
        directory.chmod(0o555)
        return directory / "out", "cannot be written"
    return "/sys/mixprec-out", "cannot be written"   # the superuser writes anywhere but in sysfs


@pytest.mark.parametrize("command", [["train"], ["compare", "--recipes", "fp32"]])
@pytest.mark.parametrize("where", ["a file", "below a file", "unwritable"])
def test_bad_output_path_exits_2_with_one_line(tmp_path, command, where, capsys):
    (tmp_path / "file").write_text("not a directory")
    out, message = {"a file": (tmp_path / "file", "is a file, not a directory"),
                    "below a file": (tmp_path / "file" / "run", f"lies below {tmp_path / 'file'}, which is a file"),
                    "unwritable": _unwritable(tmp_path)}[where]
    assert main([*command, "--steps", "1", "--out", str(out), *TINY]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"--out {out} {message}" in err


# ---- FP8 recipes that convert nothing --------------------------------------------------------------
def test_fp8_recipe_that_converts_nothing_is_refused_with_a_hint_that_works(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "fp8-blockwise", "--steps", "1", "--out", str(out), *TINY]) == 2
    err = _one_line(capsys.readouterr().err)
    assert ("fp8-blockwise converted 0 of 5 Linear layers of gpt (4 below min_features=256, 1 output head kept in "
            "high precision); this run would compute as bf16-mixed; --d-model 256 (or a larger multiple of 16) puts "
            "its block layers in FP8") in err
    assert "--allow-no-fp8" in err and not out.exists()
    # the hint: at --d-model 256 the default filter converts the block's four layers
    cfg = TrainConfig(recipe="fp8-blockwise", n_layer=1, n_head=2, d_model=256, seq_len=16)
    model = mp.prepare(build_model(cfg.model_config()), mp.Policy.from_recipe("fp8-blockwise"))
    assert fp8_coverage.fp8_coverage(model) == (4, 5)

    assert main(["train", "--recipe", "fp8-blockwise", "--steps", "1", "--out", str(out), "--allow-no-fp8",
                 *TINY]) == 0
    assert "FP8: fp8-blockwise converted 0 of 5 Linear layers of gpt" in capsys.readouterr().out


@pytest.mark.parametrize("model, sizes", [("cnn", ["--channels", "4"]), ("lstm", ["--hidden", "16"]),
                                          ("gru", ["--hidden", "16"])])
def test_fp8_on_models_without_convertible_layers_says_no_size_helps(tmp_path, model, sizes, capsys):
    assert main(["train", "--model", model, "--recipe", "fp8-rowwise", "--steps", "1", *sizes,
                 "--out", str(tmp_path / "run"), *COMMON]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"fp8-rowwise converted 0 of 1 Linear layers of {model} (1 output head kept in high precision)" in err
    assert f"no size of {model} changes that (its only Linear layer is the output head): FP8 needs --model gpt " \
           f"--d-model 256" in err


def test_compare_notes_an_fp8_row_that_computes_as_bf16(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", "cnn", "--channels", "4", "--recipes", "bf16-mixed,fp8-tensorwise",
                 "--steps", "1", "--out", str(out), *COMMON]) == 0
    note = ("fp8-tensorwise converted 0 of 1 Linear layers of cnn (1 output head kept in high precision); this row "
            "computes as bf16-mixed; no size of cnn changes that")
    assert note in capsys.readouterr().out and note in (out / "table.md").read_text()
