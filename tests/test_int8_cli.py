"""INT8 recipes at the command line: refused (with a hint that works) where they convert nothing, as FP8
recipes are; compared side by side with bf16-mixed; a trained INT8 run's checkpoint loads into a converted
model and into a plain one, and resumes."""
import json

import pytest
import torch
from torch import nn

import mixprec as mp
from mixprec.cli import main
from mixprec.int8 import Int8Linear
from mixprec.train.checkpoint import load_checkpoint
from mixprec.train.config import TrainConfig
from mixprec.train.models import build_model

COMMON = ["--batch-size", "2", "--eval-batches", "1", "--quiet"]
TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "32", "--seq-len", "16", *COMMON]
# the smallest GPT whose block layers reach min_features 256: qkv, proj and the MLP's two go INT8
CONVERTS = ["--n-layer", "1", "--n-head", "2", "--d-model", "256", "--seq-len", "16", *COMMON]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_int8_recipe_that_converts_nothing_is_refused_with_a_hint_that_works(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "int8-rowwise", "--steps", "1", "--out", str(out), *TINY]) == 2
    err = _one_line(capsys.readouterr().err)
    assert ("int8-rowwise converted 0 of 5 Linear layers of gpt (4 below min_features=256, 1 output head kept in "
            "high precision); this run would compute as bf16-mixed; --d-model 256 (or a larger multiple of 8) puts "
            "its block layers in INT8") in err
    assert "--allow-no-fp8" in err and not out.exists()
    assert main(["train", "--recipe", "int8-switchback", "--steps", "1", "--out", str(out), "--allow-no-fp8",
                 *TINY]) == 0
    assert "INT8: int8-switchback converted 0 of 5 Linear layers of gpt" in capsys.readouterr().out


def test_compare_notes_an_int8_row_that_computes_as_bf16(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--recipes", "bf16-mixed,int8-rowwise", "--steps", "1", "--out", str(out), *TINY]) == 0
    note = ("int8-rowwise converted 0 of 5 Linear layers of gpt (4 below min_features=256, 1 output head kept in "
            "high precision); this row computes as bf16-mixed; --d-model 256")
    assert note in capsys.readouterr().out and note in (out / "table.md").read_text()


def test_compare_runs_int8_recipes_and_says_how_much_is_int8(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--recipes", "bf16-mixed,int8-rowwise", "--steps", "2", "--out", str(out),
                 *CONVERTS]) == 0
    printed = capsys.readouterr().out
    assert "int8-rowwise: 4 of 5 Linear layers in INT8" in printed     # qkv, proj, 2 MLP; the tied head stays
    runs = json.loads((out / "curves.json").read_text())["runs"]
    assert runs["int8-rowwise"]["fp8_layers"] == [4, 5] and runs["bf16-mixed"]["fp8_layers"] is None
    assert runs["int8-rowwise"]["train_loss"] != runs["bf16-mixed"]["train_loss"]   # INT8 GEMMs did run


def test_trained_int8_checkpoint_loads_into_converted_and_plain_models_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "int8-rowwise", "--steps", "2", "--out", str(out), *CONVERTS]) == 0
    state = load_checkpoint(out)
    cfg = TrainConfig(**{k: v for k, v in state["config"].items() if k in TrainConfig.__dataclass_fields__})
    weights = state["model"]
    plain = build_model(cfg.model_config())
    plain.load_state_dict(weights)                       # nn.Linear's keys: a plain model takes it as it is
    converted = mp.prepare(build_model(cfg.model_config()), "int8-rowwise")
    assert sum(isinstance(m, Int8Linear) for m in converted.modules()) == 4
    converted.load_state_dict(weights)
    for name, value in weights.items():
        assert torch.equal(plain.state_dict()[name], value) and torch.equal(converted.state_dict()[name], value), name
    # the same function once unconverted: in FP32 the converted model (INT8 off) and the plain one agree
    x = torch.randint(0, 256, (2, 16))
    mp.unprepare(converted)
    assert not any(isinstance(m, Int8Linear) for m in converted.modules())
    assert all(type(m) is nn.Linear for m in converted.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        assert torch.equal(converted(x), plain(x))
    # and the run resumes from it under its INT8 recipe
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--steps", "3", "--quiet"]) == 0
    assert load_checkpoint(out)["step"] == 3
