"""TrainConfig: everything that defines a training run, validated; and what a resume may change."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

from mixprec.diagnostics.recommend import policy_from_dict
from mixprec.policy import Policy, recipes
from mixprec.train import guarding, optimizers
from mixprec.train.models import MODELS, ModelConfig, model_config

DEVICES = ("cpu", "cuda")
TASKS = ("default", "small-grad", "faults")   # faults: see faults.py
# The small-gradient task multiplies the loss by 2**-14 (~6.1e-5). Typical activation gradients of the
# default GPT are 1e-7..1e-3; times 2**-14 they fall below FP16's smallest subnormal (2**-24 ~ 6e-8) and
# flush to zero without loss scaling, while the default dynamic scale (2**16) brings them back into
# FP16's normal range. A power of two, so FP32 runs are exactly the default task's (Adam's eps and the
# clipping threshold are multiplied by the same factor, and Adam is invariant to the gradients' scale).
SMALL_GRAD_FACTOR = 2.0 ** -14

MAX_SEED = 2 ** 32 - 1

# Fields that fix the trajectory or the tensor shapes: a resumed run must match the checkpoint on these.
RESUME_MUST_MATCH = ("model", "policy", "recipe", "optim", "rounding", "seed", "batch_size", "task", "n_layer", "n_head",
                     "d_model", "seq_len", "positions", "head", "attention", "channels", "hidden")
RESUME_MUST_MATCH += guarding.GUARD_FLAGS


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run. Model sizes left as None take the model's defaults (see models.py)."""

    model: str = "gpt"
    recipe: str = "bf16-mixed"
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3            # AdamW peak LR; small byte-level models tolerate 1e-3..3e-3
    weight_decay: float = 0.1   # on matrices only, as GPT-3 and LLaMA train
    grad_clip: float = 1.0      # global norm clip: the usual GPT setting
    warmup: int | None = None   # linear warm-up steps; None: 10 % of steps
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0
    task: Literal["default", "small-grad", "faults"] = "default"
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    ckpt_every: int = 100       # checkpoint cadence in steps (also at the end, and on Ctrl-C or SIGTERM); 0: only
                                # then. 100: a default run of 300 steps loses at most a third of itself
    out: str = "runs/train"
    compile: bool = False       # torch.compile the model's blocks (the fused head + loss stays eager)
    optim: str = "adamw"        # one of optimizers.OPTIMS: AdamW and where its moments live
    rounding: str | None = None  # how half parameters take the update; None: the recipe's default
                                 # (stochastic for bf16-true; see optimizers.py)
    # A policy read from a file (`train --policy`), as policy_to_dict writes it; None: the named recipe's.
    # With one, `recipe` only labels the run (the policy's name): the policy itself travels in the config.
    policy: dict[str, Any] | None = None
    # model sizes (None: the model's default)
    n_layer: int | None = None
    n_head: int | None = None
    d_model: int | None = None
    seq_len: int | None = None
    positions: str | None = None
    head: str | None = None
    attention: str | None = None
    channels: int | None = None
    hidden: int | None = None
    # the stability guard (guarding.py); the defaults are mp.StabilityGuard's
    guard: str = "off"
    spike_sigma: float = 6.0
    window: int = 128
    snapshot_every: int | None = None   # --guard rollback's snapshot cadence; None: guarding.snapshot_every(steps)
    embedding_grad_shrink: float | None = None
    diagnose_events: bool = False   # attach mp.diagnose's view of the batch to each guard event (no effect on training)

    def __post_init__(self) -> None:
        _choice("model", self.model, MODELS)
        if self.policy is None:
            _choice("recipe", self.recipe, tuple(recipes()))
        elif not isinstance(self.recipe, str) or not self.recipe:
            raise ValueError(f"recipe must name the policy (a non-empty string); got {self.recipe!r}")
        _choice("device", self.device, DEVICES)
        _choice("task", self.task, TASKS)
        _choice("optim", self.optim, optimizers.OPTIMS)
        optimizers.check_rounding(self.rounding, self.precision_policy(), self.recipe)
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False; got {self.compile!r}")
        if self.ckpt_every < 0:
            raise ValueError(f"ckpt_every must be >= 0 (0: only at the end); got {self.ckpt_every}")
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            raise ValueError(f"warmup must lie in [0, steps={self.steps}]; got {self.warmup}")
        _number("lr", self.lr, "a finite number > 0, e.g. 2e-3", lambda v: v > 0)
        _number("weight_decay", self.weight_decay, "a finite number >= 0, e.g. 0.1", lambda v: v >= 0)
        _number("grad_clip", self.grad_clip, "a finite number > 0, e.g. 1.0", lambda v: v > 0)
        # numpy's generators take seeds >= 0, and 2**32 - 1 is the largest seed every generator here accepts
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, {MAX_SEED}] (2**32 - 1); got {self.seed!r}")
        self.model_config()  # validates the sizes (e.g. d_model a multiple of n_head)
        guarding.check_fields(self)

    def model_config(self) -> ModelConfig:
        return model_config(self.model, **{f: getattr(self, f) for f in
                                           ("n_layer", "n_head", "d_model", "seq_len", "positions", "head",
                                            "attention", "channels", "hidden")})

    def precision_policy(self) -> Policy:
        """The Policy this run trains under: the policy file's, else the named recipe's."""
        if self.policy is None:
            return Policy.from_recipe(self.recipe)
        return policy_from_dict(self.policy, source="the run's policy")

    @property
    def seq_len_or_default(self) -> int:
        return getattr(self.model_config(), "seq_len", 1)

    @property
    def effective_rounding(self) -> str:
        return optimizers.effective_rounding(self.rounding, self.precision_policy())

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else self.steps // 10

    @property
    def loss_factor(self) -> float:
        return SMALL_GRAD_FACTOR if self.task == "small-grad" else 1.0

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resumed_config(saved: dict[str, Any], overrides: dict[str, Any], resume_dir: str) -> TrainConfig:
    """The config of a resumed run: the checkpoint's, with the given overrides.

    Overrides of the fields in RESUME_MUST_MATCH must equal the checkpoint's (else ValueError naming
    both; a rounding is compared as it acts, the recipe's default included; a policy from a file as the
    Policy it reads as); the rest (steps, lr, device, cadences, out) may change. A run trained under a
    policy file resumes under it: a --recipe is refused. A checkpoint written before runs recorded
    their optimizer was trained with torch's AdamW, rounding to nearest.
    """
    saved_policy = _saved_policy(saved)
    if "optim" not in saved:
        in_place = saved_policy is not None and optimizers.rounds_in_place(saved_policy)
        saved = {**saved, "optim": "adamw", "rounding": "nearest" if in_place else None}
    asked = overrides.get("policy")
    if (asked is not None and asked != saved.get("policy")) or (
            asked is None and saved.get("policy") is not None and overrides.get("recipe") is not None):
        raise ValueError(f"--resume {resume_dir} holds a run under {_describe_policy(saved)}; this run asks for "
                         f"{_describe_policy(overrides)}: drop --recipe/--policy (the run keeps its own), or start "
                         f"a fresh run with --out")
    # a checkpoint written before runs recorded their guard ran without one
    saved = {**{f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in guarding.GUARD_FLAGS}, **saved}
    for name in RESUME_MUST_MATCH:
        if name not in overrides or overrides[name] is None:
            continue
        if name == "rounding" and saved_policy is not None:
            if optimizers.effective_rounding(saved.get(name), saved_policy) == overrides[name]:
                continue
        if overrides[name] != saved.get(name):
            raise ValueError(f"--resume {resume_dir} holds a run with {name}={saved.get(name)!r} "
                             f"(model {saved.get('model')}, recipe {saved.get('recipe')}); this run asks for "
                             f"{name}={overrides[name]!r}: drop that flag, or start a fresh run with --out")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    merged = {k: v for k, v in saved.items() if k in fields}
    merged.update({k: v for k, v in overrides.items() if v is not None and k in fields})
    return TrainConfig(**merged)


def _saved_policy(saved: dict[str, Any]) -> Policy | None:
    """The Policy a saved config trained under (None for an unknown recipe: the config check names it)."""
    if saved.get("policy") is not None:
        return policy_from_dict(saved["policy"], source="the checkpoint's policy")
    return Policy.from_recipe(saved["recipe"]) if saved.get("recipe") in recipes() else None


def _describe_policy(config: dict[str, Any]) -> str:
    if config.get("policy") is None:
        return f"recipe {config.get('recipe')}"
    return f"the policy {config.get('recipe')} from a file ({policy_from_dict(config['policy']).describe()})"


def _number(field: str, value: object, expected: str, valid: Callable[[float], bool]) -> None:
    """A float field: finite (argparse's float() accepts 'inf' and 'nan') and in its range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not valid(value):
        raise ValueError(f"{field} must be {expected}; got {value!r}")


def _choice(field: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {field} {value!r}; choose one of: {', '.join(choices)}")
