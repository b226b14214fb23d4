"""mp.explain: the table as text, and where each module of a model lands."""
import torch

import mixprec as mp
from helpers import MLP, TinyGPT, TinyRNNLM


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


def test_params_column_shows_the_casts():
    text = mp.explain("bf16-true", MLP())
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith(("fc1", "norm"))}
    assert "bfloat16" in lines["fc1"] and "float32" in lines["norm"]
