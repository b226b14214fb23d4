"""Hooks that feed range statistics per (module, tensor kind) on the device: mp.diagnose and the monitor.

Per module: its outputs (activations) in a forward hook, the gradients of those outputs (activation
gradients) through a hook on each output tensor, and, when asked after the backward pass, its own
parameters (weights) and their .grad (weight gradients). Nothing is read back to the host until
`read()`, which copies every accumulator to the host in one transfer per device.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from mixprec.diagnostics.stats import GRANULARITIES, INT8_GRANULARITIES, KINDS, N_BINS, RangeAccumulator, fractions, int8_entry
from mixprec.formats import FORMATS

__all__ = ["Collector", "TensorStats", "module_names", "plain"]


@contextlib.contextmanager
def plain(device_type: str = "cpu") -> Iterator[None]:
    """Statistics ops run as written: no autocast, no torch-function mode (mp.autocast's FP16 emulation
    would round an amax to FP16). Under torch.compile the graph is left as traced."""
    if torch.compiler.is_compiling():
        yield
        return
    with torch._C.DisableTorchFunction(), torch.autocast(device_type, enabled=False):
        yield


def module_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> qualified name ("" for the root), the first name of a shared module."""
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    return names


def floating_leaves(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor) and t.is_floating_point()]


@dataclass
class TensorStats:
    """Statistics of one tensor kind of one module, over every tensor and call it saw.

    formats:     per format, fractions of all values: underflow (non-zero, flushes to zero), subnormal,
                 overflow (to inf, or saturating for FP8 E4M3); `zero` and `nonfinite` are the FP32
                 values' own.
    fp8_scaling: per granularity, the FP8 what-if: {"scale_spread_bits", "<fp8 format>": {"underflow",
                 "subnormal"}} (fractions of all values), or None when not computed.
    int8_scaling: the INT8 what-if (mixprec.diagnostics.stats), per granularity ("rowwise",
                 "tensorwise"): {"sqnr_db": SQNR of the quantized tensor against it, "zero": fraction of
                 all values that are non-zero but quantize to code 0}, or None when not computed.
    """

    module: str
    kind: str
    numel: int
    amax: float
    min_nonzero: float | None
    formats: dict[str, dict[str, float]]
    fp8_scaling: dict[str, dict[str, Any]] | None
    counts: list[int]          # the bucket counts (mixprec.diagnostics.stats), for histograms
    int8_scaling: dict[str, dict[str, float]] | None = None

    @property
    def log2_range(self) -> tuple[float, float] | None:
        """(log2 smallest non-zero magnitude, log2 amax), None for an all-zero tensor."""
        if self.min_nonzero is None or self.amax <= 0:
            return None
        return math.log2(self.min_nonzero), math.log2(self.amax)

    def histogram(self) -> dict[str, Any]:
        from mixprec.diagnostics.stats import histogram
        return histogram(self.counts)

    def to_dict(self) -> dict[str, Any]:
        h = self.histogram()
        return {"module": self.module, "kind": self.kind, "numel": self.numel, "amax": self.amax,
                "min_nonzero": self.min_nonzero, "formats": self.formats, "fp8_scaling": self.fp8_scaling,
                "int8_scaling": _finite(self.int8_scaling), "log2_histogram": {str(e): c for e, c in zip(h["exponents"], h["counts"]) if c},
                "zeros": h["zero"], "inf": h["inf"], "nan": h["nan"]}


class Collector:
    """Range statistics of a model's modules, gathered by hooks on the device.

    kinds: which of KINDS to gather; fp8_formats / whatif: the FP8 what-if scaling statistics (a few
    passes per tensor: for mp.diagnose, off by default in the monitor); int8: the INT8 what-if; modules: which modules (a
    predicate on (name, module); default every module). `active` switches the hooks on and off
    without removing them. preallocate: the buffers of every (module, kind) on the model's device at
    attach(), so that the hooks only update them in place (what torch.compile traces into a graph).
    """

    def __init__(self, model: nn.Module, *, kinds: tuple[str, ...] = KINDS, fp8_formats: tuple[str, ...] = (),
                 whatif: bool = False, modules: Callable[[str, nn.Module], bool] | None = None,
                 preallocate: bool = False, int8: bool = False) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"Unknown tensor kinds {sorted(unknown)}; choose from: {', '.join(KINDS)}")
        self.model = model
        self.kinds = tuple(kinds)
        self.fp8_formats = tuple(fp8_formats)
        self.whatif = whatif
        self.int8 = int8
        self.preallocate = preallocate
        self.select = modules or (lambda name, module: True)
        self.acc: dict[tuple[str, str], RangeAccumulator] = {}
        self.active = True
        self._handles: list[Any] = []
        self.classes: dict[str, str] = {}   # module name -> class name, in registration order
        self.leaves: set[str] = set()       # modules without children (their outputs are no other's)

    def _modules(self) -> Iterator[tuple[str, nn.Module]]:
        seen: set[int] = set()
        for name, module in self.model.named_modules():
            if id(module) in seen or not self.select(name, module):
                continue
            seen.add(id(module))
            yield name, module

    # ---- hooks ----------------------------------------------------------------------------------------
    def attach(self) -> "Collector":
        if self._handles:
            return self
        device = next((p.device for p in self.model.parameters()), None)
        for name, module in self._modules():
            self.classes[name] = type(module).__name__
            if not list(module.children()):
                self.leaves.add(name)
            if self.preallocate:
                own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
                for kind in self.kinds:
                    if kind.startswith("weight") and not own:
                        continue
                    self.acc[(name, kind)] = RangeAccumulator(self.fp8_formats, self.whatif, device, int8=self.int8)
            if "activations" in self.kinds or "activation_grads" in self.kinds:
                acts = self._accumulator(name, "activations") if "activations" in self.kinds else None
                grads = self._accumulator(name, "activation_grads") if "activation_grads" in self.kinds else None
                self._handles.append(module.register_forward_hook(self._forward_hook(acts, grads)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "Collector":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def _accumulator(self, name: str, kind: str) -> RangeAccumulator:
        acc = self.acc.get((name, kind))
        if acc is None:
            acc = self.acc[(name, kind)] = RangeAccumulator(self.fp8_formats, self.whatif, int8=self.int8)
        return acc

    def _forward_hook(self, acts: RangeAccumulator | None, grads: RangeAccumulator | None) -> Callable:
        # The accumulators are bound here, not looked up by name: under torch.compile the hook traces
        # into the model's graph as in-place updates of their buffers.
        def observe(t: torch.Tensor) -> None:
            if acts is not None:
                acts.add(t)
            if grads is not None and t.requires_grad:
                t.register_hook(lambda g: _add_plain(grads, g))

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self.active:
                return
            tensors = [output] if isinstance(output, torch.Tensor) else floating_leaves(output)
            for t in tensors:
                if not t.is_floating_point():
                    continue
                if torch.compiler.is_compiling():
                    observe(t)
                else:
                    with plain(t.device.type):
                        observe(t)
        return hook

    def add_parameters(self) -> None:
        """Weights and weight gradients (each module's own parameters); call after the backward pass."""
        for name, module in self._modules():
            for p in module.parameters(recurse=False):
                if not p.is_floating_point():
                    continue
                with plain(p.device.type):
                    if "weights" in self.kinds:
                        self._accumulator(name, "weights").add(p)
                    if "weight_grads" in self.kinds and p.grad is not None:
                        self._accumulator(name, "weight_grads").add(p.grad)

    def reset(self) -> None:
        for acc in self.acc.values():
            acc.reset()

    # ---- reading --------------------------------------------------------------------------------------
    def read(self) -> dict[tuple[str, str], TensorStats]:
        """Every accumulator that saw values, as TensorStats: one device-to-host copy per device."""
        by_device: dict[torch.device, list[tuple[tuple[str, str], list[torch.Tensor]]]] = {}
        for key, acc in self.acc.items():
            if acc.allocated:
                values = acc.values()
                by_device.setdefault(values[0].device, []).append((key, values))
        out: dict[tuple[str, str], TensorStats] = {}
        nf = len(self.fp8_formats)
        for device, entries in by_device.items():
            flat = torch.cat([v.reshape(-1) for _, values in entries for v in values]).cpu().tolist()
            pos = 0
            for key, values in entries:
                counts = [int(v) for v in flat[pos:pos + N_BINS]]
                amax, mn = flat[pos + N_BINS], flat[pos + N_BINS + 1]
                pos += N_BINS + 2
                fp8 = int8 = None
                acc = self.acc[key]
                if acc.fp8 is not None:
                    width = 2 * nf + 2
                    cells = flat[pos:pos + len(GRANULARITIES) * width]
                    pos += len(GRANULARITIES) * width
                    fp8 = _fp8_entry(cells, width, self.fp8_formats, max(sum(counts), 1))
                if acc.int8 is not None:
                    int8 = int8_entry(flat[pos:pos + 3 * len(INT8_GRANULARITIES)], sum(counts))
                    pos += 3 * len(INT8_GRANULARITIES)
                if sum(counts) == 0:
                    continue
                out[key] = TensorStats(
                    module=key[0], kind=key[1], numel=sum(counts), amax=amax,
                    min_nonzero=None if not math.isfinite(mn) else mn,
                    formats={f: fractions(counts, f) for f in FORMATS if f != "fp32"},
                    fp8_scaling=fp8, counts=counts, int8_scaling=int8)
        return out


def _finite(int8: dict[str, dict[str, float]] | None) -> dict[str, dict[str, Any]] | None:
    """JSON has no inf or NaN: an SQNR that is one is written as a string."""
    if int8 is None:
        return None
    return {g: {k: (v if math.isfinite(v) else str(v)) for k, v in e.items()} for g, e in int8.items()}


def _add_plain(acc: RangeAccumulator, grad: torch.Tensor) -> None:
    with plain(grad.device.type):
        acc.add(grad)


def _fp8_entry(cells: list[float], width: int, formats: tuple[str, ...], numel: int) -> dict[str, Any]:
    nf = len(formats)
    out = {}
    for g, gran in enumerate(GRANULARITIES):
        row = cells[g * width:(g + 1) * width]
        spread = row[2 * nf + 1] - row[2 * nf]
        entry: dict[str, Any] = {"scale_spread_bits": spread if math.isfinite(spread) else 0.0}
        for i, f in enumerate(formats):
            entry[f] = {"underflow": row[2 * i] / numel, "subnormal": row[2 * i + 1] / numel}
        out[gran] = entry
    return out
