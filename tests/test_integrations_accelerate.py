"""mixprec.integrations.accelerate: a model and optimizer prepared under a policy, then trained through
Accelerator(mixed_precision="no") with accelerate's own backward, clipping and step, against the hand loop."""
import pytest
import torch
import torch.nn.functional as F

accelerate = pytest.importorskip("accelerate", reason="needs accelerate (pip install 'mixprec[accelerate]')")

import mixprec as mp  # noqa: E402
from helpers import MLP  # noqa: E402
from mixprec.integrations.accelerate import loss_scaler, prepare  # noqa: E402

STEPS = 4


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state: each test gets its own (as accelerate's own tests do)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _batches(steps=STEPS):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 32, generator=g), torch.randint(0, 8, (16,), generator=g)) for _ in range(steps)]


def _model():
    torch.manual_seed(0)
    return MLP()


def _hand_loop(recipe, batches, accumulate=1):
    policy = mp.Policy.from_recipe(recipe)
    model = mp.prepare(_model(), policy)
    optimizer = mp.optim.AdamW(model.parameters(), lr=1e-2, state_dtype="int8", min_quant_numel=1024)
    scaler = mp.LossScaler.for_policy(policy)
    for i, (x, y) in enumerate(batches):
        with mp.autocast(policy, device_type="cpu"):
            loss = F.cross_entropy(model(x), y) / accumulate
        scaler.scale(loss).backward()
        if (i + 1) % accumulate == 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    return model, scaler


@pytest.mark.parametrize("recipe,accumulate", [("fp16-mixed", 1), ("fp16-mixed", 2), ("bf16-mixed", 1)])
def test_accelerate_matches_the_hand_loop(recipe, accumulate):
    batches = _batches()
    reference, ref_scaler = _hand_loop(recipe, batches, accumulate)

    accelerator = accelerate.Accelerator(mixed_precision="no", cpu=True, gradient_accumulation_steps=accumulate)
    model = _model()
    optimizer = mp.optim.AdamW(model.parameters(), lr=1e-2, state_dtype="int8", min_quant_numel=1024)
    model, optimizer = prepare(accelerator, model, optimizer, recipe)
    for x, y in batches:
        with accelerator.accumulate(model):
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    # The same ops in the same order on the CPU (the scale applied in the backward pass instead of on the
    # loss multiplies the same FP32 numbers): bitwise equal.
    for p, q in zip(reference.parameters(), accelerator.unwrap_model(model).parameters()):
        assert torch.equal(p, q)
    assert loss_scaler(optimizer).state_dict() == ref_scaler.state_dict()
    assert "mixprec_loss_scaler" in optimizer.state_dict()


def test_accelerate_skips_an_injected_inf_and_keeps_the_reported_loss():
    accelerator = accelerate.Accelerator(mixed_precision="no", cpu=True)
    model = _model()
    model, optimizer = prepare(accelerator, model, torch.optim.AdamW(model.parameters(), lr=1e-2), "fp16-mixed")
    poison = {"on": False}

    def overflow(grad):        # an overflow inside the backward pass of step 2
        return torch.where(torch.arange(grad.numel()).view_as(grad) == 0, float("nan"), grad) if poison["on"] else grad

    model.fc1.weight.register_hook(overflow)
    for step, (x, y) in enumerate(_batches()):
        poison["on"] = step == 2
        before = [p.detach().clone() for p in model.parameters()]
        loss = F.cross_entropy(model(x), y)
        assert loss.item() < 10                               # the loss itself is not scaled
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step == 2:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    scaler = loss_scaler(optimizer)
    assert scaler.num_skipped_steps == 1 and scaler.get_scale() == 2.0 ** 15
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_accelerate_refuses_its_own_mixed_precision():
    accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
    model = _model()
    with pytest.raises(ValueError, match="mixed_precision='no'"):
        prepare(accelerator, model, torch.optim.AdamW(model.parameters()), "bf16-mixed")


def test_gradients_are_unscaled_after_ddp_has_reduced_them(one_rank):
    # The unscale runs when the backward pass ends, after the callback DDP queues to write the reduced
    # gradients (queued earlier in the same pass); unscaled before it, the gradients would come back scaled.
    from mixprec.integrations import convert
    from mixprec.integrations._scaling import LossScaling, MixprecOptimizer
    policy = mp.Policy.from_recipe("fp16-mixed")
    x, y = _batches(1)[0]
    reference = mp.prepare(_model(), policy)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    scaler = mp.LossScaler.for_policy(policy)
    with mp.autocast(policy, device_type="cpu"):
        loss = F.cross_entropy(reference(x), y)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)

    model = _model()
    scaling = LossScaling(mp.LossScaler.for_policy(policy))
    convert(model, policy, after=scaling.mark)
    MixprecOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), scaling)
    ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=False)
    F.cross_entropy(ddp(x), y).backward()
    for p, q in zip(reference.parameters(), model.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_a_guard_takes_the_step_and_keeps_a_nan_loss_out():
    try:
        from mixprec.stability import StabilityGuard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="mixprec.stability"):
            prepare(accelerate.Accelerator(mixed_precision="no", cpu=True), _model(),
                    torch.optim.AdamW(_model().parameters()), "bf16-mixed", guard={})
        return

    class WithLoss(torch.nn.Module):         # returns {"loss": ...}, as a Hugging Face model does
        def __init__(self):
            super().__init__()
            self.mlp = _model()

        def forward(self, x, y, poison=False):
            loss = F.cross_entropy(self.mlp(x), y)
            return {"loss": loss * float("nan") if poison else loss}

    accelerator = accelerate.Accelerator(mixed_precision="no", cpu=True)
    model = WithLoss()
    model, optimizer = prepare(accelerator, model, mp.optim.AdamW(model.parameters(), lr=1e-2), "bf16-mixed",
                               guard=dict(window=4, warmup=2, snapshot_every=0, ladder=("skip",)))
    for step, (x, y) in enumerate(_batches()):
        before = [p.detach().clone() for p in model.parameters()]
        accelerator.backward(model(x, y, poison=step == 2)["loss"])
        optimizer.step()
        optimizer.zero_grad()
        if step == 2:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    guard = optimizer.optimizer.scaling.guard
    guard.flush()
    assert [(e["step"], e["action"]) for e in guard.events] == [(2, "skip")]
    assert "mixprec_guard" in optimizer.state_dict()
