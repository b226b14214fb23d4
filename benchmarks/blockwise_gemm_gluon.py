"""An experiment: DeepSeek-V3's blockwise FP8 GEMM in Gluon (Triton's explicit-layout dialect), warp
specialized, against cuBLAS's.

    C = (A * sa) @ (B * sb)^T      A: (M, K), B: (N, K) FP8 row-major, both scaled along K per 128

Each 128-slice of K gives a tensor-core product that must be promoted into the FP32 accumulator with
the slice's scales (acc += P * sa sb^T). Triton's `tl.dot` waits for each product before that
promotion, so the tensor cores idle while it runs (blockwise_gemm_triton.py: 0.78-0.84x cuBLAS).

Here a CTA owns a 128 x 256 tile of C and splits into three partitions (gl.warp_specialize):
- a producer warp copies A's, B's and the scales' tiles slice by slice into a ring of STAGES
  shared-memory buffers (TMA), refilling a buffer once both consumers have released it;
- two consumer warpgroups, one per 64 rows, each multiply their rows by the left and then the right
  128 columns of the slice through one set of product registers, and promote each product. While one
  warpgroup promotes, the other's products keep the tensor cores busy.
The grid is persistent (one CTA per SM walks the tiles), so the producer loads the next tile's first
slices while the consumers write the last tile out.

Not in the library: on the H200 it equals cuBLAS bit for bit and runs at its speed, not faster
(0.96-1.04x on the GPT's weight gradients; benchmarks/results/fp8.md, session 9). The same kernel with
one scale for the whole product (promote=False) takes 0.43 ms where cuBLAS's tensorwise GEMM takes
0.47 and the blockwise kernels 0.62-0.65: the promotions, about a third of the time, are not hidden
behind the other warpgroup's products. Overlapping them inside a warpgroup (a second product register
set, waited with warpgroup_mma_wait(1)) is what ptxas refuses: it serializes the products whenever
an accumulator is read while another product is in flight (its message C7514), and that is how the
variants this one replaced lost (0.72-0.88x). `python benchmarks/probe_fp8.py ggemm` times it.

Scales: sa (M, ceil(K/128)) 1x128; sb (N, ceil(K/128)) 1x128 (B_GROUP 1, the weight gradient) or
(ceil(N/128), ceil(K/128)) 128x128 (B_GROUP 128, the forward and input gradient: one per slice and
128 columns).
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from blockwise_gemm_triton import _tile_of

BLOCK_K = 128            # the scale tile: one promotion per 128 of K
SLICE = gl.constexpr(BLOCK_K)     # the same, for the kernels
BM, BN = 128, 256        # the CTA's tile: two warpgroups of 64 rows, each row range in two halves of 128
_GL_DTYPE = {torch.float8_e4m3fn: gl.float8e4nv, torch.float8_e5m2: gl.float8e5, torch.float32: gl.float32,
             torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@gluon.jit
def _tile_offsets(tile, M, N, BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr):
    """(first row, first column) of tile number `tile`, in blockwise_gemm_triton's order (groups of
    GROUP_M tile rows, so that CTAs working at the same time share B's tiles in L2)."""
    tile_m, tile_n = _tile_of(tile, M, N, BM, BN, GROUP_M)
    return tile_m * BM, tile_n * BN


@gluon.jit
def _producer(a_desc, b_desc, sa_desc, sb_desc, a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, M, N, k_slices,
              GROUP_M: gl.constexpr, STAGES: gl.constexpr, B_VECTOR: gl.constexpr):
    """Copies slice after slice of every tile of this CTA into the ring (`it` counts ring uses)."""
    BM: gl.constexpr = a_bufs.shape[1]
    BN: gl.constexpr = b_bufs.shape[1]
    nbytes: gl.constexpr = (a_desc.block_type.nbytes + b_desc.block_type.nbytes + sa_desc.block_type.nbytes
                            + B_VECTOR * sb_desc.block_type.nbytes)
    tiles = ((M + BM - 1) // BM) * ((N + BN - 1) // BN)
    it = 0
    for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
        off_m, off_n = _tile_offsets(tile, M, N, BM, BN, GROUP_M)
        for kb in range(k_slices):
            stage = it % STAGES
            # wait until both consumers have released the buffer (free on the first pass)
            mbarrier.wait(empty.index(stage), ((it // STAGES) & 1) ^ 1, pred=it >= STAGES)
            bar = ready.index(stage)
            mbarrier.expect(bar, nbytes)
            tma.async_copy_global_to_shared(a_desc, [off_m, kb * SLICE], bar, a_bufs.index(stage))
            tma.async_copy_global_to_shared(b_desc, [off_n, kb * SLICE], bar, b_bufs.index(stage))
            tma.async_copy_global_to_shared(sa_desc, [kb, off_m], bar, sa_bufs.index(stage))
            if B_VECTOR:
                tma.async_copy_global_to_shared(sb_desc, [kb, off_n], bar, sb_bufs.index(stage))
            it += 1


@gluon.jit
def _product(a_bufs, b_bufs, stage, into, HALF: gl.constexpr, COLS: gl.constexpr):
    """This warpgroup's 64 rows times the slice's columns COLS*128.., in the registers of `into`
    (use_acc=False: the product starts from zero, `into` only lends its registers)."""
    a = a_bufs.index(stage).slice(HALF * 64, 64)
    b = b_bufs.index(stage).slice(COLS * 128, 128)
    prod = warpgroup_mma(a, b.permute((1, 0)), into, use_acc=False, is_async=True)
    return warpgroup_mma_wait(num_outstanding=0, deps=(prod, ))


@gluon.jit
def _accumulate(a_bufs, b_bufs, stage, acc, HALF: gl.constexpr, COLS: gl.constexpr):
    """acc + the product of _product, accumulated by the tensor cores (one scale for the whole GEMM)."""
    a = a_bufs.index(stage).slice(HALF * 64, 64)
    b = b_bufs.index(stage).slice(COLS * 128, 128)
    acc = warpgroup_mma(a, b.permute((1, 0)), acc, is_async=True)
    return warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))


@gluon.jit
def _promote(acc, prod, sa, sb_bufs, stage, sb_block, COLS: gl.constexpr, B_VECTOR: gl.constexpr,
             acc_layout: gl.constexpr):
    """acc + prod * (sa sb^T), DeepSeek-V3's FP32 promotion. 1x128 column scales come from the ring
    straight into the accumulator's column layout; a 128x128 block has the one scale sb_block."""
    if B_VECTOR:
        flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        sb_row = sb_bufs.index(stage)._reinterpret(gl.float32, [sb_bufs.shape[2]], flat).slice(COLS * 128, 128)
        sb = sb_row.load(gl.SliceLayout(0, acc_layout))
        return acc + prod * sa[:, None] * sb[None, :]
    else:
        return acc + prod * (sa * sb_block)[:, None]


@gluon.jit
def _consumer(a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, c_bufs, c_desc, M, N, k_slices, sb_ptr, sb_kb, sb_n,
              HALF: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, B_VECTOR: gl.constexpr,
              PROMOTE: gl.constexpr):
    """Rows HALF*64.. of every tile of this CTA: 64 x 256 as two 64 x 128 accumulators."""
    BM: gl.constexpr = a_bufs.shape[1]
    BN: gl.constexpr = b_bufs.shape[1]
    B_GROUP: gl.constexpr = 1 if B_VECTOR else SLICE
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, 128, 32])
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    c_smem = c_bufs.index(HALF)
    prod = gl.zeros([64, 128], gl.float32, acc_layout)
    tiles = ((M + BM - 1) // BM) * ((N + BN - 1) // BN)
    it = 0
    for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
        off_m, off_n = _tile_offsets(tile, M, N, BM, BN, GROUP_M)
        left = gl.zeros([64, 128], gl.float32, acc_layout)
        right = gl.zeros([64, 128], gl.float32, acc_layout)
        sb_left = sb_ptr + (off_n // B_GROUP) * sb_n      # 128x128 scales: the left half's block row
        right_ok = off_n + 128 < N
        for kb in range(k_slices):
            stage = it % STAGES
            mbarrier.wait(ready.index(stage), (it // STAGES) & 1)
            sa_row = sa_bufs.index(stage)._reinterpret(gl.float32, [sa_bufs.shape[2]], flat).slice(HALF * 64, 64)
            sa = sa_row.load(gl.SliceLayout(1, acc_layout))
            sb_l = 0.0
            sb_r = 0.0
            if not B_VECTOR:    # the halves' 128x128 block scales, loaded ahead of their use
                sb_l = gl.load(sb_left + kb * sb_kb)
                sb_r = gl.load(sb_left + sb_n + kb * sb_kb, mask=right_ok, other=0.0)
            if PROMOTE:
                prod = _product(a_bufs, b_bufs, stage, prod, HALF, 0)
                left = _promote(left, prod, sa, sb_bufs, stage, sb_l, 0, B_VECTOR, acc_layout)
            else:       # the ceiling: the tensor cores accumulate, no scales
                left = _accumulate(a_bufs, b_bufs, stage, left, HALF, 0)
            if kb == k_slices - 1:
                # out through shared memory and TMA (which clips the edges), the left half as soon as
                # it is final: the two halves and their addresses do not fit in registers together
                tma.store_wait(pendings=0)            # the previous tile's right half has left c_smem
                c_smem.store(left.to(c_desc.dtype))
                fence_async_shared()
                tma.async_copy_shared_to_global(c_desc, [off_m + HALF * 64, off_n], c_smem)
            if PROMOTE:
                prod = _product(a_bufs, b_bufs, stage, prod, HALF, 1)
                right = _promote(right, prod, sa, sb_bufs, stage, sb_r, 1, B_VECTOR, acc_layout)
            else:
                right = _accumulate(a_bufs, b_bufs, stage, right, HALF, 1)
            mbarrier.arrive(empty.index(stage))
            it += 1
        tma.store_wait(pendings=0)
        c_smem.store(right.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [off_m + HALF * 64, off_n + 128], c_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def _consumer_top(a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, c_bufs, c_desc, M, N, k_slices, sb_ptr, sb_kb, sb_n,
                  GROUP_M: gl.constexpr, STAGES: gl.constexpr, B_VECTOR: gl.constexpr, PROMOTE: gl.constexpr):
    _consumer(a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, c_bufs, c_desc, M, N, k_slices, sb_ptr, sb_kb, sb_n,
              0, GROUP_M, STAGES, B_VECTOR, PROMOTE)


@gluon.jit
def _consumer_bottom(a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, c_bufs, c_desc, M, N, k_slices, sb_ptr, sb_kb,
                     sb_n, GROUP_M: gl.constexpr, STAGES: gl.constexpr, B_VECTOR: gl.constexpr,
                     PROMOTE: gl.constexpr):
    _consumer(a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, c_bufs, c_desc, M, N, k_slices, sb_ptr, sb_kb, sb_n,
              1, GROUP_M, STAGES, B_VECTOR, PROMOTE)


@gluon.jit
def mm_blockwise_kernel(a_desc, b_desc, c_desc, sa_desc, sb_desc, sb_ptr, M, N, K, sb_kb, sb_n,
                        B_GROUP: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                        CONSUMER_REGS: gl.constexpr, PROMOTE: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    B_VECTOR: gl.constexpr = B_GROUP == 1        # B's scales per row (1x128), else per 128x128 block
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
    sa_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BM], sa_desc.layout)
    sb_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BN], sb_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, BM // 2, BN // 2], c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)       # both consumers release a buffer
    k_slices = (K + BK - 1) // BK
    consumer_args = (a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, c_bufs, c_desc, M, N, k_slices, sb_ptr, sb_kb,
                     sb_n, GROUP_M, STAGES, B_VECTOR, PROMOTE)
    gl.warp_specialize([
        (_consumer_top, consumer_args),
        (_consumer_bottom, consumer_args),
        (_producer, (a_desc, b_desc, sa_desc, sb_desc, a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, M, N, k_slices,
                     GROUP_M, STAGES, B_VECTOR)),
    ], [4, 1], [CONSUMER_REGS, 24])


def _descriptor(t: torch.Tensor, box: list[int]) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for(box, _GL_DTYPE[t.dtype])
    return TensorDescriptor(t, list(t.shape), list(t.stride()), box, layout)


def mm_blockwise_nt(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor, *, b_block: bool,
                    out_dtype: torch.dtype, stages: int = 3, group_m: int = 8, consumer_regs: int = 232,
                    persistent: bool = True, promote: bool = True) -> torch.Tensor:
    """(qa * sa) @ (qb * sb)^T for FP8 codes qa (M, K), qb (N, K); M, N and K multiples of 16 (TMA).

    sa: (M, ceil(K/128)) 1x128 scales of A; sb: (N, ceil(K/128)) 1x128 scales of B, or with b_block
    (ceil(N/128), ceil(K/128)) 128x128 scales. 1x128 scales are read K-slice-major, as
    mixprec.fp8.kernels writes them (others are copied). persistent: one CTA per SM, else one per tile.
    promote=False: the same kernel without the per-slice promotion (the scales ignored), its ceiling.
    """
    m, k = qa.shape
    n = qb.shape[0]
    assert qb.shape[1] == k and k % 16 == 0 and m % 16 == 0 and n % 16 == 0, (qa.shape, qb.shape)
    qa, qb = qa.contiguous(), qb.contiguous()
    c = torch.empty((m, n), dtype=out_dtype, device=qa.device)
    sa_t = sa.float().t().contiguous()                 # (K/128, M): a view of the kernels' own layout
    sb_t = sa_t if b_block else sb.float().t().contiguous()
    sb = sb.float()
    tiles = ((m + BM - 1) // BM) * ((n + BN - 1) // BN)
    sms = torch.cuda.get_device_properties(qa.device).multi_processor_count
    grid = (min(tiles, sms) if persistent else tiles,)
    mm_blockwise_kernel[grid](_descriptor(qa, [BM, BLOCK_K]), _descriptor(qb, [BN, BLOCK_K]),
                              _descriptor(c, [BM // 2, BN // 2]), _descriptor(sa_t, [1, BM]),
                              _descriptor(sb_t, [1, BN]),
                              sb, m, n, k, sb.stride(1), sb.stride(0), B_GROUP=BLOCK_K if b_block else 1,
                              STAGES=stages, GROUP_M=group_m, CONSUMER_REGS=consumer_regs, PROMOTE=promote,
                              num_warps=4)
    return c
