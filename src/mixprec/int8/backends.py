"""Which backend runs an Int8Linear's integer GEMMs, and why.

    emulate  any device: the integer products of the INT8 codes summed exactly (in FP32 over chunks of
             1024 terms, where every partial sum is an integer below 2**24, and the chunks in float64),
             then the result rounded to FP32 as the int32 accumulator's conversion does. The same
             numbers as int_mm, bit for bit; the CPU path, and the reference.
    int_mm   torch._int_mm (cuBLASLt INT8 tensor cores, int32 accumulation) on CUDA GPUs of compute
             capability 8.0+ (Ampere, Ada, Hopper, newer); operands are zero-padded to its shape rules
             (M > 16, K and N multiples of 8), which adds nothing to the sums. Quantization and the
             scaling after the GEMM are PyTorch ops (torch.compile fuses them).
    triton   a Triton kernel (mixprec.int8._kernels) on the same GPUs: the int32 sums scaled in its
             epilogue, so no int32 result is written and read back; the same numbers bit for bit.
    auto     triton on Hopper and newer GPUs with triton installed (1.2-1.5x torch._int_mm's GEMM + scaling at
             a transformer's shapes on an H100: benchmarks/results/int8.md), int_mm on the other GPUs that
             run INT8 GEMMs (where the Triton GEMM is not measured yet), emulate elsewhere.
"""
from __future__ import annotations

import importlib.util

import torch

from mixprec.int8.config import BACKENDS

_DESCRIPTIONS = {
    "emulate": "INT8 codes and int32 sums emulated exactly (FP32/float64 integer arithmetic), then scaled in FP32",
    "int_mm": "INT8 GEMMs through torch._int_mm (int32 accumulation), scaled in FP32",
    "triton": "INT8 GEMMs in a Triton kernel (int32 accumulation) that scales in FP32 before writing",
}
# looked up once at import: torch.compile traces resolve_backend, and a constant traces cleanly
_TRITON = importlib.util.find_spec("triton") is not None

# torch._int_mm runs cuBLASLt's INT8 kernels; PyTorch tests them on Ampere and newer
MIN_CAPABILITY = (8, 0)
# where auto picks the Triton GEMM: the GPUs it was measured faster than torch._int_mm on (Hopper)
TRITON_AUTO_CAPABILITY = (9, 0)


def _cuda_capability(index: int | None) -> tuple[int, int]:
    if not torch.cuda.is_available():
        return (0, 0)
    return tuple(torch.cuda.get_device_capability(index))


def int8_gemm_supported(device: torch.device | str) -> bool:
    """Whether `device` runs torch._int_mm's INT8 tensor-core GEMMs (CUDA, capability >= 8.0)."""
    device = torch.device(device)
    return device.type == "cuda" and _cuda_capability(device.index) >= MIN_CAPABILITY


def _device_name(device: torch.device) -> str:
    major, minor = _cuda_capability(device.index) if device.type == "cuda" else (0, 0)
    if (major, minor) != (0, 0):
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return str(device)


def resolve_backend(backend: str, device: torch.device | str, *, int8_capable: bool | None = None) -> str:
    """The concrete backend ("emulate", "int_mm" or "triton") that `backend` means on `device`.

    int8_capable: whether `device` runs INT8 GEMMs, when the caller already knows (Int8Linear looks it
    up when its weight moves, so torch.compile traces no CUDA query); None: ask.
    Raises ValueError for an unknown name, and for int_mm where the device cannot run it, naming
    backend="emulate" as the way out.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown INT8 backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "emulate":
        return "emulate"
    device = torch.device(device)
    capable = int8_gemm_supported(device) if int8_capable is None else int8_capable
    if backend == "auto":
        if not capable:
            return "emulate"
        return "triton" if _TRITON and _cuda_capability(device.index) >= TRITON_AUTO_CAPABILITY else "int_mm"
    if not capable:
        raise ValueError(f"INT8 backend {backend!r} needs a CUDA GPU of compute capability "
                         f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ for INT8 tensor cores, but the tensors are on "
                         f"{_device_name(device)}; use backend='emulate' (the same numbers, exactly) on this device")
    if backend == "triton" and not _TRITON:
        raise ValueError("INT8 backend 'triton' needs the triton package; use backend='int_mm' or 'emulate'")
    return backend


def backend_info(backend: str = "auto", device: torch.device | str | None = None) -> str:
    """Which backend `backend` resolves to on `device` (default: the current CUDA device or the CPU)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    chosen = resolve_backend(backend, device)
    picked = f"{backend} -> {chosen}" if backend != chosen else chosen
    return f"INT8 backend {picked} on {_device_name(device)}: {_DESCRIPTIONS[chosen]}"
