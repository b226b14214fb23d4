"""An experiment: the 1x128 quantization of x and x^T reading each 128x128 tile from memory once (GPU).

mixprec.fp8.kernels.quantize_1x128_t reads each tile twice, once for x's codes (a scale per row of
the tile) and once for x^T's (a scale per column): a program holding the whole tile in registers spilled
(sessions 5-8, benchmarks/results/fp8.md), and the two reads put it at 0.57 of copy bandwidth. Here
(Gluon, Triton's explicit-layout dialect) a CTA copies its tile into shared memory by TMA, then reads
it from there twice: strips of rows for x's codes and strips of columns for x^T's, so registers hold a
strip at a time and memory sees one read and the two code writes.

The arithmetic is the library's own (kernels._scale and kernels._codes, called from Gluon), so the
codes and scales are compared with the library's byte for byte.

Not in the library: bit-exact in every check, but slower than the two-read kernel on the H200 (BF16
8192^2, CUDA graph after a read flush; benchmarks/results/fp8.md, session 9): 0.24-0.45 of copy
bandwidth for these persistent CTAs with 2-4 tiles in flight, 0.40 with a CTA per tile (0.47 for a
simpler kernel without the ring), against the library's 0.56-0.57. Reading the tile once is not where
the time goes; the quantization of a tile held in shared memory (its strips, reductions and the
transposing layout conversion) is slower than streaming it twice through registers.

    PYTHONPATH=src python3 benchmarks/quantize_1x128_gluon.py [--n 8192] [--json FILE]
"""
from __future__ import annotations

import argparse
import json

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from mixprec.fp8 import kernels
from mixprec.fp8.quantize import AMAX_EPS, get_fp8_format

TILE = 128                # the tile: 1x128 groups along each dimension
B = gl.constexpr(TILE)    # the same, for the kernel


@gluon.jit
def _quantize_tile(tile, pid_r, pid_k, q_ptr, s_ptr, qt_ptr, st_ptr, R, K, FMAX: gl.constexpr, POW2: gl.constexpr,
                   EPS: gl.constexpr, OUT: gl.constexpr, M: gl.constexpr, MIN_NORMAL: gl.constexpr,
                   MAGIC: gl.constexpr, HW_CAST: gl.constexpr, PTX: gl.constexpr, STRIP: gl.constexpr,
                   num_warps: gl.constexpr):
    """Both code layouts and their scales from one 128x128 tile in shared memory, with the library's
    arithmetic (kernels._scale, kernels._codes)."""
    # x's codes: strips of STRIP rows, each thread 8 neighbouring values of a row (16-byte reads)
    rows_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
    for i in gl.static_range(B // STRIP):
        x = tile.slice(i * STRIP, STRIP).load(rows_layout).to(gl.float32)
        s, inv = kernels._scale(gl.max(gl.abs(x), axis=1), FMAX, POW2, EPS, PTX)
        rows = pid_r * B + i * STRIP + gl.arange(0, STRIP, layout=gl.SliceLayout(1, rows_layout))
        cols = pid_k * B + gl.arange(0, B, layout=gl.SliceLayout(0, rows_layout))
        mask = (rows < R)[:, None] & (cols < K)[None, :]
        codes = kernels._codes(x, inv[:, None], FMAX, POW2, OUT, M, MIN_NORMAL, MAGIC, HW_CAST, PTX)
        gl.store(q_ptr + rows[:, None] * K + cols[None, :], codes, mask=mask)
        gl.store(s_ptr + pid_k * R + rows, s, mask=rows < R)          # (K/B, R): outer-dim-major

    # x^T's codes: strips of STRIP columns, read as rows of 16 bytes and transposed by the compiler
    # through shared memory into runs down a column: each thread then stores 8 neighbouring bytes of a
    # row of x^T
    strip_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (STRIP // 8), STRIP // 8], [num_warps, 1], [1, 0])
    cols_layout: gl.constexpr = gl.BlockedLayout([8, 1], [16, 2], [1, num_warps], [0, 1])
    for j in gl.static_range(B // STRIP):
        x = tile.slice(j * STRIP, STRIP, dim=1).load(strip_layout).to(gl.float32)
        s, inv = kernels._scale(gl.max(gl.abs(x), axis=0), FMAX, POW2, EPS, PTX)
        codes = kernels._codes(x, inv[None, :], FMAX, POW2, OUT, M, MIN_NORMAL, MAGIC, HW_CAST, PTX)
        codes = gl.convert_layout(codes, cols_layout)
        rows = pid_r * B + gl.arange(0, B, layout=gl.SliceLayout(1, cols_layout))
        cols = pid_k * B + j * STRIP + gl.arange(0, STRIP, layout=gl.SliceLayout(0, cols_layout))
        mask = (rows < R)[:, None] & (cols < K)[None, :]
        gl.store(qt_ptr + cols[None, :] * R + rows[:, None], codes, mask=mask)
        cols_s = pid_k * B + j * STRIP + gl.arange(0, STRIP, layout=gl.SliceLayout(0, strip_layout))
        gl.store(st_ptr + pid_r * K + cols_s, s, mask=cols_s < K)    # (R/B, K)


@gluon.jit
def quantize_1x128_t_kernel(x_desc, q_ptr, s_ptr, qt_ptr, st_ptr, R, K, FMAX: gl.constexpr, POW2: gl.constexpr,
                            EPS: gl.constexpr, OUT: gl.constexpr, M: gl.constexpr, MIN_NORMAL: gl.constexpr,
                            MAGIC: gl.constexpr, HW_CAST: gl.constexpr, PTX: gl.constexpr, STRIP: gl.constexpr,
                            STAGES: gl.constexpr, num_warps: gl.constexpr):
    # A persistent CTA walks tiles pid, pid + programs, ...: TMA copies the next STAGES-1 tiles into a
    # ring of shared-memory tiles while the current one is quantized
    tiles_k = (K + B - 1) // B
    tiles = ((R + B - 1) // B) * tiles_k
    ring = gl.allocate_shared_memory(x_desc.dtype, [STAGES, B, B], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    first = gl.program_id(0)
    step = gl.num_programs(0)
    for i in gl.static_range(STAGES - 1):          # (tiles past the end are not loaded)
        t = first + i * step
        mbarrier.expect(ready.index(i), x_desc.block_type.nbytes, pred=t < tiles)
        tma.async_copy_global_to_shared(x_desc, [(t // tiles_k) * B, (t % tiles_k) * B], ready.index(i),
                                        ring.index(i), pred=t < tiles)
    n = 0
    for t in range(first, tiles, step):
        # the buffer the next load goes to was last read by the previous tile's quantization
        ahead = t + (STAGES - 1) * step
        slot = (n + STAGES - 1) % STAGES
        gl.thread_barrier()                        # every warp is done reading that buffer
        mbarrier.expect(ready.index(slot), x_desc.block_type.nbytes, pred=ahead < tiles)
        tma.async_copy_global_to_shared(x_desc, [(ahead // tiles_k) * B, (ahead % tiles_k) * B], ready.index(slot),
                                        ring.index(slot), pred=ahead < tiles)
        mbarrier.wait(ready.index(n % STAGES), (n // STAGES) & 1)
        _quantize_tile(ring.index(n % STAGES), t // tiles_k, t % tiles_k, q_ptr, s_ptr, qt_ptr, st_ptr, R, K, FMAX,
                       POW2, EPS, OUT, M, MIN_NORMAL, MAGIC, HW_CAST, PTX, STRIP, num_warps)
        n += 1


def empty_outputs(x: torch.Tensor, fmt: str):
    """(q, s, qT, sT) for x (R, K), in the library's layouts: scales outer-dim-major, (K/128, R) and (R/128, K)."""
    r, k = x.shape
    dtype = get_fp8_format(fmt).torch_dtype
    return (torch.empty((r, k), dtype=dtype, device=x.device),
            torch.empty((triton.cdiv(k, TILE), r), dtype=torch.float32, device=x.device),
            torch.empty((k, r), dtype=dtype, device=x.device),
            torch.empty((triton.cdiv(r, TILE), k), dtype=torch.float32, device=x.device))


def quantize_1x128_t(x: torch.Tensor, fmt: str, *, power_of_2: bool = False, strip: int = 32, warps: int = 4,
                     stages: int = 2, ctas_per_sm: int = 3):
    """((q, s), (qT, sT)) as mixprec.fp8.kernels.quantize_1x128_t, for a BF16/FP16 CUDA x (R, K), K % 8 == 0."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"quantize_1x128_t (Gluon) takes BF16 or FP16 input, got {x.dtype}")
    x = x.contiguous()
    r, k = x.shape
    f = get_fp8_format(fmt)
    q, s, qt, st = empty_outputs(x, fmt)
    gl_dtype = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([TILE, TILE], gl_dtype)
    desc = TensorDescriptor(x, [r, k], [k, 1], [TILE, TILE], layout)
    out = kernels._tl_dtype(fmt)
    tiles = triton.cdiv(r, TILE) * triton.cdiv(k, TILE)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    quantize_1x128_t_kernel[(min(tiles, sms * ctas_per_sm),)](
        desc, q, s, qt, st, r, k, FMAX=f.max, POW2=power_of_2, EPS=AMAX_EPS, OUT=out, STRIP=strip, STAGES=stages,
        num_warps=warps, **kernels._grid_constants(f))
    return (q, s.t()), (qt, st.t())


def same_quantization(got, want) -> bool:
    """Whether two ((q, s), (qT, sT)) results are equal, the codes byte for byte."""
    return all(torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a,
                           b.view(torch.uint8) if b.dtype.itemsize == 1 else b)
               for pa, pb in zip(got, want) for a, b in zip(pa, pb))


def check_against_library(x: torch.Tensor, rows: list, variants) -> None:
    """Each variant's result against the library's, byte for byte, on x and a ragged tensor, for E4M3,
    E5M2 and power-of-2 scales; variants: (label, fn(t, fmt, power_of_2)). Appends a row per check."""
    ragged = torch.randn(1000, 2056, device="cuda", dtype=torch.bfloat16) * 100
    for fmt, pow2 in (("fp8_e4m3", False), ("fp8_e5m2", False), ("fp8_e4m3", True)):
        for t in (x, ragged):
            want = kernels.quantize_1x128_t(t, fmt, power_of_2=pow2)
            for label, fn in variants:
                rows.append(dict(check=f"{fmt} pow2={pow2} {tuple(t.shape)} {label}",
                                 equal=same_quantization(fn(t, fmt, pow2), want)))
                print(rows[-1], flush=True)


def save(path: str | None, rows: list, command: str) -> None:
    """rows as JSON with the device, versions and command, where asked."""
    if path:
        env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   command=command)
        with open(path, "w") as fh:
            json.dump(dict(env=env, rows=rows), fh, indent=1)


def timing_harness(n: int, rows: list):
    """(x, run): the input (BF16 n x n, rows of magnitudes 1e-3 to 1e3) and run(name, fn), which times fn
    in a CUDA graph after an L2 flush and appends its share of a copy's bandwidth (x read, both code
    layouts written, against a copy of x) to rows."""
    from bench_fp8 import graph_time_ms
    x = (torch.randn(n, n, device="cuda") * torch.logspace(-3, 3, n, device="cuda")[:, None]).to(torch.bfloat16)
    dst = torch.empty_like(x)
    copy_bw = 2 * x.numel() * 2 / graph_time_ms(lambda: dst.copy_(x))          # read + write, bytes per ms
    moved = x.numel() * (2 + 1 + 1)

    def run(name, fn):
        ms = graph_time_ms(fn)
        rows.append(dict(kernel=name, graph_ms=round(ms, 4), of_copy=round(moved / ms / copy_bw, 3)))
        print(rows[-1], flush=True)

    return x, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    n = args.n
    x, run = timing_harness(n, rows)
    run("library (two reads per tile)", lambda: kernels.quantize_1x128_t(x, "fp8_e4m3"))
    check_against_library(x, rows, [
        (f"strip={strip} w{warps} {ctas} CTAs/SM",
         lambda t, fmt, pow2, strip=strip, warps=warps, ctas=ctas: quantize_1x128_t(
             t, fmt, power_of_2=pow2, strip=strip, warps=warps, ctas_per_sm=ctas))
        for strip, warps, ctas in ((32, 4, 3), (64, 8, 2), (16, 4, 1000))])
    # ctas_per_sm=1000: a CTA per tile (every CTA's loop runs once)
    for strip, warps, stages, ctas in ((32, 4, 2, 1000), (32, 4, 2, 3), (32, 4, 3, 2), (16, 4, 2, 4), (64, 8, 2, 2),
                                       (32, 8, 3, 1), (32, 4, 4, 1)):
        run(f"gluon, one read per tile, strips of {strip}, {warps} warps, {stages} tiles in flight, {ctas} CTAs/SM",
            lambda strip=strip, warps=warps, stages=stages, ctas=ctas: quantize_1x128_t(
                x, "fp8_e4m3", strip=strip, warps=warps, stages=stages, ctas_per_sm=ctas))
    save(args.json, rows, f"python benchmarks/quantize_1x128_gluon.py --n {n}")


if __name__ == "__main__":
    main()
