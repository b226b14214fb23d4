"""The models `mixprec train` and `mixprec compare` run: a small GPT, a CNN, and LSTM/GRU language models.

They are written plainly, as a user would write them, so that mixprec's rules (mp.prepare, mp.autocast)
are what keeps them numerically safe: the RMSNorm below does not upcast by itself, the GRU is not
pinned to FP32 here, and the attention goes through mixprec.ops.attention (FP32 softmax) or SDPA.

Every model maps a batch `x` to logits whose last dimension is the class count. The GPT also takes the
targets, nanoGPT style: `model(idx, targets) -> loss`, computed by mp.ops.head_cross_entropy (the FP32
head and loss fused, without materialising half logits). The CNN and the RNNs leave the loss to the
caller: `mp.ops.cross_entropy(logits.reshape(-1, C), y.reshape(-1))`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

import mixprec as mp

MODELS = ("gpt", "cnn", "lstm", "gru")
BYTE_VOCAB = 256          # byte-level text: every file is a sequence of bytes 0..255
DIGIT_CLASSES = 10


# ---- GPT ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Sizes and variants of the GPT. The defaults train on 2 CPU cores in about a minute."""

    vocab_size: int = BYTE_VOCAB
    seq_len: int = 128                 # context of 128 bytes: a few lines of Python
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    positions: Literal["learned", "rotary"] = "learned"
    head: Literal["tied", "separate"] = "tied"
    attention: Literal["manual", "sdpa"] = "manual"
    mlp_ratio: int = 4                 # GPT-2's hidden width of 4 d

    def __post_init__(self) -> None:
        _choice("positions", self.positions, ("learned", "rotary"))
        _choice("head", self.head, ("tied", "separate"))
        _choice("attention", self.attention, ("manual", "sdpa"))
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "mlp_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if self.positions == "rotary" and (self.d_model // self.n_head) % 2:
            raise ValueError(f"rotary positions need an even head size; got d_model/n_head = "
                             f"{self.d_model // self.n_head}")


class RMSNorm(nn.Module):
    """Root-mean-square norm (LLaMA): x / sqrt(mean(x^2) + eps) * weight.

    Written as a user would, without an FP32 upcast: mixprec's rules upcast it (mean of squares is a sum).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps  # LLaMA's 1e-6: keeps rsqrt finite for an all-zero row, negligible otherwise
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with q, k, v of shape (batch, heads, time, head_dim): mixprec.ops.attention,
    which keeps the scores, the softmax and scores @ V in FP32 (the table's attention row)."""
    return mp.ops.attention(q, k, v, causal=causal)


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer): rotates pairs of q/k channels by position-dependent angles."""

    def __init__(self, head_dim: int, seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        # base 10000 as in RoFormer/LLaMA: wavelengths from 2*pi to ~10000*2*pi positions
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        # not persistent: derived from the config, so checkpoints hold only learned state
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.size(-2)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        cos, sin = self.cos[:t], self.sin[:t]
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        return rotated.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.attention = cfg.n_head, cfg.attention
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = Rotary(cfg.d_model // cfg.n_head, cfg.seq_len) if cfg.positions == "rotary" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = manual_attention(q, k, v, causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.d_model), CausalSelfAttention(cfg)
        self.norm2 = RMSNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """A decoder-only transformer over bytes: pre-norm blocks (RMSNorm), causal attention, GELU MLP."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(_init_gpt_weights)
        for block in self.blocks:  # GPT-2: residual projections scaled by 1/sqrt(2 L) keep the stream's variance flat
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.head == "tied":
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
        """Logits (batch, time, vocab) of the next byte; with `targets` (batch, time), the cross-entropy
        instead (mean or sum over the positions), from the fused head + loss."""
        if idx.size(1) > self.cfg.seq_len:
            raise ValueError(f"sequence of {idx.size(1)} tokens is longer than seq_len={self.cfg.seq_len}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        hidden = self.norm(x)
        if targets is None:
            return self.lm_head(hidden)
        return _head_loss(hidden, self.lm_head, targets, reduction)   # lm_head.weight is the embedding's when tied


# Eager under torch.compile: a graph break after the blocks, and the fused op runs its own kernels.
@torch.compiler.disable
def _head_loss(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    return mp.ops.head_cross_entropy(hidden, head, targets, reduction=reduction)


def _init_gpt_weights(module: nn.Module) -> None:
    # GPT-2's N(0, 0.02) for every matrix: small enough that the initial logits are near uniform
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)


# ---- CNN ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class CNNConfig:
    """A small convolutional classifier for 8x8 grey images (the UCI digits)."""

    channels: int = 32
    num_classes: int = DIGIT_CLASSES

    def __post_init__(self) -> None:
        if self.channels <= 0 or self.num_classes <= 1:
            raise ValueError(f"channels must be positive and num_classes > 1; got {self.channels}, {self.num_classes}")


class CNN(nn.Module):
    """conv-BN-ReLU x2, max-pool 8x8 -> 4x4, conv-BN-ReLU, global average pool, linear head."""

    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        c = cfg.channels

        def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
            # no conv bias: the BatchNorm's shift replaces it
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        self.features = nn.Sequential(conv_bn(1, c), conv_bn(c, 2 * c), nn.MaxPool2d(2),
                                      conv_bn(2 * c, 2 * c), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * c, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ---- LSTM / GRU language models ------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RNNConfig:
    """A recurrent byte-level language model: embedding, stacked LSTM or GRU, linear head."""

    cell: Literal["lstm", "gru"] = "lstm"
    vocab_size: int = BYTE_VOCAB
    seq_len: int = 128
    d_model: int = 128       # embedding width
    hidden: int = 256
    n_layer: int = 1

    def __post_init__(self) -> None:
        _choice("cell", self.cell, ("lstm", "gru"))
        for name in ("vocab_size", "seq_len", "d_model", "hidden", "n_layer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")


class RNNLM(nn.Module):
    def __init__(self, cfg: RNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        rnn = nn.LSTM if cfg.cell == "lstm" else nn.GRU
        self.rnn = rnn(cfg.d_model, cfg.hidden, num_layers=cfg.n_layer, batch_first=True)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.tok_emb(idx))
        return self.lm_head(out)


# ---- factory -----------------------------------------------------------------------------------
ModelConfig = GPTConfig | CNNConfig | RNNConfig


# The size fields (command-line flags) each model takes.
MODEL_SIZES = {"gpt": ("n_layer", "n_head", "d_model", "seq_len", "positions", "head", "attention"),
               "cnn": ("channels",),
               "lstm": ("n_layer", "d_model", "seq_len", "hidden"),
               "gru": ("n_layer", "d_model", "seq_len", "hidden")}


def model_config(name: str, **sizes) -> ModelConfig:
    """The config for model `name` (one of MODELS) with the given sizes; None means the default.

    A size that does not apply to the model (e.g. `channels` for the GPT) raises ValueError naming the
    sizes that do: a flag that changes nothing is refused, not ignored.
    """
    _choice("model", name, MODELS)
    cls = {"gpt": GPTConfig, "cnn": CNNConfig, "lstm": RNNConfig, "gru": RNNConfig}[name]
    given = {k: v for k, v in sizes.items() if v is not None}
    for key in given:
        if key not in MODEL_SIZES[name]:
            raise ValueError(f"{_flag(key)} does not apply to --model {name}; its sizes are: "
                             f"{', '.join(map(_flag, MODEL_SIZES[name]))}")
    kwargs = dict(given)
    if cls is RNNConfig:
        kwargs["cell"] = name
    return cls(**kwargs)


def build_model(cfg: ModelConfig) -> nn.Module:
    """An FP32 model from its config (mp.prepare applies the precision policy afterwards)."""
    if isinstance(cfg, GPTConfig):
        return GPT(cfg)
    if isinstance(cfg, CNNConfig):
        return CNN(cfg)
    if isinstance(cfg, RNNConfig):
        return RNNLM(cfg)
    raise TypeError(f"expected GPTConfig, CNNConfig or RNNConfig; got {type(cfg).__name__}")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _choice(field: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {field} {value!r}; choose one of: {', '.join(choices)}")
