"""Probes behind the end-to-end FP8 figures (GPU only), each against an anchor in the same process.

    host     the CPU time of one quantize_pair call (triton backend) per granularity, on a tensor small
             enough that the GPU is never the bottleneck: what each call costs the host, against a
             torch op (abs().amax()) and a bare launch of the same Triton kernel. In a training step the
             GPU idles where the host falls behind, so this bounds what a lighter launch path can save.
    gemm     torch._scaled_mm at a weight-gradient shape (out N x K, reduced over M tokens) and a forward
             shape, per scale layout and output dtype: whether the blockwise weight-gradient GEMM (1x128 x
             1x128 scales, FP32 out) is slow for its scales or for its FP32 output.
    tgemm    a Triton blockwise GEMM (blockwise_gemm_triton.py, an experiment) against torch._scaled_mm on
             the blockwise GEMMs of the d=4096 GPT (4096 tokens): weight gradients (1x128 x 1x128) and
             forward products (1x128 x 128x128), each autotuned, then every config alone on one shape,
             and a Triton FP8 GEMM without per-K scales (one scale for the whole product) as the ceiling.
    ggemm    the same GEMMs in Gluon (blockwise_gemm_gluon.py, an experiment: warp specialized, one
             warpgroup's promotions beside the other's products): each config on the largest weight
             gradient, then the best on all eight, against cuBLAS and an FP32 product of the dequantized
             operands.
    amax     the tensorwise amax pass (a read-only reduction) against variants: its strip loop unrolled
             (every load issued at once) and a persistent grid (a few programs per SM striding over the
             tiles), on a BF16 activation and an FP32 master weight; kernel time by CUDA graph without
             an L2 flush, the anchor a device-to-device copy of the same tensor.
    rowamax  the rowwise recipe's row-and-column amax pass against the same kernel reducing in BF16,
             with its strips unrolled, and per-tile partial maxima reduced by torch.amax; CUDA-graph
             timing after a read flush of L2, as bench_fp8.py quantize.

    PYTHONPATH=src python3 benchmarks/probe_fp8.py [host] [gemm] [tgemm] [ggemm] [amax] [rowamax] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import triton
import triton.testing

import triton.language as tl

import blockwise_gemm_triton as tgemm
from mixprec.fp8 import kernels
from mixprec.fp8.gemm import Operand, mm_nt
from mixprec.fp8.quantize import dequantize
from mixprec.fp8.recipes import quantize_pair


def _host_us(fn, calls: int = 300) -> float:
    """Wall time per call (us) of `calls` calls queued without a sync (the GPU work per call is tiny)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def probe_host() -> list[dict]:
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    rows = [dict(probe="host", what="anchor: x.abs().amax()", us_per_call=round(_host_us(lambda: x.abs().amax()), 1))]
    for gran in ("tensorwise", "rowwise", "1x128", "128x128"):
        us = _host_us(lambda: quantize_pair(x, "fp8_e4m3", gran, backend="triton", power_of_2=False))
        rows.append(dict(probe="host", what=f"quantize_pair {gran} (custom ops)", us_per_call=round(us, 1)))
    amax = kernels.tensor_amax(x)
    rows.append(dict(probe="host", what="tensor_amax op alone",
                     us_per_call=round(_host_us(lambda: kernels.tensor_amax(x)), 1)))
    rows.append(dict(probe="host", what="cast_t op alone (amax given)",
                     us_per_call=round(_host_us(lambda: kernels.quantize_tensor_t(x, "fp8_e4m3", amax=amax)), 1)))
    # the same amax kernel launched bare (its autotuned config already chosen above): Triton's own launch cost
    out = torch.zeros((), device="cuda")
    cfg = kernels._amax_kernel.best_config
    kern, kw = kernels._amax_kernel.fn, dict(cfg.kwargs, num_warps=cfg.num_warps)
    grid = (triton.cdiv(256, kw["BR"] * kw["STRIPS"]), triton.cdiv(256, kw["BK"]))
    rows.append(dict(probe="host", what="amax kernel, bare Triton launch",
                     us_per_call=round(_host_us(lambda: kern[grid](x, out, 256, 256, **kw)), 1)))
    rows.append(dict(probe="host", what="amax kernel through the autotuner",
                     us_per_call=round(_host_us(lambda: kernels._amax_kernel[grid](x, out, 256, 256)), 1)))
    return rows


def profile_host(granularity: str, calls: int = 500, top: int = 22) -> None:
    """Where the host time of quantize_pair goes: cProfile's functions by their own time."""
    import cProfile
    import pstats
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    fn = lambda: quantize_pair(x, "fp8_e4m3", granularity, backend="triton", power_of_2=False)   # noqa: E731
    _host_us(fn, calls=20)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    print(f"--- host profile of {calls} quantize_pair calls, {granularity}", flush=True)
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def probe_gemm(m: int = 4096, n: int = 16384, k: int = 4096) -> list[dict]:
    """dW = dy^T (n, m) @ x (m, k): operands (n, m) and (k, m) quantized along m; forward (m, k) x (n, k)."""
    rows = []
    dyt = torch.randn(n, m, device="cuda", dtype=torch.bfloat16)
    xt = torch.randn(k, m, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    flops = 2 * m * n * k
    q = {}
    for name, t, gran in (("dyT", dyt, "1x128"), ("xT", xt, "1x128"), ("x", x, "1x128"), ("w", w, "128x128"),
                          ("dyT_tw", dyt, "tensorwise"), ("xT_tw", xt, "tensorwise")):
        q[name] = quantize_pair(t, "fp8_e4m3", gran, backend="triton", power_of_2=False)[0]
    cases = [("wgrad 1x128 x 1x128", "dyT", "xT"), ("wgrad tensorwise", "dyT_tw", "xT_tw"),
             ("forward 1x128 x 128x128", "x", "w")]
    for label, a, b in cases:
        for out in (torch.float32, torch.bfloat16):
            fn = lambda: mm_nt(q[a], q[b], out_dtype=out, backend="cublas")   # noqa: E731
            ms = triton.testing.do_bench(fn, return_mode="median")
            rows.append(dict(probe="gemm", what=f"{label}, {str(out).split('.')[1]} out",
                             shape=f"{q[a].q.shape[0]}x{q[b].q.shape[0]}, K={q[a].q.shape[1]}", ms=round(ms, 4),
                             TFLOPs=round(flops / ms / 1e9)))
    # the BF16 GEMM of the same wgrad shape: the anchor every FP8 ratio above is read against
    a16, b16 = dyt, xt
    ms = triton.testing.do_bench(lambda: a16 @ b16.t(), return_mode="median")
    rows.append(dict(probe="gemm", what="anchor: wgrad in BF16 (bf16 out)", shape=f"{n}x{k}, K={m}", ms=round(ms, 4),
                     TFLOPs=round(flops / ms / 1e9)))
    return rows


def _blockwise_cases(tokens: int, d: int):
    """The blockwise GEMMs of the d-wide GPT's linears (QKV, out, FC1, FC2) at `tokens` tokens, per
    linear its forward (1x128 x 128x128 scales) and its weight gradient (1x128 x 1x128):
    ([(label, A operand, B operand, out dtype)], (dy, x) of FC1 in BF16, whose weight gradient is
    cases[5], the largest)."""
    cases = []
    for n_out, n_in in [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]:        # (out, in) features
        x = torch.randn(tokens, n_in, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n_out, n_in, device="cuda")
        dy = torch.randn(tokens, n_out, device="cuda", dtype=torch.bfloat16)
        xa, xt = quantize_pair(x, "fp8_e4m3", "1x128", backend="triton", power_of_2=False)
        wa, _ = quantize_pair(w, "fp8_e4m3", "128x128", backend="triton", power_of_2=False)
        _, dyt = quantize_pair(dy, "fp8_e4m3", "1x128", backend="triton", power_of_2=False)
        cases.append((f"forward {tokens}x{n_out}, K={n_in}", xa, wa, torch.bfloat16))
        cases.append((f"wgrad {n_out}x{n_in}, K={tokens}", dyt, xt, torch.float32))
        if n_out == 4 * d:
            fc1 = (dy, x)
    return cases, fc1


def probe_triton_gemm(tokens: int = 4096, d: int = 4096) -> list[dict]:
    """The blockwise GEMMs of the GPT's linears (QKV, out, FC1, FC2), cuBLAS (the anchor) and Triton."""
    rows = []
    cases, _ = _blockwise_cases(tokens, d)
    for label, a, b, out in cases:
        flops = 2 * a.q.shape[0] * b.q.shape[0] * a.q.shape[1]
        ref = mm_nt(a, b, out_dtype=out, backend="cublas")
        got = tgemm.mm_blockwise_nt(a.q, a.scale, b.q, b.scale, b_block=b.granularity == "128x128",
                                    out_dtype=out)
        rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        t_cublas = triton.testing.do_bench(lambda: mm_nt(a, b, out_dtype=out, backend="cublas"), return_mode="median")
        t_triton = triton.testing.do_bench(lambda: tgemm.mm_blockwise_nt(
            a.q, a.scale, b.q, b.scale, b_block=b.granularity == "128x128", out_dtype=out), return_mode="median")
        t_one = triton.testing.do_bench(lambda: tgemm.mm_one_scale_nt(a.q, b.q, 1.0, out), return_mode="median")
        best = tgemm.mm_blockwise_kernel.best_config
        rows.append(dict(probe="tgemm", what=label, out=str(out).split(".")[1], cublas_ms=round(t_cublas, 4),
                         triton_ms=round(t_triton, 4), triton_vs_cublas=round(t_cublas / t_triton, 3),
                         triton_TFLOPs=round(flops / t_triton / 1e9), cublas_TFLOPs=round(flops / t_cublas / 1e9),
                         one_scale_ms=round(t_one, 4), rel_diff_vs_cublas=f"{rel:.2e}", best_config=str(best)))
    # every config alone on the largest weight gradient
    label, a, b, out = cases[5]
    ref_big = mm_nt(a, b, out_dtype=out, backend="cublas")
    configs = list(tgemm.mm_blockwise_kernel.configs)
    try:
        for cfg in configs + tgemm.WARP_SPECIALIZED:
            tgemm.mm_blockwise_kernel.configs = [cfg]
            tgemm.mm_blockwise_kernel.cache.clear()
            fn = lambda: tgemm.mm_blockwise_nt(a.q, a.scale, b.q, b.scale, b_block=False, out_dtype=out)  # noqa: E731
            try:
                rel = ((fn() - ref_big).norm() / ref_big.norm()).item()
            except Exception as err:       # warp specialization may not compile on this GPU
                rows.append(dict(probe="tgemm config", what=label, config=str(cfg), error=repr(err)[:300]))
                continue
            ms = triton.testing.do_bench(fn, return_mode="median")
            rows.append(dict(probe="tgemm config", what=label, config=str(cfg), ms=round(ms, 4),
                             rel_diff_vs_cublas=f"{rel:.2e}"))
    finally:
        tgemm.mm_blockwise_kernel.configs = configs
        tgemm.mm_blockwise_kernel.cache.clear()
    return rows


def probe_gluon_gemm(tokens: int = 4096, d: int = 4096) -> list[dict]:
    """The GPT's blockwise GEMMs in Gluon (blockwise_gemm_gluon.py) against cuBLAS (the anchor): ragged
    shapes against FP32, each config on the largest weight gradient, the best on all eight GEMMs."""
    import blockwise_gemm_gluon as ggemm
    rows = []
    cases, (dy_big, x_big) = _blockwise_cases(tokens, d)

    def gluon(a, b, out, **cfg):
        return ggemm.mm_blockwise_nt(a.q, a.scale, b.q, b.scale, b_block=b.granularity == "128x128", out_dtype=out,
                                     **cfg)

    # ragged shapes (tiles and K slices cut by the edges) against the FP32 product of dequantized operands
    for m, n, k in ((1040, 784, 1040), (4096, 4096 + 48, 4096 + 64)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda")
        xa = quantize_pair(x, "fp8_e4m3", "1x128", backend="triton", power_of_2=False)[0]
        for b, b_gran in ((quantize_pair(y, "fp8_e4m3", "1x128", backend="triton", power_of_2=False)[0], "1x128"),
                          (quantize_pair(w, "fp8_e4m3", "128x128", backend="triton", power_of_2=False)[0], "128x128")):
            exact = dequantize(xa.q, xa.scale) @ dequantize(b.q, b.scale).t()
            ref = mm_nt(xa, b, out_dtype=torch.float32, backend="cublas")
            got = gluon(xa, b, torch.float32)
            rel = ((got - ref).norm() / ref.norm()).item()
            rows.append(dict(probe="ggemm edges", what=f"{m}x{n}, K={k}, 1x128 x {b_gran}",
                             rel_diff_vs_cublas=f"{rel:.2e}",
                             rel_diff_vs_fp32=f"{((got - exact).norm() / exact.norm()).item():.2e}",
                             cublas_rel_diff_vs_fp32=f"{((ref - exact).norm() / exact.norm()).item():.2e}",
                             ok=rel < 1e-6))
            print(rows[-1], flush=True)

    configs = [dict(group_m=g) for g in (8, 4, 16)] + [dict(persistent=False)]
    label, a, b, out = cases[5]                      # the 16384x4096 weight gradient
    ref = mm_nt(a, b, out_dtype=out, backend="cublas")
    t_cublas = triton.testing.do_bench(lambda: mm_nt(a, b, out_dtype=out, backend="cublas"), return_mode="median")
    timed = []
    for cfg in configs:
        try:
            got = gluon(a, b, out, **cfg)
            rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            ms = triton.testing.do_bench(lambda: gluon(a, b, out, **cfg), return_mode="median")
        except Exception as err:
            rows.append(dict(probe="ggemm config", what=label, config=cfg, error=repr(err)[:400]))
            print(rows[-1], flush=True)
            continue
        timed.append((ms, cfg) if rel < 1e-5 else (float("inf"), cfg))
        rows.append(dict(probe="ggemm config", what=label, config=cfg, ms=round(ms, 4), cublas_ms=round(t_cublas, 4),
                         gluon_vs_cublas=round(t_cublas / ms, 3), rel_diff_vs_cublas=f"{rel:.2e}"))
        print(rows[-1], flush=True)
    if not timed or min(timed)[0] == float("inf"):
        return rows
    best = min(timed, key=lambda t: t[0])[1]
    # the kernel's ceiling (no promotion: one scale) against cuBLAS's tensorwise GEMM of the same shape
    a_tw = quantize_pair(dy_big, "fp8_e4m3", "tensorwise", backend="triton", power_of_2=False)[1]
    b_tw = quantize_pair(x_big, "fp8_e4m3", "tensorwise", backend="triton", power_of_2=False)[1]
    t_tw = triton.testing.do_bench(lambda: mm_nt(a_tw, b_tw, out_dtype=out, backend="cublas"), return_mode="median")
    t_one = triton.testing.do_bench(lambda: gluon(a, b, out, promote=False, **best), return_mode="median")
    rows.append(dict(probe="ggemm ceiling", what=label, cublas_tensorwise_ms=round(t_tw, 4),
                     gluon_one_scale_ms=round(t_one, 4), cublas_blockwise_ms=round(t_cublas, 4)))
    print(rows[-1], flush=True)
    for label, a, b, out in cases:
        flops = 2 * a.q.shape[0] * b.q.shape[0] * a.q.shape[1]
        ref = mm_nt(a, b, out_dtype=out, backend="cublas")
        exact = (dequantize(a.q, a.scale) @ dequantize(b.q, b.scale).t())
        got = gluon(a, b, out, **best)
        rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        rel_exact = ((got.float() - exact).norm() / exact.norm()).item()
        rel_cublas_exact = ((ref.float() - exact).norm() / exact.norm()).item()
        t_cublas = triton.testing.do_bench(lambda: mm_nt(a, b, out_dtype=out, backend="cublas"), return_mode="median")
        t_gluon = triton.testing.do_bench(lambda: gluon(a, b, out, **best), return_mode="median")
        rows.append(dict(probe="ggemm", what=label, out=str(out).split(".")[1], config=best,
                         cublas_ms=round(t_cublas, 4), gluon_ms=round(t_gluon, 4),
                         gluon_vs_cublas=round(t_cublas / t_gluon, 3), gluon_TFLOPs=round(flops / t_gluon / 1e9),
                         cublas_TFLOPs=round(flops / t_cublas / 1e9), rel_diff_vs_cublas=f"{rel:.2e}",
                         rel_diff_vs_fp32=f"{rel_exact:.2e}", cublas_rel_diff_vs_fp32=f"{rel_cublas_exact:.2e}"))
        print(rows[-1], flush=True)
    return rows


@triton.jit
def _amax_unrolled(x_ptr, amax_ptr, R, K, BR: tl.constexpr, BK: tl.constexpr, STRIPS: tl.constexpr):
    # kernels._amax_kernel with its strip loop unrolled: the STRIPS loads do not wait on each other
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    m = tl.zeros((BR, BK), dtype=tl.float32)
    for i in tl.static_range(STRIPS):
        rows = (tl.program_id(0) * STRIPS + i) * BR + tl.arange(0, BR)
        mask = (rows[:, None] < R) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        m = tl.maximum(m, tl.abs(x))
    tl.atomic_max(amax_ptr, tl.max(tl.max(m, axis=1), axis=0))


@triton.jit
def _amax_persistent(x_ptr, amax_ptr, N, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    # a few programs per SM, each striding over the flat tensor UNROLL blocks at a time
    m = tl.zeros((BLOCK,), dtype=tl.float32)
    step = tl.num_programs(0) * BLOCK * UNROLL
    for start in range(tl.program_id(0) * BLOCK * UNROLL, N, step):
        for u in tl.static_range(UNROLL):
            offs = start + u * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
            m = tl.maximum(m, tl.abs(x))
    tl.atomic_max(amax_ptr, tl.max(m, axis=0))


def probe_amax() -> list[dict]:
    from triton.testing import do_bench_cudagraph
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for label, x in (("BF16 8192x8192", torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)),
                     ("FP32 4096x16384", torch.randn(4096, 16384, device="cuda"))):
        r, k = x.shape
        want = x.abs().amax().float()
        dst = torch.empty_like(x)
        t_copy = do_bench_cudagraph(lambda: dst.copy_(x))
        out = torch.zeros((), device="cuda")

        def timed(name, launch):
            out.zero_()
            got = launch()           # the library's op returns its amax; the variants write `out`
            ok = bool((got if isinstance(got, torch.Tensor) else out) == want)
            ms = do_bench_cudagraph(launch)
            # bytes moved: the amax reads the tensor once; the copy reads and writes it
            rows.append(dict(probe="amax", what=f"{name}, {label}", ms=round(ms, 4), ok=ok,
                             of_copy=round((t_copy / 2) / ms, 3)))

        timed("library (autotuned)", lambda: kernels._amax_op(x))
        for br, bk, n, w in ((64, 128, 4, 4), (32, 256, 8, 4), (32, 256, 8, 8), (32, 256, 16, 8), (64, 128, 8, 8)):
            grid = (triton.cdiv(r, br * n), triton.cdiv(k, bk))
            timed(f"unrolled {br}x{bk} x{n}, {w} warps",
                  lambda: _amax_unrolled[grid](x, out, r, k, BR=br, BK=bk, STRIPS=n, num_warps=w))
        for per_sm, block, unroll, w in ((4, 4096, 4, 8), (8, 2048, 4, 4), (2, 8192, 2, 8), (16, 2048, 2, 4)):
            timed(f"persistent {per_sm}/SM, block {block} x{unroll}, {w} warps",
                  lambda: _amax_persistent[(sms * per_sm,)](x, out, x.numel(), BLOCK=block, UNROLL=unroll,
                                                            num_warps=w))
    return rows


@triton.jit
def _row_col_amax_strips(x_ptr, row_ptr, col_ptr, R, K, BR: tl.constexpr, BK: tl.constexpr,
                         STRIPS: tl.constexpr, PARTIALS: tl.constexpr):
    # kernels._row_col_amax_kernel with its strip loop unrolled (the STRIPS loads issue together).
    # PARTIALS: no atomics; the rows' maxima over this program's BK columns go to row_ptr (K/BK, R), the
    # columns' over its STRIPS * BR rows to col_ptr (R/(BR*STRIPS), K), for torch.amax to reduce
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    m = tl.zeros((BR, BK), dtype=tl.float32)
    for i in tl.static_range(STRIPS):
        rows = (tl.program_id(0) * STRIPS + i) * BR + tl.arange(0, BR)
        mask = (rows[:, None] < R) & (cols[None, :] < K)
        a = tl.abs(tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32))
        if PARTIALS:
            tl.store(row_ptr + tl.program_id(1) * R + rows, tl.max(a, axis=1), mask=rows < R)
        else:
            tl.atomic_max(row_ptr + rows, tl.max(a, axis=1).to(tl.int32, bitcast=True), mask=rows < R)
        m = tl.maximum(m, a)
    if PARTIALS:
        tl.store(col_ptr + tl.program_id(0) * K + cols, tl.max(m, axis=0), mask=cols < K)
    else:
        tl.atomic_max(col_ptr + cols, tl.max(m, axis=0).to(tl.int32, bitcast=True), mask=cols < K)


@triton.jit
def _row_col_amax_narrow(x_ptr, row_amax_ptr, col_amax_ptr, R, K, BR: tl.constexpr, BK: tl.constexpr):
    # kernels._row_col_amax_kernel (one tile per program) reducing in x's own dtype: a max is exact in
    # any format, and BF16 halves the bytes the reductions move between threads
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    a = tl.abs(tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0))
    tl.atomic_max(row_amax_ptr + rows, tl.max(a, axis=1).to(tl.float32).to(tl.int32, bitcast=True), mask=rows < R)
    tl.atomic_max(col_amax_ptr + cols, tl.max(a, axis=0).to(tl.float32).to(tl.int32, bitcast=True), mask=cols < K)


def probe_row_amax() -> list[dict]:
    from bench_fp8 import _config_text, graph_time_ms
    rows = []
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    r, k = x.shape
    want_r, want_c = x.abs().amax(1).float(), x.abs().amax(0).float()
    dst = torch.empty_like(x)
    copy_bw = 2 * x.numel() * 2 / graph_time_ms(lambda: dst.copy_(x))     # read + write, bytes per ms

    def timed(name, fn):
        got_r, got_c = fn()
        ok = bool(torch.equal(got_r, want_r) and torch.equal(got_c, want_c))
        ms = graph_time_ms(fn)
        rows.append(dict(probe="rowamax", what=f"{name}, BF16 8192x8192", graph_ms=round(ms, 4), ok=ok,
                         of_copy=round(x.numel() * 2 / ms / copy_bw, 3)))
        print(rows[-1], flush=True)

    timed("library (autotuned)", lambda: kernels.row_col_amax(x))
    # what the op's two zero-filled outputs cost: the kernel alone on buffers zeroed once (it then
    # finds the same maxima again), the two fills alone, and one fill of a single buffer for both
    row_once = torch.zeros(r, dtype=torch.int32, device="cuda")
    col_once = torch.zeros(k, dtype=torch.int32, device="cuda")
    kernel = kernels._row_col_amax_kernel
    kernel[lambda meta: (triton.cdiv(r, meta["BR"] * meta["STRIPS"]), triton.cdiv(k, meta["BK"]))](
        x, row_once, col_once, r, k)
    best = kernel.best_config
    grid = (triton.cdiv(r, best.kwargs["BR"] * best.kwargs["STRIPS"]), triton.cdiv(k, best.kwargs["BK"]))

    def kernel_alone():
        kernel.fn[grid](x, row_once, col_once, r, k, **best.kwargs, num_warps=best.num_warps)
        return row_once.view(torch.float32), col_once.view(torch.float32)
    timed(f"the kernel alone ({_config_text(best)}), outputs zeroed beforehand", kernel_alone)
    ms_fills = graph_time_ms(lambda: (torch.zeros(r, dtype=torch.int32, device="cuda"),
                                      torch.zeros(k, dtype=torch.int32, device="cuda")))
    ms_fill = graph_time_ms(lambda: torch.zeros(r + k, dtype=torch.int32, device="cuda"))
    rows.append(dict(probe="rowamax", what="the op's two zero fills alone / one fill of both",
                     graph_ms=round(ms_fills, 4),
                     one_fill_ms=round(ms_fill, 4)))
    print(rows[-1], flush=True)

    def one_fill():
        both = torch.zeros(r + k, dtype=torch.int32, device="cuda")
        kernel.fn[grid](x, both[:r], both[r:], r, k, **best.kwargs, num_warps=best.num_warps)
        return both[:r].view(torch.float32), both[r:].view(torch.float32)
    timed("the kernel after one fill of a buffer for both outputs", one_fill)
    for br, bk, w in ((128, 128, 4), (128, 128, 8), (64, 128, 4), (128, 256, 8), (64, 256, 4)):
        def narrow(br=br, bk=bk, w=w):
            row_a = torch.zeros(r, dtype=torch.int32, device="cuda")
            col_a = torch.zeros(k, dtype=torch.int32, device="cuda")
            _row_col_amax_narrow[(triton.cdiv(r, br), triton.cdiv(k, bk))](x, row_a, col_a, r, k, BR=br, BK=bk,
                                                                          num_warps=w)
            return row_a.view(torch.float32), col_a.view(torch.float32)
        timed(f"BF16 reductions {br}x{bk}, {w} warps", narrow)
    for br, bk, n, w in ((128, 128, 1, 4), (64, 128, 2, 4), (32, 128, 4, 4), (32, 256, 4, 8), (64, 256, 2, 8),
                         (16, 256, 8, 4), (32, 128, 8, 4)):
        def unrolled(br=br, bk=bk, n=n, w=w):
            row_a = torch.zeros(r, dtype=torch.int32, device="cuda")
            col_a = torch.zeros(k, dtype=torch.int32, device="cuda")
            _row_col_amax_strips[(triton.cdiv(r, br * n), triton.cdiv(k, bk))](
                x, row_a, col_a, r, k, BR=br, BK=bk, STRIPS=n, PARTIALS=False, num_warps=w)
            return row_a.view(torch.float32), col_a.view(torch.float32)
        timed(f"unrolled {br}x{bk} x{n}, {w} warps", unrolled)

        def partials(br=br, bk=bk, n=n, w=w):
            row_p = torch.empty(triton.cdiv(k, bk), r, device="cuda")
            col_p = torch.empty(triton.cdiv(r, br * n), k, device="cuda")
            _row_col_amax_strips[(triton.cdiv(r, br * n), triton.cdiv(k, bk))](
                x, row_p, col_p, r, k, BR=br, BK=bk, STRIPS=n, PARTIALS=True, num_warps=w)
            return row_p.amax(0), col_p.amax(0)
        timed(f"partials {br}x{bk} x{n}, {w} warps (+ torch.amax of both)", partials)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probes", nargs="*", default=["host", "gemm"],
                    choices=["host", "gemm", "tgemm", "ggemm", "amax", "rowamax"])
    ap.add_argument("--json")
    ap.add_argument("--profile-host", default="", help="comma-separated granularities: cProfile their calls")
    args = ap.parse_args()
    for gran in filter(None, args.profile_host.split(",")):
        profile_host(gran)
    rows = []
    for probe in args.probes:
        for row in {"host": probe_host, "gemm": probe_gemm, "tgemm": probe_triton_gemm, "ggemm": probe_gluon_gemm,
                      "amax": probe_amax, "rowamax": probe_row_amax}[probe]():
            print(row, flush=True)
            rows.append(row)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               command="python benchmarks/probe_fp8.py " + " ".join(args.probes))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(env=env, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
