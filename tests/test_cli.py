"""The `mixprec` command line: train and compare smoke runs, resume, and bad input (exit code 2)."""
import csv
import json
import subprocess
import sys

import pytest
import torch

from mixprec.train import data
from mixprec.cli import main
from mixprec.train.report import COLUMNS

TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "32", "--seq-len", "32", "--batch-size", "4",
        "--eval-batches", "2", "--quiet"]


def test_train_writes_checkpoint_and_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "fp16-mixed", "--steps", "4", "--log-every", "2", "--eval-every", "2",
                 "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "recipe fp16-mixed" in printed and "done: step 4" in printed
    assert {p.name for p in out.iterdir()} >= {"checkpoint.pt", "metrics.jsonl", "config.json"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    assert all({"tokens_per_s", "loss_scale", "lr", "skipped_steps"} <= set(r) for r in train)
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]

    # resume with more steps: continues from step 4, keeps the model and recipe of the checkpoint
    assert main(["train", "--resume", str(out), "--steps", "6", "--quiet"]) == 0
    assert "resuming at step 4" in capsys.readouterr().out
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 6


def test_python_dash_m_runs_the_cnn_with_plain_progress_in_a_log(tmp_path):
    """Progress written to a pipe (a CI log, not a terminal): whole lines, no carriage-return redraws."""
    result = subprocess.run([sys.executable, "-m", "mixprec", "train", "--model", "cnn", "--channels", "4",
                             "--recipe", "bf16-mixed", "--steps", "3", "--eval-every", "3", "--batch-size", "8",
                             "--out", str(tmp_path / "cnn")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "images/s" in result.stdout and (tmp_path / "cnn" / "checkpoint.pt").is_file()
    assert "\r" not in result.stderr
    progress = result.stderr.splitlines()
    assert progress[0].startswith("cnn bf16-mixed: step 3: validation loss")
    assert progress[-1].startswith("cnn bf16-mixed: step 3/3 (100%)") and "images/s" in progress[-1]


def test_compare_writes_table_curves_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--recipes", "fp32,fp16-noscale,fp16-mixed", "--steps", "3", "--out", str(out),
                 *TINY]) == 0
    printed = capsys.readouterr().out
    header = [c.format(items="tokens").replace("ref", "fp32") for c in COLUMNS]
    assert "| " + " | ".join(header) + " |" in printed
    assert f"plot: {out / 'loss_curves.png'}" in printed
    with (out / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["recipe"] for r in rows] == ["fp32", "fp16-noscale", "fp16-mixed"]
    assert float(rows[0]["val vs fp32"]) == 0.0 and float(rows[2]["final loss scale"]) > 1
    assert rows[1]["final loss scale"] == ""                      # fp16-noscale has no scaler
    for row in rows:
        assert 0 < float(row["FP16 underflow, unscaled"]) <= 1 and float(row["tokens/s"]) > 0
    # underflow at the recipe's own scale: none for fp32 (no FP16), scale 1 for fp16-noscale, far less
    # once fp16-mixed scales by 2**16
    scaled = "FP16 underflow, recipe's scale"
    assert rows[0][scaled] == ""
    assert rows[1][scaled] == rows[1]["FP16 underflow, unscaled"]
    assert float(rows[2][scaled]) < float(rows[2]["FP16 underflow, unscaled"]) / 10
    fp32_row = next(line for line in printed.splitlines() if line.startswith("| fp32 |"))
    cells = [c.strip() for c in fp32_row.strip("|").split("|")]
    assert cells[-3] == "-" and cells[-1] == "-"                  # no loss scale, no FP16 underflow of its own
    curves = json.loads((out / "curves.json").read_text())
    assert set(curves["runs"]) == {"fp32", "fp16-noscale", "fp16-mixed"}
    assert len(curves["runs"]["fp32"]["train_loss"]) == 3 and curves["meta"]["unigram_entropy"] > 2
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table_lines = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("|")]
    assert len(table_lines) == 5                                  # header, rule, 3 recipes


def test_compare_over_seeds_summarises_each_recipes_difference(tmp_path, capsys):
    """--seeds runs the whole comparison per seed and reports each recipe's difference to the reference
    seed by seed, with its mean, standard deviation and standard error over the seeds."""
    out = tmp_path / "seeds"
    assert main(["compare", "--recipes", "fp32,fp16-noscale", "--steps", "2", "--seeds", "3,4", "--out", str(out),
                 *TINY]) == 0
    rels = {}
    for seed in (3, 4):
        with (out / f"seed-{seed}" / "table.csv").open() as f:
            rels[seed] = {r["recipe"]: float(r["val vs fp32"]) for r in csv.DictReader(f)}["fp16-noscale"]
        assert json.loads((out / f"seed-{seed}" / "curves.json").read_text())["config"]["seed"] == seed
    assert rels[3] != rels[4]
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["reference"] == "fp32" and summary["seeds"] == [3, 4]
    got = summary["recipes"]["fp16-noscale"]
    assert got["by_seed"] == {"3": rels[3], "4": rels[4]}
    assert got["mean"] == pytest.approx((rels[3] + rels[4]) / 2)
    assert got["std"] == pytest.approx(abs(rels[3] - rels[4]) / 2 ** 0.5)    # sample std of two values
    assert got["std_error"] == pytest.approx(got["std"] / 2 ** 0.5)
    assert summary["recipes"]["fp32"]["mean"] == 0.0
    table = (out / "seeds.md").read_text()
    assert "seeds 3, 4" in table and f"| fp16-noscale | {rels[3]:+.2%} / {rels[4]:+.2%} |" in table
    assert table in capsys.readouterr().out


def test_compare_small_grad_shows_the_underflow_loss_scaling_prevents(tmp_path):
    """The 2018 paper's effect, at the command line: with the loss multiplied by 2**-14, FP16 without
    scaling loses nearly every activation gradient and barely trains; dynamic scaling restores FP32's
    trajectory."""
    out = tmp_path / "small"
    assert main(["compare", "--task", "small-grad", "--recipes", "fp32,fp16-noscale,fp16-mixed", "--steps", "12",
                 "--lr", "1e-2", "--out", str(out), *TINY]) == 0
    runs = json.loads((out / "curves.json").read_text())["runs"]
    val = {r: runs[r]["final_val_loss"] for r in runs}
    assert runs["fp32"]["underflow"]["activation_grads"] > 0.9   # measured: 94 %
    assert runs["fp16-mixed"]["underflow"]["activation_grads_scaled"] < 0.1
    assert val["fp16-noscale"] > 1.1 * val["fp32"]                # measured: +25 % after 12 steps
    assert abs(val["fp16-mixed"] - val["fp32"]) < 0.01 * val["fp32"]  # measured: +0.00 %


def test_compare_runs_fp8_recipes_and_says_how_much_is_fp8(tmp_path, capsys):
    """FP8 recipes run through mp.prepare on the CPU (emulated). d_model 256 is the smallest width whose
    block layers reach FP8's min_features; at the tiny default width the note says nothing is FP8."""
    out = tmp_path / "fp8"
    sizes = ["--n-layer", "1", "--n-head", "2", "--d-model", "256", "--seq-len", "32", "--batch-size", "4",
             "--eval-batches", "1", "--quiet"]
    assert main(["compare", "--recipes", "bf16-mixed,fp8-blockwise", "--steps", "2", "--out", str(out), *sizes]) == 0
    printed = capsys.readouterr().out
    assert "fp8-blockwise: 4 of 5 Linear layers in FP8" in printed   # qkv, proj, 2 MLP; the tied head stays
    runs = json.loads((out / "curves.json").read_text())["runs"]
    assert runs["fp8-blockwise"]["fp8_layers"] == [4, 5] and runs["bf16-mixed"]["fp8_layers"] is None
    assert runs["fp8-blockwise"]["train_loss"] != runs["bf16-mixed"]["train_loss"]  # FP8 GEMMs did run
    assert "fp8-blockwise: 4 of 5" in (out / "table.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "transformer"], "Unknown model 'transformer'; choose one of: gpt, cnn, lstm, gru"),
    (["train", "--recipe", "bf16mixed"], "Unknown recipe 'bf16mixed'; choose one of: fp32, fp16-mixed, bf16-mixed"),
    (["compare", "--recipes", "fp32,fp4"], "Unknown recipe 'fp4'; choose one of: fp32,"),
    (["train", "--device", "tpu"], "Unknown device 'tpu'; choose one of: cpu, cuda"),
    (["train", "--steps", "0"], "steps must be a positive integer; got 0"),
    (["compare", "--steps", "-3"], "steps must be a positive integer; got -3"),
    (["compare", "--seeds", "0,x"], "--seeds takes comma-separated integers, e.g. 0,1,2,3; got '0,x'"),
    (["compare", "--seeds", "1,1"], "--seeds names a seed twice: 1,1"),
    (["compare", "--seed", "1", "--seeds", "0,1"], "give --seed or --seeds, not both"),
    (["train", "--task", "tiny"], "Unknown task 'tiny'; choose one of: default, small-grad"),
    (["train", "--resume", "/nonexistent/run"], "No checkpoint to resume from: /nonexistent/run/checkpoint.pt"),
    (["train", "--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["launch"], "invalid choice: 'launch' (choose from 'recipes', 'explain', 'train', 'compare', 'bench', 'diagnose')"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_exits_2(capsys):
    assert main(["train", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda needs a CUDA GPU" in err and "use --device cpu" in err and err.count("\n") == 1


def test_resume_of_another_model_or_recipe_exits_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "fp32", "--steps", "1", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--recipe", "bf16-mixed"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with recipe='fp32'" in err and "asks for recipe='bf16-mixed'" in err and err.count("\n") == 1
    assert main(["train", "--resume", str(out), "--model", "lstm"]) == 2
    assert "holds a run with model='gpt'" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "is at step 1 of 1: nothing to do; give --steps larger than 1" in err and err.count("\n") == 1


def test_missing_corpus_exits_2_naming_the_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "stdlib_root", lambda: tmp_path / "no-stdlib")
    assert main(["train", "--steps", "1", "--out", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"looked for the directory {tmp_path / 'no-stdlib'}" in err and "Traceback" not in err


def test_recipes_lists_every_recipe(capsys):
    from mixprec.policy import recipes
    assert main(["recipes"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == recipes()


# ---- the command line's layout, --version, explain --------------------------------------------
def test_version_names_mixprec_and_torch(capsys):
    import mixprec as mp
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"mixprec {mp.__version__} (torch {torch.__version__})\n"


def test_the_console_script_and_python_dash_m_are_mixprec_cli():
    import tomllib
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"mixprec": "mixprec.cli:main"}
    assert "from mixprec.cli import main" in (root / "src" / "mixprec" / "__main__.py").read_text()


@pytest.mark.parametrize("model, sizes", [("gpt", ["--n-layer", "2", "--d-model", "64", "--head", "separate"]),
                                          ("cnn", ["--channels", "8"]), ("lstm", ["--hidden", "16"])])
def test_explain_prints_what_mp_explain_prints_for_the_built_in_model(model, sizes, capsys):
    import mixprec as mp
    from mixprec.train.models import build_model, model_config
    assert main(["explain", "--model", model, "--recipe", "fp16-mixed", *sizes]) == 0
    keys = {"--n-layer": "n_layer", "--d-model": "d_model", "--head": "head", "--channels": "channels",
            "--hidden": "hidden"}
    given = {keys[f]: (v if f == "--head" else int(v)) for f, v in zip(sizes[::2], sizes[1::2])}
    expected = mp.explain(mp.Policy.from_recipe("fp16-mixed"), build_model(model_config(model, **given)))
    assert capsys.readouterr().out == expected + "\n"
    assert main(["explain", "--recipe", "bf16-true"]) == 0
    assert capsys.readouterr().out == mp.explain("bf16-true") + "\n"


@pytest.mark.parametrize("argv, message", [
    (["explain", "--model", "gpt", "--channels", "8"], "--channels does not apply to --model gpt; its sizes are: "
                                                       "--n-layer, --n-head, --d-model, --seq-len, --positions"),
    (["explain", "--hidden", "8"], "--hidden sets a size of a model: give --model (one of: gpt, cnn, lstm, gru)"),
    (["train", "--model", "cnn", "--n-head", "2"], "--n-head does not apply to --model cnn; its sizes are: --channels"),
    (["compare", "--model", "lstm", "--positions", "rotary"], "--positions does not apply to --model lstm"),
    (["train", "--recipe", "bf16-mixed", "--rounding", "stochastic"],
     "--rounding applies to BF16/FP16 parameters updated in place (bf16-true); recipe bf16-mixed keeps FP32 "
     "parameters, so its updates are not rounded: drop --rounding"),
    (["compare", "--recipes", "fp32,fp16-true", "--rounding", "kahan"], "--rounding applies to BF16/FP16 parameters"),
    (["train", "--optim", "sgd"], "Unknown optim 'sgd'; choose one of: adamw, adamw-bf16, adamw-int8, adamw-int4"),
    (["compare", "--optims", "adamw,lion"], "Unknown optim 'lion'; choose one of: adamw, adamw-bf16,"),
    (["compare", "--optims", "adamw,adamw"], "--optims names an optim twice: adamw,adamw"),
    (["compare", "--optim", "adamw", "--optims", "adamw,adamw-int8"], "give --optim or --optims, not both"),
    (["compare", "--size", "tpu"], "Unknown size 'tpu'; choose one of: cpu, gpu"),
    (["compare", "--size", "gpu", "--model", "cnn"], "--size gpu sets the GPT's sizes; --model cnn has one size"),
    (["train", "--recipe", "fp32", "--allow-no-fp8"], "--allow-no-fp8 applies to FP8 and INT8 recipes; recipe fp32 converts no"),
    (["bench", "--model", "bert", "--device", "cpu"], "Unknown model 'bert'; choose one of: llama, gpt2, resnet50, "
                                                      "vit, gpt"),
    (["bench", "--recipe", "fp8-blockwise", "--device", "cpu"], "Unknown recipe 'fp8-blockwise' for bench; choose "
                                                                "one of: bf16-mixed, fp16-mixed"),
    (["bench", "--rounds", "0", "--device", "cpu"], "--rounds must be an integer >= 1; got 0"),
    (["bench", "--device", "tpu"], "Unknown device 'tpu'; choose one of: cuda, cpu"),
    (["bench", "--model", "vit", "--fused-head-loss", "--device", "cpu"], "--fused-head-loss applies to the Hugging "
                                                                          "Face causal LMs (llama, gpt2); 'vit'"),
])
def test_flags_that_do_not_apply_or_name_nothing_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err


# ---- optimizers --------------------------------------------------------------------------------
def test_train_with_a_low_bit_optimizer_and_resume_must_match_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "bf16-true", "--optim", "adamw-int8", "--steps", "2", "--out", str(out),
                 *TINY]) == 0
    printed = capsys.readouterr().out
    assert ("optimizer: adamw-int8, mixprec.optim.AdamW (INT8 moments), stochastic rounding of the half parameters"
            in printed)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["config"]["optim"] == "adamw-int8"
    assert main(["train", "--resume", str(out), "--steps", "3", "--optim", "adamw", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with optim='adamw-int8'" in err and "asks for optim='adamw'" in err
    assert main(["train", "--resume", str(out), "--steps", "3", "--rounding", "kahan", "--quiet"]) == 2
    assert "holds a run with rounding=None" in capsys.readouterr().err
    # the recipe's default, named: the same run
    assert main(["train", "--resume", str(out), "--steps", "3", "--rounding", "stochastic", "--quiet"]) == 0


def test_compare_puts_optimizers_side_by_side(tmp_path, capsys):
    out = tmp_path / "optims"
    assert main(["compare", "--recipes", "bf16-mixed,bf16-true", "--optims", "adamw,adamw-int8", "--steps", "3",
                 "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    names = ["bf16-mixed+adamw", "bf16-mixed+adamw-int8", "bf16-true+adamw", "bf16-true+adamw-int8"]
    with (out / "table.csv").open() as f:
        assert [r["recipe"] for r in csv.DictReader(f)] == names
    runs = json.loads((out / "curves.json").read_text())["runs"]
    assert list(runs) == names and all((out / name / "metrics.jsonl").is_file() for name in names)
    assert runs["bf16-mixed+adamw"]["optimizer"] == "torch.optim.AdamW (FP32 moments)"
    assert runs["bf16-true+adamw-int8"]["optimizer"] == ("mixprec.optim.AdamW (INT8 moments), stochastic rounding "
                                                         "of the half parameters")
    assert runs["bf16-mixed+adamw"]["train_loss"][:1] == runs["bf16-mixed+adamw-int8"]["train_loss"][:1]  # same start
    assert runs["bf16-mixed+adamw"]["train_loss"] != runs["bf16-mixed+adamw-int8"]["train_loss"]
    assert "optimizer of bf16-mixed+adamw: torch.optim.AdamW (FP32 moments)" in printed
    assert "val vs bf16-mixed+adamw" in printed          # no fp32 row: the first row is the reference


def test_compare_without_matplotlib_says_how_to_get_the_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)    # import matplotlib raises ImportError
    out = tmp_path / "noplot"
    assert main(["compare", "--recipes", "fp32", "--steps", "1", "--out", str(out), *TINY]) == 0
    assert ("plot: not written: matplotlib is not installed; get it with pip install 'mixprec[plot]'"
            in capsys.readouterr().out)
    assert not (out / "loss_curves.png").exists() and (out / "table.md").is_file()


# ---- compare's sizes -----------------------------------------------------------------------------
def test_compare_on_cuda_defaults_to_the_gpu_size_where_fp8_converts(monkeypatch):
    """--device cuda picks --size gpu: the 12-layer d_model 1024 GPT, FP8 among the recipes, and every block
    Linear layer in FP8 under the default filter (checked on the meta device); flags override the size."""
    from mixprec.cli import build_parser
    from mixprec.fp8.config import Float8Config
    from mixprec.fp8.convert import default_filter
    from mixprec.train import commands, memory
    from mixprec.train.models import build_model
    monkeypatch.setattr(commands, "require_device", lambda device: None)
    monkeypatch.setattr(memory, "check_fits", lambda cfg: None)
    job = commands.setup_compare(build_parser().parse_args(["compare", "--device", "cuda", "--steps", "200"]))
    cfg = job.base
    assert job.size == "gpu" and cfg.device == "cuda" and cfg.steps == 200 and cfg.eval_every == 33
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.seq_len, cfg.batch_size) == (12, 16, 1024, 1024, 8)
    assert [r.name for r in job.rows] == ["fp32", "fp16-noscale", "fp16-mixed", "bf16-mixed", "fp8-tensorwise"]
    with torch.device("meta"):
        model = build_model(cfg.model_config())
    rule = default_filter(model, Float8Config(recipe="tensorwise"))
    converted = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and rule(n, m) is None]
    assert len(converted) == 4 * 12                             # qkv, proj and the MLP's two, in every block
    job = commands.setup_compare(build_parser().parse_args(["compare", "--device", "cpu"]))
    assert job.size == "cpu" and job.base.d_model is None and [r.name for r in job.rows][-1] == "bf16-mixed"


# ---- bench ---------------------------------------------------------------------------------------
def test_bench_runs_on_the_cpu_at_tiny_size_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--model", "gpt", "--device", "cpu", "--tiny", "--steps", "1", "--rounds", "3",
                 "--warmup", "1", "--json", str(path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    rounds = [line for line in printed if line.startswith("round ")]
    assert len(rounds) == 3 and all("torch.autocast" in r and "mixprec" in r and "tokens/s" in r for r in rounds)
    result = json.loads(path.read_text())
    assert result["model"] == "gpt" and result["recipe"] == "bf16-mixed" and result["device"] == "cpu"
    assert len(result["ratios"]) == 3 and result["ratio"] == sorted(result["ratios"])[1]     # the median
    assert set(result["items_per_s"]) == {"torch.autocast", "mixprec"} and result["peak_memory_ratio"] is None
    assert result["command"].startswith("mixprec bench --model gpt") and result["graph_breaks"] is None  # eager
    assert printed[-2].startswith(f"mixprec / torch.autocast: {result['ratio']:.3f}x tokens/s (median of the 3 "
                                  f"per-round ratios)")
    assert printed[-1] == f"json: {path}"


def test_bench_counts_the_graph_breaks_that_dynamo_counts():
    from mixprec.train.bench import graph_break_count

    def broken(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2

    torch._dynamo.reset()
    before = graph_break_count()
    assert torch.equal(torch.compile(broken, backend="eager")(torch.ones(3)), torch.full((3,), 4.0))
    assert graph_break_count() - before == 1


def test_bench_fused_head_loss_runs_a_hugging_face_model(tmp_path, capsys):
    pytest.importorskip("transformers", reason="needs transformers (pip install 'mixprec[transformers]')")
    path = tmp_path / "bench.json"
    assert main(["bench", "--model", "llama", "--fused-head-loss", "--device", "cpu", "--tiny", "--steps", "1",
                 "--rounds", "1", "--warmup", "1", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["fused_head_loss"] is True
    assert "llama (tiny), fused head loss, bf16-mixed" in capsys.readouterr().out


def test_bench_profile_writes_traces_and_the_variants_side_by_side(tmp_path, capsys):
    path, prof = tmp_path / "bench.json", tmp_path / "prof"
    assert main(["bench", "--model", "gpt", "--device", "cpu", "--tiny", "--steps", "1", "--rounds", "1",
                 "--warmup", "1", "--json", str(path), "--profile", str(prof)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"profile: {prof / 'kernels.md'}")
    for variant in ("torch.autocast", "mixprec"):
        assert json.loads((prof / f"trace-{variant}.json").read_text())["traceEvents"]
    profile = json.loads(path.read_text())["profile"]
    assert profile["unit"] == "op" and profile["steps"] == 3 and set(profile["totals"]) == {"torch.autocast", "mixprec"}
    differences = [abs(r["mixprec us"] - r["torch.autocast us"]) for r in profile["rows"]]
    assert differences == sorted(differences, reverse=True)
    # the fused head loss is mixprec's own autograd function: only its column has it
    head = next(r for r in profile["rows"] if r["name"] == "_HeadCrossEntropy")
    assert head["mixprec launches"] == 1 and head["torch.autocast launches"] == 0
    table = (prof / "kernels.md").read_text()
    assert "| **total** |" in table and "`_HeadCrossEntropy`" in table


def test_profile_steps_counts_each_op_per_step(tmp_path):
    from mixprec.train.bench_profile import profile_steps

    a, b = torch.randn(64, 64), torch.randn(64, 64)
    result = profile_steps(lambda: (a @ b) @ b, 3, torch.device("cpu"), tmp_path / "trace.json")
    assert result["rows"]["aten::mm"]["launches"] == 2            # two GEMMs per step, over 3 steps
    assert result["total_us"] == pytest.approx(sum(r["us"] for r in result["rows"].values()))
    assert (tmp_path / "trace.json").stat().st_size > 0


def test_bench_profile_into_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    assert main(["bench", "--device", "cpu", "--tiny", "--profile", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert "--profile" in err and "is a file, not a directory" in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_bench_without_a_gpu_exits_2_naming_the_way_out(capsys):
    assert main(["bench", "--model", "gpt"]) == 2
    err = capsys.readouterr().err
    assert "mixprec bench times training on a CUDA GPU" in err and "give --device cpu" in err
    assert err.count("\n") == 1
