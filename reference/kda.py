"""Float64 oracles for Kimi Delta Attention, in plain differentiable PyTorch (tests and benchmarks only).

Two independent forms of the same recurrence (DESIGN.md §2), per value head with state S [K, V]:
    S~ = Diag(exp g_t) S_{t-1};  S_t = S~ + k_t (beta_t (v_t - S~^T k_t))^T;  o_t = S_t^T (scale q_t)
``naive_recurrent_kda`` runs it token by token; ``naive_chunk_kda`` uses the chunked WY/UT form.
Every input is upcast to float64, outputs are float64, and autograd gives float64 gradients for all
floating inputs (including initial_state, A_log and dt_bias).
"""
import itertools
from typing import List, Optional, Tuple

import torch

Tensor = torch.Tensor


def l2norm_ref(x: Tensor) -> Tensor:
    """``x / sqrt(sum(x^2, -1) + 1e-6)`` in float64."""
    x = x.double()
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def kda_gate_ref(g_raw: Tensor, A_log: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                 lower_bound: Optional[float] = None) -> Tensor:
    """Log-decay ``g [B, T, HV, K]`` from raw gate inputs ``g_raw [B, T, HV, K]``.

    Without lower_bound: ``g = -exp(A_log[h]) * softplus(g_raw + dt_bias[h])`` (unbounded below).
    With lower_bound lb: ``g = lb * sigmoid(exp(A_log[h]) * (g_raw + dt_bias[h]))``.
    A_log ``[HV]`` (None means a factor of 1); dt_bias ``[HV * K]`` or ``[HV, K]`` (None means 0).
    """
    x = g_raw.double()
    HV, K = x.shape[-2], x.shape[-1]
    if dt_bias is not None:
        x = x + dt_bias.double().reshape(HV, K)
    a = 1.0 if A_log is None else torch.exp(A_log.double().reshape(HV, 1))
    if lower_bound is None:
        return -a * torch.logaddexp(x, torch.zeros_like(x))  # exact softplus, no threshold
    return lower_bound * torch.sigmoid(a * x)


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel,
             use_beta_sigmoid_in_kernel, A_log, dt_bias, lower_bound):
    """Apply the in-kernel options; return float64 q (scaled, at HV heads), k (HV heads), v, g, beta."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm_ref(q), l2norm_ref(k)
    if use_gate_in_kernel:
        g = kda_gate_ref(g, A_log, dt_bias, lower_bound)
    if use_beta_sigmoid_in_kernel:
        beta = torch.sigmoid(beta)
    H, HV = q.shape[2], v.shape[2]
    head_of = torch.arange(HV, device=q.device) // (HV // H)  # value head hv reads q/k head hv // (HV/H)
    q, k = q.index_select(2, head_of), k.index_select(2, head_of)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return q * scale, k, v, g, beta


def _segments(B: int, T: int, cu_seqlens: Optional[Tensor]) -> List[Tuple[int, int, int]]:
    """(batch row, start, end) of every sequence; its index in the list is its state index n."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    if B != 1:
        raise ValueError(f"cu_seqlens needs batch size 1, got B={B}")
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]


def _run(step, q, k, v, g, beta, initial_state, output_final_state, cu_seqlens):
    """Apply ``step(S, b, start, end) -> (o [end-start, HV, V], S)`` to every sequence; assemble outputs."""
    B, T, HV, K = k.shape
    V = v.shape[-1]
    segs = _segments(B, T, cu_seqlens)
    rows: List[List[Tensor]] = [[] for _ in range(B)]
    finals = []
    for n, (b, start, end) in enumerate(segs):
        if initial_state is None:
            S = torch.zeros(HV, K, V, dtype=torch.float64, device=q.device)
        else:
            S = initial_state[n].double()
        o, S = step(S, b, start, end)
        rows[b].append(o)
        finals.append(S)
    o = torch.stack([torch.cat(r, 0) for r in rows], 0)
    return o, (torch.stack(finals, 0) if output_final_state else None)


def naive_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                        use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
                        use_beta_sigmoid_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None,
                        cu_seqlens=None):
    """Token-by-token KDA in float64. Shapes as ``fastattn.chunk_kda``.

    Returns ``(o [B, T, HV, V] float64, final_state [N, HV, K, V] float64 or None)``.
    """
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel,
                                use_beta_sigmoid_in_kernel, A_log, dt_bias, lower_bound)

    def step(S, b, start, end):
        outs = []
        for t in range(start, end):
            S = torch.exp(g[b, t])[:, :, None] * S                          # decay first
            kt = k[b, t]
            err = v[b, t] - torch.einsum("hkv,hk->hv", S, kt)               # delta rule vs decayed S
            S = S + torch.einsum("hk,hv->hkv", kt, beta[b, t][:, None] * err)
            outs.append(torch.einsum("hkv,hk->hv", S, q[b, t]))            # read the updated state
        return torch.stack(outs, 0), S

    return _run(step, q, k, v, g, beta, initial_state, output_final_state, cu_seqlens)


def naive_chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                    use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                    A_log=None, dt_bias=None, lower_bound=None, cu_seqlens=None, chunk_size=64):
    """Chunked (WY/UT) KDA in float64; any T (the last chunk of a sequence may be short).

    Per chunk with entering state S and chunk-local inclusive cumsum G of g:
    ``L_ij = beta_i sum_d k_id k_jd exp(G_id - G_jd)`` (i > j), ``T = (I + L)^-1``,
    ``W = T Diag(beta) (K * e^G)``, ``U = T Diag(beta) V``, ``V_new = U - W S``,
    ``A_ij = sum_d q_id k_jd exp(G_id - G_jd)`` (i >= j), ``O = (Q * e^G) S + A V_new``,
    ``S' = Diag(e^{G_last}) S + (K * e^{G_last - G})^T V_new``.
    Pairwise decays are masked (i >= j) before exp, so every exponent is <= 0 for g <= 0.
    """
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel,
                                use_beta_sigmoid_in_kernel, A_log, dt_bias, lower_bound)

    def step(S, b, start, end):
        outs = []
        for cs in range(start, end, chunk_size):
            ce = min(cs + chunk_size, end)
            n = ce - cs
            qc, kc, vc, gc = (x[b, cs:ce].transpose(0, 1) for x in (q, k, v, g))   # [HV, n, D]
            bc = beta[b, cs:ce].transpose(0, 1)[:, :, None]                        # [HV, n, 1]
            G = gc.cumsum(1)
            ii = torch.arange(n, device=q.device)
            causal = (ii[:, None] >= ii[None, :])[None, :, :, None]
            diff = G[:, :, None, :] - G[:, None, :, :]                               # [HV, i, j, K]
            E = torch.exp(torch.where(causal, diff, torch.full_like(diff, float("-inf"))))
            A = torch.einsum("hid,hjd,hijd->hij", qc, kc, E)
            strict = (ii[:, None] > ii[None, :]).double()
            L = bc * torch.einsum("hid,hjd,hijd->hij", kc, kc, E) * strict
            eye = torch.eye(n, dtype=torch.float64, device=q.device)
            Tm = torch.linalg.inv(eye + L)
            W = Tm @ (bc * kc * torch.exp(G))
            U = Tm @ (bc * vc)
            v_new = U - W @ S
            outs.append(((qc * torch.exp(G)) @ S + A @ v_new).transpose(0, 1))
            G_last = G[:, -1:, :]
            S = torch.exp(G_last).transpose(1, 2) * S + (kc * torch.exp(G_last - G)).transpose(1, 2) @ v_new
        return torch.cat(outs, 0), S

    return _run(step, q, k, v, g, beta, initial_state, output_final_state, cu_seqlens)


def kda_inputs(B: int, T: int, H: int, HV: int, K: int, V: int, *, gate: str = "none", extreme: bool = False,
               beta_mode: str = "rand", l2norm: bool = True, beta_sigmoid: bool = False,
               initial_state: bool = False, seqlens: Optional[List[int]] = None,
               dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> dict:
    """Random keyword arguments for ``chunk_kda``-style calls (test and benchmark data).

    gate: "none" (g is the log-decay), "softplus" (raw gate, A_log, dt_bias) or "bounded" (lower_bound).
    extreme: log-decays reach about -30 per step (and beyond for the softplus gate).
    beta_mode: "rand", "zero" or "one" (as logits of +-40 when beta_sigmoid).
    Without l2norm, k is unit-normalised here so the recurrence stays bounded.
    seqlens: packed sequence lengths (sum T, needs B == 1) giving cu_seqlens.
    """
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, fn=torch.randn):
        return fn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, HV, V)
    if not l2norm:
        k = l2norm_ref(k)
    kw = dict(use_qk_l2norm_in_kernel=l2norm, use_beta_sigmoid_in_kernel=beta_sigmoid,
              use_gate_in_kernel=gate != "none")
    if gate == "none":
        g = -30 * rnd(B, T, HV, K, fn=torch.rand) if extreme else torch.nn.functional.logsigmoid(
            2 + rnd(B, T, HV, K))
    elif gate == "softplus":
        g = 15 + 10 * rnd(B, T, HV, K) if extreme else rnd(B, T, HV, K)
        kw.update(A_log=(torch.zeros(HV, dtype=torch.float64) if extreme else 0.5 * rnd(HV)).float(),
                  dt_bias=(0.5 * rnd(HV * K)).float())
    elif gate == "bounded":
        g = 3 * rnd(B, T, HV, K)
        kw.update(A_log=(0.5 * rnd(HV)).float(), dt_bias=(0.5 * rnd(HV * K)).float(),
                  lower_bound=-5.0 if extreme else -1.0)
    else:
        raise ValueError(f"gate must be 'none', 'softplus' or 'bounded', got {gate!r}")
    if beta_mode == "rand":
        beta = 2 * rnd(B, T, HV) if beta_sigmoid else rnd(B, T, HV, fn=torch.rand)
    elif beta_mode in ("zero", "one"):
        one = beta_mode == "one"
        beta = torch.full((B, T, HV), (40.0 if one else -40.0) if beta_sigmoid else float(one), dtype=torch.float64)
    else:
        raise ValueError(f"beta_mode must be 'rand', 'zero' or 'one', got {beta_mode!r}")
    if seqlens is not None:
        if B != 1 or sum(seqlens) != T:
            raise ValueError(f"seqlens {seqlens} need B == 1 and sum == T={T}")
        kw["cu_seqlens"] = torch.tensor([0] + list(itertools.accumulate(seqlens)), device=device)
    N = B if seqlens is None else len(seqlens)
    if initial_state:
        kw["initial_state"] = (0.5 * rnd(N, HV, K, V)).float().to(device)
    for name in ("A_log", "dt_bias"):
        if name in kw:
            kw[name] = kw[name].to(device)
    kw.update(q=q.to(device, dtype), k=k.to(device, dtype), v=v.to(device, dtype), g=g.to(device, dtype),
              beta=beta.to(device, dtype))
    return kw


__all__ = ["kda_gate_ref", "kda_inputs", "l2norm_ref", "naive_recurrent_kda", "naive_chunk_kda"]
