"""`mixprec train --nproc 2` on CPU ranks (gloo, through torch.distributed.run): DDP and FSDP2 runs end to end
and resumed (also onto another number of ranks and the other --dp), the same loss trajectory as one process on
the same global batch, a signal saving one checkpoint for all ranks, and mistakes refused before any rank starts.

Each launch starts fresh Python processes (a few seconds each on a small CPU), so every run here is tiny.
"""
import json
import signal
import subprocess
import sys
import time

import pytest

from mixprec.cli import main
from tolerances import DATA_PARALLEL_BF16_LOSS_RTOL, FP32_ORDER_RTOL

TINY = ["--model", "gpt", "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--seq-len", "32", "--batch-size",
        "4", "--eval-batches", "2", "--log-every", "1", "--eval-every", "2", "--quiet"]


def _losses(out):
    """(step, kind, loss) of every record in OUT/metrics.jsonl."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], k, r[k]) for r in records for k in ("train_loss", "val_loss") if k in r]


def _trained(out) -> bool:
    metrics = out / "metrics.jsonl"
    return metrics.is_file() and "train_loss" in metrics.read_text()


def _assert_same_trajectory(got, expected, rtol):
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in expected]
    for (step, kind, a), (_, _, b) in zip(got, expected):
        assert a == pytest.approx(b, rel=rtol), f"{kind} at step {step}: {a} vs {b}"


@pytest.mark.parametrize("dp, recipe, rtol, resume_flags", [
    # FP32: the ranks' gradients averaged in FP32 are the full batch's gradient summed in another order
    ("ddp", "fp32", FP32_ORDER_RTOL, []),
    # bf16-mixed, FSDP2; resumed on one rank under DDP: DCP reshards parameters and optimizer state
    ("fsdp2", "bf16-mixed", DATA_PARALLEL_BF16_LOSS_RTOL, ["--nproc", "1", "--dp", "ddp"]),
])
def test_two_ranks_train_as_one_process_does_and_resume(tmp_path, capfd, dp, recipe, rtol, resume_flags):
    single, ranks = tmp_path / "single", tmp_path / "ranks"
    assert main(["train", "--recipe", recipe, "--steps", "4", "--out", str(single), *TINY]) == 0
    capfd.readouterr()
    assert main(["train", "--nproc", "2", "--dp", dp, "--recipe", recipe, "--steps", "4", "--out", str(ranks),
                 *TINY]) == 0
    printed = capfd.readouterr().out
    assert f"2 processes ({dp}, gloo), 2 of the global batch of 4 each" in printed
    assert printed.count("done: step 4") == 1   # rank 0 alone speaks
    assert f"checkpoint: {ranks / 'checkpoint.dcp'}" in printed
    assert (ranks / "checkpoint.dcp" / ".metadata").is_file() and not (ranks / "checkpoint.pt").exists()
    assert json.loads((ranks / "config.json").read_text())["batch_size"] == 4
    _assert_same_trajectory(_losses(ranks), _losses(single), rtol)

    assert main(["train", "--resume", str(ranks), "--steps", "6", *resume_flags, "--quiet"]) == 0
    printed = capfd.readouterr().out
    assert "resuming at step 4" in printed and printed.count("done: step 6") == 1
    steps = [s for s, k, _ in _losses(ranks) if k == "train_loss"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (ranks / "checkpoint.prev.dcp" / ".metadata").is_file()   # the step-4 checkpoint, kept


def test_sigterm_stops_every_rank_after_the_same_step_with_one_checkpoint(tmp_path, capfd):
    """A scheduler's SIGTERM to the command: torchrun forwards it, the ranks agree on the step to stop after,
    save it together and exit 143; the run resumes from there."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mixprec", "train", "--nproc", "2", "--steps", "100000",
                             "--out", str(out), *TINY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _trained(out) and time.monotonic() < deadline:   # the ranks are in the training loop
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    stopped = [line for line in err.splitlines() if line.startswith("mixprec train:")]
    assert len(stopped) == 1 and "interrupted by SIGTERM at step" in stopped[0], err
    assert f"checkpoint saved to {out / 'checkpoint.dcp'}" in stopped[0] and "Traceback" not in err
    step = int(stopped[0].split("at step ")[1].split(":")[0])
    assert main(["train", "--resume", str(out), "--steps", str(step + 1), "--quiet"]) == 0
    assert f"resuming at step {step}" in capfd.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--nproc", "0"], "--nproc must be a positive integer (processes to start); got 0"),
    (["--nproc", "-2"], "--nproc must be a positive integer (processes to start); got -2"),
    (["--nproc", "two"], "argument --nproc: invalid int value: 'two'"),
    (["--nproc", "3"], "a global batch of 4 does not split evenly over 3 ranks"),
    (["--nproc", "2", "--dp", "zero"], "Unknown --dp 'zero'; choose one of: ddp, fsdp2"),
    (["--dp", "fsdp2"], "--dp applies to runs over several processes: give --nproc 2 or more"),
    (["--nproc", "2", "--recipe", "fp16-true"], "recipe fp16-true keeps FP32 master weights"),
    (["--nproc", "2", "--guard", "skip"], "--guard and --embedding-grad-shrink train in one process for now"),
])
def test_bad_nproc_exits_2_with_one_line_before_any_rank_starts(tmp_path, flags, message, capfd):
    out = tmp_path / "run"
    assert main(["train", "--steps", "2", "--out", str(out), *TINY, *flags]) == 2
    captured = capfd.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1, captured.err
    assert captured.out == "" and not out.exists()


def test_resuming_a_single_process_run_over_several_is_refused(tmp_path, capfd):
    out = tmp_path / "run"
    assert main(["train", "--steps", "2", "--out", str(out), *TINY]) == 0
    capfd.readouterr()
    assert main(["train", "--resume", str(out), "--steps", "4", "--nproc", "2"]) == 2
    err = capfd.readouterr().err
    assert f"--resume {out} holds a single-process run (checkpoint.pt)" in err and err.count("\n") == 1
