"""Which backend runs a Float8Linear's quantization and GEMMs, and why.

    emulate  any device: the same quantization (codes and scales), then the GEMM in FP32 on the
             dequantized values. The reference the fast paths are tested against; the CPU path.
    cublas   quantization in PyTorch ops (fused by torch.compile's inductor), GEMMs through
             torch._scaled_mm (cuBLASLt); needs CUDA compute capability 8.9+ (Ada, Hopper, newer).
    triton   GEMMs as cublas, quantization in Triton kernels that read each tensor once and write
             the codes and their transpose together (the backward's layouts) in the same pass
             (tensorwise and rowwise scales need an amax pass over the tensor first).
    auto     on a GPU with FP8 tensor cores: triton (cublas where Triton is missing), in eager mode
             and under torch.compile alike, so a compiled model quantizes exactly as the eager one
             (the kernels are custom ops that inductor calls as they are; benchmarks/results/fp8.md
             compares them with inductor's own fusion of the cublas path); emulate elsewhere.
"""
from __future__ import annotations

import importlib.util

import torch

from mixprec.fp8.config import BACKENDS

_DESCRIPTIONS = {
    "emulate": "FP8 quantization emulated exactly, GEMMs in FP32 on the dequantized values",
    "cublas": "quantization in PyTorch ops, GEMMs in FP8 through torch._scaled_mm (cuBLASLt)",
    "triton": "quantization fused with the transpose in Triton kernels, GEMMs in FP8 through torch._scaled_mm",
}


# looked up once at import: torch.compile traces resolve_backend, and a constant traces cleanly
_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether Triton can be imported (it ships with CUDA builds of PyTorch)."""
    return _TRITON


def _cuda_capability(index: int | None) -> tuple[int, int]:
    """(major, minor) of CUDA device `index` (None: the current one); (0, 0) without CUDA."""
    if not torch.cuda.is_available():
        return (0, 0)
    return tuple(torch.cuda.get_device_capability(index))


def fp8_gemm_supported(device: torch.device | str) -> bool:
    """Whether `device` has FP8 tensor cores that torch._scaled_mm drives (CUDA, capability >= 8.9)."""
    device = torch.device(device)
    return device.type == "cuda" and _cuda_capability(device.index) >= (8, 9)


def _device_name(device: torch.device) -> str:
    major, minor = _cuda_capability(device.index) if device.type == "cuda" else (0, 0)
    if (major, minor) != (0, 0):
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return str(device)


def resolve_backend(backend: str, device: torch.device | str, *, fp8_capable: bool | None = None) -> str:
    """The concrete backend ("emulate", "cublas" or "triton") that `backend` means on `device`.

    fp8_capable: whether `device` runs FP8 GEMMs, when the caller already knows (Float8Linear looks
    it up when its weight changes device, so that torch.compile traces no CUDA query); None: ask.
    Raises ValueError for an unknown name, and for cublas/triton where the device cannot run FP8
    GEMMs, naming backend="emulate" as the way out.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown FP8 backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "emulate":
        return "emulate"
    capable = fp8_gemm_supported(device) if fp8_capable is None else fp8_capable
    if backend == "auto":
        if not capable:
            return "emulate"
        return "triton" if triton_available() else "cublas"
    if not capable:
        raise ValueError(f"FP8 backend {backend!r} needs a CUDA GPU of compute capability 8.9+ for FP8 GEMMs, "
                         f"but the tensors are on {_device_name(device)}; use backend='emulate' "
                         "(exact FP8 quantization, FP32 GEMMs) on this device")
    if backend == "triton" and not triton_available():
        raise ValueError("FP8 backend 'triton' needs the triton package; use backend='cublas' or 'emulate'")
    return backend


def backend_info(backend: str = "auto", device: torch.device | str | None = None) -> str:
    """Which backend `backend` resolves to on `device` (default: the current CUDA device or the CPU),
    and what it does, e.g. for mp.explain."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    chosen = resolve_backend(backend, device)
    picked = f"{backend} -> {chosen}" if backend != chosen else chosen
    return f"FP8 backend {picked} on {_device_name(device)}: {_DESCRIPTIONS[chosen]}"
