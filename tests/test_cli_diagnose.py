"""`mixprec diagnose`, `mixprec train --policy FILE` (the file diagnose recommends) and `mixprec compare
--batch-sizes`: what they write and print, the policy's round trip through a run and its resume, and bad
input (exit code 2, one line)."""
import json

import pytest
import torch

import mixprec as mp
from mixprec.cli import build_parser, main
from mixprec.diagnostics import load_policy, save_policy
from mixprec.train import commands
from mixprec.train.config import TrainConfig
from mixprec.train.diagnose_command import loss_on_logits, model_and_batch

SIZES = ["--n-layer", "1", "--n-head", "2", "--d-model", "32", "--seq-len", "32"]
TINY = [*SIZES, "--batch-size", "4", "--eval-batches", "2", "--quiet"]


def _one_line_error(capsys, message: str) -> None:
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err


def _table_modules(printed: str) -> list[str]:
    """The module column of the risk table that diagnose prints (between its rule and its '...' line)."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("module ")) + 2
    rows = []
    for line in lines[start:]:
        if not line.strip() or line.startswith(("...", "u/s/o:")):   # the table ends at its notes
            break
        rows.append(line.split()[0])
    return rows


# ---- diagnose ------------------------------------------------------------------------------------
def test_diagnose_writes_the_report_and_prints_a_table_of_the_models_modules(tmp_path, capsys):
    out = tmp_path / "diag"
    assert main(["diagnose", "--model", "gpt", "--recipe", "bf16-mixed", "--batch-size", "4", *SIZES,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    written = {p.name for p in out.iterdir()}
    assert {"report.txt", "report.json", "report.html", "recommended_policy.json"} <= written
    pytest.importorskip("matplotlib")
    assert {"hist_activation_grads.png", "ranges_weights.png"} <= written
    assert f"figures: {len([n for n in written if n.endswith('.png')])} PNGs in {out}" in printed
    assert f"recommended policy: {out / 'recommended_policy.json'}" in printed and str(out / "report.html") in printed

    # the table is the model's: every row names one of its modules, the riskiest first
    cfg = TrainConfig(model="gpt", batch_size=4, n_layer=1, n_head=2, d_model=32, seq_len=32)
    model, batch = model_and_batch(cfg)
    names = {name or "<model>" for name, _ in model.named_modules()}
    rows = _table_modules(printed)
    assert len(rows) >= 10 and set(rows) <= names and "blocks.0.attn.qkv" in rows
    report = json.loads((out / "report.json").read_text())
    risks = [r["risk"] for r in report["risk"]]
    assert risks == sorted(risks, reverse=True) and risks[0] > 0
    # diagnosed: train's initial weights (seed 0) on train's first batch, and the recipe asked for
    assert report["loss"] == pytest.approx(loss_on_logits(model(batch[0]), batch[1]).item(), rel=1e-5)
    assert report["policy"]["compute_dtype"] == "bf16" and report["audit"] is not None
    assert load_policy(out / "recommended_policy.json").compute_dtype == torch.bfloat16


@pytest.mark.parametrize("model, sizes, module", [("cnn", ["--channels", "4"], "head"),
                                                  ("lstm", ["--hidden", "16", "--d-model", "16", "--seq-len", "16"],
                                                   "rnn")])
def test_diagnose_runs_the_other_built_in_models(model, sizes, module, tmp_path, capsys):
    out = tmp_path / model
    assert main(["diagnose", "--model", model, "--batch-size", "8", "--loss-scale", "1024", *sizes,
                 "--out", str(out)]) == 0
    rows = _table_modules(capsys.readouterr().out)
    built, _ = model_and_batch(TrainConfig(model=model, **{k.lstrip("-").replace("-", "_"): (int(v))
                                                            for k, v in zip(sizes[::2], sizes[1::2])}))
    assert rows and set(rows) <= {name or "<model>" for name, _ in built.named_modules()}
    report = json.loads((out / "report.json").read_text())
    assert module in {layer["name"] for layer in report["layers"]}
    assert report["loss_scale"] == 1024 and report["policy"] is None


def test_diagnose_refuses_an_out_holding_files_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "diag"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "hist_stale.png").write_bytes(b"an earlier diagnosis's figure")
    argv = ["diagnose", "--model", "cnn", "--channels", "4", "--batch-size", "8", "--out", str(out)]
    assert main(argv) == 2
    _one_line_error(capsys, f"--out {out} already holds files (hist_stale.png, notes.txt); replace the diagnosis "
                            f"there with --overwrite")
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"       # not the diagnosis's: kept
    assert not (out / "hist_stale.png").exists() and (out / "report.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["diagnose", "--model", "vit"], "Unknown model 'vit'; choose one of: gpt, cnn, lstm, gru"),
    (["diagnose", "--recipe", "fp4"], "Unknown recipe 'fp4'; choose one of: fp32,"),
    (["diagnose", "--loss-scale", "0"], "--loss-scale must be a finite number > 0, e.g. 65536; got 0.0"),
    (["diagnose", "--loss-scale", "inf"], "--loss-scale must be a finite number > 0, e.g. 65536; got inf"),
    (["diagnose", "--batch-size", "0"], "batch_size must be a positive integer; got 0"),
    (["diagnose", "--model", "cnn", "--n-head", "2"], "--n-head does not apply to --model cnn; its sizes are: "
                                                      "--channels"),
    (["diagnose", "--steps", "3"], "unrecognized arguments: --steps 3"),
])
def test_diagnose_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "diag")]) == 2
    _one_line_error(capsys, message)
    assert not (tmp_path / "diag").exists()


# ---- train --policy ------------------------------------------------------------------------------
def test_the_recommended_policy_trains_resumes_and_a_resume_keeps_it(tmp_path, capsys):
    diag = tmp_path / "diag"
    assert main(["diagnose", "--recipe", "fp16-mixed", "--batch-size", "4", *SIZES, "--out", str(diag)]) == 0
    policy_file = diag / "recommended_policy.json"
    policy = load_policy(policy_file)
    # diagnosed under fp16-mixed: a static loss scale, the largest power of 2 that keeps the gradients finite
    assert isinstance(policy.loss_scale, float) and policy.compute_dtype == torch.float16
    capsys.readouterr()

    run = tmp_path / "run"
    assert main(["train", "--policy", str(policy_file), "--steps", "2", "--log-every", "1", "--out", str(run),
                 *TINY]) == 0
    printed = capsys.readouterr().out
    assert "policy fp16-mixed from a file" in printed and f"loss scale {policy.loss_scale:g}" in printed
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"] == "fp16-mixed" and load_policy(policy_file) == load_policy(
        save_policy(TrainConfig(**config).precision_policy(), tmp_path / "back.json"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_scale"] for r in records if "loss_scale" in r] == [policy.loss_scale] * 2   # static: not fp16-mixed's dynamic 65536

    # resume: the checkpoint's policy, with no flag or the same file; another policy or a recipe is refused
    assert main(["train", "--resume", str(run), "--steps", "3", "--quiet"]) == 0
    assert "resuming at step 2" in capsys.readouterr().out
    assert main(["train", "--resume", str(run), "--policy", str(policy_file), "--steps", "4", "--quiet"]) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 4
    capsys.readouterr()
    other = save_policy(mp.Policy.from_recipe("fp16-mixed"), tmp_path / "other.json")
    assert main(["train", "--resume", str(run), "--policy", str(other), "--steps", "5"]) == 2
    _one_line_error(capsys, f"--resume {run} holds a run under the policy fp16-mixed from a file (")
    assert main(["train", "--resume", str(run), "--recipe", "fp16-mixed", "--steps", "5"]) == 2
    _one_line_error(capsys, "this run asks for recipe fp16-mixed: drop --recipe/--policy")
    plain = tmp_path / "plain"
    assert main(["train", "--recipe", "bf16-mixed", "--steps", "1", "--out", str(plain), *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(plain), "--policy", str(policy_file), "--steps", "2"]) == 2
    _one_line_error(capsys, f"--resume {plain} holds a run under recipe bf16-mixed; this run asks for the policy "
                            f"fp16-mixed from a file")


def test_a_recipes_policy_file_trains_exactly_as_the_recipe(tmp_path, capsys):
    policy_file = save_policy(mp.Policy.from_recipe("bf16-mixed"), tmp_path / "bf16.json")
    for name, flags in (("recipe", ["--recipe", "bf16-mixed"]), ("file", ["--policy", str(policy_file)])):
        assert main(["train", *flags, "--steps", "3", "--log-every", "1", "--out", str(tmp_path / name), *TINY]) == 0
    losses = {name: [json.loads(line).get("train_loss") for line in (tmp_path / name / "metrics.jsonl").open()]
              for name in ("recipe", "file")}
    assert losses["file"] == losses["recipe"] and len([v for v in losses["file"] if v is not None]) == 3


@pytest.mark.parametrize("content, message", [
    (None, "No policy file at {path}"),
    ("{not json", "{path} is not JSON:"),
    (json.dumps({"format": "mixprec-policy/1", "compute_dtype": "bf16", "precision": "high"}),
     "{path}: unknown keys ['precision']; valid keys:"),
    (json.dumps({"format": "mixprec-policy/1", "loss_scale": -1.0}), "a static loss_scale must be a positive"),
    (json.dumps(["bf16-mixed"]), "{path}: a policy file holds a JSON object"),
])
def test_a_bad_policy_file_exits_2_with_one_line(content, message, tmp_path, capsys):
    path = tmp_path / "policy.json"
    if content is not None:
        path.write_text(content)
    assert main(["train", "--policy", str(path), "--steps", "1", "--out", str(tmp_path / "run"), *TINY]) == 2
    _one_line_error(capsys, message.format(path=path))
    assert not (tmp_path / "run").exists()


def test_policy_and_recipe_together_exit_2(tmp_path, capsys):
    path = save_policy(mp.Policy.from_recipe("fp32"), tmp_path / "p.json")
    assert main(["train", "--policy", str(path), "--recipe", "fp32", "--steps", "1"]) == 2
    _one_line_error(capsys, f"give --recipe or --policy, not both (got --recipe fp32 and --policy {path})")


# ---- compare --batch-sizes -----------------------------------------------------------------------
def test_compare_over_batch_sizes_rows_differences_and_range_shifts(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--recipes", "fp32,fp16-noscale", "--batch-sizes", "16,4", "--steps", "2",
                 "--out", str(out), *[a for a in TINY if a not in ("--batch-size", "4")]]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "batch_sizes.json").read_text())
    assert summary["batch_sizes"] == [4, 16] and summary["reference"] == "fp32"
    for b in (4, 16):
        runs = json.loads((out / f"bs-{b}" / "curves.json").read_text())["runs"]
        assert list(runs) == [f"fp32@{b}", f"fp16-noscale@{b}"]
        assert json.loads((out / f"bs-{b}" / "curves.json").read_text())["config"]["batch_size"] == b
        ref, val = runs[f"fp32@{b}"]["final_val_loss"], runs[f"fp16-noscale@{b}"]["final_val_loss"]
        assert summary["differences"]["fp16-noscale"][str(b)] == pytest.approx((val - ref) / ref)   # its own fp32
        assert summary["differences"]["fp32"][str(b)] == 0.0
    table = (out / "batch_sizes.md").read_text()
    assert "| fp16-noscale@16 |" in table and "val vs fp32 at its batch size" in table
    assert "| recipe | batch 4 (2 steps) | batch 16 (2 steps) |" in table
    # the logits' gradient of a mean loss is (softmax - onehot) / tokens: 4x the batch, 2 bits smaller
    assert "batch 16 against batch 4: ranges that moved most" in table
    assert any(line.strip().startswith(("lm_head act grad: amax -2.0 bits", "<model> act grad: amax -2.0 bits"))
               for line in summary["range_shifts"])
    assert table in printed


def test_batch_sizes_without_steps_train_the_same_samples_each():
    args = build_parser().parse_args(["compare", "--batch-sizes", "16,64,256", "--recipes", "fp32"])
    job = commands.setup_compare(args)
    assert {b: c.steps for b, c in job.by_batch_size.items()} == {16: 300, 64: 75, 256: 19}
    assert {b: c.batch_size for b, c in job.by_batch_size.items()} == {16: 16, 64: 64, 256: 256}
    assert job.by_batch_size[64].eval_every == 75 // 6


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "16,x"], "--batch-sizes takes comma-separated positive integers, e.g. 16,64,256; got '16,x'"),
    (["--batch-sizes", "0,4"], "--batch-sizes takes comma-separated positive integers"),
    (["--batch-sizes", "4,4"], "--batch-sizes names a batch size twice: 4,4"),
    (["--batch-sizes", "4,8", "--batch-size", "8"], "give --batch-size or --batch-sizes, not both"),
    (["--batch-sizes", "4,8", "--seeds", "0,1"], "give --seeds or --batch-sizes, not both"),
])
def test_compare_batch_sizes_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    assert main(["compare", *argv, "--out", str(tmp_path / "cmp")]) == 2
    _one_line_error(capsys, message)


def test_diagnose_run_reads_the_trained_weights_and_the_next_batch(tmp_path, capsys):
    """--run DIR: the checkpoint's weights, on the batch the run would train on next, under the run's own
    policy; the report's FP32 loss is the trained model's on that batch."""
    from mixprec.train.checkpoint import load_checkpoint
    from mixprec.train.data import batches_for
    from mixprec.train.models import build_model

    run = tmp_path / "run"
    assert main(["train", "--recipe", "fp16-mixed", "--steps", "6", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert main(["diagnose", "--run", str(run)]) == 0
    printed = capsys.readouterr().out
    assert f"trained 6 steps ({run}), on batch 6" in printed and "recipe fp16-mixed against FP32" in printed
    report = json.loads((run / "diagnosis" / "report.json").read_text())

    state = load_checkpoint(run)
    cfg = TrainConfig(**state["config"])
    model = build_model(cfg.model_config())
    model.load_state_dict(state["model"])
    x, y = batches_for("gpt", batch_size=cfg.batch_size, seq_len=cfg.seq_len_or_default, seed=cfg.seed).train_batch(6)
    assert report["loss"] == pytest.approx(loss_on_logits(model(x), y).item(), rel=1e-5)
    assert report["policy"]["name"] == "fp16-mixed" and report["policy"]["loss_scale"] == "dynamic"

    assert main(["diagnose", "--run", str(run), "--d-model", "64"]) == 2
    assert "--d-model is fixed by the run that --run" in capsys.readouterr().err
