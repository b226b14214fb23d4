"""An experiment: the library's 1x128 quantization (x and x^T) with the register layouts chosen by hand.

mixprec.fp8.kernels.quantize_1x128_t runs a program per chunk of a 128x128 tile: a strip of rows for
x's codes, a strip of columns for x^T's. Triton picks the layouts: each thread loads 8 neighbouring
values of a row (16 bytes), so in a strip of columns a thread holds pieces of 8 columns. That costs
instructions: the column maxima reduce across lanes and warps, each thread computes 8 columns' scales,
and the compiler transposes the code bytes through shared memory (byte loads and repacking) to store
rows of x^T. Compiled for sm_90, that program is about 650 instructions per thread for its 32 values,
the row strip's about 340 (session 10, benchmarks/results/fp8.md).

Here (Gluon, Triton's explicit-layout dialect) the layouts follow the groups instead:

    row strip      each thread holds 32 neighbouring values of one row (four 16-byte loads): its
                   group's maximum is in-thread but for 4 lanes, and it stores 32 code bytes of x
    column strip   each thread holds RPT neighbouring rows of CPT columns, the lanes of a warp across
                   the strip's columns: a column's maximum is in-thread but for the lanes and warps
                   stacked down the tile, and with CPT = 1 its codes are RPT neighbouring bytes of a row
                   of x^T, stored as 16-byte vectors with no transposition (the loads are 2 bytes each,
                   a warp's load 64 neighbouring bytes of a row). With CPT = 2 the loads widen, but
                   the compiler no longer sees the stores' neighbouring bytes once the columns are split
                   apart: byte stores
    both           programs whose strip lies inside the tensor load and store without masks

Compiled for sm_90 here (`--sass`; not yet run on a GPU): with CPT = 1 a column strip executes about
415 instructions per thread and a row strip about 300, against the library's 656 and 339.

The arithmetic is the library's (kernels._scale, kernels._codes, called from Gluon), so codes and
scales are compared with the library's byte for byte.

    PYTHONPATH=src python3 benchmarks/quantize_1x128_lanes.py [--n 8192] [--json FILE]
    PYTHONPATH=src:<triton> python3 benchmarks/quantize_1x128_lanes.py --sass   (no GPU: sm_90 SASS counts)
"""
from __future__ import annotations

import argparse

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from mixprec.fp8 import kernels
from mixprec.fp8.quantize import AMAX_EPS, get_fp8_format

TILE = 128
B = gl.constexpr(TILE)


@gluon.jit
def _row_strip(x_ptr, q_ptr, s_ptr, R, K, row0, pid_k, FMAX: gl.constexpr, POW2: gl.constexpr, EPS: gl.constexpr,
               OUT: gl.constexpr, M: gl.constexpr, MIN_NORMAL: gl.constexpr, MAGIC: gl.constexpr,
               HW_CAST: gl.constexpr, PTX: gl.constexpr, CHUNK: gl.constexpr, num_warps: gl.constexpr):
    """x's codes and 1x128 scales for CHUNK rows (from row0) of the tile in column pid_k."""
    layout: gl.constexpr = gl.BlockedLayout([1, 32], [8, 4], [num_warps, 1], [1, 0])
    rows = row0 + gl.arange(0, CHUNK, layout=gl.SliceLayout(1, layout))
    cols = pid_k * B + gl.arange(0, B, layout=gl.SliceLayout(0, layout))
    offsets = rows[:, None] * K + cols[None, :]
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    inside = (row0 + CHUNK <= R) & (pid_k * B + B <= K)      # no masks inside the tensor
    if inside:
        x = gl.load(x_ptr + offsets)
    else:
        x = gl.load(x_ptr + offsets, mask=mask, other=0.0)
    x = x.to(gl.float32)
    s, inv = kernels._scale(gl.max(gl.abs(x), axis=1), FMAX, POW2, EPS, PTX)
    codes = kernels._codes(x, inv[:, None], FMAX, POW2, OUT, M, MIN_NORMAL, MAGIC, HW_CAST, PTX)
    if inside:
        gl.store(q_ptr + offsets, codes)
    else:
        gl.store(q_ptr + offsets, codes, mask=mask)
    gl.store(s_ptr + pid_k * R + rows, s, mask=rows < R)          # (K/B, R): outer-dim-major


@gluon.jit
def _column_strip(x_ptr, qt_ptr, st_ptr, R, K, pid_r, col0, FMAX: gl.constexpr, POW2: gl.constexpr,
                  EPS: gl.constexpr, OUT: gl.constexpr, M: gl.constexpr, MIN_NORMAL: gl.constexpr,
                  MAGIC: gl.constexpr, HW_CAST: gl.constexpr, PTX: gl.constexpr, CHUNK: gl.constexpr,
                  CPT: gl.constexpr, num_warps: gl.constexpr):
    """x^T's codes and 1x128 scales for CHUNK columns (from col0) of the tile in row pid_r."""
    LANES_C: gl.constexpr = CHUNK // CPT                 # lanes across the strip's columns
    LANES_R: gl.constexpr = 32 // LANES_C                # lanes down the tile
    RPT: gl.constexpr = B // (LANES_R * num_warps)       # neighbouring rows per thread
    layout: gl.constexpr = gl.BlockedLayout([RPT, CPT], [LANES_R, LANES_C], [num_warps, 1], [1, 0])
    rows = pid_r * B + gl.arange(0, B, layout=gl.SliceLayout(1, layout))
    cols = col0 + gl.arange(0, CHUNK, layout=gl.SliceLayout(0, layout))
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    inside = (pid_r * B + B <= R) & (col0 + CHUNK <= K)      # no masks inside the tensor
    if inside:
        x = gl.load(x_ptr + (rows[:, None] * K + cols[None, :]))
    else:
        x = gl.load(x_ptr + (rows[:, None] * K + cols[None, :]), mask=mask, other=0.0)
    x = x.to(gl.float32)
    s, inv = kernels._scale(gl.max(gl.abs(x), axis=0), FMAX, POW2, EPS, PTX)
    codes = kernels._codes(x, inv[None, :], FMAX, POW2, OUT, M, MIN_NORMAL, MAGIC, HW_CAST, PTX)
    gl.store(st_ptr + pid_r * K + cols, s, mask=cols < K)        # (R/B, K)
    # a thread's codes of one column are RPT neighbouring bytes of a row of x^T: split the CPT columns
    # apart (in-thread), so that each one's registers run down the rows and store as one vector
    offsets = cols[None, :] * R + rows[:, None]
    if CPT == 1:
        if inside:
            gl.store(qt_ptr + offsets, codes)
        else:
            gl.store(qt_ptr + offsets, codes, mask=mask)
    else:
        gl.static_assert(CPT == 2)
        c0, c1, o0, o1, m0, m1 = _split_columns(codes, offsets, mask)
        gl.store(qt_ptr + o0, c0, mask=m0)
        gl.store(qt_ptr + o1, c1, mask=m1)


@gluon.jit
def _split_columns(codes, offsets, mask):
    """Even and odd columns of three (rows, columns) tensors whose neighbouring columns share a thread."""
    shape: gl.constexpr = [codes.shape[0], codes.shape[1] // 2, 2]
    c0, c1 = gl.split(gl.reshape(codes, shape))
    o0, o1 = gl.split(gl.reshape(offsets, shape))
    m0, m1 = gl.split(gl.reshape(mask, shape))
    return c0, c1, o0, o1, m0, m1


@gluon.jit
def quantize_1x128_t_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, R, K, FMAX: gl.constexpr, POW2: gl.constexpr,
                            EPS: gl.constexpr, OUT: gl.constexpr, M: gl.constexpr, MIN_NORMAL: gl.constexpr,
                            MAGIC: gl.constexpr, HW_CAST: gl.constexpr, PTX: gl.constexpr, CHUNK: gl.constexpr,
                            CPT: gl.constexpr, num_warps: gl.constexpr):
    # as the library with GROUP=1: per tile, its NC row strips, then its NC column strips
    NC: gl.constexpr = B // CHUNK
    pid_r = gl.program_id(0) // (2 * NC)
    j = gl.program_id(0) % (2 * NC)
    pid_k = gl.program_id(1)
    if j < NC:
        _row_strip(x_ptr, q_ptr, s_ptr, R, K, pid_r * B + j * CHUNK, pid_k, FMAX, POW2, EPS, OUT, M, MIN_NORMAL,
                   MAGIC, HW_CAST, PTX, CHUNK, num_warps)
    else:
        _column_strip(x_ptr, qt_ptr, st_ptr, R, K, pid_r, pid_k * B + (j - NC) * CHUNK, FMAX, POW2, EPS, OUT, M,
                      MIN_NORMAL, MAGIC, HW_CAST, PTX, CHUNK, CPT, num_warps)


def _constants(fmt: str, power_of_2: bool, chunk: int, cpt: int) -> dict:
    f = get_fp8_format(fmt)
    return dict(FMAX=f.max, POW2=power_of_2, EPS=AMAX_EPS, OUT=kernels._tl_dtype(fmt), CHUNK=chunk, CPT=cpt,
                **kernels._grid_constants(f))


def quantize_1x128_t(x: torch.Tensor, fmt: str, *, power_of_2: bool = False, chunk: int = 32, cpt: int = 1,
                     warps: int = 4):
    """((q, s), (qT, sT)) as mixprec.fp8.kernels.quantize_1x128_t, for a 2-D BF16/FP16 CUDA x."""
    from quantize_1x128_gluon import empty_outputs
    x = x.contiguous()
    r, k = x.shape
    q, s, qt, st = empty_outputs(x, fmt)
    grid = (triton.cdiv(r, TILE) * 2 * (TILE // chunk), triton.cdiv(k, TILE))
    quantize_1x128_t_kernel[grid](x, q, s, qt, st, r, k, num_warps=warps,
                                  **_constants(fmt, power_of_2, chunk, cpt))
    return (q, s.t()), (qt, st.t())


# (chunk, cpt, warps): a row strip covers 8 rows per warp, so chunk = 8 * warps; chunk / cpt <= 32 lanes
CONFIGS = ((32, 1, 4), (16, 1, 2), (32, 2, 4), (64, 2, 8))


def sass_counts() -> None:
    """Per config, the sm_90 SASS instruction count of the kernel and of each strip's branch (no GPU:
    Triton's bundled ptxas and nvdisasm)."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    sig = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "qt_ptr": "*fp8e4nv", "st_ptr": "*fp32",
           "R": "i32", "K": "i32"}
    for chunk, cpt, warps in CONFIGS:
        consts = dict(_constants("fp8_e4m3", False, chunk, cpt), num_warps=warps)
        signature = {**sig, **{name: "constexpr" for name in consts}}
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(sig))}
        src = GluonASTSource(fn=quantize_1x128_t_kernel, signature=signature, constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(compiled.asm["ptx"])
            info = subprocess.run([str(bin_dir / "ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", str(ptx) + ".cubin"],
                                  capture_output=True, text=True, check=True).stderr
            sass = subprocess.run([str(bin_dir / "nvdisasm"), str(ptx) + ".cubin"], capture_output=True, text=True,
                                  check=True).stdout
        code = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/\s+[A-Z@]", line)
                and "NOP" not in line]
        exits = [i for i, line in enumerate(code) if "EXIT" in line]
        regs = re.search(r"Used (\d+) registers", info).group(1)
        vector = {op: sum(op in line for line in code) for op in ("LDG.E.128", "LDG.E.64", "LDG.E ", "LDG.E.U16",
                                                                  "STG.E.128", "STG.E.64", "STG.E ", "STG.E.U8",
                                                                  "LDS", "STS", "SHFL")}
        print(f"chunk {chunk}, {cpt} columns per thread, {warps} warps: {regs} registers, {len(code)} instructions "
              f"(exits at {exits}); {vector}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--json")
    ap.add_argument("--sass", action="store_true", help="compile for sm_90 here and count SASS; no GPU needed")
    args = ap.parse_args()
    if args.sass:
        sass_counts()
        return
    from quantize_1x128_gluon import check_against_library, save, timing_harness
    rows = []
    x, run = timing_harness(args.n, rows)
    check_against_library(x, rows, [
        (f"chunk={chunk} cpt={cpt} w{warps}",
         lambda t, fmt, pow2, chunk=chunk, cpt=cpt, warps=warps: quantize_1x128_t(
             t, fmt, power_of_2=pow2, chunk=chunk, cpt=cpt, warps=warps))
        for chunk, cpt, warps in CONFIGS])
    for _ in range(2):      # twice, interleaved: the figures' spread
        run("library (Triton's layouts)", lambda: kernels.quantize_1x128_t(x, "fp8_e4m3"))
        for chunk, cpt, warps in CONFIGS:
            run(f"hand-chosen layouts, strips of {chunk}, {cpt} columns per thread, {warps} warps",
                lambda chunk=chunk, cpt=cpt, warps=warps: quantize_1x128_t(x, "fp8_e4m3", chunk=chunk, cpt=cpt,
                                                                            warps=warps))
    save(args.json, rows, f"python benchmarks/quantize_1x128_lanes.py --n {args.n}")


if __name__ == "__main__":
    main()
