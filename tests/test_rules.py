"""The precision table as data: built-in rows, user rules, their precedence and the op table."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixprec import rules
from mixprec.rules import Precision


@pytest.fixture(autouse=True)
def _clean_registry():
    rules.reset()
    yield
    rules.reset()


def test_builtin_rows_match_what_they_say():
    assert rules.rule_for_module("ln", nn.LayerNorm(4), None).precision is Precision.FP32_CAST_BACK
    assert rules.rule_for_module("bn", nn.BatchNorm2d(4), None).precision is Precision.FP32_CAST_BACK
    assert rules.rule_for_module("emb", nn.Embedding(4, 4), "embedding").precision is Precision.FP32
    assert rules.rule_for_module("lm_head", nn.Linear(4, 4), "head").precision is Precision.FP32_OUTPUT
    assert rules.rule_for_module("gru", nn.GRU(4, 4), None).precision is Precision.FP32
    assert rules.rule_for_module("lstm", nn.LSTM(4, 4), None).precision is Precision.HALF
    assert rules.rule_for_module("fc", nn.Linear(4, 4), None).precision is Precision.HALF
    assert rules.rule_for_module("act", nn.GELU(), None) is None
    for rule in (*rules.BUILTIN_MODULE_RULES, *rules.BUILTIN_OP_RULES):
        assert rule.why, rule.what                     # every row says why
    table = rules.op_table()
    assert table[F.softmax].precision is Precision.FP32 and table[F.cross_entropy].precision is Precision.FP32
    assert table[F.layer_norm].precision is Precision.FP32_CAST_BACK
    assert rules.op_table(builtin=False) == {}


def test_user_rules_come_first_and_reset_forgets_them():
    class MyNorm(nn.Module):
        pass

    rules.keep_fp32("blocks.0.mlp", torch.erf)
    rules.register_norm(MyNorm)
    rules.allow_half(F.softmax)
    assert rules.rule_for_module("x", MyNorm(), None).precision is Precision.FP32_CAST_BACK
    assert rules.rule_for_module("blocks.0.mlp", nn.Sequential(), None).precision is Precision.FP32
    assert rules.op_table()[torch.erf].precision is Precision.FP32
    assert rules.op_table()[F.softmax].precision is Precision.HALF        # overrides the built-in row
    assert set(rules.op_table(builtin=False)) == {torch.erf, F.softmax}
    assert [r.what for r in rules.user_op_rules()] == ["softmax", "erf"]  # newest first
    rules.reset()
    assert rules.op_table()[F.softmax].precision is Precision.FP32 and torch.erf not in rules.op_table()
    assert rules.rule_for_module("x", MyNorm(), None) is None


def test_bad_targets_are_refused():
    with pytest.raises(TypeError, match="nn.Module class, a module name or a matcher"):
        rules.keep_fp32(3)
    with pytest.raises(TypeError, match="register_norm takes nn.Module classes"):
        rules.register_norm("RMSNorm")


def test_a_matcher_sees_name_module_and_role():
    seen = []
    rules.keep_fp32(lambda name, module, role: seen.append((name, role)) or name == "b")
    assert rules.rule_for_module("b", nn.Identity(), "head").what == "<lambda>"
    assert ("b", "head") in seen
