"""The Triton kernels of the FP32 cross entropy (mixprec.ops._triton_cross_entropy) against head_loss.py's
PyTorch reference, in Triton's interpreter where there is no GPU (tests/triton_interpreter.py): the kernels
alone (one factor for every row, one per row, a row_grad of the wrong size, the fused loss and gradient),
and head_cross_entropy in one pass and in chunks with the kernels in place of the reference. On a GPU,
tests/test_ops_head_loss.py runs the compiled kernels. Without triton in the environment this test is skipped.
"""
import pytest
import torch

from helpers import relative_error
from tolerances import FP32_ORDER_RTOL, HEAD_LOSS_GRAD_RTOL
from triton_interpreter import check_in_interpreter, round_casts_like_the_gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernels are tested instead")
def test_cross_entropy_kernels_equal_the_reference_in_triton_interpreter():
    check_in_interpreter(__file__)


def _head_loss_and_grads(chunk_rows, dtype):
    import mixprec as mp
    torch.manual_seed(0)
    x = (torch.randn(3, 17, 32) * 2).requires_grad_()
    head = torch.nn.Linear(32, 300)
    target = torch.randint(0, 300, (3, 17))
    target[:, ::6] = -100
    loss = mp.ops.head_cross_entropy(x, head, target, compute_dtype=dtype, chunk_rows=chunk_rows)
    loss.backward()
    return [loss.detach(), x.grad, head.weight.grad, head.bias.grad]


def _interpreter_main() -> None:
    """Run in a subprocess with TRITON_INTERPRET=1 (see the test above)."""
    from mixprec.ops import _triton_cross_entropy as kernels
    from mixprec.ops import head_loss

    round_casts_like_the_gpu()
    problems = []
    torch.manual_seed(0)
    logits = torch.randn(40, 5000) * 8          # a row longer than one 4096-wide block
    target = torch.randint(0, 5000, (40,))
    target[::5] = -100
    lse, loss = kernels.forward(logits, target, -100)
    ref_lse, ref_loss = head_loss.row_logsumexp_loss(logits, target, -100)
    for name, got, ref in (("lse", lse, ref_lse), ("loss", loss, ref_loss)):
        if relative_error(got, ref) > FP32_ORDER_RTOL:
            problems.append(f"forward {name}: relative error {relative_error(got, ref):.2e} > {FP32_ORDER_RTOL}")
    for label, row_grad in (("one factor", torch.tensor(0.37)), ("one per row", torch.rand(40) + 0.5)):
        for dtype in (torch.float32, torch.bfloat16):
            got = kernels.backward(logits, lse, target, row_grad, -100, dtype)
            ref = head_loss.softmax_grad(logits, ref_lse, target, row_grad, -100, dtype)
            error = relative_error(got, ref)
            if got.dtype != dtype or error > HEAD_LOSS_GRAD_RTOL:
                problems.append(f"backward, {label}, {dtype}: {got.dtype}, relative error {error:.2e}")
    for dtype in (torch.float32, torch.bfloat16):
        got_loss, got_grad = kernels.loss_and_grad(logits, target, -100, dtype)
        ref_grad = head_loss.softmax_grad(logits, ref_lse, target, torch.tensor(1.0), -100, dtype)
        if relative_error(got_loss, ref_loss) > FP32_ORDER_RTOL:
            problems.append(f"loss_and_grad {dtype} loss: relative error {relative_error(got_loss, ref_loss):.2e}")
        if got_grad.dtype != dtype or relative_error(got_grad, ref_grad) > HEAD_LOSS_GRAD_RTOL:
            problems.append(f"loss_and_grad {dtype} grad: {got_grad.dtype}, "
                            f"relative error {relative_error(got_grad, ref_grad):.2e}")
    try:
        kernels.backward(logits, lse, target, torch.ones(7), -100, torch.float32)
        problems.append("a row_grad of 7 values for 40 rows was accepted")
    except ValueError as err:
        if "1 or 40" not in str(err):
            problems.append(f"row_grad error does not name the sizes: {err}")

    for chunk_rows in (None, 16):                # 51 rows: three chunks and a partial one
        for dtype in (torch.float32, torch.bfloat16):
            ref = _head_loss_and_grads(chunk_rows, dtype)
            reference = head_loss._kernels
            head_loss._kernels = lambda logits: kernels   # the kernels wherever the reference would run
            try:
                got = _head_loss_and_grads(chunk_rows, dtype)
            finally:
                head_loss._kernels = reference
            rtols = (FP32_ORDER_RTOL, HEAD_LOSS_GRAD_RTOL, HEAD_LOSS_GRAD_RTOL, HEAD_LOSS_GRAD_RTOL)
            for name, g, r, rtol in zip(("loss", "grad x", "grad W", "grad b"), got, ref, rtols):
                if relative_error(g, r) > rtol:
                    problems.append(f"head_cross_entropy chunk_rows={chunk_rows} {dtype} {name}: "
                                    f"relative error {relative_error(g, r):.2e} > {rtol}")
    print("\n".join(problems) if problems else "all equal")


if __name__ == "__main__":
    _interpreter_main()
