"""What an FP8 or INT8 recipe did to a model: how many Linear layers run in FP8 (INT8), and, when none
does, why and which size would change that (checked with the convert module's default filter, not
guessed). INT8 converts with FP8's filter, so the same layers stay in high precision; only the shape
rule differs (multiples of 8 for INT8 GEMMs, 16 for FP8's)."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from mixprec.fp8.config import Float8Config
from mixprec.fp8.convert import SHAPE_MULTIPLE as FP8_MULTIPLE
from mixprec.fp8.convert import default_filter as fp8_filter
from mixprec.fp8.convert import report as fp8_report
from mixprec.int8.config import Int8Config
from mixprec.int8.convert import SHAPE_MULTIPLE as INT8_MULTIPLE
from mixprec.int8.convert import default_filter as int8_filter
from mixprec.int8.convert import report as int8_report
from mixprec.policy import Policy
from mixprec.train.config import TrainConfig
from mixprec.train.models import build_model

_D_MODEL_LIMIT = 16384   # the widest GPT the hint considers
# convert's reasons for keeping a layer in high precision, as a count reads them ("4 below min_features=256")
_KIND_TEXT = {"small": "below min_features={min_features}", "output head": "output head"}


@dataclass(frozen=True)
class Fp8Coverage:
    """What convert did to a model's Linear layers."""

    fp8: int                # Linear layers that mp.prepare put in FP8 (in INT8, for an INT8 recipe)
    total: int              # Linear layers of the model
    kept: dict[str, int]    # why the others stay in high precision: count per kind of reason


def _kind(config: Float8Config | Int8Config | None):
    """(label, default filter, shape multiple of the GEMMs) of a converter config."""
    if isinstance(config, Int8Config):
        return "INT8", int8_filter, INT8_MULTIPLE
    return "FP8", fp8_filter, FP8_MULTIPLE


def coverage(model: nn.Module) -> Fp8Coverage:
    """What convert did (read from the FP8 report, else the INT8 one: a Policy has at most one)."""
    decisions = [(d, d.fp8) for d in fp8_report(model)] or [(d, d.int8) for d in int8_report(model)]
    kept = Counter(_reason_kind(d.reason) for d, low in decisions if not low)
    return Fp8Coverage(sum(low for _, low in decisions), len(decisions), dict(kept))


def fp8_coverage(model: nn.Module) -> tuple[int, int]:
    """(Linear layers that mp.prepare put in FP8 or INT8, Linear layers): FP8 and INT8 recipes leave small
    layers, the head and the attention scores in high precision (the convert modules' default filter)."""
    cov = coverage(model)
    return cov.fp8, cov.total


def converter(policy: Policy) -> Float8Config | Int8Config | None:
    """The policy's FP8 or INT8 config (a Policy has at most one), or None."""
    return policy.fp8 or policy.int8


def refuse_no_conversion(cfg: TrainConfig, policy: Policy, model: nn.Module) -> None:
    """ValueError (one line, with the way out) when an FP8 or INT8 policy converted no Linear layer of the
    prepared `model`: the run would compute as bf16-mixed under another name."""
    config = converter(policy)
    if config is not None and fp8_coverage(model)[0] == 0:
        raise ValueError(describe(cfg, config, model, "this run would compute") + "; or give --recipe "
                         "bf16-mixed (the same computation), or --allow-no-fp8 to train it anyway")


def _reason_kind(reason: str) -> str:
    """convert's reasons carry sizes ("small: min(in, out) = 32 < ..."); the kind before the colon or
    parenthesis groups them."""
    return reason.split(":")[0].split(" (")[0]


def describe(cfg: TrainConfig, config: Float8Config | Int8Config, model: nn.Module,
             computes: str = "this run computes") -> str:
    """One line: what recipe cfg.recipe did to this model; when it converted nothing, what the run
    `computes` as and the --d-model (GPT) that gives FP8 (INT8) layers, or that no size does."""
    label, _, multiple = _kind(config)
    cov = coverage(model)
    why = ", ".join(f"{n} {_KIND_TEXT.get(kind, kind).format(min_features=config.min_features)}"
                    for kind, n in cov.kept.items())
    text = f"{cfg.recipe} converted {cov.fp8} of {cov.total} Linear layers of {cfg.model}"
    if why:
        text += f" ({why} kept in high precision)"
    if cov.fp8:
        return text
    text += f"; {computes} as bf16-mixed"
    d_model = convertible_d_model(cfg, config)
    if d_model is not None:
        return text + f"; --d-model {d_model} (or a larger multiple of {multiple}) puts its block layers in {label}"
    gpt_d_model = convertible_d_model(TrainConfig(model="gpt"), config)
    why = " (its only Linear layer is the output head)" if set(cov.kept) == {"output head"} else ""
    return text + f"; no size of {cfg.model} changes that{why}: {label} needs --model gpt --d-model {gpt_d_model}"


def convertible_d_model(cfg: TrainConfig, config: Float8Config | Int8Config) -> int | None:
    """The smallest --d-model above cfg's at which the default filter puts some Linear layer of the GPT in
    FP8 or INT8 (None for other models). Candidates are multiples of 16 (FP8 GEMMs; 8 for INT8) and of
    --n-head, from min_features up (smaller layers are never converted); each is checked on a model built
    on the meta device (no memory)."""
    if cfg.model != "gpt":
        return None
    _, default_filter, multiple = _kind(config)
    m = cfg.model_config()
    step = math.lcm(multiple, m.n_head * (2 if m.positions == "rotary" else 1))   # rotary needs even head sizes
    start = max(m.d_model + 1, config.min_features)
    for d_model in range(-(-start // step) * step, _D_MODEL_LIMIT + 1, step):
        with torch.device("meta"):
            model = build_model(cfg.replace(d_model=d_model).model_config())
        rule = default_filter(model, config)
        if any(rule(name, layer) is None for name, layer in model.named_modules() if isinstance(layer, nn.Linear)):
            return d_model
    return None
