"""Running a Triton kernel test in Triton's CPU interpreter, where there is no GPU.

TRITON_INTERPRET is read when triton is imported, so a test re-runs its own file in a fresh process with
the flag set; that process prints "all equal" or the differences it found (`check_in_interpreter`).

The interpreter's float casts differ from the GPU's: it truncates FP32 -> BF16 and rounds FP8 half up, where
the GPU rounds to nearest even. `round_casts_like_the_gpu` replaces them by torch's conversions, which round
to nearest even, so the kernels' results can be compared bit for bit.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def check_in_interpreter(test_file: str) -> None:
    """Run `test_file` as a script under TRITON_INTERPRET=1 and fail with its output unless it ends in
    "all equal"; skip where triton is not installed."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, test_file], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("all equal"), out.stdout[-3000:] + out.stderr[-3000:]


def round_casts_like_the_gpu() -> None:
    """Make the interpreter's FP32/BF16/FP16/FP8 conversions round to nearest even (call in the subprocess)."""
    import numpy as np
    import triton.runtime.interpreter as interp

    as_torch = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                "fp8e4nv": torch.float8_e4m3fn, "fp8e5": torch.float8_e5m2}
    bits = {1: (np.uint8, torch.uint8), 2: (np.uint16, torch.int16), 4: (np.uint32, torch.int32)}
    original = interp._convert_float

    def convert(data, src, dst, rounding_mode):
        s, d = as_torch.get(src.name), as_torch.get(dst.name)
        if s is None or d is None:
            return original(data, src, dst, rounding_mode)
        t = torch.from_numpy(np.ascontiguousarray(data).copy()).view(s).to(d)
        return t.view(bits[d.itemsize][1]).numpy().view(bits[d.itemsize][0])

    interp._convert_float = convert
