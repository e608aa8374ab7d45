"""PyTorch backend of KDA (the CPU path; also runs on CUDA tensors). Autograd gives the backward.

Math in fp32 (float64 inputs stay float64). Chunked form, per chunk of C rows with entering state S and
chunk-local inclusive cumsum G of the log-decay g (see reference/kda.py for the derivation):
    L_ij = beta_i sum_d k_id k_jd e^(G_id - G_jd) (i > j);  [W | U] = (I + L)^-1 Diag(beta) [K e^G | V]
    A_ij = sum_d q_id k_jd e^(G_id - G_jd) (i >= j);  V_new = U - W S;  O = (Q e^G) S + A V_new
    S' = Diag(e^(G_C)) S + (K e^(G_C - G))^T V_new
Every exponent evaluated is a direct sum of log-decays over its own range (never a difference of two
large cumsums), so it is <= 0 and accurate for unbounded (softplus) gates: pairwise decays inside a
16-row sub-chunk are masked before exp, and blocks between sub-chunks are factored through the last
row of the earlier (column) sub-chunk, a past row, so no output depends on a later token.
"""
import itertools
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from .options import KDAOptions

Tensor = torch.Tensor
SUB_CHUNK = 16                # rows of the pairwise (diagonal) blocks of the intra-chunk matrices
PAIRWISE_BUDGET = 1 << 24     # elements of the [.., C, SUB, K] pairwise tensor per group of chunks


def _prologue(q, k, v, g, beta, opts: KDAOptions, A_log, dt_bias):
    """Upcast, apply the in-kernel options, expand q/k to HV heads, fold scale into q."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    if opts.use_qk_l2norm:
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    if opts.use_gate:
        x = g if dt_bias is None else g + dt_bias.to(dt).reshape(g.shape[-2:])
        a = 1.0 if A_log is None else A_log.to(dt).exp()[:, None]
        if opts.lower_bound is None:
            g = -a * torch.logaddexp(x, torch.zeros_like(x))   # softplus without a threshold
        else:
            g = opts.lower_bound * torch.sigmoid(a * x)
    if opts.use_beta_sigmoid:
        beta = torch.sigmoid(beta)
    H, HV = q.shape[2], v.shape[2]
    if HV != H:
        q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)
    return q * opts.scale, k, v, g, beta


def _sequences(B: int, T: int, cu_seqlens: Optional[Tensor]) -> Tuple[List[int], List[int]]:
    """Start offsets (into the B*T flattened tokens) and lengths of every sequence."""
    if cu_seqlens is None:
        return [b * T for b in range(B)], [T] * B
    cu = [int(x) for x in cu_seqlens.tolist()]
    return cu[:-1], [e - s for s, e in zip(cu[:-1], cu[1:])]


def _scan(S0: Tensor, starts: Sequence[int], counts: Sequence[int], items: Sequence[Tensor],
          step: Callable[..., Tuple[Tensor, Tuple[Tensor, ...]]]):
    """Sequential pass: for j = 0, 1, .., ``step(S, *item_j)`` advances every sequence with a j-th item.

    Item j of sequence n is row ``starts[n] + j`` of each tensor in ``items``. Sequences are sorted
    longest first so the active ones form a prefix of the state batch; items are regrouped once into
    per-step tensors (so autograd never scatters into the whole input per step). Returns the final
    states (original order) and each per-item output of ``step``, put back in item order.
    """
    N, dev = len(counts), S0.device
    order = sorted(range(N), key=lambda n: -counts[n])
    sorted_counts = [counts[n] for n in order]
    n_items = items[0].shape[0]
    steps = torch.arange(sorted_counts[0], device=dev)[:, None]
    src = torch.tensor([starts[n] for n in order], device=dev)[None, :] + steps   # [J, N] item ids
    src = torch.where(steps < torch.tensor(sorted_counts, device=dev)[None, :], src, n_items)
    per_step = [torch.cat([x, x.new_zeros(1, *x.shape[1:])], 0).index_select(0, src.flatten())
                .unflatten(0, src.shape).unbind(0) for x in items]
    order_t = torch.tensor(order, device=dev)
    S = S0.index_select(0, order_t)
    outs = []
    active = N
    for t in range(sorted_counts[0]):
        while sorted_counts[active - 1] <= t:
            active -= 1
        S_new, out = step(S[:active], *(x[t][:active] for x in per_step))
        S = S_new if active == N else torch.cat([S_new, S[active:]], 0)
        outs.append(out)
    item_ids = torch.cat([src[t][:len(o[0])] for t, o in enumerate(outs)])
    item_order = torch.argsort(item_ids)
    results = [torch.cat(o, 0).index_select(0, item_order) for o in zip(*outs)]
    return S.index_select(0, torch.argsort(order_t)), results


def _initial(initial_state: Optional[Tensor], N: int, HV: int, K: int, V: int, like: Tensor) -> Tensor:
    if initial_state is None:
        return like.new_zeros(N, HV, K, V)
    return initial_state.to(like.dtype)


def _suffix_sums(g: Tensor, dim: int) -> Tensor:
    """``sum_{r > j} g_r`` along ``dim`` (exclusive reverse cumsum, summed directly: no cancellation)."""
    rev = g.flip(dim).cumsum(dim).flip(dim)
    return torch.cat([rev.narrow(dim, 1, g.shape[dim] - 1), torch.zeros_like(g.narrow(dim, 0, 1))], dim)


def _pairwise_blocks(q: Tensor, k: Tensor, g: Tensor) -> Tuple[Tensor, Tensor]:
    """``A_ij = sum_d x_id k_jd exp(sum_{j<r<=i} g_rd)`` for i >= j (0 above), x in (q, k); inputs [m, C, K].

    Diagonal SUB x SUB blocks: pairwise segment sums, masked before exp. Block (a, b), a > b: anchored on
    the last row e of sub-chunk b, as (x_i e^(sum_{e<r<=i} g)) . (k_j e^(sum_{j<r<=e} g)). Every exponent
    is a direct sum of log-decays over its own range (<= 0, and accurate even when the chunk cumsum
    is huge). Returns (A_qk, A_kk), each [m, C, C], diagonal included.
    """
    m, C, K = q.shape
    sub = SUB_CHUNK if C % SUB_CHUNK == 0 else C
    ns = C // sub
    dev = q.device
    r = torch.arange(sub, device=dev)
    gs, ks = g.unflatten(1, (ns, sub)), k.unflatten(1, (ns, sub))             # [m, ns, sub, K]
    Xs = torch.stack([q.unflatten(1, (ns, sub)), ks], -1)                      # [m, ns, sub, K, 2]
    after = (r[None, :] > r[:, None])[:, :, None]                              # [j, i, 1]: i > j
    seg = torch.where(after, gs[:, :, None, :, :], 0.0).cumsum(3).transpose(2, 3)  # [m, ns, i, j, K]
    causal = after.transpose(0, 1) | (r[:, None] == r[None, :])[:, :, None]   # [i, j, 1]: i >= j
    E = torch.exp(torch.where(causal, seg, -math.inf))
    D = (E * ks[:, :, None, :, :]) @ Xs                                        # [m, ns, i, j, 2]
    eye = torch.eye(ns, dtype=q.dtype, device=dev)
    A = D.permute(0, 4, 1, 2, 3)[:, :, :, :, None, :] * eye[:, None, :, None]  # [m, 2, a, i, b, j]
    A = A.reshape(m, 2, C, C)
    if ns > 1:
        k_hat = ks * torch.exp(_suffix_sums(gs, 2))                            # [m, b, sub, K]
        later = (torch.arange(C, device=dev)[None, :] // sub > torch.arange(ns, device=dev)[:, None])[:, :, None]
        seg = torch.where(later, g[:, None], 0.0).cumsum(2)                    # [m, b, C, K]
        F = torch.exp(torch.where(later, seg, -math.inf))
        XF = torch.cat([q[:, None] * F, k[:, None] * F], 2)                   # [m, b, 2C, K]
        R = XF @ k_hat.transpose(-1, -2)                                       # [m, b, 2C, sub]
        A = A + R.unflatten(2, (2, C)).permute(0, 2, 3, 1, 4).reshape(m, 2, C, C)
    return A[:, 0], A[:, 1]


def _intra(q: Tensor, k: Tensor, g: Tensor) -> Tuple[Tensor, Tensor]:
    """_pairwise_blocks over [M, C, K] in groups of chunks. When the pairwise tensors of all chunks
    exceed PAIRWISE_BUDGET, each group is checkpointed (recomputed in backward) to bound memory."""
    M, C, K = q.shape
    m = max(1, PAIRWISE_BUDGET // (C * min(C, SUB_CHUNK) * K))
    recompute = M > m and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, g))
    outs = []
    for s in range(0, M, m):
        args = (q[s:s + m], k[s:s + m], g[s:s + m])
        outs.append(checkpoint(_pairwise_blocks, *args, use_reentrant=False) if recompute
                    else _pairwise_blocks(*args))
    return torch.cat([o[0] for o in outs], 0), torch.cat([o[1] for o in outs], 0)


def chunk_kda_torch(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, opts: KDAOptions,
                    initial_state: Optional[Tensor] = None, A_log: Optional[Tensor] = None,
                    dt_bias: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                    ) -> Tuple[Tensor, Optional[Tensor]]:
    """Chunked KDA in PyTorch. Inputs as validated by ``fastattn.chunk_kda`` (A_log [HV], dt_bias [HV, K],
    cu_seqlens int64 [N + 1], initial_state [N, HV, K, V]); float64 inputs are computed in float64.

    Returns (o [B, T, HV, V] in v's dtype, final state [N, HV, K, V] fp32 or None).
    """
    out_dtype = v.dtype
    B, T = q.shape[:2]
    q, k, v, g, beta = _prologue(q, k, v, g, beta, opts, A_log, dt_bias)
    HV, K, V, C = v.shape[2], q.shape[-1], v.shape[-1], opts.chunk_size
    starts, lens = _sequences(B, T, cu_seqlens)
    N, dev = len(lens), q.device
    # Pack every sequence into whole chunks (zero rows pad each sequence's last chunk).
    n_chunks = [-(-n // C) for n in lens]
    chunk_start = [0] + list(itertools.accumulate(n_chunks))[:-1]
    NC, Ttot = sum(n_chunks), B * T
    shift = torch.tensor([c * C - s for c, s in zip(chunk_start, starts)], device=dev)
    pos = torch.repeat_interleave(shift, torch.tensor(lens, device=dev)) + torch.arange(Ttot, device=dev)
    src = torch.full((NC * C,), Ttot, dtype=torch.long, device=dev)
    src[pos] = torch.arange(Ttot, device=dev)

    def pack(x: Tensor) -> Tensor:  # [B, T, HV, *D] -> [NC, HV, C, *D]
        flat = x.reshape(Ttot, *x.shape[2:])
        flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])], 0)
        return flat.index_select(0, src).unflatten(0, (NC, C)).transpose(1, 2)

    q, k, v, g, beta = (pack(x) for x in (q, k, v, g, beta))
    G = g.cumsum(2)                                                             # [NC, HV, C, K]
    A_qk, A_kk = (a.unflatten(0, (NC, HV)) for a in _intra(q.flatten(0, 1), k.flatten(0, 1), g.flatten(0, 1)))
    strict = torch.ones(C, C, dtype=torch.bool, device=dev).tril(-1)
    L = beta[..., None] * A_kk * strict
    rhs = beta[..., None] * torch.cat([k * torch.exp(G), v], -1)
    WU = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)
    W, U = WU[..., :K], WU[..., K:]
    k_dec = k * torch.exp(_suffix_sums(g, 2))                                   # k e^(G_C - G)
    decay = torch.exp(G[:, :, -1:, :]).transpose(-1, -2)                        # [NC, HV, K, 1]

    def step(S: Tensor, Wc: Tensor, Uc: Tensor, kc: Tensor, dc: Tensor):
        v_new = Uc - Wc @ S
        return dc * S + kc.transpose(-1, -2) @ v_new, (S, v_new)

    S0 = _initial(initial_state, N, HV, K, V, q)
    S_final, (S_chunk, v_new) = _scan(S0, chunk_start, n_chunks, (W, U, k_dec, decay), step)
    o = (q * torch.exp(G)) @ S_chunk + A_qk @ v_new
    o = o.transpose(1, 2).reshape(NC * C, HV, V).index_select(0, pos).reshape(B, T, HV, V)
    return o.to(out_dtype), (S_final if opts.output_final_state else None)


def recurrent_kda_torch(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, opts: KDAOptions,
                        initial_state: Optional[Tensor] = None, A_log: Optional[Tensor] = None,
                        dt_bias: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                        ) -> Tuple[Tensor, Optional[Tensor]]:
    """Token-by-token KDA in PyTorch (decoding path), vectorised over sequences and heads.

    Same inputs and returns as :func:`chunk_kda_torch` (``opts.chunk_size`` is ignored).
    """
    out_dtype = v.dtype
    B, T = q.shape[:2]
    q, k, v, g, beta = _prologue(q, k, v, g, beta, opts, A_log, dt_bias)
    HV, K, V = v.shape[2], q.shape[-1], v.shape[-1]
    starts, lens = _sequences(B, T, cu_seqlens)
    tokens = [x.reshape(B * T, *x.shape[2:]) for x in (q, k, v, g.exp(), beta)]

    def step(S: Tensor, qt: Tensor, kt: Tensor, vt: Tensor, at: Tensor, bt: Tensor):
        S = at[..., None] * S                                                    # decay first
        err = vt - (kt[..., None, :] @ S).squeeze(-2)                            # v - S~^T k
        S = S + kt[..., :, None] * (bt[..., None] * err)[..., None, :]
        return S, ((qt[..., None, :] @ S).squeeze(-2),)                          # read updated S

    S0 = _initial(initial_state, len(lens), HV, K, V, q)
    S_final, (o,) = _scan(S0, starts, lens, tokens, step)
    return o.reshape(B, T, HV, V).to(out_dtype), (S_final if opts.output_final_state else None)


__all__ = ["chunk_kda_torch", "recurrent_kda_torch"]
