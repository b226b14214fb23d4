"""DiagnosisMonitor: the range statistics of mp.diagnose gathered during training, every N steps.

    monitor = DiagnosisMonitor(model, every=100)
    for step in range(steps):
        loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        monitor.step()             # after backward, before zero_grad: weights and their grads on sampled steps
        scaler.step(opt); scaler.update(); opt.zero_grad()
    print(monitor.report())        # reads the device counters once

On a sampled step the hooks count activations and activation gradients on the device (no host
synchronisation); on the others they return at once (one Python call per module). Gradients are counted
as they are in .grad when step() runs: scaled, if it runs before the scaler unscales them.

Compiled models: hooks registered before torch.compile (create the monitor first, then compile) are
traced into the graph. The on/off switch is a Python attribute that Dynamo guards on, so a compiled model
gets two graphs (sampled and not) and recompiles nothing after. Weights and weight gradients are read
outside the graph and work with any compiled model.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from mixprec.diagnostics.collect import Collector
from mixprec.diagnostics.report import DiagnosisReport, ModuleDiagnosis
from mixprec.diagnostics.run import DEFAULT_FORMATS
from mixprec.diagnostics.stats import KINDS, split_formats
from mixprec.formats import get_format

__all__ = ["DiagnosisMonitor"]


class DiagnosisMonitor:
    """Range statistics of `model`'s modules every `every` training steps (see the module docstring).

    formats: the formats reported ("int8" adds the INT8 what-if, a few passes per tensor); kinds: which
    tensor kinds to gather; fp8_scaling: the FP8 what-if (costs a few passes per tensor); modules: a predicate (name, module) choosing modules (default all);
    loss_scale: the scale gradients carry when step() runs (for the report's header and recommend()).
    """

    def __init__(self, model: nn.Module, every: int = 100, *, formats: tuple[str, ...] = DEFAULT_FORMATS,
                 kinds: tuple[str, ...] = KINDS, fp8_scaling: bool = False,
                 modules: Callable[[str, nn.Module], bool] | None = None, loss_scale: float | None = None) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive number of steps; got {every!r}")
        self.model = getattr(model, "_orig_mod", model)
        self.every = every
        formats, int8 = split_formats(formats)
        self.formats = tuple(get_format(f).name for f in formats)
        self.loss_scale = loss_scale
        self.collector = Collector(self.model, kinds=kinds, fp8_formats=tuple(f for f in self.formats
                                                                               if f.startswith("fp8")),
                                   whatif=fp8_scaling, modules=modules, preallocate=True,
                                   int8=int8).attach()
        self.steps = 0
        self.samples = 0
        self.collector.active = True    # the first step is sampled

    @property
    def sampling(self) -> bool:
        """Whether the current step is gathered."""
        return self.collector.active

    def step(self) -> None:
        """Call once per training step, after the backward pass (and before the gradients are zeroed)."""
        if self.collector.active:
            self.collector.add_parameters()
            self.samples += 1
        self.steps += 1
        self.collector.active = self.steps % self.every == 0

    def report(self, *, reset: bool = False) -> DiagnosisReport:
        """The statistics gathered so far, summed over the sampled steps (one host transfer)."""
        stats = self.collector.read()
        layers = {}
        for name, cls in self.collector.classes.items():
            kinds = {k: stats.get((name, k)) for k in KINDS}
            if any(kinds.values()):
                layers[name] = ModuleDiagnosis(name=name, cls=cls, leaf=name in self.collector.leaves, **kinds)
        report = DiagnosisReport(layers=layers, formats=self.formats, loss_scale=self.loss_scale,
                                 samples=self.samples, device=_device(self.model))
        if reset:
            self.reset()
        return report

    def reset(self) -> None:
        """Forget what was gathered (the hooks stay)."""
        self.collector.reset()
        self.samples = 0

    def close(self) -> None:
        """Remove the hooks."""
        self.collector.detach()

    def __enter__(self) -> "DiagnosisMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _device(model: nn.Module) -> str:
    for p in model.parameters():
        return str(p.device)
    return "cpu"
