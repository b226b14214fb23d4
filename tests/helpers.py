"""Shared test helpers: small models with the shapes the precision table has rows for, a regression task,
and a precision trace that records the dtype every aten op computes in, per module (a TorchDispatchMode).

The trace records an op's input precision as the narrowest format that holds its values exactly
("bf16" for an FP32 tensor of BF16 values), so traces compare across devices and emulation: a CPU
FP32 GEMM on BF16 values and a CUDA BF16 GEMM with FP32 output both read "bf16".
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mixprec as mp
from mixprec.formats import round_to


class RMSNorm(nn.Module):
    """Hand-written, as in LLaMA: not an nn.RMSNorm, matched by its class name."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.fc = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = mp.ops.attention(q, k, v, causal=True)  # hand-written attention: softmax and scores@V in FP32
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc(self.norm2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab=64, dim=32, heads=4, layers=2, block_size=16):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(block_size, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


class TinyCNN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.avg(F.relu(self.bn2(self.conv2(x)))).flatten(1)
        return self.fc(x)


class TinyRNNLM(nn.Module):
    def __init__(self, cell="lstm", vocab=64, dim=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        out, _ = self.rnn(self.emb(idx))
        return self.head(out)


class MLP(nn.Module):
    """A small regression/classification model for training-loop tests."""

    def __init__(self, inp=32, hidden=64, out=8):
        super().__init__()
        self.fc1 = nn.Linear(inp, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.gelu(self.norm(self.fc1(x))))))


def regression_task(seed=0, n=512):
    """A small regression task for the MLP: y = tanh(x W) + noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    w = torch.randn(32, 8, generator=g) / 4
    return x, torch.tanh(x @ w) + 0.05 * torch.randn(n, 8, generator=g)





# Ops that only move or cast data: they carry no precision decision of their own.
_IGNORED = {"_to_copy", "to", "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "clone",
            "detach", "alias", "slice", "select", "split", "split_with_sizes", "unsqueeze", "squeeze", "copy_",
            "empty", "empty_like", "zeros", "ones", "ones_like", "zeros_like", "arange", "lift_fresh", "full",
            "scalar_tensor", "_local_scalar_dense", "unbind", "contiguous", "as_strided", "new_empty",
            "new_zeros", "fill_", "zero_", "_reshape_alias", "tril", "triu", "logical_not", "bitwise_not",
            "masked_fill", "where", "eq", "lt", "gt", "ge", "le", "ne", "_unsafe_index", "index", "embedding",
            "copy", "set_", "resize_", "native_dropout", "bernoulli_", "rand", "randn", "_efficientzerotensor",
            "isnan", "isinf", "abs", "amax", "max", "min", "sign", "copysign", "bitwise_and", "bitwise_or",
            "__rshift__", "__lshift__", "_foreach_copy_", "empty_strided"}


GEMM_OPS = {"mm", "addmm", "bmm", "convolution", "mkldnn_convolution", "_convolution", "cudnn_convolution"}


def effective_precision(t: torch.Tensor) -> str:
    if not t.is_floating_point():
        return "int"
    if t.dtype in (torch.float16, torch.bfloat16):
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}[t.dtype]
    x = t.detach().float()
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return "fp32"
    # BF16 (7 mantissa bits) first: BF16 values in FP16's range are FP16 values too.
    if torch.equal(round_to(finite, "bf16"), finite):
        return "bf16"
    if torch.equal(round_to(finite, "fp16"), finite):
        return "fp16"
    return "fp32"


class PrecisionTrace(TorchDispatchMode):
    """Collects (module, op, input precisions, output precisions) for every compute op."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.stack: list[str] = []
        self.records: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = []
        self.outputs: dict[str, tuple[str, ...]] = {}  # module -> precisions of its (last) output
        self._hooks = []

    def __enter__(self):
        for name, module in self.model.named_modules():
            self._hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: self.stack.append(n)))
            self._hooks.append(module.register_forward_hook(lambda m, a, o, n=name: self._pop(n, o)))
        return super().__enter__()

    def _pop(self, name, output) -> None:
        self.stack.pop()  # (returns None: a forward hook's return value would replace the module's output)
        leaves = [o for o in torch.utils._pytree.tree_leaves(output) if isinstance(o, torch.Tensor)]
        with self.disabled():
            self.outputs[name] = tuple(effective_precision(o) for o in leaves if o.is_floating_point())

    def disabled(self):
        from torch.utils._python_dispatch import _disable_current_modes
        return _disable_current_modes()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in _IGNORED:
            flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]
            flat_out = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            ins = tuple(effective_precision(a) for a in flat_in if a.is_floating_point())
            outs = tuple(effective_precision(o) for o in flat_out if o.is_floating_point())
            module = self.stack[-1] if self.stack else ""
            self.records.append((module, name, ins, outs))
        return out

    def by_module(self, op_outputs: bool = True) -> dict[str, set[tuple[tuple[str, ...], tuple[str, ...]]]]:
        """module -> {(input precisions, output precisions)}: comparable across devices (op names differ).

        A GEMM's raw output is half natively and FP32-then-rounded when emulated, so GEMMs contribute
        their inputs (the module's output is recorded apart); op_outputs=False does so for every op.
        """
        summary: dict[str, set] = defaultdict(set)
        for module, op, ins, outs in self.records:
            summary[module].add((ins, outs if op_outputs and op not in GEMM_OPS else ()))
        for module, outs in self.outputs.items():
            summary[module].add((("output",), outs))
        return summary

    def ops(self, module: str, op: str) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        return [(ins, outs) for m, o, ins, outs in self.records if m == module and o == op]


def trace_forward(model, inputs, policy, loss_fn=None, targets=None, op_rules="auto"):
    """Trace the forward pass (and loss) of a prepared model under mp.autocast(policy) on the inputs' device."""
    with PrecisionTrace(model) as trace, mp.autocast(policy, device_type=inputs.device.type, op_rules=op_rules):
        out = model(inputs)
        if loss_fn is not None:
            loss_fn(out, targets)
    return trace


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Normwise relative error ||a - ref|| / ||ref||, computed in float64."""
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()
