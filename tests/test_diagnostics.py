"""mixprec.diagnostics: range statistics per format (exact), what mp.diagnose reports per module, and the
loss scale it recommends on the small-gradient task."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mixprec as mp
from helpers import MLP, regression_task
from mixprec import diagnostics as dg
from mixprec.diagnostics.stats import INT8_GRANULARITIES, fp8_whatif, fractions, int8_whatif, tensor_counts
from mixprec.formats import get_format, round_to

FORMATS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")
TINY = 2.0**-30


def reference(x: torch.Tensor, fmt: str) -> dict[str, int]:
    """Counts by rounding each value: native casts (IEEE overflow to inf) where torch has one that does not
    saturate; E4M3's cast saturates, so its overflow is read off round_to without saturation."""
    f = get_format(fmt)
    r = x.to(f.torch_dtype).float() if fmt != "fp8_e4m3" else round_to(x, fmt, saturate=False)
    return {"underflow": int(((x != 0) & (r == 0)).sum()),
            "subnormal": int(((r != 0) & (r.abs() < f.min_normal)).sum()),
            "overflow": int((torch.isinf(r) & torch.isfinite(x)).sum())}


def counted(x: torch.Tensor, fmt: str) -> dict[str, int]:
    fr = fractions(tensor_counts(x), fmt)
    return {k: round(fr[k] * x.numel()) for k in ("underflow", "subnormal", "overflow")}


def test_powers_of_two_fall_where_each_format_says():
    x = torch.tensor([2.0**k for k in range(-30, 21)])   # 51 values, one per binade
    # by hand: zero edge min_subnormal/2, normal from min_normal, overflow from max + ulp/2 (464 for E4M3)
    expected = {"fp16": (6, 10, 5),        # <= 2^-25, 2^-24..2^-15, >= 2^16
                "bf16": (0, 0, 0),
                "fp8_e4m3": (21, 3, 12),   # <= 2^-10, 2^-9..2^-7, >= 2^9
                "fp8_e5m2": (14, 2, 5)}    # <= 2^-17, 2^-16..2^-15, >= 2^16
    for fmt, (u, s, o) in expected.items():
        assert counted(x, fmt) == {"underflow": u, "subnormal": s, "overflow": o}, fmt
        assert counted(x, fmt) == reference(x, fmt), fmt


@pytest.mark.parametrize("fmt", FORMATS)
def test_fractions_match_a_plain_reference_exactly(fmt):
    g = torch.Generator().manual_seed(1)
    n = 200_000
    log_uniform = torch.exp2(torch.empty(n).uniform_(-40, 25, generator=g)) * torch.randn(n, generator=g).sign()
    gaussian = torch.randn(n, generator=g) * 2.0**-20
    f = get_format(fmt)
    half_sub = f.min_subnormal / 2
    ulp_max = 2.0 ** (math.floor(math.log2(f.max)) - f.mantissa_bits)
    edges = torch.tensor([half_sub, half_sub * (1 + 2**-20), f.min_normal - half_sub, f.min_normal,
                          f.max, f.max + ulp_max / 2, f.max + ulp_max, -half_sub, 0.0, -0.0, 1.0])
    for x in (log_uniform, gaussian, edges, torch.cat([log_uniform, gaussian, edges])):
        assert counted(x, fmt) == reference(x, fmt)
        fr = fractions(tensor_counts(x), fmt)
        assert fr["zero"] == (x == 0).sum().item() / x.numel()


def test_fp8_whatif_matches_the_quantizer():
    g = torch.Generator().manual_seed(2)
    rows = torch.exp2(torch.empty(256, 1).uniform_(-24, 0, generator=g))
    x = torch.randn(256, 384, generator=g) * rows            # rows of very different ranges
    x[:, :5] *= 2.0**-18                                      # and small values inside each row
    w = fp8_whatif(x, ("fp8_e4m3",))
    for i, gran in enumerate(dg.GRANULARITIES):
        q, scale = mp.fp8.quantize(x, "fp8_e4m3", granularity=gran)
        r = q.float()
        assert w[i, 0].item() == ((x != 0) & (r == 0)).sum().item(), gran
        assert w[i, 1].item() == ((r != 0) & (r.abs() < 2.0**-6)).sum().item(), gran
        spread = math.log2(scale.max().item() / scale.min().item())
        assert w[i, 3].item() - w[i, 2].item() == pytest.approx(spread, abs=1e-5), gran
    assert w[0, 0] > w[2, 0] > 0   # finer scales leave fewer values flushed to zero


def int8_reference(x: torch.Tensor, granularity: str) -> tuple[float, float, int]:
    """(sum x**2, sum (x - x_hat)**2 in FP64, non-zero values quantized to 0) through mixprec.int8 itself."""
    q, scale = mp.int8.quantize(x, granularity)
    x_hat = mp.int8.dequantize(q, scale)
    return (x.double().square().sum().item(), (x_hat.double() - x.double()).square().sum().item(),
            int(((x != 0) & (q == 0)).sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_whatif_matches_the_quantizer(dtype):
    # the diagnostics write INT8 quantization out themselves (they may not import int8/): the same codes,
    # so the same zeros exactly and the same error sums up to FP64 summation order (1e-12 relative)
    g = torch.Generator().manual_seed(4)
    rows = torch.exp2(torch.empty(3, 64, 1).uniform_(-30, 10, generator=g))
    x = (torch.randn(3, 64, 300, generator=g) * rows)
    x[..., :7] *= 2.0**-9                                      # values below half a step in every row
    x = x.to(dtype)
    w = int8_whatif(x)
    for i, gran in enumerate(INT8_GRANULARITIES):
        signal, noise, zero = int8_reference(x, gran)
        assert w[i, 2].item() == zero and zero > 0, gran
        assert w[i, 0].item() == pytest.approx(signal, rel=1e-12) and w[i, 1].item() == pytest.approx(noise, rel=1e-12)
    # rows over 40 binades: one scale for the tensor sends the small rows to zero, one per row keeps them
    # (the SQNR of the whole tensor is dominated by its largest rows either way)
    assert w[1, 2] > 0.5 * x.numel() and w[0, 2] < 0.05 * x.numel()
    assert 10 * math.log10(w[0, 0].item() / w[0, 1].item()) > 35
    # a non-finite value is left out (its scale would be NaN)
    y = x.float().clone()
    y[0, 0, 0] = math.inf
    z = int8_whatif(y)
    assert torch.isfinite(z).all()


class Identity(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.lin = nn.Linear(n, n, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(n))

    def forward(self, x):
        return self.lin(x)


def test_diagnose_counts_each_tensor_kind_exactly():
    g = torch.Generator().manual_seed(3)
    x = torch.exp2(torch.empty(32, 64).uniform_(-30, 20, generator=g)) * torch.randn(32, 64, generator=g).sign()
    target = torch.exp2(torch.empty(32, 64).uniform_(-40, -5, generator=g))   # the output's gradient
    model = Identity(64)
    scale = 2.0**12
    report = dg.diagnose(model, (x, target), lambda out, t: (out * t).sum(), loss_scale=scale)
    layer = report.layers["lin"]
    assert layer.cls == "Linear" and layer.leaf
    acts, grads = layer.activations, layer.activation_grads
    assert acts.numel == x.numel() and acts.amax == x.abs().max().item()
    assert acts.min_nonzero == x.abs().min().item()
    assert grads.amax == (target * scale).max().item()   # the gradient of loss * loss_scale
    for fmt in FORMATS:
        assert counted(x, fmt) == {k: round(acts.formats[fmt][k] * x.numel()) for k in counted(x, fmt)}
        assert reference(target * scale, fmt) == {
            k: round(grads.formats[fmt][k] * target.numel()) for k in ("underflow", "subnormal", "overflow")}
    assert layer.weights.amax == 1.0 and layer.weights.formats["fp16"]["underflow"] == 0
    assert layer.weight_grads.numel == 64 * 64
    assert model.lin.weight.grad is None   # the model itself is left alone
    hist = acts.histogram()
    assert sum(hist["counts"]) + hist["zero"] == x.numel()


def test_diagnose_reports_the_int8_whatif(tmp_path):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 64, generator=g) * torch.exp2(torch.empty(32, 1).uniform_(-12, 4, generator=g))
    target = torch.randn(32, 64, generator=g)
    loss_fn = lambda out, t: (out * t).sum()   # noqa: E731
    report = dg.diagnose(Identity(64), (x, target), loss_fn, formats=("bf16", "int8"))
    assert report.formats == ("bf16",) and report.int8
    acts = report.layers["lin"].activations.int8_scaling
    for gran in INT8_GRANULARITIES:
        signal, noise, zero = int8_reference(x, gran)
        assert acts[gran]["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise), abs=1e-9)
        assert acts[gran]["zero"] == zero / x.numel()
    assert acts["tensorwise"]["zero"] > 10 * acts["rowwise"]["zero"]   # rows over 16 binades
    weights = report.layers["lin"].weights.int8_scaling   # the identity: 0 and 1 are exact codes
    assert weights["rowwise"]["sqnr_db"] == math.inf and weights["rowwise"]["zero"] == 0
    text = report.table(top=None)
    assert "int8 SQNR r/t" in text and "int8@row 0%" in text
    data = json.loads(report.to_json())
    kinds = {k: v for layer in data["layers"] if layer["name"] == "lin" for k, v in layer["kinds"].items()}
    assert kinds["weights"]["int8_scaling"]["rowwise"]["sqnr_db"] == "inf"
    assert kinds["activations"]["int8_scaling"]["tensorwise"]["zero"] == acts["tensorwise"]["zero"]
    # without "int8" nothing is computed; an INT8 policy asks for it by itself
    assert not dg.diagnose(Identity(64), (x, target), loss_fn, formats=("bf16",)).int8
    with_policy = dg.diagnose(Identity(64), (x, target), loss_fn, formats=("bf16",), policy="int8-rowwise")
    assert with_policy.int8 and with_policy.layers["lin"].activations.int8_scaling == acts
    assert "INT8 what-if" in with_policy.save_html(tmp_path).read_text()
    monitor = dg.DiagnosisMonitor(Identity(64), every=1, formats=("fp16", "int8"))
    loss_fn(monitor.model(x), target).backward()
    monitor.step()
    assert monitor.report().layers["lin"].activations.int8_scaling == acts


def _small_grad_loss(out, y):
    return F.mse_loss(out, y) * TINY


def _train(policy, steps=60):
    torch.manual_seed(0)
    model = mp.prepare(MLP(), policy)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, eps=1e-30)   # eps below the tiny gradients
    scaler = mp.LossScaler.for_policy(policy)
    x, y = regression_task()
    losses = []
    for step in range(steps):
        i = torch.arange(step * 64, step * 64 + 64) % len(x)
        with mp.autocast(policy):
            loss = F.mse_loss(model(x[i]), y[i])
        optimizer.zero_grad()
        scaler.scale(loss * TINY).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    return losses, scaler


def test_small_gradients_underflow_fp16_and_the_recommended_scale_trains():
    torch.manual_seed(0)
    x, y = regression_task()
    report = dg.diagnose(MLP(), (x[:64], y[:64]), _small_grad_loss, policy="fp16-mixed")
    for name in ("fc1", "fc2"):
        assert report.layers[name].weight_grads.formats["fp16"]["underflow"] > 0.99
        assert report.layers[name].activation_grads.formats["fp16"]["underflow"] > 0.99
    assert report.rows()[0].kind.endswith("grads") and "fp16 underflow" in report.rows()[0].why
    assert "fp16 underflow 100%" in str(report)

    policy = report.recommend()
    assert isinstance(policy, mp.Policy) and policy.compute_dtype == torch.float16
    grad_amax = max(s.amax for layer in report.layers.values()
                    for s in (layer.activation_grads, layer.weight_grads) if s)
    scale = policy.loss_scale
    assert math.log2(scale) == int(math.log2(scale))                 # a power of two,
    assert grad_amax * scale < 65520 <= grad_amax * scale * 2        # the largest with no FP16 overflow
    assert policy.fp16_loss_scale == scale and not policy.bf16_at_risk

    scaled_losses, scaler = _train(policy)
    unscaled_losses, _ = _train(policy.replace(loss_scale=1.0))
    assert not scaler.is_dynamic()
    assert unscaled_losses[-1] > 0.9 * unscaled_losses[0]   # scale 1: FP16 flushes the gradients, no learning
    assert scaled_losses[-1] < 0.2 * scaled_losses[0]       # the recommended scale trains


def test_recommended_policy_file_round_trip(tmp_path):
    torch.manual_seed(0)
    x, y = regression_task()
    policy = dg.diagnose(MLP(), (x[:64], y[:64]), _small_grad_loss, policy="fp16-mixed").recommend()
    path = dg.save_policy(policy, tmp_path / "policy.json")
    loaded = dg.load_policy(path)
    assert loaded == policy and isinstance(loaded, dg.RecommendedPolicy)
    plain = mp.Policy.from_recipe("fp8-blockwise")
    assert dg.load_policy(dg.save_policy(plain, tmp_path / "fp8.json")) == plain
    (tmp_path / "bad.json").write_text(json.dumps({"format": "mixprec-policy/1", "compute_dtype": "fp12"}))
    with pytest.raises(ValueError, match="fp12"):
        dg.load_policy(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="No policy file"):
        dg.load_policy(tmp_path / "missing.json")


class Wide(nn.Module):
    """Linear layers of 256+ features (FP8's min_features), and a head kept high precision."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(256, 512)
        self.fc2 = nn.Linear(512, 256)
        self.head = nn.Linear(256, 16)

    def forward(self, x):
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


def _outputs(model):
    outs, handles = {}, []
    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(lambda m, a, o, n=name: outs.__setitem__(n, o.detach().float())))
    return outs, handles


def test_sqnr_per_module_under_fp8_blockwise_matches_a_direct_computation():
    import copy
    torch.manual_seed(0)
    model = Wide()
    x, y = torch.randn(64, 256), torch.randint(0, 16, (64,))
    policy = mp.Policy.from_recipe("fp8-blockwise")
    report = dg.diagnose(model, (x, y), F.cross_entropy, policy=policy)

    ref, ours = copy.deepcopy(model), mp.prepare(copy.deepcopy(model), policy)
    ref_out, _ = _outputs(ref)
    our_out, _ = _outputs(ours)
    ref(x)
    with torch.no_grad(), mp.autocast(policy, device_type="cpu"):
        ours(x)
    for name in ("fc1", "fc2", "head", ""):
        r, o = ref_out[name].double(), our_out[name].double()
        direct = 10 * math.log10(r.square().sum().item() / (o - r).square().sum().item())
        assert report.layers[name].sqnr_db == pytest.approx(direct, abs=1e-9), name
    assert report.layers["fc1"].compute == "fp8" and report.layers["head"].compute == "half->fp32"
    # alone on the FP32 inputs: fc1's input is the batch itself, so the two agree; fc2's is fc2's own error
    assert report.layers["fc1"].sqnr_local_db == pytest.approx(report.layers["fc1"].sqnr_db, abs=1e-9)
    fc2_input = F.gelu(ref_out["fc1"]).to(torch.bfloat16)     # under the policy fc2 read BF16 (fc1's output)
    with torch.no_grad(), mp.autocast(policy, device_type="cpu"):
        alone = ours.fc2(fc2_input).double()
    r = ref_out["fc2"].double()
    direct = 10 * math.log10(r.square().sum().item() / (alone - r).square().sum().item())
    assert report.layers["fc2"].sqnr_local_db == pytest.approx(direct, abs=1e-9)
    assert 15 < report.layers["fc2"].sqnr_local_db < 40       # FP8 E4M3 (3 mantissa bits), blockwise scales

    # a threshold above what FP8 reaches keeps the FP8 layers out of FP8; prepare applies it, unprepare undoes it
    rec = report.recommend(sqnr_threshold_db=60)
    assert rec.keep_out_of_fp8 == ("fc1", "fc2") and rec.fp8 is not None
    fresh = mp.prepare(copy.deepcopy(model), rec)
    assert type(fresh.fc1) is dg.HighPrecisionLinear and type(fresh.head) is nn.Linear
    with mp.autocast(rec, device_type="cpu"):
        assert fresh(x).shape == (64, 16)
    assert type(mp.unprepare(fresh).fc1) is nn.Linear
    assert report.recommend().keep_out_of_fp8 == ()           # at the default threshold FP8 is fine here


def test_html_report_and_pngs_are_written(tmp_path):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    torch.manual_seed(0)
    x, y = regression_task()
    printed = []
    paths = dg.run_cli_diagnosis(MLP(), (x[:64], y[:64]), _small_grad_loss, tmp_path, policy="bf16-mixed",
                                 echo=printed.append)   # what `mixprec diagnose --out DIR` calls
    text = "\n".join(printed)
    assert "fp16 underflow" in text and str(paths["html"]) in text and "mixprec train --policy" in text
    assert paths["report"].audit is not None and (tmp_path / "report.txt").read_text().startswith("mixprec diagnosis")
    page = paths["html"].read_text()
    assert paths["html"].stat().st_size > 1000 and "Recommended policy" in page
    names = {p.name for p in paths["images"]}
    for kind in dg.KINDS:
        assert {f"hist_{kind}.png", f"ranges_{kind}.png"} <= names
        assert f"hist_{kind}.png" in page
    image = matplotlib_image.imread(tmp_path / "hist_activation_grads.png")
    assert image.shape[1] == 1000 and image.shape[0] > 400        # 10 in at 100 dpi; the format strips below
    assert image[..., :3].std() > 0.05                            # something drawn
    data = json.loads(paths["json"].read_text())
    assert {layer["name"] for layer in data["layers"]} >= {"fc1", "fc2", "fc3", "norm"}
    assert data["recommendation"]["compute_dtype"] == "bf16"
    assert dg.load_policy(paths["policy"]).compute_dtype == torch.bfloat16


def test_html_without_matplotlib_says_how_to_get_figures(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)    # import matplotlib raises ImportError
    torch.manual_seed(0)
    x, y = regression_task()
    report = dg.diagnose(MLP(), (x[:16], y[:16]), F.mse_loss, fp8_scaling=False)
    path = report.save_html(tmp_path)
    assert "pip install &#x27;mixprec[plot]&#x27;" in path.read_text()
    assert not list(tmp_path.glob("*.png"))


def test_monitor_gathers_every_n_steps_without_syncing():
    torch.manual_seed(0)
    model = MLP()
    x, y = regression_task()
    monitor = dg.DiagnosisMonitor(model, every=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(7):                       # sampled: steps 0, 3, 6
        F.mse_loss(model(x[:32]), y[:32]).backward()
        monitor.step()
        opt.step()
        opt.zero_grad()
    report = monitor.report()
    assert report.samples == 3
    assert report.layers["fc1"].activations.numel == 3 * 32 * 64
    assert report.layers["fc1"].activation_grads.numel == 3 * 32 * 64
    assert report.layers["fc1"].weight_grads.numel == 3 * (64 * 32 + 64)
    assert "3 sampled steps" in str(report)
    monitor.close()
    F.mse_loss(model(x[:32]), y[:32]).backward()
    assert monitor.report().layers["fc1"].activations.numel == 3 * 32 * 64   # hooks removed


def test_event_diagnosis_is_compact_and_names_nonfinite_gradients():
    torch.manual_seed(0)
    model = MLP()
    x, y = regression_task()
    F.mse_loss(model(x[:16]), y[:16]).backward()
    model.fc2.weight.grad[0, 0] = float("inf")
    event = dg.event_diagnosis(model)
    json.dumps(event)
    assert [d["param"] for d in event["nonfinite_grads"]] == ["fc2.weight"]
    quick = dg.event_diagnosis(model, (x[:16], y[:16]), _small_grad_loss)
    json.dumps(quick)
    assert quick["risky"] and quick["risky"][0]["why"].startswith("fp16 underflow")


def test_range_shifts_name_what_a_larger_batch_moved():
    torch.manual_seed(0)
    x, y = regression_task()
    small = dg.diagnose(MLP(), (x[:8], y[:8]), F.mse_loss, fp8_scaling=False)
    torch.manual_seed(0)
    large = dg.diagnose(MLP(), (x[:256], y[:256]), F.mse_loss, fp8_scaling=False)
    shifts = dg.range_shifts(small, large, top=5)
    assert len(shifts) == 5 and shifts[0].size >= shifts[-1].size
    # mean-reduced loss: per-sample activation gradients shrink with the batch
    grads = {(s.module, s.kind): s for s in dg.range_shifts(small, large, top=None)}
    assert grads[("fc3", "activation_grads")].log2_amax_shift < -2
    text = dg.describe_range_shifts({8: small, 256: large})
    assert text.startswith("256 against 8")


def test_fixed_size_bincount_matches_bincount(monkeypatch):
    """The path CUDA and compiled graphs take (histc, no read-back), in chunks, against torch.bincount."""
    from mixprec.diagnostics import stats
    g = torch.Generator().manual_seed(4)
    x = torch.randn(100_003, generator=g) * torch.exp2(torch.randint(-60, 60, (100_003,), generator=g).float())
    x[::7] = 0
    x[5], x[6] = float("nan"), float("inf")
    monkeypatch.setattr(stats, "HISTC_CHUNK", 30_000)
    a = x.abs()
    idx = torch.where(torch.isnan(a), stats.NAN_BIN, torch.bucketize(a, stats._boundaries(a.device), right=True))
    assert torch.equal(stats.fixed_bincount(idx), torch.bincount(idx, minlength=stats.N_BINS))


def test_monitor_traces_into_a_compiled_model():
    """Hooks registered before torch.compile trace into its graph (backend "eager": Dynamo's tracing without
    inductor's code generation, to keep the test short); the on/off switch costs one recompile."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    x, y = regression_task()
    monitor = dg.DiagnosisMonitor(model, every=2)
    compiled = torch.compile(model, backend="eager")
    for step in range(4):                       # sampled: steps 0, 2
        F.mse_loss(compiled(x[:32]), y[:32]).backward()
        monitor.step()
        model.zero_grad()
    report = monitor.report()
    monitor.close()
    assert report.samples == 2
    assert report.layers["fc2"].activations.numel == 2 * 32 * 64
    assert report.layers["fc2"].activation_grads.numel == 2 * 32 * 64
