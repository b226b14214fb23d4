"""The precision table, proven on the aten ops a model actually runs (recorded by a TorchDispatchMode)."""
import pytest
import torch
import torch.nn.functional as F

import mixprec as mp
from mixprec.ops import head_loss
from helpers import GEMM_OPS as GEMMS
from helpers import trace_forward
from helpers import TinyCNN, TinyGPT, TinyRNNLM

HALF = {"bf16-mixed": "bf16", "fp16-mixed": "fp16"}
# aten ops whose kernels compute in FP32 from half inputs (mixprec.rules.NORM_KERNEL_EVIDENCE; measured in
# test_rules.test_norm_kernels_compute_in_fp32_from_half_inputs)
FP32_KERNELS = {"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                "_native_batch_norm_legit_no_training", "cudnn_batch_norm", "native_layer_norm", "native_group_norm",
                "_fused_rms_norm"}


def _lm_loss(out, targets):
    return F.cross_entropy(out.flatten(0, 1), targets.flatten())


def _gpt_trace(recipe, device="cpu"):
    torch.manual_seed(0)
    model = mp.prepare(TinyGPT().to(device), recipe)
    idx = torch.randint(0, 64, (2, 16), device=device)
    return trace_forward(model, idx, recipe, _lm_loss, idx)


@pytest.mark.parametrize("recipe", ["bf16-mixed", "fp16-mixed"])
def test_gpt_block_follows_the_table(recipe):
    half = HALF[recipe]
    trace = _gpt_trace(recipe)
    for layer in ("blocks.0.qkv", "blocks.0.proj", "blocks.0.fc", "blocks.0.fc2", "blocks.1.fc"):
        gemms = [r for r in trace.records if r[0] == layer and r[1] in GEMMS]
        assert gemms, layer
        for _, op, ins, outs in gemms:  # Linear: half inputs (FP32 accumulation) and a half output
            assert set(ins) == {half}, (layer, op, ins, outs)
        assert trace.outputs[layer] == (half,)
    for norm in ("blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "norm"):
        computed = [r for r in trace.records if r[0] == norm]
        assert computed and all(outs == ("fp32",) for _, _, _, outs in computed), computed  # RMSNorm in FP32
    attention = [r for r in trace.records if r[0] == "blocks.0" and r[1] in ("bmm", "_softmax")]
    assert [op for _, op, _, _ in attention] == ["bmm", "_softmax", "bmm"]
    (_, _, qk_in, qk_out), (_, _, sm_in, sm_out), (_, _, pv_in, pv_out) = attention
    assert set(qk_in) == {half} and qk_out == ("fp32",)       # q @ k^T: half values, FP32 scores
    assert sm_in == ("fp32",) and sm_out == ("fp32",)         # softmax in FP32
    assert pv_in == ("fp32", half) and pv_out == ("fp32",)    # FP32 probabilities @ V, FP32 accumulate
    head = trace.ops("lm_head", "mm")
    assert head == [((half, half), ("fp32",))]                # head: half GEMM inputs, FP32 logits
    assert trace.outputs["lm_head"] == ("fp32",) and trace.outputs["tok"] == ("fp32",)  # embeddings FP32
    loss_ops = {op: (ins, outs) for m, op, ins, outs in trace.records if m == "" and "softmax" in op or "nll" in op}
    assert loss_ops["_log_softmax"] == (("fp32",), ("fp32",))  # the loss on FP32 logits, in FP32


@pytest.mark.parametrize("recipe", ["bf16-mixed", "fp16-mixed"])
def test_cnn_batchnorm_in_fp32_conv_and_pooling_in_half(recipe):
    half = HALF[recipe]
    torch.manual_seed(0)
    model = mp.prepare(TinyCNN(), recipe)
    trace = trace_forward(model, torch.randn(4, 1, 8, 8), recipe)
    for conv in ("conv1", "conv2"):
        ops = [r for r in trace.records if r[0] == conv and r[1] in GEMMS]
        assert ops and all(set(ins) == {half} for _, _, ins, _ in ops) and trace.outputs[conv] == (half,)
    for bn in ("bn1", "bn2"):   # half activations, FP32 parameters, the kernel computes in FP32
        ops = [r for r in trace.records if r[0] == bn and "batch_norm" in r[1]]
        assert ops and all(op in FP32_KERNELS and ins[0] == half and set(ins[1:]) <= {"fp32", "bf16", "fp16"}
                           for _, op, ins, _ in ops), ops
    assert trace.outputs["pool"] == (half,) and trace.outputs["avg"] == (half,)
    assert trace.ops("fc", "mm") == [((half, half), ("fp32",))]


@pytest.mark.parametrize("recipe", ["bf16-mixed", "fp16-mixed"])
def test_lstm_in_half_gru_in_fp32(recipe):
    half = HALF[recipe]
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (2, 8))
    lstm = trace_forward(mp.prepare(TinyRNNLM("lstm"), recipe), idx, recipe)
    # GEMMs of the decomposed cell, or one fused RNN kernel; zero initial states read as "bf16".
    lstm_gemms = [r for r in lstm.records if r[0] == "rnn" and (r[1] in GEMMS or "rnn" in r[1])]
    assert lstm_gemms and all(half in ins and set(ins) <= {half, "bf16"} for _, _, ins, _ in lstm_gemms)
    assert set(lstm.outputs["rnn"]) == {half}
    gru = trace_forward(mp.prepare(TinyRNNLM("gru"), recipe), idx, recipe)
    gru_ops = [r for r in gru.records if r[0] == "rnn" and r[1] != "unsafe_split"]
    assert gru_ops and all(outs[0] == "fp32" for _, _, _, outs in gru_ops)
    assert set(gru.outputs["rnn"]) == {"fp32"}


def test_user_rules_and_explain():
    class MyScaleNorm(torch.nn.Module):
        def forward(self, x):
            return x / x.norm(dim=-1, keepdim=True)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)
            self.scale_norm = MyScaleNorm()
            self.out = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.out(self.scale_norm(self.fc(x)))

    try:
        mp.rules.register_norm(MyScaleNorm)
        model = mp.prepare(Net(), "bf16-mixed")
        trace = trace_forward(model, torch.randn(4, 16), "bf16-mixed")
        ops = [r for r in trace.records if r[0] == "scale_norm"]
        assert ops and all(outs == ("fp32",) for _, _, _, outs in ops)
        text = mp.explain("bf16-mixed", model)
        assert "scale_norm" in text and "MyScaleNorm" in text and "output cast back" in text
    finally:
        mp.rules.reset()


def test_keep_fp32_by_name_and_allow_half_op():
    try:
        mp.rules.keep_fp32("blocks.0.fc")
        trace = _gpt_trace("bf16-mixed")
        assert all(outs == ("fp32",) and "bf16" not in ins[1:]
                   for _, _, ins, outs in (r for r in trace.records if r[0] == "blocks.0.fc"))
        mp.rules.reset()
        mp.rules.allow_half(F.cross_entropy)  # an override of the table: the loss in half
        trace = _gpt_trace("bf16-mixed")
        assert trace.ops("", "_log_softmax") == [(("bf16",), ("bf16",))]
    finally:
        mp.rules.reset()


@pytest.mark.cuda
@pytest.mark.parametrize("recipe", ["bf16-mixed", "fp16-mixed"])
def test_cpu_and_cuda_apply_the_same_table(recipe, monkeypatch):
    """The same model computes every op in the same precision on the CPU and on CUDA."""
    # The aten trace cannot see inside the loss's Triton kernels (tested apart in test_ops_head_loss).
    monkeypatch.setattr(head_loss, "_triton", lambda: None)
    for make, inputs, loss in [
        (TinyGPT, lambda d: torch.randint(0, 64, (2, 16), device=d), _lm_loss),
        (TinyCNN, lambda d: torch.randn(4, 1, 8, 8, device=d), None),
        (lambda: TinyRNNLM("lstm"), lambda d: torch.randint(0, 64, (2, 8), device=d), None),
        (lambda: TinyRNNLM("gru"), lambda d: torch.randint(0, 64, (2, 8), device=d), None),
    ]:
        summaries = []
        for device in ("cpu", "cuda"):
            torch.manual_seed(0)
            model = mp.prepare(make().to(device), recipe)
            torch.manual_seed(1)
            x = inputs(device)
            # Emulated FP16 rounds each op's output in a separate cast: compare inputs and module outputs.
            trace = trace_forward(model, x, recipe, loss, x, op_rules="intercept")   # the table's own op rows
            summaries.append(trace.by_module(op_outputs=recipe != "fp16-mixed"))
        cpu, cuda = summaries
        for module in set(cpu) | set(cuda):
            # RNN kernels differ in how they split their work, not in precision: compare output precisions.
            if module == "rnn":
                assert {o for _, outs in cpu[module] for o in outs} == {o for _, outs in cuda[module] for o in outs}
            else:
                assert cpu[module] == cuda[module], (make, module, cpu[module] ^ cuda[module])


@pytest.mark.parametrize("recipe", ["bf16-mixed", "fp16-mixed"])
def test_ops_cross_entropy_is_the_loss_row(recipe):
    """mp.ops.cross_entropy computes in FP32 from half logits, as the mode makes F.cross_entropy do."""
    torch.manual_seed(0)
    logits = (torch.randn(32, 50) * 4).to(torch.bfloat16)
    target = torch.randint(0, 50, (32,))
    reference = F.cross_entropy(logits.float(), target, reduction="sum")
    got = mp.ops.cross_entropy(logits, target, reduction="sum")
    assert got.dtype == torch.float32 and torch.equal(got, reference)
    with mp.autocast(recipe):
        intercepted = F.cross_entropy(logits, target, reduction="sum")
        inside = mp.ops.cross_entropy(logits, target, reduction="sum")
    assert torch.equal(intercepted, reference) and torch.equal(inside, reference)


def _op_table_cases(d):
    """Arguments (as a BF16 autocast region sees them) for every function of the built-in op table."""
    torch.manual_seed(0)
    x = (torch.randn(64, 16, device=d) * 3).bfloat16()
    y = torch.randn(64, 16, device=d).bfloat16()
    z = torch.randn(64, 16, device=d).bfloat16()
    shifted = (100 + torch.randn(64, 16, device=d)).bfloat16()     # norms: statistics in half would show
    p = torch.rand(64, 16, device=d).bfloat16()
    labels = torch.randint(0, 16, (64,), device=d)
    signs = (torch.randint(0, 2, (64,), device=d) * 2 - 1).float()
    w, b = torch.rand(16, device=d) + 0.5, torch.randn(16, device=d)
    multilabel = torch.full((64, 16), -1, dtype=torch.long, device=d)
    multilabel[:, :3] = torch.randint(0, 16, (64, 3), device=d)
    log_probs = torch.randn(20, 4, 10, device=d).log_softmax(-1).bfloat16()
    ctc = (log_probs, torch.randint(1, 10, (4, 6), device=d), torch.full((4,), 20, device=d),
           torch.full((4,), 6, device=d))
    softmaxes = {fn: lambda fn=fn: ((x, -1), {}) for fn in (
        torch.softmax, F.softmax, torch.Tensor.softmax, torch.log_softmax, F.log_softmax, torch.Tensor.log_softmax,
        torch.special.softmax, torch.special.log_softmax, F.softmin, torch.logsumexp, torch.Tensor.logsumexp,
        torch.cumsum, torch.Tensor.cumsum)}
    return {**softmaxes,
            torch.norm: lambda: ((x,), {}), torch.linalg.vector_norm: lambda: ((x,), {}),
            F.cross_entropy: lambda: ((x, labels), {}), F.nll_loss: lambda: ((x.log_softmax(-1), labels), {}),
            F.mse_loss: lambda: ((x, y), {}), F.l1_loss: lambda: ((x, y), {}),
            F.smooth_l1_loss: lambda: ((x, y), {}), F.huber_loss: lambda: ((x, y), {}),
            F.binary_cross_entropy: lambda: ((p, p), {}), F.binary_cross_entropy_with_logits: lambda: ((x, p), {}),
            F.kl_div: lambda: ((x.log_softmax(-1), y.softmax(-1)), {"reduction": "batchmean"}),
            F.poisson_nll_loss: lambda: ((x, p), {}), F.gaussian_nll_loss: lambda: ((x, y, p + 0.1), {}),
            F.cosine_embedding_loss: lambda: ((x, y, signs), {}), F.hinge_embedding_loss: lambda: ((x, y.sign()), {}),
            F.margin_ranking_loss: lambda: ((x[:, 0], y[:, 0], signs), {}),
            F.multilabel_margin_loss: lambda: ((x, multilabel), {}),
            F.multilabel_soft_margin_loss: lambda: ((x, (p > 0.5).bfloat16()), {}),
            F.multi_margin_loss: lambda: ((x, labels), {}), F.soft_margin_loss: lambda: ((x, y.sign()), {}),
            F.triplet_margin_loss: lambda: ((x, y, z), {}), F.ctc_loss: lambda: (ctc, {}),
            F.layer_norm: lambda: ((shifted, (16,), w, b), {}), F.rms_norm: lambda: ((shifted, (16,), w), {}),
            F.group_norm: lambda: ((shifted, 4, w, b), {}),
            F.batch_norm: lambda: ((shifted, torch.zeros(16, device=d), torch.ones(16, device=d), w, b, True), {}),
            F.instance_norm: lambda: ((shifted.view(4, 16, 16).transpose(1, 2).contiguous(),), {})}


@pytest.mark.cuda
def test_cuda_autocast_lists_compute_the_built_in_op_rows():
    """op_rules="autocast" (no function mode) gives what the rules give, on CUDA, for every built-in op
    function but CUDA_AUTOCAST_EXCEPTIONS, which do differ as stated."""
    from mixprec.rules import CUDA_AUTOCAST_EXCEPTIONS
    from tolerances import FP32_ORDER_ATOL, FP32_ORDER_RTOL
    cases = _op_table_cases("cuda")
    builtin = {fn for rule in mp.rules.BUILTIN_OP_RULES for fn in rule.functions}
    assert set(cases) == builtin

    def run(fn, op_rules):
        args, kwargs = cases[fn]()
        with mp.autocast("bf16-mixed", device_type="cuda", op_rules=op_rules):
            return fn(*args, **kwargs)

    wrong = []
    for fn in builtin:
        ruled = run(fn, "intercept")
        try:
            native = run(fn, "autocast")
        except RuntimeError as err:
            if fn not in CUDA_AUTOCAST_EXCEPTIONS:
                wrong.append(f"{fn}: raised {err}")
            continue
        if fn is F.binary_cross_entropy:
            wrong.append("torch.autocast no longer refuses binary_cross_entropy")
        if ruled.dtype == torch.float32:     # computed and returned in FP32
            same = native.dtype == torch.float32 and torch.allclose(native, ruled, rtol=FP32_ORDER_RTOL,
                                                                    atol=FP32_ORDER_ATOL)
        else:     # a norm: the rule casts back; the same FP32 values may round one BF16 ulp apart
            same = torch.allclose(native.to(ruled.dtype).float(), ruled.float(), rtol=2 ** -8, atol=0)
        if same == (fn in CUDA_AUTOCAST_EXCEPTIONS):
            diff = (native.float() - ruled.float()).abs().max().item()
            wrong.append(f"{fn}: {'agrees although listed' if same else 'differs'} (max |diff| {diff:.3g}, "
                         f"{native.dtype} under torch.autocast)")
    assert not wrong, "\n".join(wrong)
