"""mixprec in the Hugging Face Transformers `Trainer`: one call on the Trainer you already build.

    trainer = Trainer(model=model, args=TrainingArguments(..., bf16=False, fp16=False), train_dataset=ds)
    prepare_trainer(trainer, "fp16-mixed", state_dtype="int8")
    trainer.train()                   # logs carry loss_scale and skipped_steps; checkpoints carry the scale

`prepare_trainer` works on any Trainer (subclasses such as TRL's included), after its construction and before
train():

- the model: `mixprec.integrations.convert` (mp.prepare: the precision table on Hugging Face modules,
  their RMSNorm classes, `_keep_in_fp32_modules`, tied embeddings and head; FP8 swaps; and a forward run under
  mp.autocast). The Trainer's own mixed precision must be off: TrainingArguments(bf16=True/fp16=True) would
  run accelerate's torch.autocast (and GradScaler) on top, so they are refused with the way out;
- the optimizer: mixprec's AdamW (`optimizer_kwargs` such as state_dtype="int8"; lr, betas, eps and the
  weight-decay groups from the TrainingArguments, as the Trainer builds its own) given through the
  Trainer's `optimizer_cls_and_kwargs`, so the Trainer creates it when it would (after FSDP wrapping). An
  optimizer passed as `optimizers=` or a class in `optimizer_cls_and_kwargs` is kept and wrapped instead.
  Either way it is a `MixprecOptimizer` that steps through the policy's LossScaler;
- loss scaling (FP16 recipes) without a Trainer subclass: the model's outputs scale the gradient in the
  backward pass only (the logged loss is the true one), gradients are unscaled when the backward pass of the
  step that syncs them ends, before the Trainer clips them and logs their norm, and the step is skipped
  after an overflow (mixprec.integrations._scaling). The loss scale rides in the optimizer's state dict,
  so the Trainer's optimizer.pt saves it and resume_from_checkpoint restores it. One difference from the
  Trainer's own GradScaler: the learning-rate scheduler also advances on a skipped step (knowing whether a
  step was skipped costs a host sync per step; a few skips in a run move the schedule by as many steps);
- `MixprecCallback`, first in the callback list so every reporter sees its keys: `loss_scale` and
  `skipped_steps` in the Trainer's logs (and log_history), and the events of a mp.StabilityGuard
  (`prepare_trainer(..., guard={...})`: the guard then takes the optimizer step).
"""
from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import TrainerCallback
from transformers.modeling_outputs import CausalLMOutputWithPast

from mixprec.integrations._scaling import LossScaling, MixprecOptimizer, find_mixprec_optimizer, guard_factory
from mixprec.integrations.converters import PolicyForward, _as_policy, convert
from mixprec.ops.head_loss import head_cross_entropy
from mixprec.optim import AdamW
from mixprec.policy import Policy
from mixprec.scaler import LossScaler

__all__ = ["prepare_trainer", "MixprecCallback", "TrainerOptimizer", "loss_scaler", "fuse_head_loss",
           "unfuse_head_loss", "has_fused_head_loss"]


class TrainerOptimizer(MixprecOptimizer):
    """The optimizer class prepare_trainer hands to the Trainer's `optimizer_cls_and_kwargs`: the Trainer calls
    it with its parameter groups; it builds `optimizer_cls(groups, **kwargs)` and steps it through the loss
    scaler."""

    def __init__(self, params: Any, *, optimizer_cls: type = AdamW, scaling: LossScaling, **kwargs: Any) -> None:
        super().__init__(optimizer_cls(params, **kwargs), scaling)


class MixprecCallback(TrainerCallback):
    """Puts mixprec's numbers into the Trainer's logs: `loss_scale` and `skipped_steps` (when the scaler is on),
    and with a mp.StabilityGuard `guard_events` (its events since the last log) and `guard_last_event`.

    prepare_trainer adds it (first, so that every reporter sees the keys). By hand:
    `Trainer(..., callbacks=[MixprecCallback(scaler)])`.
    """

    def __init__(self, scaler: LossScaler | None = None, *, guard: Any = None, scaling: LossScaling | None = None):
        self.scaling = scaling
        self._scaler, self._guard = scaler, guard
        self._events_logged = 0

    @property
    def scaler(self) -> LossScaler | None:
        return self._scaler if self._scaler is not None else (self.scaling.scaler if self.scaling else None)

    @property
    def guard(self) -> Any:
        return self._guard if self._guard is not None else (self.scaling.guard if self.scaling else None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:     # training logs only (not evaluation or the final summary)
            return
        extra: dict[str, Any] = {}
        scaler = self.scaler
        if scaler is not None and scaler.is_enabled():
            extra["loss_scale"] = scaler.get_scale()              # host syncs, at logging steps only
            extra["skipped_steps"] = scaler.num_skipped_steps
        events = getattr(self.guard, "events", None)
        if events is not None:
            extra["guard_events"] = len(events) - self._events_logged
            if len(events) > self._events_logged:
                extra["guard_last_event"] = str(events[-1])
            self._events_logged = len(events)
        if not extra:
            return
        # Trainer.log appended {**logs, "step": ...} to log_history just before calling on_log: extend it too.
        if state.log_history and all(state.log_history[-1].get(k) == v for k, v in logs.items()):
            state.log_history[-1].update(extra)
        logs.update(extra)


def prepare_trainer(trainer: "transformers.Trainer", policy: Policy | str = "bf16-mixed", *,
                    optimizer_cls: type | None = None, scaler: LossScaler | None = None, guard: Any = None,
                    head: str | None = None, fused_head_loss: bool = False,
                    **optimizer_kwargs: Any) -> "transformers.Trainer":
    """Train `trainer.model` under `policy` with a mixprec optimizer; returns the trainer (changed in place).

    optimizer_cls: the optimizer class (default mp.optim.AdamW); optimizer_kwargs go to it (state_dtype="int8",
        rounding=...), over lr/betas/eps from the TrainingArguments. Ignored when the Trainer already has an
        optimizer (optimizers=) or an optimizer_cls_and_kwargs, which are kept and wrapped.
    scaler: the LossScaler (default mp.LossScaler.for_policy(policy): disabled for BF16 and FP8 recipes).
    guard: the keyword arguments of a mp.StabilityGuard, made for the Trainer's model and optimizer when the
        Trainer makes the optimizer; it then replaces the step (guard.step(loss, scaler=scaler), the loss the
        model returned), its events reach the logs and its state rides in optimizer.pt.
    head: the output head's module name where mp.prepare's guess would be wrong.
    fused_head_loss: a causal LM computes its training loss from the head's input (fuse_head_loss): no logits
        kept, less memory; training outputs carry no logits.
    """
    if not isinstance(trainer, transformers.Trainer):
        raise TypeError(f"prepare_trainer takes a transformers.Trainer; got {type(trainer).__name__}")
    policy = _as_policy(policy)
    args = trainer.args
    on = [name for name in ("fp16", "bf16", "fp16_full_eval", "bf16_full_eval") if getattr(args, name, False)]
    if on:
        raise ValueError(f"TrainingArguments({', '.join(f'{n}=True' for n in on)}) would run accelerate's "
                         f"torch.autocast (and GradScaler) on top of mixprec's policy "
                         f"{policy.name or policy.describe()!r}; set "
                         f"{', '.join(f'{n}=False' for n in on)}: the policy sets the precision")
    if trainer.accelerator.mixed_precision != "no":
        raise ValueError(f"the Trainer's Accelerator runs mixed_precision={trainer.accelerator.mixed_precision!r} "
                         "(set by `accelerate launch --mixed_precision` or ACCELERATE_MIXED_PRECISION); launch with "
                         "--mixed_precision no: the policy sets the precision")
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise ValueError("DeepSpeed runs its own precision and optimizer wrappers; prepare_trainer supports the "
                         "Trainer without DeepSpeed (DDP and FSDP through accelerate)")
    if any(isinstance(cb, MixprecCallback) for cb in trainer.callback_handler.callbacks):
        raise ValueError("this Trainer was already prepared by mixprec")
    if policy.master_weights:
        raise ValueError(f"policy {policy.name or policy.describe()!r} keeps FP32 master weights, but the Trainer "
                         "clips and measures the gradients of model.parameters(), the half copies; use an "
                         "FP32-parameter recipe (fp16-mixed, bf16-mixed, fp8-*) or bf16-true")

    scaling = LossScaling(scaler if scaler is not None else LossScaler.for_policy(policy),
                          is_sync=lambda: trainer.accelerator.sync_gradients,
                          guard_factory=guard_factory(trainer.model, guard))
    convert(trainer.model, policy, head=head, after=scaling.mark)
    if fused_head_loss:
        fuse_head_loss(trainer.model)

    if trainer.optimizer is not None:
        trainer.optimizer = MixprecOptimizer(trainer.optimizer, scaling)
    else:
        if trainer.optimizer_cls_and_kwargs is not None:
            cls, kwargs = trainer.optimizer_cls_and_kwargs
            kwargs = {**kwargs, **optimizer_kwargs}
        else:
            cls = optimizer_cls or AdamW
            kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
                      **optimizer_kwargs}
        trainer.optimizer_cls_and_kwargs = (TrainerOptimizer, {"optimizer_cls": cls, "scaling": scaling, **kwargs})
    callback = MixprecCallback(scaling=scaling)
    trainer.callback_handler.callbacks.insert(0, callback)    # before the reporters, which read the logs
    return trainer


def loss_scaler(trainer_or_optimizer: Any) -> LossScaler:
    """The LossScaler of a prepared Trainer (or of its optimizer)."""
    if isinstance(trainer_or_optimizer, transformers.Trainer):
        for cb in trainer_or_optimizer.callback_handler.callbacks:
            if isinstance(cb, MixprecCallback) and cb.scaler is not None:
                return cb.scaler
        raise ValueError("this Trainer was not prepared by mixprec.integrations.transformers.prepare_trainer")
    found = find_mixprec_optimizer(trainer_or_optimizer)
    if found is None:
        raise ValueError(f"{type(trainer_or_optimizer).__name__} is not a mixprec-prepared optimizer")
    return found.scaler


# ---- the output head fused into the loss ------------------------------------------------------------------
# Config fields of Hugging Face models whose logits are not plain head(hidden): the fused loss would differ.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                     "mup_width_multiplier", "lm_head_multiplier")
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
# Rows per chunk: one chunk's FP32 logits take about this many bytes.
_CHUNK_BYTES = 256 * 2 ** 20


def fuse_head_loss(model: nn.Module) -> nn.Module:
    """Compute a Hugging Face causal LM's training loss from the head's input, without materialising logits.

        model = mixprec.integrations.transformers.fuse_head_loss(model)   # after mp.prepare / convert
        loss = model(input_ids, labels=labels).loss                        # the same loss, logits None

    In training mode with `labels`, the model's forward runs its base model and then
    `mp.ops.head_cross_entropy(hidden, lm_head, shifted labels, chunk_rows=...)`: the output head and the loss
    in FP32 as the precision table wants, a chunk of tokens at a time, so that no (tokens x vocab) tensor is
    kept for the backward (Hugging Face's own path keeps the logits and an FP32 copy of them). The loss is
    Hugging Face's causal LM loss (labels shifted left, -100 ignored, `num_items_in_batch` honoured); the
    output's `logits` is None. Evaluation mode, or no labels: the model's own forward, logits included.

    The forward is replaced on this instance (`model.forward`); `unfuse_head_loss(model)` puts the class's back.
    Refused for models whose logits are not the output embedding applied to the last hidden state (soft-capped
    or scaled logits). A chunk holds as many tokens as make about 256 MiB of FP32 logits.
    """
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"fuse_head_loss takes a Hugging Face PreTrainedModel; got {type(model).__name__}")
    head = model.get_output_embeddings()
    base = model.base_model
    if not isinstance(head, nn.Linear) or base is model:
        raise ValueError(f"{type(model).__name__} has no Linear output head over a base model "
                         f"(get_output_embeddings() is {type(head).__name__}); fuse_head_loss takes causal LMs "
                         "such as LlamaForCausalLM or GPT2LMHeadModel")
    changed = [f for f in _LOGIT_TRANSFORMS if getattr(model.config, f, None) not in (None, 0, 0.0, 1, 1.0)]
    if changed:
        raise ValueError(f"{type(model).__name__}'s logits are transformed after the head ({', '.join(changed)} in "
                         "its config): the fused loss would not be the model's loss")
    # a bound method (not a closure): copy.deepcopy of the model rebinds it to the copy, torch.compile traces it
    fused = types.MethodType(_fused_forward, model)
    current = model.__dict__.get("forward")
    if current is None:
        model.forward = fused
    elif isinstance(current, PolicyForward) and current.inner is None:   # convert()'s: it runs ours inside
        current.inner = fused
    elif not has_fused_head_loss(model):
        raise ValueError(f"{type(model).__name__}.forward is already replaced on this instance ({current!r}); "
                         "call fuse_head_loss on the model before whatever replaced it")
    return model


def unfuse_head_loss(model: nn.Module) -> nn.Module:
    """Undo fuse_head_loss: the model's class forward again."""
    if not has_fused_head_loss(model):
        raise ValueError(f"{type(model).__name__} was not given a fused head loss")
    current = model.__dict__["forward"]
    if isinstance(current, PolicyForward):
        current.inner = None
    else:
        del model.forward
    return model


def has_fused_head_loss(model: nn.Module) -> bool:
    """Whether fuse_head_loss gave `model` its forward (directly, or inside convert()'s PolicyForward)."""
    current = model.__dict__.get("forward")
    if isinstance(current, PolicyForward):
        current = current.inner
    return getattr(current, "__func__", None) is _fused_forward


def _fused_forward(self, input_ids=None, *args, labels=None, **kwargs):
    if labels is None or not self.training or not torch.is_grad_enabled():
        return type(self).forward(self, input_ids, *args, labels=labels, **kwargs)
    if args:   # the causal LM's positional order need not be its base model's
        raise TypeError(f"with a fused head loss, pass {type(self).__name__}'s arguments after input_ids by keyword")
    if kwargs.pop("logits_to_keep", 0) not in (0, None):
        raise ValueError("fuse_head_loss computes the loss over every position; logits_to_keep applies to "
                         "returned logits, which a fused loss does not make")
    loss_kwargs = {k: kwargs.pop(k) for k in _LOSS_KWARGS if k in kwargs}
    return_dict = kwargs.pop("return_dict", None)
    outputs = self.base_model(input_ids, **kwargs)
    head = self.get_output_embeddings()
    chunk_rows = max(1, _CHUNK_BYTES // (4 * head.out_features))
    loss = _causal_lm_loss(outputs[0], head, labels, chunk_rows, **loss_kwargs)
    out = CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
                                 attentions=getattr(outputs, "attentions", None))
    return out.to_tuple() if return_dict is False else out


@torch.compiler.disable   # under torch.compile: the base model's graph, then the fused op's own kernels
def _causal_lm_loss(hidden, head, labels, chunk_rows, num_items_in_batch=None, ignore_index=-100,
                    shift_labels=None):
    if shift_labels is None:   # tokens < n predict n; the last position predicts nothing
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.to(hidden.device)
    if num_items_in_batch is None:
        return head_cross_entropy(hidden, head, target, ignore_index=ignore_index, chunk_rows=chunk_rows)
    loss = head_cross_entropy(hidden, head, target, ignore_index=ignore_index, reduction="sum",
                              chunk_rows=chunk_rows)
    return loss / torch.as_tensor(num_items_in_batch, device=loss.device)
