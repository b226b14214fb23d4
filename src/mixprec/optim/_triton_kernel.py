"""The fused Adam/AdamW Triton kernel: one launch updates every tensor of a parameter group.

Tensors are reached through a pointer table (one row of int64 addresses per tensor) and a program
table (each program's tensor and first element), so a launch covers any number of tensors of any
sizes. A program owns ROWS quantization blocks and handles each block as two halves (the 4-bit
layout packs value j with value j + BLOCK/2), so it reads every input once and writes once:

    load p, g, codes/moments and the blocks' absmax  ->  dequantize  ->  m, v in FP32
    absmax of the new m, v per block  ->  requantize, store codes and absmax
        (non-finite values are stored as 0 and left out of the absmax, as blockwise.quantize_blockwise)
    delta from the FP32 m, v  ->  p + delta rounded (nearest / stochastic / Kahan)  ->  store p

A loss scaler's found_inf masks every load and store (a skipped step moves no bytes and needs no
host sync); grad_scale divides the gradient. Compiled with enable_fp_fusion=False, so the FP32
arithmetic is the reference's operation for operation (reference.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

from mixprec.optim._triton_ops import (finite_or_zero, minifloat_decode, minifloat_encode, one_minus_exp, random_bits,
                                      stochastic_round, stream_key)

# State layouts (constexpr STATE) and parameter roundings (constexpr ROUNDING).
STATE_DENSE_F32, STATE_DENSE_BF16, STATE_MINIFLOAT, STATE_FP8 = 0, 1, 2, 3
ROUND_NEAREST, ROUND_STOCHASTIC, ROUND_KAHAN = 0, 1, 2
# Columns of the pointer table.
COLUMNS = ("param", "grad", "m", "v", "m_absmax", "v_absmax", "step", "kahan_comp")
NCOLS = len(COLUMNS)
MIN_ABSMAX = tl.constexpr(2.0 ** -100)   # codes.MIN_BLOCK_ABSMAX


@triton.jit
def _ptr(table, tid, COL: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Column COL of the tensor's row of the pointer table, as a pointer to DT (16-byte aligned if told:
    the hint must sit on the conversion itself, it does not survive being returned through a call)."""
    if ALIGNED:
        return tl.multiple_of(tl.load(table + tid * 8 + COL).to(tl.pointer_type(DT)), 16)
    return tl.load(table + tid * 8 + COL).to(tl.pointer_type(DT))


@triton.jit
def _load_moment(ptr, lo, hi, mlo, mhi, bytes_lo, dec, STATE: tl.constexpr, PACK4: tl.constexpr,
                 EXP: tl.constexpr, MAN: tl.constexpr, SIGNED: tl.constexpr, SUB: tl.constexpr):
    """FP32 values of one moment for both halves of the program's blocks."""
    if STATE == 2:
        if PACK4:
            q = tl.load(ptr + bytes_lo, mask=mlo, other=0).to(tl.int32)
            q_lo = q & 0xF
            q_hi = q >> 4
        else:
            q_lo = tl.load(ptr + lo, mask=mlo, other=0).to(tl.int32)
            q_hi = tl.load(ptr + hi, mask=mhi, other=0).to(tl.int32)
        x_lo = minifloat_decode(q_lo, EXP, MAN, SIGNED, SUB) * dec
        x_hi = minifloat_decode(q_hi, EXP, MAN, SIGNED, SUB) * dec
    elif STATE == 3:
        x_lo = tl.load(ptr + lo, mask=mlo, other=0.0).to(tl.float32) * dec
        x_hi = tl.load(ptr + hi, mask=mhi, other=0.0).to(tl.float32) * dec
    else:
        x_lo = tl.load(ptr + lo, mask=mlo, other=0.0).to(tl.float32)
        x_hi = tl.load(ptr + hi, mask=mhi, other=0.0).to(tl.float32)
    return x_lo, x_hi


@triton.jit
def _block_absmax(x_lo, x_hi):
    return tl.maximum(tl.max(tl.abs(x_lo), axis=1), tl.max(tl.abs(x_hi), axis=1))


@triton.jit
def _store_moment(ptr, absmax_ptr, x_lo, x_hi, lo, hi, mlo, mhi, bytes_lo, block_idx, mrow, rb_lo, rb_hi,
                  STATE: tl.constexpr, PACK4: tl.constexpr, S_DT: tl.constexpr, CODE_MAX: tl.constexpr,
                  CODE_LOW: tl.constexpr, EXP: tl.constexpr, MAN: tl.constexpr, SIGNED: tl.constexpr, SUB: tl.constexpr):
    """Write one moment back in its layout (codes + absmax, BF16 stochastically rounded, or FP32)."""
    if STATE >= 2:
        # A NaN or inf is stored as 0 and the scale is the finite values' (one bad value must not poison the
        # block's shared absmax); the caller's x_lo / x_hi, which the update uses, keep their FP32 values.
        # The select runs in every tile (step time on an H100, 16 x 4096^2 FP32 params: int8 -4 %, int4 +10 %,
        # fp8 +4 %): skipping it in tiles without a NaN/inf (a NaN-keeping absmax, then a branch) is 4-8 % slower.
        x_lo = finite_or_zero(x_lo)
        x_hi = finite_or_zero(x_hi)
        absmax = _block_absmax(x_lo, x_hi)
        tl.store(absmax_ptr + block_idx, absmax, mask=mrow)
        enc = tl.div_rn(tl.zeros_like(absmax) + CODE_MAX, tl.maximum(absmax, MIN_ABSMAX))[:, None]
        u_lo = x_lo * enc
        u_hi = x_hi * enc
        if STATE == 3:
            tl.store(ptr + lo, tl.minimum(tl.maximum(u_lo, CODE_LOW), CODE_MAX).to(S_DT), mask=mlo)
            tl.store(ptr + hi, tl.minimum(tl.maximum(u_hi, CODE_LOW), CODE_MAX).to(S_DT), mask=mhi)
        else:
            c_lo = minifloat_encode(u_lo, EXP, MAN, SIGNED, SUB)
            c_hi = minifloat_encode(u_hi, EXP, MAN, SIGNED, SUB)
            if PACK4:
                tl.store(ptr + bytes_lo, (c_lo | (c_hi << 4)).to(tl.uint8), mask=mlo)
            else:
                tl.store(ptr + lo, c_lo.to(tl.uint8), mask=mlo)
                tl.store(ptr + hi, c_hi.to(tl.uint8), mask=mhi)
    elif STATE == 1:
        tl.store(ptr + lo, stochastic_round(x_lo, rb_lo, tl.bfloat16), mask=mlo)
        tl.store(ptr + hi, stochastic_round(x_hi, rb_hi, tl.bfloat16), mask=mhi)
    else:
        tl.store(ptr + lo, x_lo, mask=mlo)
        tl.store(ptr + hi, x_hi, mask=mhi)


@triton.jit
def _param_delta(p, m, v, step_size, inv_sqrt_bc2, eps, lr_wd, DECOUPLED: tl.constexpr, HAS_WD: tl.constexpr):
    denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
    delta = -(step_size * tl.div_rn(m, denom))
    if DECOUPLED and HAS_WD:
        delta = delta - p * lr_wd
    return delta


@triton.jit
def _store_param(p_ptr, c_ptr, p, delta, offs, mask, key, ROUNDING: tl.constexpr, P_DT: tl.constexpr):
    if ROUNDING == 1:
        tl.store(p_ptr + offs, stochastic_round(p + delta, random_bits(offs, key), P_DT), mask=mask)
    elif ROUNDING == 2:
        comp = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = delta + comp
        new = (p + y).to(P_DT)
        tl.store(p_ptr + offs, new, mask=mask)
        tl.store(c_ptr + offs, (y - (new.to(tl.float32) - p)).to(P_DT), mask=mask)
    else:
        tl.store(p_ptr + offs, (p + delta).to(P_DT), mask=mask)


@triton.jit
def fused_adam_kernel(
    ptrs, numels, rng_base, prog_tensor, prog_start, grad_scale_ptr, found_inf_ptr,
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, ln_beta1, ln_beta2, eps, weight_decay, lr_wd,
    P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr, V_DT: tl.constexpr,
    STATE: tl.constexpr, PACK4: tl.constexpr,
    M_EXP: tl.constexpr, M_MAN: tl.constexpr, M_SUB: tl.constexpr, M_MAX: tl.constexpr, M_LOW: tl.constexpr,
    V_EXP: tl.constexpr, V_MAN: tl.constexpr, V_SUB: tl.constexpr, V_MAX: tl.constexpr, V_LOW: tl.constexpr,
    ROUNDING: tl.constexpr, DECOUPLED: tl.constexpr, HAS_WD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    TILE: tl.constexpr = BLOCK * ROWS
    pid = tl.program_id(0)
    tid = tl.load(prog_tensor + pid)
    start = tl.multiple_of(tl.load(prog_start + pid), TILE)
    numel = tl.load(numels + tid)
    if HAS_FOUND_INF:  # a skipped step has no live elements: it loads and stores nothing
        numel = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
    if ALIGNED:  # numel and every address divisible by 16 (checked on the host): masks and pointers are
        numel = tl.multiple_of(numel, 16)   # constant / aligned over 16 elements, so loads are 16-byte vectors
    _adam_tile(ptrs, tid, start, numel, rng_base, grad_scale_ptr, lr, beta1, one_minus_beta1, beta2,
               one_minus_beta2, ln_beta1, ln_beta2, eps, weight_decay, lr_wd, P_DT, G_DT, M_DT, V_DT,
               STATE, PACK4, M_EXP, M_MAN, M_SUB, M_MAX, M_LOW, V_EXP, V_MAN, V_SUB, V_MAX, V_LOW,
               ROUNDING, DECOUPLED, HAS_WD, HAS_GRAD_SCALE, ALIGNED, BLOCK, ROWS)


@triton.jit
def _adam_tile(
    ptrs, tid, start, numel, rng_base, grad_scale_ptr,
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, ln_beta1, ln_beta2, eps, weight_decay, lr_wd,
    P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr, V_DT: tl.constexpr,
    STATE: tl.constexpr, PACK4: tl.constexpr,
    M_EXP: tl.constexpr, M_MAN: tl.constexpr, M_SUB: tl.constexpr, M_MAX: tl.constexpr, M_LOW: tl.constexpr,
    V_EXP: tl.constexpr, V_MAN: tl.constexpr, V_SUB: tl.constexpr, V_MAX: tl.constexpr, V_LOW: tl.constexpr,
    ROUNDING: tl.constexpr, DECOUPLED: tl.constexpr, HAS_WD: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    """One program's ROWS blocks of one tensor; elements at or past `numel` are masked off."""
    HALF: tl.constexpr = BLOCK // 2
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, HALF)
    lo = start + rows[:, None] * BLOCK + cols[None, :]
    hi = lo + HALF
    bytes_lo = start // 2 + rows[:, None] * HALF + cols[None, :]   # 4-bit: byte j holds values j, j + HALF
    block_idx = start // BLOCK + rows
    mlo = lo < numel
    mhi = hi < numel
    mrow = block_idx * BLOCK < numel

    p_ptr = _ptr(ptrs, tid, 0, P_DT, ALIGNED)
    g_ptr = _ptr(ptrs, tid, 1, G_DT, ALIGNED)
    m_ptr = _ptr(ptrs, tid, 2, M_DT, ALIGNED)
    v_ptr = _ptr(ptrs, tid, 3, V_DT, ALIGNED)
    c_ptr = _ptr(ptrs, tid, 7, P_DT, ALIGNED)
    ma_ptr = _ptr(ptrs, tid, 4, tl.float32)
    va_ptr = _ptr(ptrs, tid, 5, tl.float32)
    t = tl.load(_ptr(ptrs, tid, 6, tl.float32)) + 1.0
    base = tl.load(rng_base + tid).to(tl.uint32)
    step_u32 = t.to(tl.uint32)

    p_lo = tl.load(p_ptr + lo, mask=mlo, other=0.0).to(tl.float32)
    p_hi = tl.load(p_ptr + hi, mask=mhi, other=0.0).to(tl.float32)
    g_lo = tl.load(g_ptr + lo, mask=mlo, other=0.0).to(tl.float32)
    g_hi = tl.load(g_ptr + hi, mask=mhi, other=0.0).to(tl.float32)
    if HAS_GRAD_SCALE:
        gs = tl.load(grad_scale_ptr).to(tl.float32)
        g_lo = tl.div_rn(g_lo, tl.zeros_like(g_lo) + gs)   # div_rn does not broadcast a scalar
        g_hi = tl.div_rn(g_hi, tl.zeros_like(g_hi) + gs)
    if not DECOUPLED and HAS_WD:
        g_lo = g_lo + p_lo * weight_decay
        g_hi = g_hi + p_hi * weight_decay

    m_dec = tl.zeros([ROWS, 1], tl.float32)
    v_dec = tl.zeros([ROWS, 1], tl.float32)
    if STATE >= 2:
        m_am = tl.load(ma_ptr + block_idx, mask=mrow, other=0.0)
        v_am = tl.load(va_ptr + block_idx, mask=mrow, other=0.0)
        m_dec = tl.div_rn(tl.maximum(m_am, MIN_ABSMAX), tl.zeros_like(m_am) + M_MAX)[:, None]
        v_dec = tl.div_rn(tl.maximum(v_am, MIN_ABSMAX), tl.zeros_like(v_am) + V_MAX)[:, None]
    m_lo, m_hi = _load_moment(m_ptr, lo, hi, mlo, mhi, bytes_lo, m_dec, STATE, PACK4, M_EXP, M_MAN, True, M_SUB)
    v_lo, v_hi = _load_moment(v_ptr, lo, hi, mlo, mhi, bytes_lo, v_dec, STATE, PACK4, V_EXP, V_MAN, False, V_SUB)

    # Values past the tensor's end are zero, as in the reference's padded blocks.
    m_lo = tl.where(mlo, m_lo * beta1 + g_lo * one_minus_beta1, 0.0)
    m_hi = tl.where(mhi, m_hi * beta1 + g_hi * one_minus_beta1, 0.0)
    v_lo = tl.where(mlo, v_lo * beta2 + (g_lo * g_lo) * one_minus_beta2, 0.0)
    v_hi = tl.where(mhi, v_hi * beta2 + (g_hi * g_hi) * one_minus_beta2, 0.0)

    # BF16 state: one random 32-bit number per element, low half for m, high half for v
    rb_lo = lo.to(tl.uint32)
    rb_hi = hi.to(tl.uint32)
    if STATE == 1:
        key_mv = stream_key(base, step_u32, 1)
        rb_lo = random_bits(lo, key_mv)
        rb_hi = random_bits(hi, key_mv)
    _store_moment(m_ptr, ma_ptr, m_lo, m_hi, lo, hi, mlo, mhi, bytes_lo, block_idx, mrow, rb_lo, rb_hi,
                  STATE, PACK4, M_DT, M_MAX, M_LOW, M_EXP, M_MAN, True, M_SUB)
    _store_moment(v_ptr, va_ptr, v_lo, v_hi, lo, hi, mlo, mhi, bytes_lo, block_idx, mrow, rb_lo >> 16, rb_hi >> 16,
                  STATE, PACK4, V_DT, V_MAX, V_LOW, V_EXP, V_MAN, False, V_SUB)

    bc1 = one_minus_exp(t * ln_beta1)   # accurate 1 - beta**t (GPU exp2 is approximate and 1 - x cancels)
    bc2 = one_minus_exp(t * ln_beta2)
    step_size = tl.div_rn(lr, bc1)
    inv_sqrt_bc2 = tl.div_rn(1.0, tl.sqrt_rn(bc2))
    d_lo = _param_delta(p_lo, m_lo, v_lo, step_size, inv_sqrt_bc2, eps, lr_wd, DECOUPLED, HAS_WD)
    d_hi = _param_delta(p_hi, m_hi, v_hi, step_size, inv_sqrt_bc2, eps, lr_wd, DECOUPLED, HAS_WD)
    key_p = stream_key(base, step_u32, 0)
    _store_param(p_ptr, c_ptr, p_lo, d_lo, lo, mlo, key_p, ROUNDING, P_DT)
    _store_param(p_ptr, c_ptr, p_hi, d_hi, hi, mhi, key_p, ROUNDING, P_DT)
