"""`mixprec bench`: a training step under a mixprec policy against plain torch.autocast, in one process.

For a named model (built from its config with random weights: nothing is downloaded) and a recipe,
two copies of the model, with the same initial weights, train side by side on the same batch:

    anchor:   torch.autocast(dtype) [+ torch.amp.GradScaler for FP16]        (what users have)
    mixprec:  mp.prepare(model, policy) + mp.autocast(policy) [+ mp.LossScaler]   (the README's loop)

each with torch's AdamW (fused on CUDA), optionally under torch.compile, TF32 on for both. The loss is
what each user writes: Hugging Face models compute theirs from `labels=`; the GPT's anchor runs
F.cross_entropy on its logits and its mixprec copy `model(idx, targets)`, the fused FP32 head + loss.

After a warm-up (compilation, autotuning, lazy optimizer state), the two are timed in interleaved
rounds, each round running `steps` steps of one and then of the other, the order alternating from round
to round, so that drifts of the GPU's clocks and the cost of going second hit both alike. The ratio is
the median of the per-round ratios of items per second (mixprec / anchor; above 1 mixprec is faster).
Peak memory (CUDA) is each variant's own: its resident parameters, buffers and optimizer state plus the
highest allocation above them during its timed steps, so neither the other copy nor the warm-up's
one-time work (compilation, Triton's autotuning scratch) counts.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import mixprec as mp

BENCH_MODELS = ("llama", "gpt2", "resnet50", "vit", "gpt")
BENCH_RECIPES = ("bf16-mixed", "fp16-mixed")
BENCH_DEVICES = ("cuda", "cpu")
VARIANTS = ("torch.autocast", "mixprec")


@dataclass
class Workload:
    """A model factory, a batch, and each variant's loss: `loss[variant](model, batch)`."""

    name: str
    build: Callable[[], torch.nn.Module]
    batch: Callable[[torch.device], Any]
    loss: dict[str, Callable[[torch.nn.Module, Any], torch.Tensor]]
    items_per_step: int
    item_name: str
    config: dict = field(default_factory=dict)
    channels_last: bool = False
    after_prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = None   # the mixprec copy only


def _same_loss(fn: Callable[[torch.nn.Module, Any], torch.Tensor]) -> dict[str, Callable]:
    return {variant: fn for variant in VARIANTS}


def _generator() -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(0)


def _hf_causal_lm(kind: str, tiny: bool, fused_head_loss: bool = False) -> Workload:
    try:
        import transformers
    except ImportError:
        raise ValueError(f"--model {kind} needs the transformers package: pip install transformers") from None
    batch, seq = (2, 32) if tiny else (8, 1024)
    if kind == "llama":   # hidden 1024, 12 layers, 16 heads, vocab 32000
        sizes = (dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512) if tiny else
                 dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=32000))
        config = transformers.LlamaConfig(**sizes, max_position_embeddings=seq, attn_implementation="sdpa")
        cls = transformers.LlamaForCausalLM
    else:                 # GPT-2 small: 768 wide, 12 layers, 12 heads, its 50257-token vocabulary
        sizes = (dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512, bos_token_id=0, eos_token_id=0) if tiny else
                 dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257))
        config = transformers.GPT2Config(**sizes, n_positions=seq, attn_implementation="sdpa")
        cls = transformers.GPT2LMHeadModel
    vocab = config.vocab_size

    def make_batch(device: torch.device) -> torch.Tensor:
        return torch.randint(0, vocab, (batch, seq), generator=_generator()).to(device)

    after = None
    if fused_head_loss:   # mixprec's copy computes the loss from the head's input, no logits kept
        from mixprec.integrations.transformers import fuse_head_loss
        after = fuse_head_loss
    return Workload(kind, lambda: cls(config), make_batch, _same_loss(lambda m, ids: m(input_ids=ids, labels=ids).loss),
                    batch * seq, "tokens", config={"batch": batch, "seq": seq, **sizes}, after_prepare=after)


def _vision(kind: str, tiny: bool) -> Workload:
    try:
        import torchvision
    except ImportError:
        raise ValueError(f"--model {kind} needs torchvision (a build that matches this torch: pip's wheels "
                         f"need a CUDA torch)") from None
    if kind == "resnet50":
        batch, image = (2, 32) if tiny else (128, 224)
        build = torchvision.models.resnet50
    else:
        batch, image = (2, 32) if tiny else (64, 224)
        if tiny:
            def build():
                return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                            hidden_dim=64, mlp_dim=128)
        else:
            build = torchvision.models.vit_b_16

    def make_batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        g = _generator()
        images = torch.randn(batch, 3, image, image, generator=g).to(device)
        if kind == "resnet50":
            images = images.contiguous(memory_format=torch.channels_last)
        return images, torch.randint(0, 1000, (batch,), generator=g).to(device)

    return Workload(kind, build, make_batch, _same_loss(lambda m, b: F.cross_entropy(m(b[0]), b[1])), batch, "images",
                    config={"batch": batch, "image": image}, channels_last=kind == "resnet50")


def _own_gpt(tiny: bool) -> Workload:
    from mixprec.train.models import GPT, GPTConfig
    batch, seq = (2, 32) if tiny else (8, 1024)
    config = (GPTConfig(vocab_size=512, seq_len=seq, n_layer=2, n_head=2, d_model=64, head="separate",
                        attention="sdpa") if tiny else
              GPTConfig(vocab_size=50304, seq_len=seq, n_layer=12, n_head=16, d_model=1024, head="separate",
                        attention="sdpa"))

    def make_batch(device: torch.device) -> torch.Tensor:
        return torch.randint(0, config.vocab_size, (batch, seq + 1), generator=_generator()).to(device)

    def anchor_loss(model, tokens):   # nanoGPT's loss under torch.autocast
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    loss = {"torch.autocast": anchor_loss, "mixprec": lambda model, tokens: model(tokens[:, :-1], tokens[:, 1:])}
    return Workload("gpt", lambda: GPT(config), make_batch, loss, batch * seq, "tokens",
                    config={"batch": batch, **asdict(config)})


def workload(name: str, *, tiny: bool = False, fused_head_loss: bool = False) -> Workload:
    """The benchmark's model `name` at the sizes the results record (`tiny`: a few layers of width 64 and
    a batch of 2, for a functional run on the CPU; not a measurement). fused_head_loss: the Hugging Face
    models' mixprec copy computes its loss with integrations.transformers.fuse_head_loss."""
    if fused_head_loss and name not in ("llama", "gpt2"):
        raise ValueError(f"--fused-head-loss applies to the Hugging Face causal LMs (llama, gpt2); {name!r} is not one")
    if name in ("llama", "gpt2"):
        return _hf_causal_lm(name, tiny, fused_head_loss)
    if name in ("resnet50", "vit"):
        return _vision(name, tiny)
    if name == "gpt":
        return _own_gpt(tiny)
    raise ValueError(f"Unknown model {name!r}; choose one of: {', '.join(BENCH_MODELS)}")


class _Variant:
    """One training loop: its model, optimizer, scaler and step."""

    def __init__(self, work: Workload, policy: mp.Policy, kind: str, compile: bool, device: torch.device) -> None:
        torch.manual_seed(0)   # the same initial weights for both variants
        model = work.build().to(device)
        if work.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if kind == "mixprec":
            model = mp.prepare(model, policy)
            if work.after_prepare is not None:
                model = work.after_prepare(model)
            self.scaler = mp.LossScaler.for_policy(policy)
            self.context = lambda: mp.autocast(policy, device_type=device.type)
        else:
            self.scaler = torch.amp.GradScaler(device.type, enabled=policy.compute_dtype == torch.float16)
            self.context = lambda: torch.autocast(device.type, dtype=policy.compute_dtype)
        self.model = model
        self.forward = torch.compile(model) if compile else model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.loss = work.loss[kind]

    def step(self, batch: Any) -> None:
        with self.context():
            loss = self.loss(self.forward, batch)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def resident_bytes(self) -> int:
        """Parameters, buffers and optimizer state, each storage once."""
        tensors = [*self.model.parameters(), *self.model.buffers(),
                   *(v for state in self.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


def check_arguments(model: str, recipe: str, *, steps: int, rounds: int, warmup: int, device: str,
                    tiny: bool = False, fused_head_loss: bool = False) -> Workload:
    """The workload of run_bench's arguments; ValueError (one line: the bad value and the choices) first.
    The device is checked first: on a machine without CUDA nothing else needs saying."""
    check_device(device)
    if model not in BENCH_MODELS:
        raise ValueError(f"Unknown model {model!r}; choose one of: {', '.join(BENCH_MODELS)}")
    if recipe not in BENCH_RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r} for bench; choose one of: {', '.join(BENCH_RECIPES)}")
    for name, value, least in (("steps", steps, 1), ("rounds", rounds, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"--{name} must be an integer >= {least}; got {value!r}")
    return workload(model, tiny=tiny, fused_head_loss=fused_head_loss)   # raises when a package is missing


def check_device(device: str) -> None:
    """ValueError (one line, naming the way out) for an unknown device, or CUDA on a machine without it."""
    if device not in BENCH_DEVICES:
        raise ValueError(f"Unknown device {device!r}; choose one of: {', '.join(BENCH_DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"mixprec bench times training on a CUDA GPU, and torch {torch.__version__} sees none; "
                         f"give --device cpu for a slow functional run (not a measurement)")


def run_bench(model: str, recipe: str, *, compile: bool = False, steps: int = 10, rounds: int = 5,
              warmup: int = 5, device: str = "cuda", tiny: bool = False, fused_head_loss: bool = False,
              profile_dir: Path | None = None, profile_steps: int = 3,
              progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Time mixprec against torch.autocast on one model and recipe (see the module docstring); returns
    the result as a JSON-ready dict. `progress` receives a line per phase and per round.
    profile_dir: afterwards, profile `profile_steps` more steps of each variant and write the traces and
    the side-by-side kernel table there (mixprec.train.bench_profile); the result's "profile" sums it up."""
    work = check_arguments(model, recipe, steps=steps, rounds=rounds, warmup=warmup, device=device, tiny=tiny,
                           fused_head_loss=fused_head_loss)
    dev = torch.device(device)
    # TF32 for both variants: what a GPU user's FP32 matmuls (optimizer excluded) run at
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    batch = work.batch(dev)
    policy = mp.Policy.from_recipe(recipe)
    variants = {kind: _Variant(work, policy, kind, compile, dev) for kind in VARIANTS}
    graph_breaks: dict[str, int] = {}
    for kind, variant in variants.items():
        progress(f"warm-up {kind}: {warmup} steps" + (", compiling" if compile else ""))
        before = graph_break_count()
        for _ in range(warmup):
            variant.step(batch)
        if compile:
            graph_breaks[kind] = graph_break_count() - before
            progress(f"{kind}: {graph_breaks[kind]} graph break(s)")
    _sync(dev)
    times: dict[str, list[float]] = {kind: [] for kind in variants}
    peaks: dict[str, int] = {}
    for r in range(rounds):
        for kind in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            variant = variants[kind]
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
                before = torch.cuda.memory_allocated(dev)
            start = time.perf_counter()
            for _ in range(steps):
                variant.step(batch)
            _sync(dev)
            times[kind].append(time.perf_counter() - start)
            if dev.type == "cuda":
                peak = torch.cuda.max_memory_allocated(dev) - before + variant.resident_bytes()
                peaks[kind] = max(peaks.get(kind, 0), peak)
        rates = {k: steps * work.items_per_step / t[-1] for k, t in times.items()}
        progress(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {rates[k]:,.0f} {work.item_name}/s" for k in VARIANTS)
                 + f" ({rates['mixprec'] / rates['torch.autocast']:.3f}x)")
    ratios = [a / m for a, m in zip(times["torch.autocast"], times["mixprec"])]
    profiled = None if profile_dir is None else _profile(variants, batch, profile_steps, dev, Path(profile_dir),
                                                         f"mixprec bench: {model}, {recipe}, "
                                                         f"{'compiled' if compile else 'eager'}", progress)
    return {"model": model, "recipe": recipe, "compile": compile, "fused_head_loss": fused_head_loss, "tiny": tiny,
            "device": _device_name(dev),
            "torch": torch.__version__, "config": work.config, "item_name": work.item_name, "warmup": warmup,
            "steps_per_round": steps, "rounds": rounds,
            "items_per_s": {k: steps * work.items_per_step / statistics.median(t) for k, t in times.items()},
            "items_per_s_by_round": {k: [steps * work.items_per_step / s for s in t] for k, t in times.items()},
            "ratio": statistics.median(ratios), "ratios": ratios,
            "peak_memory_bytes": peaks or None,
            "peak_memory_ratio": peaks["mixprec"] / peaks["torch.autocast"] if peaks else None,
            "graph_breaks": graph_breaks or None,
            **({"profile": profiled} if profiled is not None else {})}


def _profile(variants: dict[str, _Variant], batch: Any, steps: int, device: torch.device, out: Path, title: str,
             progress: Callable[[str], None]) -> dict[str, Any]:
    from mixprec.train import bench_profile

    out.mkdir(parents=True, exist_ok=True)
    progress(f"profiling {steps} steps of each variant into {out}")
    profiles = {kind: bench_profile.profile_steps(lambda v=variant: v.step(batch), steps, device,
                                                  out / f"trace-{kind}.json") for kind, variant in variants.items()}
    comparison = bench_profile.compare(profiles, *VARIANTS, unit="kernel" if device.type == "cuda" else "op")
    bench_profile.write_table(comparison, *VARIANTS, out / "kernels.md", title)
    return {**comparison, "rows": comparison["rows"][:bench_profile.TABLE_ROWS], "steps": steps, "dir": str(out)}


def graph_break_count() -> int:
    """Graph breaks Dynamo has counted in this process so far."""
    from torch._dynamo.utils import counters
    return sum(counters["graph_break"].values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
