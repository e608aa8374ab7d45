"""Float64 oracles for EVA / FlashEVA attention, in plain differentiable PyTorch (tests and benchmarks only).

DESIGN.md §3, one head, window W, chunk C (W a multiple of C), scale s:
    o_t = (sum_{j in L(t)} e^{s q_t.k_j} v_j + sum_{c in R(t)} e^{s q_t.kl_c} vl_c) / (same sums without v)
with block local windows L(t) = [floor(t/W) W, t], R(t) = {c < floor(t/W) W/C}, or sliding windows
a = C floor(max(t-W+1, 0)/C), L(t) = [a, t], R(t) = {c < a/C}. Landmarks of the complete chunks c:
    kl_c = sum_m softmax_m(mu.k_m) k_m,   vl_c = sum_m softmax_m(s (phi.k_m - |k_m|^2 / 2)) v_m.
Everything is a dense masked softmax over [K ; landmarks]; packed sequences are a per-sequence loop.
Every input is upcast to float64 (or run in a chosen dtype for same-precision baselines); autograd gives
gradients for q, k, v, mu and phi.
"""
from typing import Optional, Tuple, Union

import torch

Tensor = torch.Tensor


def eva_local_bounds(t: Tensor, window_size: int, chunk_size: int, local: str = "block") -> Tuple[Tensor, Tensor]:
    """For positions t, return (lo, n_remote): L(t) = [lo, t] and R(t) = [0, n_remote)."""
    W, C = window_size, chunk_size
    if local == "block":
        lo = (t // W) * W
    elif local == "sliding":
        lo = (torch.clamp(t - W + 1, min=0) // C) * C
    else:
        raise ValueError(f"local must be 'block' or 'sliding', got {local!r}")
    return lo, lo // C


def eva_mask_ref(T: int, window_size: int, chunk_size: int, local: str = "block") -> Tensor:
    """Boolean visibility ``[T, T + T // C]`` of query t over [keys ; landmarks] (DESIGN.md §3)."""
    t = torch.arange(T)
    lo, nr = eva_local_bounds(t, window_size, chunk_size, local)
    j = torch.arange(T)
    local_vis = (j[None, :] >= lo[:, None]) & (j[None, :] <= t[:, None])
    c = torch.arange(T // chunk_size)
    remote_vis = c[None, :] < nr[:, None]
    return torch.cat([local_vis, remote_vis], dim=1)


def eva_landmarks_ref(k: Tensor, v: Tensor, chunk_size: int, mu: Optional[Tensor] = None,
                      phi: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                      dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor]:
    """Landmarks ``[B, T // C, Hkv, D]`` of the complete chunks of k, v ``[B, T, Hkv, D]``, computed in
    ``dtype`` (float64 for the oracle; the input dtype for a same-precision PyTorch baseline)."""
    k, v = k.to(dtype), v.to(dtype)
    B, T, Hkv, D = k.shape
    C = chunk_size
    s = D ** -0.5 if softmax_scale is None else softmax_scale
    mu = k.new_zeros(Hkv, D) if mu is None else mu.to(dtype)
    phi = k.new_zeros(Hkv, D) if phi is None else phi.to(dtype)
    n = T // C
    kc = k[:, :n * C].reshape(B, n, C, Hkv, D)
    vc = v[:, :n * C].reshape(B, n, C, Hkv, D)
    a = torch.softmax(torch.einsum("bnchd,hd->bnch", kc, mu), dim=2)
    z = s * (torch.einsum("bnchd,hd->bnch", kc, phi) - 0.5 * (kc * kc).sum(-1))
    b = torch.softmax(z, dim=2)
    return torch.einsum("bnch,bnchd->bnhd", a, kc), torch.einsum("bnch,bnchd->bnhd", b, vc)


def _eva_one(q, k, v, W, C, mu, phi, s, local):
    """One sequence: q [1, T, H, D], k, v [1, T, Hkv, D] -> (o [1, T, H, D], lse [1, H, T]) in q's dtype."""
    T, H = q.shape[1], q.shape[2]
    Hkv = k.shape[2]
    kl, vl = eva_landmarks_ref(k, v, C, mu, phi, s, dtype=q.dtype)
    ka = torch.cat([k, kl], dim=1).repeat_interleave(H // Hkv, dim=2)
    va = torch.cat([v, vl], dim=1).repeat_interleave(H // Hkv, dim=2)
    logits = s * torch.einsum("bthd,bjhd->bhtj", q, ka)
    mask = eva_mask_ref(T, W, C, local).to(q.device)
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("bhtj,bjhd->bthd", p, va), lse


def flash_eva_ref(q: Tensor, k: Tensor, v: Tensor, *, window_size: int = 2048, chunk_size: int = 16,
                  mu: Optional[Tensor] = None, phi: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                  local: str = "block", cu_seqlens: Optional[Tensor] = None, return_lse: bool = False,
                  dtype: torch.dtype = torch.float64) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Dense EVA attention computed in ``dtype`` (float64: the oracle); same arguments and layout as
    ``fastattn.flash_eva``.

    Returns o ``[B, T, H, D]`` (and lse ``[B, H, T]``, natural log, when ``return_lse``) in ``dtype``.
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    s = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if cu_seqlens is None:
        outs = [_eva_one(q[b:b + 1], k[b:b + 1], v[b:b + 1], window_size, chunk_size, mu, phi, s, local)
                for b in range(q.shape[0])]
        o = torch.cat([x[0] for x in outs], dim=0)
        lse = torch.cat([x[1] for x in outs], dim=0)
    else:
        cu = [int(x) for x in cu_seqlens.tolist()]
        outs = [_eva_one(q[:, a:b], k[:, a:b], v[:, a:b], window_size, chunk_size, mu, phi, s, local)
                for a, b in zip(cu[:-1], cu[1:])]
        o = torch.cat([x[0] for x in outs], dim=1)
        lse = torch.cat([x[1] for x in outs], dim=2)
    return (o, lse) if return_lse else o


__all__ = ["eva_local_bounds", "eva_mask_ref", "eva_landmarks_ref", "flash_eva_ref"]
