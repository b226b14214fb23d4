"""mp.explain: the table as text, and where each module of a model lands."""
import torch

import mixprec as mp
from helpers import MLP, TinyGPT, TinyRNNLM
from mixprec.int8 import Int8Linear


def test_explain_lists_rules_and_modules():
    text = mp.explain("fp16-mixed", TinyRNNLM("gru"))
    assert "RNN, GRU" in text and "recurrence accumulates error" in text
    assert "rnn" in text and "GRU" in text and "head" in text
    assert "pure half" in mp.explain(mp.Policy.from_opt_level("O3"))


def test_an_unprepared_model_is_explained_on_a_copy():
    model = TinyGPT()
    text = mp.explain("bf16-mixed", model)
    assert "lm_head" in text and "head" in text and "FP32 weights; half GEMM inputs" in text
    assert "tok" in text and "embedding" in text
    assert not any("forward" in m.__dict__ for m in model.modules())   # untouched


def test_fp8_layers_are_listed():
    torch.manual_seed(0)
    text = mp.explain("fp8-blockwise", TinyGPT(dim=256))
    assert "Linear layers in FP8" in text and "output head" in text


def test_int8_layers_are_listed():
    # through the Policy.converters seam: the module table names Int8Linear, then convert's decisions
    torch.manual_seed(0)
    model = TinyGPT(dim=256)
    text = mp.explain("int8-switchback", model)
    assert "INT8 switchback (INT8 matmuls: output/grad_input; auto)" in text
    classes = {}   # the module table's class column (convert's table, after it, repeats the names)
    for line in text.splitlines():
        if line.startswith("blocks.0."):
            classes.setdefault(line.split()[0], line.split()[1])
    assert classes["blocks.0.qkv"] == "Int8Linear" and classes["blocks.0.fc2"] == "Int8Linear"
    assert "8 of 9 Linear layers in INT8" in text
    assert "converted (switchback; INT8 output/grad_input)" in text and "output head (named 'lm_head')" in text
    assert not any(isinstance(m, Int8Linear) for m in model.modules())   # explained on a copy


def test_params_column_shows_the_casts():
    text = mp.explain("bf16-true", MLP())
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith(("fc1", "norm"))}
    assert "bfloat16" in lines["fc1"] and "float32" in lines["norm"]
