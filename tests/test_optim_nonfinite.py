"""A non-finite gradient element stays in its element, whatever the state layout (CPU).

Left in the block's FP32 absmax, one NaN or inf gradient element would turn the whole block (256 or 128
parameters) of int8, int4 or fp8 state NaN for good. The contract
(reference.reference_step, blockwise.quantize_blockwise): the parameter takes FP32 Adam's update (NaN for a
non-finite gradient, as torch.optim.AdamW gives), and block-quantized state stores a non-finite moment as 0
over the scale of the block's finite values.
"""
import math

import pytest
import torch

import mixprec.optim as mo
from mixprec.optim import blockwise, codes
from mixprec.optim.state import state_to_moments

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: threads only contend


N = 5000            # >= 4096 elements: quantized state; 5000 = 19.5 blocks of 256: a tail block
BAD = 300           # the poisoned element: block 1 of 256 (block 2 of 128), in its block's first half
STEPS, BAD_STEP = 6, 2   # two finite steps, the bad one, three finite ones
LR, WD = 1e-2, 0.1
BADS = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf")}
STATE_DTYPES = ["fp32", "bf16", "int8", "int4", "fp8"]
# Pure BF16/FP16 parameters (stochastic rounding, Kahan) and Adam's L2 decay, whose NaN parameter then
# feeds a NaN gradient into the moments at every later step.
EXTRA_CASES = [("int8", torch.bfloat16, "stochastic", mo.AdamW), ("int4", torch.float16, "kahan", mo.AdamW),
               ("bf16", torch.bfloat16, "stochastic", mo.AdamW), ("fp8", torch.bfloat16, "kahan", mo.AdamW),
               ("int8", torch.float32, "nearest", mo.Adam)]
CASES = [(s, torch.float32, "nearest", mo.AdamW) for s in STATE_DTYPES] + EXTRA_CASES


def _case_id(case):
    state_dtype, p_dtype, rounding, cls = case
    return f"{state_dtype}-{str(p_dtype).split('.')[-1]}-{rounding}-{cls.__name__}"


def _grads(seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(N, generator=gen) * 0.1 for _ in range(STEPS)]


def _run(case, grads):
    """Snapshots (parameter as FP32, m, v dequantized, raw state tensors) after every step."""
    state_dtype, p_dtype, rounding, cls = case
    gen = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter((torch.randn(N, generator=gen) * 0.5).to(p_dtype))
    opt = cls([p], lr=LR, weight_decay=WD, state_dtype=state_dtype, rounding=rounding, seed=3)
    out = []
    for g in grads:
        p.grad = g.to(p_dtype)
        opt.step()
        st = opt.state[p]
        m, v = state_to_moments(st, N)
        out.append((p.detach().float().clone(), m.clone(), v.clone(),
                    {k: t.clone() for k, t in st.items() if isinstance(t, torch.Tensor)}))
    return out


def _block_mask(state_dtype):
    """The elements sharing BAD's block scale (for dense state: BAD alone)."""
    fmt = codes.get_state_format(state_dtype)
    mask = torch.zeros(N, dtype=torch.bool)
    if fmt.quantized:
        first = BAD // fmt.block * fmt.block
        mask[first:first + fmt.block] = True
    else:
        mask[BAD] = True
    return mask


def _bits_equal(a, b):
    """Equal bit patterns (NaN included) of two tensors of one dtype."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.view(ints), b.view(ints))


@pytest.mark.parametrize("bad", list(BADS))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_nonfinite_gradient_stays_in_its_element(case, bad):
    state_dtype = case[0]
    fmt = codes.get_state_format(state_dtype)
    grads = _grads()
    poisoned = [g.clone() for g in grads]
    poisoned[BAD_STEP][BAD] = BADS[bad]
    got = _run(case, poisoned)
    block = _block_mask(state_dtype)
    elem = torch.zeros(N, dtype=torch.bool)
    elem[BAD] = True
    for step, (p, m, v, raw) in enumerate(got):
        where = f"step {step + 1}"
        # the parameter: FP32 Adam's update, NaN for a non-finite gradient (inf / inf), from then on NaN
        # there (as with torch.optim.AdamW) and finite everywhere else
        assert torch.isfinite(p[~elem]).all(), f"{where}: NaN/inf spread to {(~torch.isfinite(p)).sum()} params"
        assert bool(torch.isnan(p[BAD])) == (step >= BAD_STEP), where
        # the moments: finite everywhere for quantized state (a non-finite moment is stored as 0); FP32 and
        # BF16 state keep the element's own non-finite moments, as torch.optim.AdamW does
        for x in (m, v):
            assert torch.isfinite(x[~elem]).all(), f"{where}: a moment is non-finite outside the element"
            assert torch.isfinite(x[BAD]) == (fmt.quantized or step < BAD_STEP), where
        for k in ("exp_avg_absmax", "exp_avg_sq_absmax"):
            assert k not in raw or torch.isfinite(raw[k]).all(), f"{where}: {k}"

    # Against runs where that gradient was finite: its own value (not its block's largest moment) and 1.0
    # (10 sigma: the block's largest, so the block's scale differs from ours, where BAD stores 0).
    for finite_value, same_scale in ((grads[BAD_STEP][BAD].item(), True), (1.0, False)):
        finite = [g.clone() for g in grads]
        finite[BAD_STEP][BAD] = finite_value
        ref = _run(case, finite)
        scales_equal = True
        for step, ((p, m, v, raw), (rp, rm, rv, rraw)) in enumerate(zip(got, ref)):
            where = f"step {step + 1}, finite gradient {finite_value:.3g}"
            # Outside BAD's block (dense state: every other element) nothing depends on BAD's values: bit for
            # bit equal (blocks share nothing; stochastic rounding draws per element index).
            assert _bits_equal(p[~block], rp[~block]), f"{where}: parameters outside the block differ"
            assert _bits_equal(m[~block], rm[~block]) and _bits_equal(v[~block], rv[~block]), where
            if not fmt.quantized:
                continue
            k = BAD // fmt.block
            scales_equal &= bool(raw["exp_avg_absmax"][k] == rraw["exp_avg_absmax"][k]
                                 and raw["exp_avg_sq_absmax"][k] == rraw["exp_avg_sq_absmax"][k])
            near = block & ~elem
            diff = (p[near] - rp[near]).abs().max().item()
            if scales_equal:
                # the block's scale never differed: its other elements are bit for bit the finite run's
                assert diff == 0 and _bits_equal(m[near], rm[near]) and _bits_equal(v[near], rv[near]), where
            else:
                # The update of the bad step uses the FP32 moments (exact there); afterwards the neighbours'
                # moments decode on another scale. An Adam step moves an element by about lr (|m^|/sqrt(v^)
                # <~ 1); another scale changes that step, at most reversing it: |diff| <= 2 lr a later step.
                bound = 2 * LR * (step - BAD_STEP)
                assert diff <= bound, f"{where}: block neighbours moved {diff:.3g} (bound {bound:.3g})"
        if fmt.quantized:   # each reference exercised the branch it is there for
            assert scales_equal == same_scale, f"finite gradient {finite_value}: the scales were expected " \
                                               f"{'equal' if same_scale else 'to differ'}"


def _f32(x):
    return torch.tensor(x, dtype=torch.float32)


@pytest.mark.parametrize("bad", list(BADS))
@pytest.mark.parametrize("state_dtype", ["int8", "int4", "fp8"])
def test_quantized_state_follows_the_contract_written_plainly(state_dtype, bad):
    """The optimizer against the contract spelled out here: FP32 Adam, then moments with each non-finite
    value set to 0, quantized block-wise (the finite-input path that test_optim_codes checks). Codes and
    scales must match bit for bit (the moments are the same FP32 operations); parameters to FP32 rounding
    (this reference evaluates the bias corrections in FP64), with NaN exactly where FP32 Adam puts it."""
    fmt = codes.get_state_format(state_dtype)
    b1, b2, eps = 0.9, 0.999, 1e-8
    grads = _grads(seed=9)
    grads[BAD_STEP][BAD] = BADS[bad]
    grads[BAD_STEP + 1][BAD + 1] = BADS[bad]        # a second element of the same block, one step later
    gen = torch.Generator().manual_seed(4)
    p0 = torch.randn(N, generator=gen) * 0.5
    p = torch.nn.Parameter(p0.clone())
    opt = mo.AdamW([p], lr=LR, betas=(b1, b2), eps=eps, weight_decay=WD, state_dtype=state_dtype)

    def quantize(x, code):
        return blockwise.quantize_blockwise(torch.where(torch.isfinite(x), x, torch.zeros(())), code, fmt.block)

    want_p = p0.clone()
    (qm, am), (qv, av) = quantize(torch.zeros(N), fmt.m_code), quantize(torch.zeros(N), fmt.v_code)
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        m_old = blockwise.dequantize_blockwise(qm, am, fmt.m_code, fmt.block, N)
        v_old = blockwise.dequantize_blockwise(qv, av, fmt.v_code, fmt.block, N)
        m = m_old * _f32(b1) + g * _f32(1 - b1)
        v = v_old * _f32(b2) + (g * g) * _f32(1 - b2)
        m_hat, v_hat = m.double() / (1 - b1 ** t), v.double() / (1 - b2 ** t)
        want_p = (want_p.double() - LR * m_hat / (v_hat.sqrt() + eps) - LR * WD * want_p.double()).float()
        (qm, am), (qv, av) = quantize(m, fmt.m_code), quantize(v, fmt.v_code)
        st = opt.state[p]
        assert _bits_equal(st["exp_avg_codes"], qm) and torch.equal(st["exp_avg_absmax"], am), f"step {t}: m"
        assert _bits_equal(st["exp_avg_sq_codes"], qv) and torch.equal(st["exp_avg_sq_absmax"], av), f"step {t}: v"
        assert torch.equal(torch.isnan(p.detach()), torch.isnan(want_p)), f"step {t}: NaN elsewhere than FP32 Adam"
        torch.testing.assert_close(p.detach(), want_p, rtol=1e-5, atol=1e-7, equal_nan=True)
    assert torch.isnan(p.detach()).sum() == 2 and torch.isnan(p.detach()[BAD:BAD + 2]).all()


@pytest.mark.parametrize("state_dtype", ["int8", "int4", "fp8"])
def test_overflowing_second_moment_stays_in_its_element(state_dtype):
    # A finite gradient whose square overflows FP32 (|g| > 1.8e19) makes v = inf: FP32 Adam's update of that
    # element is then the decay alone (m / inf = 0), and the block must not take the inf as its v scale.
    p0 = torch.randn(N) * 0.5
    p = torch.nn.Parameter(p0.clone())
    opt = mo.AdamW([p], lr=LR, weight_decay=WD, state_dtype=state_dtype)
    g = torch.randn(N) * 0.1
    g[BAD] = 1e20
    p.grad = g
    opt.step()
    assert p[BAD].item() == (p0[BAD] - p0[BAD] * torch.tensor(LR * WD)).item()
    elsewhere = torch.ones(N, dtype=torch.bool)
    elsewhere[BAD] = False
    for _ in range(2):
        p.grad = torch.randn(N) * 0.1
        opt.step()
        m, v = state_to_moments(opt.state[p], N)
        assert torch.isfinite(p[elsewhere]).all() and torch.isfinite(m).all() and torch.isfinite(v).all()
        assert torch.isfinite(opt.state[p]["exp_avg_sq_absmax"]).all()


def test_fp32_checkpoint_with_a_nan_loads_into_low_bit_state_without_spreading():
    # torch.optim.AdamW keeps the NaN in its moments; converting that state to int8 must confine it too
    p = torch.nn.Parameter(torch.randn(N))
    ref = torch.optim.AdamW([p], lr=LR)
    g = torch.randn(N)
    g[BAD] = float("nan")
    p.grad = g
    ref.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt = mo.AdamW([q], lr=LR, state_dtype="int8")
    opt.load_state_dict(ref.state_dict())
    m, v = state_to_moments(opt.state[q], N)
    assert torch.isfinite(m).all() and torch.isfinite(v).all()
    q.grad = torch.randn(N)
    opt.step()
    assert torch.isnan(q.detach()).nonzero().flatten().tolist() == [BAD]
    assert not math.isnan(float(opt.state[q]["exp_avg_absmax"].sum()))
