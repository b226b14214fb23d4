"""The Triton FP8 quantization kernels (mixprec.fp8._kernels) against the PyTorch path, in Triton's interpreter.

Where triton is installed without a GPU, TRITON_INTERPRET=1 runs the kernels on CPU tensors with numpy
(slow: small shapes). Codes and scales must equal quantize_pair(backend="emulate") bit for bit, for both
operands (x and x^T) of every granularity, and each op's fake implementation (what torch.compile traces)
must agree with it. On a GPU, tests/test_fp8_cuda.py checks the compiled kernels. Without triton in the
environment this test is skipped (the README's test command installs it).
"""
import pytest
import torch

from triton_interpreter import check_in_interpreter

GRANULARITIES = ("rowwise", "tensorwise", "1x128", "128x128")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernels are tested instead")
def test_kernels_equal_pytorch_in_triton_interpreter():
    check_in_interpreter(__file__)


def _inputs() -> dict[str, torch.Tensor]:
    """Partial tiles on both dimensions, outlier and tiny columns (saturation-free extremes, subnormal
    codes, signed zeros), an all-zero row and column (the amax floor), BF16 and column-major inputs."""
    torch.manual_seed(0)
    x = torch.randn(150, 200) * torch.exp(torch.randn(150, 200))
    x[:, 3] *= 1e4
    x[:, 7] *= 1e-6
    x[5] = 0.0
    x[:, 11] = 0.0
    x[9, 13] = -0.0
    return {"fp32": x, "bf16": x.bfloat16(), "column_major": x.t().contiguous().t()}


def _fuse_interpreter_fma() -> None:
    """Make the interpreter's tl.fma fused, as the GPU's is.

    Triton 3.6's interpreter computes fma as x * y + z in FP32, rounding the product; the kernels
    take the exact error x * inv - p of a product from it (its sign picks the round-to-odd step), so
    an unfused fma turns some FP8 ties into wrong codes. float64 holds the product of two FP32 values
    exactly, and the one rounding left (the sum's, then to FP32) keeps the error's sign.
    """
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    def fused_fma(self, x, y, z):
        exact = x.data.astype(np.float64) * y.data.astype(np.float64) + z.data.astype(np.float64)
        return TensorHandle(exact.astype(z.data.dtype), z.dtype.scalar)

    InterpreterBuilder.create_fma = fused_fma


def _interpreter_main() -> None:
    """Run in a subprocess with TRITON_INTERPRET=1 (see the test above)."""
    import triton

    from mixprec.fp8 import _kernels as kernels
    from mixprec.fp8.recipes import quantize_pair
    from quantization_cases import tie_tensor

    kernels._check = lambda x: None       # the interpreter runs on CPU tensors
    _fuse_interpreter_fma()
    launches, all_configs = {}, {}
    for name in dir(kernels):
        kernel = getattr(kernels, name)
        if isinstance(kernel, triton.runtime.Autotuner):
            all_configs[name] = list(kernel.configs)
            launches[name] = 0
            kernel.run = _counted(kernel.run, launches, name)
    problems = []
    n_case = 0
    for granularity in GRANULARITIES:
        for fmt in ("fp8_e4m3", "fp8_e5m2"):
            for power_of_2 in (False, True):
                for label, x in {**_inputs(), "ties": tie_tensor(fmt, 150, 200)}.items():
                    # no GPU to autotune on: each case runs the next config of every kernel (each
                    # kernel has 16 cases, at least as many as its configs)
                    for name, configs in all_configs.items():
                        getattr(kernels, name).configs = [configs[n_case % len(configs)]]
                    n_case += 1
                    case = f"{granularity} {fmt} pow2={power_of_2} {label} (config {n_case - 1})"
                    got = quantize_pair(x, fmt, granularity, backend="triton", power_of_2=power_of_2)
                    ref = quantize_pair(x, fmt, granularity, backend="emulate", power_of_2=power_of_2)
                    for which, g, r in zip(("x", "x^T"), got, ref):
                        if g.q.shape != r.q.shape or not torch.equal(g.q.view(torch.uint8), r.q.view(torch.uint8)):
                            problems.append(f"{case}: codes of {which} differ")
                        if g.scale.shape != r.scale.shape or not torch.equal(g.scale, r.scale):
                            problems.append(f"{case}: scales of {which} differ")
    # the fake (meta) implementations torch.compile traces with agree with the ops in shapes and dtypes
    x = _inputs()["fp32"]
    row_col = kernels.row_col_amax(x)
    for op, args in ((kernels._quantize_1x128_t_op, (x, "fp8_e4m3", False)),
                     (kernels._quantize_128x128_t_op, (x, "fp8_e4m3", False)),
                     (kernels._amax_op, (x,)),
                     (kernels._cast_t_op, (x, kernels.tensor_amax(x), "fp8_e5m2", False)),
                     (kernels._row_col_amax_op, (x,)),
                     (kernels._cast_rowwise_t_op, (x, *row_col, "fp8_e4m3", True))):
        try:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        except Exception as err:
            problems.append(f"{op}: {type(err).__name__}: {err}")
    # every kernel ran: quantize_pair did not fall back to the PyTorch path it is compared with
    problems += [f"{name} never launched" for name, n in launches.items() if n == 0]
    print("\n".join(problems) if problems else "all equal")


def _counted(run, launches: dict, name: str):
    def counted_run(*args, **kwargs):
        launches[name] += 1
        return run(*args, **kwargs)
    return counted_run


if __name__ == "__main__":
    _interpreter_main()
