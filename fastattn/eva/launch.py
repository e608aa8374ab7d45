"""Plain-Python orchestration of the FlashEVA kernels: tile choices, packed-sequence tables, buffers,
launches. Forward = pooling + attention; backward = dq (+ delta), local dk/dv, landmark grads, pooling
backward (in place into dk, dv). No host synchronisation, so the ops are safe under torch.compile.
"""
from typing import Optional, Tuple

import torch
import triton

from .._backend import interpreting
from .._launch import launch
from ._common import LOG2E
from .attn_bwd_dkv import eva_attn_bwd_dkv_kernel
from .attn_bwd_dq import eva_attn_bwd_dq_kernel
from .attn_bwd_lm import eva_attn_bwd_lm_kernel
from .attn_fwd import eva_attn_fwd_kernel
from .options import EvaOptions
from .pool_bwd import eva_pool_bwd_kernel
from .pool_fwd import eva_pool_fwd_kernel

# Tile table per stage, keyed by the padded head dim: (rows of a query tile, key-block size, warps, stages).
# "rows" counts token x head rows (GQA heads of one kv head share a tile). Edit here to retune. D = 128 entries
# from sweeps on an H200 (triton 3.6, bf16, H16 Hkv8, W2048 C16, B8 T4096 / B2 T16384 / B1 T65536), e.g. the
# local dk/dv stage 2.46 ms at (64, 64, 8, 2) -> 1.29 ms at (32, 64, 4, 3); the other head dims were not swept.
TILES = {
    "fwd": {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 2)},
    "dq": {64: (128, 64, 8, 2), 128: (128, 64, 8, 3), 256: (64, 32, 4, 1)},
    "dkv": {64: (64, 64, 4, 2), 128: (32, 64, 4, 3), 256: (32, 32, 4, 1)},
    "lm": {64: (64, 64, 4, 2), 128: (32, 64, 4, 3), 256: (32, 32, 4, 1)},
}
INTERPRET_TILES = (32, 32, 4, 1)
# the landmark-gradient stage cuts each sequence's queries into segments of about this many tokens (at most
# LM_MAX_SEGMENTS, each a [B, T // C, Hkv, D] fp32 slice of partial sums per gradient); the interpreter uses
# short segments so its small test shapes run several of them
LM_SEGMENT = 4096
INTERPRET_LM_SEGMENT = 32
LM_MAX_SEGMENTS = 8
POOL_WARPS = 4
POOL_ELEMS = 4096  # elements per pooling tile: NCB chunks x BS tokens x BD
POOL_BWD_ELEMS = 8192  # backward: 0.277 -> 0.213 ms at B8 T4096 W2048 C16 (H200), 0.668 -> 0.453 at B1 T65536 C8


def head_dim_block(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def tiles(stage: str, D: int, G: int, dtype: torch.dtype) -> dict:
    """Tile sizes of one stage: BT query tokens x GP heads per tile, BN keys per block, warps, stages."""
    BD = head_dim_block(D)
    if interpreting():
        rows, BN, warps, stages = INTERPRET_TILES
    else:
        rows, BN, warps, stages = TILES[stage][min(256, max(64, BD))]
        if dtype == torch.float32:  # fp32 tiles take twice the shared memory
            rows, BN, stages = max(32, rows // 2), max(16, BN // 2), min(stages, 2)
    GP = 1
    while G % (GP * 2) == 0 and rows // (GP * 2) >= 16:
        GP *= 2
    return dict(BT=rows // GP, GP=GP, BN=BN, BD=BD, num_warps=warps, num_stages=stages)


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def block_tables(counts: torch.Tensor, block: int, bound: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For per-sequence item counts, the (sequence, block) of each of ``bound`` programs (sequence -1 when
    the program has no block). Computed on the device, no host sync."""
    nb = (counts + block - 1) // block
    off = torch.cumsum(nb, 0)
    pid = torch.arange(bound, device=counts.device, dtype=off.dtype)
    seq = torch.searchsorted(off, pid, right=True)
    n = counts.numel()
    seq_c = seq.clamp(max=n - 1)
    idx = pid - (off[seq_c] - nb[seq_c])
    seq = torch.where(seq < n, seq, torch.full_like(seq, -1))
    return seq.to(torch.int32), idx.to(torch.int32)


class Layout:
    """Where sequences and their landmarks live. Plain batches: B rows of T tokens and T // C landmark
    slots. Packed (cu_seqlens): one row; sequence n's landmarks start at lm_offsets[n]."""

    def __init__(self, B: int, T: int, C: int, cu_seqlens: Optional[torch.Tensor]):
        self.B, self.T, self.C, self.cu = B, T, C, cu_seqlens
        self.n_lm = T // C
        self.varlen = cu_seqlens is not None
        if self.varlen:
            self.lens = cu_seqlens[1:] - cu_seqlens[:-1]
            zero = cu_seqlens.new_zeros(1)
            self.lm_offsets = torch.cat([zero, torch.cumsum(self.lens // C, 0)])
            self.N = self.lens.numel()

    def grid(self, counts_kind: str, block: int, heads: int):
        """(grid, cu, lm_offsets, blk_seq, blk_idx) for programs over tokens or landmarks of each sequence."""
        total = self.T if counts_kind == "tokens" else self.n_lm
        if not self.varlen:
            return (triton.cdiv(total, block), heads, self.B), None, None, None, None
        counts = self.lens if counts_kind == "tokens" else self.lens // self.C
        bound = triton.cdiv(total, block) + self.N
        seq, idx = block_tables(counts, block, bound)
        return (bound, heads, 1), self.cu, self.lm_offsets, seq, idx


def lm_segments(T: int) -> int:
    """Number of query segments of the landmark-gradient stage for rows of T tokens."""
    return max(1, min(LM_MAX_SEGMENTS, T // (INTERPRET_LM_SEGMENT if interpreting() else LM_SEGMENT)))


def _pool_tiles(C: int, D: int, elems: int):
    BD = head_dim_block(D)
    tokens = max(4, elems // BD)
    BS = min(triton.next_power_of_2(C), tokens)
    return dict(NCB=max(1, tokens // BS), BS=BS, BD=BD)


def pool_fwd(k, v, mu, phi, lay: Layout, opts: EvaOptions):
    """Landmarks k_lm, v_lm [B, T // C, Hkv, D] (k's dtype) and lm_lse [B, T // C, Hkv, 2] fp32."""
    B, T, HKV, D = k.shape
    k_lm = torch.empty(B, lay.n_lm, HKV, D, device=k.device, dtype=k.dtype)
    v_lm = torch.empty(B, lay.n_lm, HKV, D, device=k.device, dtype=v.dtype)
    lm_lse = torch.empty(B, lay.n_lm, HKV, 2, device=k.device, dtype=torch.float32)
    if lay.n_lm == 0:
        return k_lm, v_lm, lm_lse
    t = _pool_tiles(opts.chunk_size, D, POOL_ELEMS)
    grid, cu, lmo, seq, idx = lay.grid("landmarks", t["NCB"], HKV)
    launch(eva_pool_fwd_kernel, grid, k, v, mu, phi, k_lm, v_lm, lm_lse, cu, lmo, seq, idx, opts.scale * LOG2E, T,
                              lay.n_lm, opts.chunk_size, HKV=HKV, D=D, IS_VARLEN=lay.varlen, num_warps=POOL_WARPS, **t)
    return k_lm, v_lm, lm_lse


def pool_bwd(k, v, mu, phi, lm_lse, dk_lm, dv_lm, dk, dv, lay: Layout, opts: EvaOptions, nseg: int = 1):
    """Add the pooling gradients into dk, dv (in place); return (dmu, dphi) [Hkv, D] fp32. dk_lm, dv_lm hold
    ``nseg`` slices of partial landmark gradients, summed by the kernel."""
    B, T, HKV, D = k.shape
    if lay.n_lm == 0:
        return mu.new_zeros(HKV, D), phi.new_zeros(HKV, D)
    t = _pool_tiles(opts.chunk_size, D, POOL_BWD_ELEMS)
    grid, cu, lmo, seq, idx = lay.grid("landmarks", t["NCB"], HKV)
    dmu = torch.zeros(B, grid[0], HKV, D, device=k.device, dtype=torch.float32)
    dphi = torch.zeros_like(dmu)
    launch(eva_pool_bwd_kernel, grid, k, v, mu, phi, lm_lse, dk_lm, dv_lm, dk, dv, dmu, dphi, cu, lmo, seq, idx,
                              opts.scale, opts.scale * LOG2E, T, lay.n_lm, opts.chunk_size, HKV=HKV, D=D,
                              IS_VARLEN=lay.varlen, NSEG=nseg, num_warps=POOL_WARPS, **t)
    return dmu.sum((0, 1)), dphi.sum((0, 1))


def _attn_args(q, k, opts: EvaOptions):
    B, T, H, D = q.shape
    return B, T, H, k.shape[2], D, dict(SLIDING=opts.sliding, PREC=dot_precision(q.dtype))


def eva_forward(q, k, v, mu, phi, cu_seqlens, opts: EvaOptions):
    """Returns (o, lse [B, H, T] fp32, k_lm, v_lm, lm_lse)."""
    B, T, H, HKV, D, common = _attn_args(q, k, opts)
    lay = Layout(B, T, opts.chunk_size, cu_seqlens)
    k_lm, v_lm, lm_lse = pool_fwd(k, v, mu, phi, lay, opts)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    t = tiles("fwd", D, H // HKV, q.dtype)
    grid, cu, lmo, seq, idx = lay.grid("tokens", t["BT"], H // t["GP"])
    launch(eva_attn_fwd_kernel, grid, q, k, v, k_lm, v_lm, o, lse, cu, lmo, seq, idx, opts.scale * LOG2E, T, lay.n_lm,
                              opts.window_size, opts.chunk_size, H=H, HKV=HKV, D=D, IS_VARLEN=lay.varlen,
                              **common, **t)
    return o, lse, k_lm, v_lm, lm_lse


def eva_backward(q, k, v, mu, phi, cu_seqlens, o, lse, k_lm, v_lm, lm_lse, do, dlse, opts: EvaOptions):
    """Returns (dq, dk, dv, dmu, dphi); dk, dv hold the local and the pooled landmark gradients."""
    B, T, H, HKV, D, common = _attn_args(q, k, opts)
    lay = Layout(B, T, opts.chunk_size, cu_seqlens)
    qk_scale = opts.scale * LOG2E
    scalars = (qk_scale, opts.scale, T, lay.n_lm, opts.window_size, opts.chunk_size)
    delta = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    dq = torch.empty_like(q)
    t = tiles("dq", D, H // HKV, q.dtype)
    grid, cu, lmo, seq, idx = lay.grid("tokens", t["BT"], H // t["GP"])
    launch(eva_attn_bwd_dq_kernel, grid, q, k, v, k_lm, v_lm, o, do, lse, dlse, delta, dq, cu, lmo, seq, idx, *scalars,
                                 H=H, HKV=HKV, D=D, IS_VARLEN=lay.varlen, HAS_DLSE=dlse is not None,
                                 **common, **t)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    t = tiles("dkv", D, H // HKV, q.dtype)
    grid, cu, lmo, seq, idx = lay.grid("tokens", t["BN"], HKV)
    launch(eva_attn_bwd_dkv_kernel, grid, q, k, v, do, lse, delta, dk, dv, cu, lmo, seq, idx, *scalars,
                                  H=H, HKV=HKV, D=D, IS_VARLEN=lay.varlen, **common, **t)
    if lay.n_lm == 0:
        return dq, dk, dv, mu.new_zeros(HKV, D), phi.new_zeros(HKV, D)
    nseg = lm_segments(T)
    dk_lm = torch.empty(nseg, B, lay.n_lm, HKV, D, device=q.device, dtype=torch.float32)
    dv_lm = torch.empty_like(dk_lm)
    t = tiles("lm", D, H // HKV, q.dtype)
    grid, cu, lmo, seq, idx = lay.grid("landmarks", t["BN"], HKV * nseg)
    launch(eva_attn_bwd_lm_kernel, grid, q, k_lm, v_lm, do, lse, delta, dk_lm, dv_lm, cu, lmo, seq, idx, *scalars,
                                 H=H, HKV=HKV, D=D, IS_VARLEN=lay.varlen, NSEG=nseg, **common, **t)
    dmu, dphi = pool_bwd(k, v, mu, phi, lm_lse, dk_lm, dv_lm, dk, dv, lay, opts, nseg)
    return dq, dk, dv, dmu, dphi
