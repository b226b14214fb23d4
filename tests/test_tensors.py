"""FP16 emulation on the CPU: FP16 values everywhere FP16 is stored, equal to native FP16 up to accumulation order."""
import torch
import torch.nn.functional as F

from torch.utils._python_dispatch import TorchDispatchMode

import mixprec as mp
from mixprec.formats import representable
from helpers import effective_precision
from helpers import TinyGPT
from tolerances import EMULATED_VS_NATIVE_FP16_GRAD_RTOL, EMULATED_VS_NATIVE_FP16_LOSS_RTOL


def _step(policy, seed=0):
    torch.manual_seed(seed)
    model = mp.prepare(TinyGPT(dim=64, layers=2), policy)
    idx = torch.randint(0, 64, (4, 16))
    outputs, output_grads = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.register_forward_hook(lambda m, a, o, n=name: outputs.__setitem__(n, o.detach()))
            module.register_full_backward_hook(lambda m, gi, go, n=name: output_grads.__setitem__(n, go[0]))
    with mp.autocast(policy):
        loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    (loss * 1024).backward()  # a modest static scale keeps small gradients above FP16's subnormals
    grads = {n: p.grad.float() / 1024 for n, p in model.named_parameters()}
    return loss.item(), grads, outputs, output_grads


def test_emulated_fp16_values_are_fp16():
    _, _, outputs, _ = _step(mp.Policy.from_recipe("fp16-mixed"))
    assert outputs
    for name, out in outputs.items():  # activations stored by half layers
        assert out.dtype == torch.float32 and representable(out, "fp16").all(), name


class _GemmOperands(TorchDispatchMode):
    """For every GEMM, in order: is each operand half (FP16 values, or an FP16 tensor) or FP32?"""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("mm", "addmm", "bmm"):
            self.seen.append(tuple("half" if effective_precision(a) in ("fp16", "bf16") else "fp32"
                                   for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


def _gemm_operands(policy):
    torch.manual_seed(0)
    model = mp.prepare(TinyGPT(dim=64, layers=2), policy)
    idx = torch.randint(0, 64, (4, 16))
    with _GemmOperands() as forward, mp.autocast(policy):
        loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    with _GemmOperands() as backward:
        (loss * 1024).backward()
    return forward.seen, backward.seen


def test_every_gemm_reads_fp16_where_native_fp16_does():
    """Forward and backward (activation and weight gradients): the same GEMMs, the same operand precisions."""
    emulated = _gemm_operands(mp.Policy.from_recipe("fp16-mixed"))
    native = _gemm_operands(mp.Policy.from_recipe("fp16-mixed", cpu_fp16="native"))
    assert emulated[0] == native[0] and emulated[1] == native[1]
    assert sum(op.count("half") for op in native[1]) > 20  # the backward really runs half GEMMs


def test_emulated_weight_gradients_are_fp16_values():
    torch.manual_seed(0)
    model = mp.prepare(TinyGPT(dim=64), "fp16-mixed")
    idx = torch.randint(0, 64, (4, 16))
    with mp.autocast("fp16-mixed"):
        loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    (loss * 1024).backward()
    half_layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for layer in half_layers:  # an FP32 master's gradient is the upcast of the FP16 gradient
        assert representable(layer.weight.grad, "fp16").all()


def test_emulation_equals_native_fp16():
    emulated = _step(mp.Policy.from_recipe("fp16-mixed"))
    native = _step(mp.Policy.from_recipe("fp16-mixed", cpu_fp16="native"))
    assert abs(emulated[0] - native[0]) / native[0] < EMULATED_VS_NATIVE_FP16_LOSS_RTOL
    for name, g_native in native[1].items():
        g_emulated = emulated[1][name]
        err = (g_emulated - g_native).norm() / g_native.norm()
        assert err < EMULATED_VS_NATIVE_FP16_GRAD_RTOL, (name, err.item())
