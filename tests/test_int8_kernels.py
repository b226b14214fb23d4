"""The Triton INT8 GEMM (mixprec.int8._kernels) against the emulated definition, in Triton's interpreter.

Where triton is installed without a GPU, TRITON_INTERPRET=1 runs the kernel on CPU tensors with numpy
(slow: small shapes). Its output must equal gemm.mm_nt(backend="emulate") bit for bit, for every
tile configuration, partial tiles on every dimension, rowwise and tensorwise scales and each output
dtype; the op's fake implementation (what torch.compile traces) must agree with it. On a GPU,
tests/test_int8_cuda.py checks the compiled kernel. Without triton in the environment this test is
skipped (the README's test command installs it).
"""
import pytest
import torch

from triton_interpreter import check_in_interpreter, round_casts_like_the_gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernel is tested instead")
def test_triton_gemm_equals_emulation_in_triton_interpreter():
    check_in_interpreter(__file__)


def _cases():
    """(a, b) operands with codes at the extremes (+-127, zeros) and scales over many binades, on shapes
    with partial tiles in M, N and K (K past one BK tile and not a multiple of it), and a K that every
    tile's BK divides (the loads unmasked along K)."""
    from mixprec.int8.gemm import Operand

    g = torch.Generator().manual_seed(0)
    for m, n, k, a_rowwise, b_rowwise in ((150, 70, 300, True, True), (33, 260, 200, True, False),
                                          (300, 9, 129, False, True), (17, 17, 64, False, False),
                                          (70, 90, 256, True, True)):
        qa = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        qb = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        qa[0] = 127                      # the largest sums
        qb[0] = -127
        qa[1] = 0
        sa = torch.exp2(torch.randint(-30, 10, (m, 1), generator=g).float()) * (1 + torch.rand(m, 1, generator=g))
        sb = torch.exp2(torch.randint(-30, 10, (n, 1), generator=g).float()) * (1 + torch.rand(n, 1, generator=g))
        yield (f"M={m} N={n} K={k}", Operand(qa, sa if a_rowwise else sa[0, 0]),
               Operand(qb, sb if b_rowwise else sb[0, 0]))


def _interpreter_main() -> None:
    """Run in a subprocess with TRITON_INTERPRET=1 (see the test above)."""
    from mixprec.int8 import _kernels as kernels
    from mixprec.int8.gemm import Operand, mm_nt

    round_casts_like_the_gpu()   # the interpreter truncates FP32 -> BF16; the GPU rounds
    configs = list(kernels._int8_mm_nt_kernel.configs)
    problems, n_case = [], 0
    for label, a, b in _cases():
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            # no GPU to autotune on: each case runs the next config in turn (15 cases, 6 configs)
            kernels._int8_mm_nt_kernel.configs = [configs[n_case % len(configs)]]
            n_case += 1
            got = mm_nt(a, b, out_dtype=out_dtype, backend="triton")
            ref = mm_nt(a, b, out_dtype=out_dtype, backend="emulate")
            if got.dtype != ref.dtype or got.shape != ref.shape or not torch.equal(got, ref):
                bad = (got.float() != ref.float()).sum().item() if got.shape == ref.shape else "shape"
                problems.append(f"{label} {out_dtype} (config {n_case - 1}): {bad} values differ")
    for m, n, k in ((0, 5, 16), (4, 3, 0)):   # empty operands: nothing launched, an empty sum is zero
        a = Operand(torch.zeros(m, k, dtype=torch.int8), torch.ones(m, 1))
        b = Operand(torch.ones(n, k, dtype=torch.int8), torch.ones(n, 1))
        got = mm_nt(a, b, out_dtype=torch.bfloat16, backend="triton")
        if not torch.equal(got, mm_nt(a, b, out_dtype=torch.bfloat16, backend="emulate")):
            problems.append(f"empty M={m} N={n} K={k}: differs")
    _, a, b = next(_cases())
    try:
        torch.library.opcheck(kernels.int8_mm_nt, (a.q, b.q, a.scale, b.scale, torch.bfloat16),
                              test_utils=("test_schema", "test_faketensor"))
    except Exception as err:
        problems.append(f"int8_mm_nt: {type(err).__name__}: {err}")
    print("\n".join(problems) if problems else "all equal")


if __name__ == "__main__":
    _interpreter_main()
