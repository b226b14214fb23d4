"""mixprec.integrations.lightning: MixprecPrecision in lightning.Trainer and lightning.Fabric against the same
loop written by hand with mixprec; checkpoint and resume of the loss scale; an injected inf skipped; clipping
with mixprec's AdamW; FP8; the FSDP variant's configuration."""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

L = pytest.importorskip("lightning", reason="needs lightning (pip install 'mixprec[lightning]')")

import mixprec as mp  # noqa: E402
from mixprec.integrations.lightning import (MixprecDiagnose, MixprecFSDPPrecision, MixprecGuard,  # noqa: E402
                                            MixprecPrecision)
from tolerances import FP32_ORDER_ATOL, FP32_ORDER_RTOL  # noqa: E402

# The plugin runs the hand loop's ops in the hand loop's order on the CPU (prepare, mp.autocast, scale, unscale,
# clip over the same parameters, step, update): results agree up to FP32 summation order (measured: bitwise).
RTOL, ATOL = FP32_ORDER_RTOL, FP32_ORDER_ATOL

logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")

D = 256          # FP8 converts Linear layers with at least 256 features (Float8Config.min_features)
STEPS = 4
BATCH = 16


class Classifier(L.LightningModule):
    def __init__(self, dim=D, classes=16, inject_inf_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(),
                                 nn.Linear(dim, classes))
        self.inject_inf_at = inject_inf_at
        self.seen_policies = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.seen_policies.append(mp.context.active_policy())
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_after_backward(self):
        if self.inject_inf_at is not None and self.trainer.global_step == self.inject_inf_at:
            self.net[0].weight.grad[0, 0] = float("inf")

    def configure_optimizers(self):
        return mp.optim.AdamW(self.parameters(), lr=1e-3)


def _batches(dim=D, steps=STEPS):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, dim, generator=g), torch.randint(0, 16, (BATCH,), generator=g)) for _ in range(steps)]


def _loader(batches):
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def _trainer(plugin, max_steps, **kwargs):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, plugins=[plugin], logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _hand_loop(recipe, batches, dim, clip=1.0, scaler=None):
    policy = mp.Policy.from_recipe(recipe)
    model = mp.prepare(Classifier(dim), policy)
    optimizer = model.configure_optimizers()
    scaler = scaler or mp.LossScaler.for_policy(policy)
    for x, y in batches:
        with mp.autocast(policy, device_type="cpu"):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return model, loss.detach(), scaler


def _assert_same_params(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("recipe", ["bf16-mixed", "fp16-mixed", "fp8-blockwise"])
def test_trainer_and_fabric_match_the_hand_loop(recipe):
    dim = D if recipe.startswith("fp8") else 64
    batches = _batches(dim)
    reference, ref_loss, ref_scaler = _hand_loop(recipe, batches, dim)

    # lightning.Trainer, with gradient clipping and mixprec's AdamW (which unscales and skips in its step)
    plugin = MixprecPrecision(recipe, device="cpu")
    model = Classifier(dim)
    _trainer(plugin, STEPS, gradient_clip_val=1.0).fit(model, _loader(batches))
    _assert_same_params(reference, model)
    assert all(p is plugin.policy for p in model.seen_policies)      # forward_context is mp.autocast(policy)
    assert plugin.scaler.get_scale() == ref_scaler.get_scale()

    # lightning.Fabric (Fabric(precision="fp8-blockwise") is refused: the plugin is the way in)
    plugin = MixprecPrecision(recipe, device="cpu")
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    module = Classifier(dim)
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
    _assert_same_params(reference, module)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=RTOL, atol=ATOL)

    fp8_layers = [m for m in module.modules() if isinstance(m, mp.fp8.Float8Linear)]
    assert len(fp8_layers) == (2 if recipe.startswith("fp8") else 0)   # the two 256x256 layers, not the head


def test_checkpoint_and_resume_keep_the_scaler_state(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    # A scale that grows every step, so that the state to keep changes at each step.
    def plugin():
        return MixprecPrecision("fp16-mixed", device="cpu", scaler=mp.LossScaler(growth_interval=1))

    batches = _batches(dim=32)
    straight, straight_plugin = Classifier(dim=32), plugin()
    every = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=STEPS, save_top_k=-1)
    L.Trainer(accelerator="cpu", devices=1, max_steps=2 * STEPS, plugins=[straight_plugin], logger=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[every]).fit(straight, _loader(batches))
    path = tmp_path / f"epoch=0-step={STEPS}.ckpt"
    saved = torch.load(path, weights_only=False)["MixprecPrecision"]
    assert saved["scale"] == 2.0 ** (16 + STEPS) and saved["num_skipped_steps"] == 0

    resumed, resumed_plugin = Classifier(dim=32), plugin()
    _trainer(resumed_plugin, 2 * STEPS).fit(resumed, _loader(batches), ckpt_path=path)
    assert resumed_plugin.scaler.state_dict() == straight_plugin.scaler.state_dict()
    _assert_same_params(straight, resumed)


@pytest.mark.parametrize("host", ["trainer", "fabric"])
def test_an_injected_inf_is_skipped(host):
    batches = _batches(dim=32)
    plugin = MixprecPrecision("fp16-mixed", device="cpu")
    snapshots = []
    if host == "trainer":
        model = Classifier(dim=32, inject_inf_at=2)

        class Snapshot(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, *args):
                snapshots.append([p.detach().clone() for p in pl_module.parameters()])

        _trainer(plugin, STEPS, gradient_clip_val=1.0, callbacks=[Snapshot()]).fit(model, _loader(batches))
    else:
        fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[plugin])
        module = Classifier(dim=32)
        model, optimizer = fabric.setup(module, module.configure_optimizers())
        for step, (x, y) in enumerate(batches):
            fabric.backward(F.cross_entropy(model(x), y))
            if step == 2:
                module.net[0].weight.grad[0, 0] = float("inf")
            # an overflow is the scaler's to skip: Fabric's clip must not raise on it
            fabric.clip_gradients(model, optimizer, max_norm=1.0, error_if_nonfinite=False)
            optimizer.step()
            optimizer.zero_grad()
            snapshots.append([p.detach().clone() for p in module.parameters()])
    assert plugin.scaler.num_skipped_steps == 1
    assert plugin.scaler.get_scale() == 2.0 ** 15                     # backed off once
    for before, after in zip(snapshots[1], snapshots[2]):             # step 2 changed nothing
        assert torch.equal(before, after)
    assert all(torch.isfinite(p).all() for p in snapshots[-1])
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))   # and training went on


def test_fabric_master_weights_need_the_optimizer_made_after_setup_module():
    plugin = MixprecPrecision("fp16-true", device="cpu")
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    module = Classifier(dim=32)
    model = fabric.setup_module(module)
    optimizer = fabric.setup_optimizers(mp.MasterWeights(torch.optim.AdamW(model.parameters(), lr=1e-3)))
    x, y = _batches(dim=32, steps=1)[0]
    fabric.backward(F.cross_entropy(model(x), y))
    optimizer.step()
    assert module.net[0].weight.dtype == torch.float16

    plain = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-3))
    fabric.backward(F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match="master weights"):
        plain.step()


def test_trainer_wraps_master_weights_for_true_recipes():
    plugin = MixprecPrecision("fp16-true", device="cpu")
    model = Classifier(dim=32)
    trainer = _trainer(plugin, 2, gradient_clip_val=1.0)
    trainer.fit(model, _loader(_batches(dim=32, steps=2)))
    assert isinstance(trainer.optimizers[0], mp.MasterWeights)
    assert model.net[0].weight.dtype == torch.float16 and model.net[2].weight.dtype == torch.float32   # LayerNorm
    assert plugin.scaler.num_skipped_steps == 0


def test_plugin_arguments_and_fsdp_variant():
    with pytest.raises(ValueError, match="Unknown recipe"):
        MixprecPrecision("bf16mixed")
    with pytest.raises(ValueError, match="Unknown device"):
        MixprecPrecision("bf16-mixed", device="tpu")
    assert MixprecPrecision("bf16-mixed").precision == "bf16-mixed"
    assert MixprecPrecision("fp16-true").precision == "16-true"
    assert not MixprecPrecision("bf16-mixed").scaler.is_enabled()

    from lightning.fabric.plugins.precision.fsdp import FSDPPrecision as FabricFSDP
    from lightning.pytorch.plugins.precision import FSDPPrecision as TrainerFSDP
    plugin = MixprecFSDPPrecision("fp16-mixed")
    assert isinstance(plugin, TrainerFSDP) and isinstance(plugin, FabricFSDP)   # both strategies take it
    config = plugin.mixed_precision_config
    assert (config.param_dtype, config.reduce_dtype, config.buffer_dtype) == (torch.float32,) * 3
    assert plugin.scaler.is_enabled() and plugin.scaler._process_group == "default"
    with pytest.raises(ValueError, match="FP32 parameters"):
        MixprecFSDPPrecision("bf16-true")


@pytest.mark.cuda
def test_fsdp_variant_trains_on_a_gpu():
    # Lightning refuses FSDP on the CPU accelerator; this runs on a GPU.
    from lightning.pytorch.strategies import FSDPStrategy
    plugin = MixprecFSDPPrecision("bf16-mixed")
    model = Classifier(dim=32)
    trainer = L.Trainer(accelerator="cuda", devices=1, strategy=FSDPStrategy(), max_steps=STEPS, plugins=[plugin],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, _loader(_batches(dim=32)))
    assert all(p is plugin.policy for p in model.seen_policies)


def _has(module, name):
    try:
        return hasattr(__import__(module, fromlist=[name]), name)
    except ImportError:
        return False


def test_guard_callback_skips_a_nan_step_or_says_it_is_missing():
    if not _has("mixprec.stability", "StabilityGuard"):
        with pytest.raises(ImportError, match="mixprec.stability.StabilityGuard"):
            MixprecGuard()
        return

    class NanAtStep2(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.trainer.global_step == 2 else loss

    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots.append([p.detach().clone() for p in pl_module.parameters()])

    guard = MixprecGuard(window=4, warmup=2, snapshot_every=0, ladder=("skip",))
    model = NanAtStep2(dim=32)      # bf16-mixed: no loss scaler, the guard alone keeps the NaN out
    _trainer(MixprecPrecision("bf16-mixed", device="cpu"), STEPS, callbacks=[guard, Snapshot()]).fit(
        model, _loader(_batches(dim=32)))
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [(e["step"], e["action"]) for e in guard.guard.events] == [(2, "skip")]


def test_diagnose_callback_reports_or_says_it_is_missing():
    if not _has("mixprec.diagnostics", "diagnose"):
        with pytest.raises(ImportError, match="mixprec.diagnostics.diagnose"):
            MixprecDiagnose(batch=None, loss_fn=None)
        return
    batches = _batches(dim=32, steps=2)
    callback = MixprecDiagnose(batches[0], F.cross_entropy)
    _trainer(MixprecPrecision("bf16-mixed", device="cpu"), 2, callbacks=[callback]).fit(
        Classifier(dim=32), _loader(batches))
    assert list(callback.reports) == [0] and "net.0" in callback.reports[0].layers
