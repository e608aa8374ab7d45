"""Shared helpers of the KDA tests: input cases, the error metric, and oracle comparisons."""
import os

import pytest
import torch
import torch.nn.functional as F

from reference.kda import naive_chunk_kda, naive_recurrent_kda

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"
# a test that runs the Triton kernels needs the interpreter (CI's interpret lane) or a GPU
needs_kernels = pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or CUDA")
# (output, gradient) tolerances on rel(); dg/dbeta get GATE_FACTOR x the gradient tolerance
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 5e-3), torch.bfloat16: (5e-3, 1e-2)}
GATE_FACTOR = 2.0
# dA_log and ddt_bias sum dg-derived terms over every token, so cancellation amplifies the per-token error; under
# fp16 inputs the products run in tf32 (10-bit mantissa, like fp16's own) and these two sums measured 1.07e-2 and
# 1.12e-2 on an H200 (B1-T2048 GVA softplus, B1-T3000 lb varlen) while every per-token gradient stayed <= 2.3e-3,
# with fp16 and with fp32 intermediates alike: they get bf16's gate bound, 2e-2.
PARAM_FACTOR = {torch.float16: 2.0}
GRAD_NAMES = ("q", "k", "v", "g", "beta", "A_log", "dt_bias", "initial_state")


def rel(x: torch.Tensor, ref: torch.Tensor, den=None) -> float:
    """||x - ref||_rms / ||ref||_rms, or / den when given (absolute rms when the denominator is 0).
    Non-finite x fails."""
    assert torch.isfinite(x).all(), "non-finite values"
    err = (x.double() - ref.double()).pow(2).mean().sqrt().item()
    den = ref.double().pow(2).mean().sqrt().item() if den is None else den
    return err / den if den > 0 else err


def make_case(B, T, H, HV, K, V, dtype, *, gate="none", l2=True, sig=True, h0=False, cu=None, out_ht=True,
              gscale=1.0, beta="random", lower_bound=-5.0, use_A=True, use_bias=True, device=DEVICE, seed=0,
              unit_qk="normalize", wide_A=False, beta_scale=1.0, low_g=False):
    """Leaves (dict) and keyword options of one KDA call.

    gate: "none" (g is the log-decay), "softplus" or "lb" (raw gate inputs, scaled by gscale).
    beta: "random" or "binary" (0/1 values, +-20 logits with sig). cu: packed sequence offsets (B must be 1).
    unit_qk: without l2, q and k are "normalize"d to unit rows or "scale"d by K^-0.5 (norm near 1).
    wide_A: softplus-gate A_log = log(1 + 15 u), a in [1, 16] (else 0.5 randn). beta_scale: scale of the
    random beta logits (with sig). low_g: g in dtype too (else fp32, as A_log, dt_bias, initial_state)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    N = B if cu is None else len(cu) - 1
    q, k = rnd(B, T, H, K), rnd(B, T, H, K)
    if not l2 and unit_qk == "scale":  # ||k|| near 1 keeps the delta rule contractive
        q, k = q * K ** -0.5, k * K ** -0.5
    elif not l2:  # unit-norm keys keep the delta rule contractive, as a real model's l2norm does
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    x = dict(q=q, k=k, v=rnd(B, T, HV, V))
    kw = dict(output_final_state=out_ht, use_qk_l2norm_in_kernel=l2, use_beta_sigmoid_in_kernel=sig,
              cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int64, device=device))
    if gate == "none":
        x["g"] = F.logsigmoid(rnd(B, T, HV, K) * 2) * gscale
    else:
        x["g"] = rnd(B, T, HV, K) * gscale
        kw["use_gate_in_kernel"] = True
        if gate == "lb":
            kw["lower_bound"] = lower_bound
        if use_A or gate == "softplus":
            wide = wide_A and gate == "softplus"
            x["A_log"] = torch.log(1 + 15 * torch.rand(HV, generator=gen)) if wide else rnd(HV) * 0.5
        if use_bias:
            x["dt_bias"] = rnd(HV * K) * 0.5
    if beta == "binary":
        b = (torch.rand(B, T, HV, generator=gen) > 0.5).float()
        x["beta"] = (b * 40 - 20) if sig else b
    else:
        x["beta"] = rnd(B, T, HV) * beta_scale if sig else torch.rand(B, T, HV, generator=gen)
    if h0:
        x["initial_state"] = rnd(N, HV, K, V) * 0.5
    low = {"q", "k", "v", "beta", "g"} if low_g else {"q", "k", "v", "beta"}
    x = {n: (t.to(dtype) if n in low else t.float()).to(device).requires_grad_() for n, t in x.items()}
    return x, kw


def call(fn, x, kw, **extra):
    """fn(q, k, v, g, beta, **everything else) with leaves from make_case."""
    rest = {n: t for n, t in x.items() if n not in ("q", "k", "v", "g", "beta")}
    return fn(x["q"], x["k"], x["v"], x["g"], x["beta"], **rest, **kw, **extra)


def loss_and_grads(o, ht, x, seed=1):
    """Backprop (o * do).sum() + (ht * dht).sum() with fixed random cotangents; return grads by name."""
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen).to(o.device, o.dtype)).sum()
    if ht is not None:
        loss = loss + (ht * torch.randn(ht.shape, generator=gen).to(ht.device, ht.dtype)).sum()
    names = [n for n in GRAD_NAMES if n in x]
    grads = torch.autograd.grad(loss, [x[n] for n in names])
    return dict(zip(names, grads))


def check_against_oracle(fn, x, kw, dtype, *, oracle="recurrent", grads=True, grad_tol_scale=1.0, **extra):
    """Run fn and the float64 oracle on the same leaves; assert outputs (and gradients) within TOL[dtype].
    Returns the dict of measured errors."""
    o, ht = call(fn, x, kw, **extra)
    ref_fn = naive_recurrent_kda if oracle == "recurrent" else naive_chunk_kda
    ro, rht = call(ref_fn, x, kw)
    to, tg = TOL[dtype]
    errs = {"o": rel(o, ro)}
    if kw.get("output_final_state"):
        errs["ht"] = rel(ht, rht)
    for name, e in errs.items():
        assert e <= to, f"{name}: rel error {e:.2e} > {to:.0e} ({errs})"
    if grads:
        got, ref = loss_and_grads(o, ht, x), loss_and_grads(ro, rht, x)
        for name in got:
            e = rel(got[name], ref[name])
            errs["d" + name] = e
            tol = tg * grad_tol_scale * (GATE_FACTOR if name in ("g", "beta", "A_log", "dt_bias") else 1.0)
            tol *= PARAM_FACTOR.get(dtype, 1.0) if name in ("A_log", "dt_bias") else 1.0
            assert e <= tol, f"d{name}: rel error {e:.2e} > {tol:.1e} ({errs})"
    return errs
