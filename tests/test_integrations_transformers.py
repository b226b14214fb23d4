"""mixprec.integrations.transformers: the Hugging Face Trainer with prepare_trainer and MixprecCallback (a tiny
LlamaForCausalLM from a config, random tokens, no downloads); the precision table on Hugging Face models."""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'mixprec[transformers]')")
pytest.importorskip("accelerate", reason="the Trainer needs accelerate (pip install 'mixprec[transformers]')")

import mixprec as mp  # noqa: E402
from mixprec.integrations.transformers import MixprecCallback, loss_scaler, prepare_trainer  # noqa: E402
from mixprec.prepare import plan_of  # noqa: E402
from mixprec.rules import Precision  # noqa: E402
from tolerances import FP32_ORDER_RTOL  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
transformers.utils.logging.set_verbosity_error()

VOCAB = 128


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state: each test gets its own (as accelerate's own tests do)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


def _data(n=32, seq=16):
    tokens = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": t, "labels": t} for t in tokens]


def _record(seen, key, what):
    """A forward hook storing what(inputs, output) under key once (returning None: the output stays)."""
    def hook(module, inputs, output):
        seen.setdefault(key, what(inputs, output))
    return hook


def _trainer(out, steps, **kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=1,
        save_steps=2, report_to=[], use_cpu=True, seed=0, max_grad_norm=1.0, disable_tqdm=True, **kwargs)
    return transformers.Trainer(model=_llama(), args=args, train_dataset=_data())


def test_trainer_trains_logs_the_scale_and_resumes(tmp_path):
    # A scale that grows every step, so the checkpoint holds a state that differs from a fresh scaler's.
    def prepared(out, steps):
        trainer = _trainer(out, steps)
        prepare_trainer(trainer, "fp16-mixed", scaler=mp.LossScaler(growth_interval=1), state_dtype="int8")
        return trainer

    straight = prepared(tmp_path / "a", 4)
    straight.train()
    logs = [h for h in straight.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    assert [h["loss_scale"] for h in logs] == [2.0 ** 17, 2.0 ** 18, 2.0 ** 19, 2.0 ** 20]
    assert all(h["skipped_steps"] == 0 for h in logs)
    assert logs[-1]["loss"] < logs[0]["loss"] + 0.5 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    inner = straight.optimizer.optimizer.optimizer                       # AcceleratedOptimizer > mixprec > AdamW
    assert isinstance(inner, mp.optim.AdamW) and inner.defaults["state_dtype"] == "int8"
    assert any(s["state_dtype"] == "int8" for s in inner.state.values())          # 8-bit moments in use

    # The loss scale is saved with the Trainer's own checkpoint (in optimizer.pt) and restored on resume.
    checkpoint = tmp_path / "a" / "checkpoint-2"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)["mixprec_loss_scaler"]
    assert saved["scale"] == 2.0 ** 18
    resumed = prepared(tmp_path / "b", 4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert loss_scaler(resumed).state_dict() == loss_scaler(straight).state_dict()
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)       # same ops in the same order on the CPU, exact optimizer state round trip


def test_trainer_forward_runs_under_the_policy_and_refuses_double_precision(tmp_path):
    trainer = _trainer(tmp_path, 1)
    prepare_trainer(trainer, "bf16-mixed")
    assert isinstance(trainer.callback_handler.callbacks[0], MixprecCallback)
    model = trainer.model
    seen = {}
    model.model.layers[0].mlp.down_proj.register_forward_hook(_record(seen, "mlp", lambda i, o: o.dtype))
    trainer.train()
    assert seen["mlp"] == torch.bfloat16                     # GEMMs in the compute dtype
    out = model(input_ids=torch.randint(0, VOCAB, (2, 8)), labels=torch.randint(0, VOCAB, (2, 8)))
    assert out.logits.dtype == torch.float32                 # the head's FP32 output
    assert not loss_scaler(trainer).is_enabled()             # BF16: no scaling

    refused = []
    for flag in ("bf16", "fp16"):
        args = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, **{flag: True})
        try:
            targs = transformers.TrainingArguments(**args)
        except ValueError:
            continue                                          # this transformers refuses it on the CPU already
        trainer = transformers.Trainer(model=_llama(), args=targs, train_dataset=_data())
        with pytest.raises(ValueError, match=f"{flag}=False"):
            prepare_trainer(trainer, "bf16-mixed")
        refused.append(flag)
    assert "bf16" in refused
    with pytest.raises(ValueError, match="master weights"):   # the Trainer clips model.parameters(), the halves
        prepare_trainer(_trainer(tmp_path, 1), "fp16-true")


def test_precision_table_holds_for_hugging_face_models():
    # LLaMA: its RMSNorm class is hand-written (upcast), embeddings and head FP32.
    llama = mp.prepare(_llama(), "bf16-mixed")
    plans = {p.name: p for p in plan_of(llama)}
    assert plans["model.embed_tokens"].role == "embedding"
    assert plans["lm_head"].role == "head" and plans["lm_head"].precision is Precision.FP32_OUTPUT
    norms = [p for p in plans.values() if p.kind == "LlamaRMSNorm"]
    assert len(norms) == 2 * 2 + 1 and all(p.precision is Precision.FP32_CAST_BACK for p in norms)

    # GPT-2: the head is tied to the token embedding; Conv1D (not an nn.Linear) runs its addmm in half.
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                                n_positions=32))
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    mp.prepare(gpt2, "bf16-mixed")
    plans = {p.name: p for p in plan_of(gpt2)}
    assert plans["lm_head"].role == "head" and plans["transformer.wte"].role == "embedding"
    assert gpt2.lm_head.weight.dtype == torch.float32
    seen = {}
    gpt2.transformer.h[0].attn.c_attn.register_forward_hook(_record(seen, "conv1d", lambda i, o: o.dtype))
    with mp.autocast("bf16-mixed", device_type="cpu"):
        logits = gpt2(torch.randint(0, VOCAB, (2, 8))).logits
    assert seen["conv1d"] == torch.bfloat16 and logits.dtype == torch.float32


def test_prepare_trainer_wraps_a_given_optimizer(tmp_path):
    trainer = _trainer(tmp_path, 1, save_strategy="no")
    trainer.optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-3)   # as optimizers=(opt, None)
    prepare_trainer(trainer, "fp16-mixed")
    trainer.train()
    assert loss_scaler(trainer).get_scale() == 2.0 ** 16 and loss_scaler(trainer.optimizer) is loss_scaler(trainer)
    with pytest.raises(ValueError, match="already prepared"):
        prepare_trainer(trainer, "fp16-mixed")


def test_callback_puts_scale_and_guard_events_into_the_logs():
    class Guard:
        events = [{"step": 3, "cause": "loss_spike", "action": "skip"}]

    scaler = mp.LossScaler()
    scaler.scale(torch.ones(()))                        # on the device, at 2**16
    callback = MixprecCallback(scaler, guard=Guard())
    state = transformers.TrainerState()
    logs = {"loss": 1.5, "grad_norm": 0.3}
    state.log_history.append({**logs, "step": 4})         # what Trainer.log appends before on_log
    callback.on_log(None, state, None, logs=logs)
    expected = {"loss_scale": 2.0 ** 16, "skipped_steps": 0, "guard_events": 1,
                "guard_last_event": str(Guard.events[0])}
    assert logs == {"loss": 1.5, "grad_norm": 0.3, **expected}
    assert state.log_history[-1] == {"loss": 1.5, "grad_norm": 0.3, "step": 4, **expected}
    callback.on_log(None, state, None, logs={"eval_loss": 2.0})   # not a training log: untouched


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                                n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                                                attn_pdrop=0.0))   # no dropout: two forwards agree


def _loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("items", [None, 37])
def test_fused_head_loss_is_the_models_loss(build, items, monkeypatch):
    """FP32 on the CPU: the fused loss and every gradient equal Hugging Face's own path (labels shifted, ignored
    positions, num_items_in_batch) to FP32 summation order; no logits are returned in training."""
    from mixprec.integrations.transformers import fuse_head_loss, has_fused_head_loss, unfuse_head_loss
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :3] = -100
    kwargs = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
    model = build().train()
    ref, ref_grads = _loss_and_grads(model, ids, labels, **kwargs)
    import mixprec.integrations.transformers as hf
    monkeypatch.setattr(hf, "_CHUNK_BYTES", 9 * 4 * VOCAB)   # chunks of 9 of the 64 tokens: 7 and a partial one
    fuse_head_loss(model)
    assert has_fused_head_loss(model)
    got, grads = _loss_and_grads(model, ids, labels, **kwargs)
    assert got.logits is None and ref.logits is not None
    torch.testing.assert_close(got.loss, ref.loss, rtol=FP32_ORDER_RTOL, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:   # FP32 sums in another order: relative to each gradient's norm
        assert (grads[name] - ref_grads[name]).norm() <= 1e-5 * ref_grads[name].norm() + 1e-8, name
    model.eval()
    assert model(input_ids=ids, labels=labels).logits is not None   # evaluation: the model's own forward
    unfuse_head_loss(model)
    assert not has_fused_head_loss(model) and "forward" not in model.__dict__


def test_fused_head_loss_under_a_policy_trains_as_the_unfused_one():
    """bf16-mixed on the CPU: the fused head loss after mp.prepare gives the loss of the unfused prepared model
    (FP32 head and loss both ways) to a BF16 rounding, and survives copy.deepcopy bound to the copy."""
    import copy
    from mixprec.integrations.transformers import fuse_head_loss
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    policy = mp.Policy.from_recipe("bf16-mixed")
    plain = mp.prepare(_llama().train(), policy)
    fused = fuse_head_loss(mp.prepare(_llama().train(), policy))
    with mp.autocast(policy):
        a = plain(input_ids=ids, labels=ids).loss
        b = fused(input_ids=ids, labels=ids).loss
    assert b.dtype == torch.float32 and abs(a.item() - b.item()) <= 2 ** -8 * abs(a.item())
    twin = copy.deepcopy(fused)
    assert twin.forward.__self__ is twin
    with mp.autocast(policy):
        assert torch.equal(twin(input_ids=ids, labels=ids).loss, b)


def test_fused_head_loss_refuses_what_it_cannot_fuse():
    from mixprec.integrations.transformers import fuse_head_loss, unfuse_head_loss
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fuse_head_loss(torch.nn.Linear(2, 2))
    model = _llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        fuse_head_loss(model)
    with pytest.raises(ValueError, match="was not given a fused head loss"):
        unfuse_head_loss(_llama())
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="by keyword"):
        fuse_head_loss(_llama().train())(ids, torch.ones(1, 4), labels=ids)


def test_trainer_with_the_fused_head_loss_trains_as_without(tmp_path):
    """prepare_trainer(fused_head_loss=True), fp16-mixed with its loss scale (emulated on the CPU): the logged
    losses follow the unfused Trainer's to FP16 rounding (the logits' gradient is rounded at another point)."""
    losses = {}
    for fused in (False, True):
        trainer = _trainer(tmp_path / str(fused), 4, save_strategy="no")
        prepare_trainer(trainer, "fp16-mixed", fused_head_loss=fused)
        from mixprec.integrations.transformers import has_fused_head_loss
        assert has_fused_head_loss(trainer.model) == fused   # inside convert()'s PolicyForward
        trainer.train()
        losses[fused] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses[True]) == 4
    for a, b in zip(losses[False], losses[True]):
        assert abs(a - b) <= 1e-3 * abs(a)


def test_fused_head_loss_under_torch_compile():
    """torch.compile traces the fused forward (the base model in its graph, the fused loss after a break)."""
    from mixprec.integrations.transformers import fuse_head_loss
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    model = fuse_head_loss(_llama().train())
    eager = model(input_ids=ids, labels=ids).loss
    compiled = torch.compile(model)(input_ids=ids, labels=ids)
    assert compiled.logits is None
    torch.testing.assert_close(compiled.loss, eager, rtol=1e-5, atol=0)   # FP32, fusions reorder a few sums
    compiled.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
