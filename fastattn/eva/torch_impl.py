"""FlashEVA in vectorised, chunked PyTorch: the CPU backend (differentiable through autograd).

Same math as the Triton kernels (DESIGN.md §3): landmarks by two per-chunk softmax poolings, then one
softmax over [local keys ; landmarks] per query, computed for blocks of queries so memory stays
O(block * (W + C + block + T/C)). Compute runs in fp32 (fp64 inputs stay fp64); outputs take q's dtype.
"""
from typing import Optional, Tuple

import torch

from .options import EvaOptions

QUERY_BLOCK = 256


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def bounds(t: torch.Tensor, opts: EvaOptions) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lo, n_remote) of positions t: L(t) = [lo, t], R(t) = [0, n_remote)."""
    W, C = opts.window_size, opts.chunk_size
    lo = ((t - W + 1).clamp(min=0) // C) * C if opts.sliding else (t // W) * W
    return lo, lo // C


def landmarks_torch(k: torch.Tensor, v: torch.Tensor, mu: torch.Tensor, phi: torch.Tensor,
                    opts: EvaOptions) -> Tuple[torch.Tensor, torch.Tensor]:
    """Landmarks ``[B, T // C, Hkv, D]`` in the compute dtype (fp32, or fp64 for fp64 inputs)."""
    dt = _compute_dtype(k)
    B, T, Hkv, D = k.shape
    C = opts.chunk_size
    n = T // C
    kc = k[:, :n * C].to(dt).reshape(B, n, C, Hkv, D)
    vc = v[:, :n * C].to(dt).reshape(B, n, C, Hkv, D)
    a = torch.softmax(torch.einsum("bnchd,hd->bnch", kc, mu.to(dt)), dim=2)
    z = opts.scale * (torch.einsum("bnchd,hd->bnch", kc, phi.to(dt)) - 0.5 * (kc * kc).sum(-1))
    b = torch.softmax(z, dim=2)
    return torch.einsum("bnch,bnchd->bnhd", a, kc), torch.einsum("bnch,bnchd->bnhd", b, vc)


def _attend(q, k, v, kl, vl, opts: EvaOptions):
    """One batch of equal-length sequences in the compute dtype -> (o [B, T, H, D], lse [B, H, T])."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    qg = q.view(B, T, Hkv, G, D)
    outs, lses = [], []
    for t0 in range(0, T, QUERY_BLOCK):
        t1 = min(t0 + QUERY_BLOCK, T)
        t = torch.arange(t0, t1, device=q.device)
        lo, nr = bounds(t, opts)
        a, n_rem = int(lo[0]), int(nr[-1])
        keys = torch.cat([k[:, a:t1], kl[:, :n_rem]], dim=1)
        vals = torch.cat([v[:, a:t1], vl[:, :n_rem]], dim=1)
        logits = torch.einsum("btkgd,bjkd->bkgtj", qg[:, t0:t1], keys) * opts.scale
        j = torch.arange(a, t1, device=q.device)
        c = torch.arange(n_rem, device=q.device)
        vis = torch.cat([(j[None, :] >= lo[:, None]) & (j[None, :] <= t[:, None]), c[None, :] < nr[:, None]], 1)
        logits = logits.masked_fill(~vis, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)
        p = torch.exp(logits - lse[..., None])
        outs.append(torch.einsum("bkgtj,bjkd->btkgd", p, vals).reshape(B, t1 - t0, H, D))
        lses.append(lse.reshape(B, H, t1 - t0))
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


def flash_eva_torch(q, k, v, mu, phi, opts: EvaOptions, cu_seqlens: Optional[torch.Tensor] = None):
    """PyTorch FlashEVA: returns (o [B, T, H, D] in q's dtype, lse [B, H, T] fp32 or fp64)."""
    dt = _compute_dtype(q)
    qc, kc, vc = q.to(dt), k.to(dt), v.to(dt)
    if cu_seqlens is None:
        kl, vl = landmarks_torch(kc, vc, mu, phi, opts)
        o, lse = _attend(qc, kc, vc, kl, vl, opts)
    else:
        cu = [int(x) for x in cu_seqlens.tolist()]
        os_, lses = [], []
        for a, b in zip(cu[:-1], cu[1:]):
            kl, vl = landmarks_torch(kc[:, a:b], vc[:, a:b], mu, phi, opts)
            o_n, lse_n = _attend(qc[:, a:b], kc[:, a:b], vc[:, a:b], kl, vl, opts)
            os_.append(o_n)
            lses.append(lse_n)
        o, lse = torch.cat(os_, dim=1), torch.cat(lses, dim=2)
    return o.to(q.dtype), lse


def decode_attend_torch(q, k_win, v_win, k_lm, v_lm, scale: float) -> torch.Tensor:
    """One decode step: q ``[B, H, D]`` over window keys ``[B, n, Hkv, D]`` and landmarks
    ``[B, m, Hkv, D]`` (all visible) -> o ``[B, H, D]`` in q's dtype."""
    dt = _compute_dtype(q)
    B, H, D = q.shape
    Hkv = k_win.shape[2]
    keys = torch.cat([k_win, k_lm], dim=1).to(dt)
    vals = torch.cat([v_win, v_lm], dim=1).to(dt)
    qg = q.to(dt).view(B, Hkv, H // Hkv, D)
    p = torch.softmax(torch.einsum("bkgd,bjkd->bkgj", qg, keys) * scale, dim=-1)
    return torch.einsum("bkgj,bjkd->bkgd", p, vals).reshape(B, H, D).to(q.dtype)
