"""CPU lane: the PyTorch KDA backend (fastattn/kda/torch_impl.py) against the float64 oracle.

Outputs, final states and every gradient (q, k, v, g or raw gate, beta, A_log, dt_bias, initial_state);
exact causality; decode equivalence; the public functions with FASTATTN_BACKEND=torch.
"""
import pytest
import torch
from hypothesis import given, strategies as st

import fastattn
from fastattn.kda import torch_impl
from fastattn.kda.options import KDAOptions
from fastattn.kda.torch_impl import chunk_kda_torch, recurrent_kda_torch
from reference.kda import kda_inputs, naive_recurrent_kda

GRAD_INPUTS = ("q", "k", "v", "g", "beta", "initial_state", "A_log", "dt_bias")
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}  # fp32 spec is 1e-4; measured <= ~1e-6


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref||_rms / ||ref||_rms (absolute when ref is ~0); NaN/inf never pass."""
    assert torch.isfinite(x).all(), "non-finite values"
    d = (x.double() - ref.double()).pow(2).mean().sqrt()
    return (d / ref.double().pow(2).mean().sqrt().clamp_min(1e-8)).item()


def opts_for(kw, chunk_size=64, output_final_state=True) -> KDAOptions:
    return KDAOptions(scale=kw["q"].shape[-1] ** -0.5, use_qk_l2norm=kw["use_qk_l2norm_in_kernel"],
                      use_gate=kw["use_gate_in_kernel"], use_beta_sigmoid=kw["use_beta_sigmoid_in_kernel"],
                      lower_bound=kw.get("lower_bound"), output_final_state=output_final_state,
                      chunk_size=chunk_size)


def call_impl(impl, kw, chunk_size=64):
    """Call a torch_impl function the way api.py does (dt_bias as [HV, K])."""
    dt_bias = kw.get("dt_bias")
    if dt_bias is not None:
        dt_bias = dt_bias.reshape(kw["v"].shape[2], kw["q"].shape[-1])
    return impl(kw["q"], kw["k"], kw["v"], kw["g"], kw["beta"], opts=opts_for(kw, chunk_size),
                initial_state=kw.get("initial_state"), A_log=kw.get("A_log"), dt_bias=dt_bias,
                cu_seqlens=kw.get("cu_seqlens"))


def leaves(kw, dtype):
    """Fresh leaf tensors: inputs in ``dtype``, states/gate parameters fp32 (float64 in a float64 run)."""
    out = dict(kw)
    for name in GRAD_INPUTS:
        if kw.get(name) is not None:
            dt = dtype if name in ("q", "k", "v", "g", "beta") or dtype == torch.float64 else torch.float32
            out[name] = kw[name].detach().to(dt).requires_grad_()
    return out


def check_against_oracle(kw, impl, dtype, chunk_size=64, tol=None):
    """Forward and backward (through o and the final state) of ``impl`` vs the float64 oracle."""
    tol = TOL[dtype] if tol is None else tol
    mine, ref = leaves(kw, dtype), leaves(kw, torch.float64)
    o, s = call_impl(impl, mine, chunk_size)
    assert o.dtype == dtype and s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ro, rs = naive_recurrent_kda(**{n: x for n, x in ref.items()}, output_final_state=True)
    errs = {"o": rel(o, ro), "state": rel(s, rs)}
    do, ds = torch.randn_like(ro), torch.randn_like(rs)
    names = [n for n in GRAD_INPUTS if ref.get(n) is not None]
    got = torch.autograd.grad((o * do.to(o.dtype)).sum() + (s * ds.to(s.dtype)).sum(), [mine[n] for n in names])
    want = torch.autograd.grad((ro * do).sum() + (rs * ds).sum(), [ref[n] for n in names])
    errs.update({"d" + n: rel(a, b) for n, a, b in zip(names, got, want)})
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"errors above {tol}: {bad} (all: {errs})"
    return errs


# (B, T, H, HV, K, V, gate, extreme, beta_mode, l2norm, beta_sigmoid, initial_state, seqlens, chunk_size)
CASES = [
    (1, 1, 1, 1, 16, 16, "none", False, "rand", True, False, False, None, 64),
    (2, 65, 2, 2, 32, 24, "none", False, "rand", True, False, True, None, 64),
    (2, 63, 1, 2, 24, 48, "softplus", False, "rand", True, True, True, None, 32),
    (1, 130, 2, 4, 64, 64, "softplus", True, "rand", True, True, True, None, 64),
    (1, 100, 1, 1, 48, 16, "bounded", True, "rand", False, False, True, None, 16),
    (1, 130, 2, 2, 16, 32, "softplus", True, "one", True, False, True, [1, 64, 65], 64),
    (1, 97, 1, 3, 24, 24, "bounded", False, "zero", True, True, True, [40, 17, 40], 16),
    (2, 40, 2, 2, 16, 16, "none", True, "one", False, False, False, None, 32),
]
IDS = [f"T{c[1]}-{c[6]}{'-extreme' if c[7] else ''}-beta_{c[8]}-C{c[13]}" for c in CASES]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("impl", [chunk_kda_torch, recurrent_kda_torch], ids=["chunk", "recurrent"])
@pytest.mark.parametrize("B,T,H,HV,K,V,gate,extreme,beta_mode,l2,bsig,h0,seqlens,chunk_size", CASES, ids=IDS)
def test_matches_oracle(impl, dtype, B, T, H, HV, K, V, gate, extreme, beta_mode, l2, bsig, h0, seqlens,
                        chunk_size):
    kw = kda_inputs(B, T, H, HV, K, V, gate=gate, extreme=extreme, beta_mode=beta_mode, l2norm=l2,
                    beta_sigmoid=bsig, initial_state=h0, seqlens=seqlens, seed=T)
    check_against_oracle(kw, impl, dtype, chunk_size)


@given(T=st.sampled_from([1, 2, 15, 16, 17, 63, 64, 65, 100, 130]), K=st.sampled_from([8, 16, 24, 40, 64]),
       V=st.sampled_from([8, 16, 24, 48, 64]), heads=st.sampled_from([(1, 1), (1, 2), (2, 2), (2, 4), (1, 3)]),
       gate=st.sampled_from(["none", "softplus", "bounded"]), extreme=st.booleans(),
       beta_mode=st.sampled_from(["rand", "rand", "zero", "one"]), h0=st.booleans(), varlen=st.booleans(),
       flags=st.tuples(st.booleans(), st.booleans()), chunk_size=st.sampled_from([16, 32, 64]),
       impl=st.sampled_from([chunk_kda_torch, chunk_kda_torch, recurrent_kda_torch]),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2 ** 16))
def test_matches_oracle_hypothesis(T, K, V, heads, gate, extreme, beta_mode, h0, varlen, flags, chunk_size,
                                   impl, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    seqlens = None
    if varlen and T > 1:
        cuts = sorted(torch.randperm(T - 1, generator=gen)[:3].add(1).tolist())
        seqlens = [b - a for a, b in zip([0] + cuts, cuts + [T])]
    B = 1 if seqlens is not None else 1 + seed % 2
    kw = kda_inputs(B, T, heads[0], heads[1], K, V, gate=gate, extreme=extreme, beta_mode=beta_mode,
                    l2norm=flags[0], beta_sigmoid=flags[1], initial_state=h0, seqlens=seqlens, seed=seed)
    check_against_oracle(kw, impl, dtype, chunk_size)


@pytest.mark.parametrize("impl", [chunk_kda_torch, recurrent_kda_torch], ids=["chunk", "recurrent"])
@pytest.mark.parametrize("gate", ["none", "softplus", "bounded", "bounded_no_A_log"])
@pytest.mark.parametrize("l2,bsig", [(False, False), (True, False), (False, True), (True, True)])
def test_in_kernel_flag_combos(impl, gate, l2, bsig):
    """Every combination of the in-kernel options (and a custom scale), float64, forward only."""
    kw = kda_inputs(2, 33, 1, 2, 24, 16, gate=gate.replace("_no_A_log", ""), l2norm=l2, beta_sigmoid=bsig,
                    initial_state=True, dtype=torch.float64)
    if gate == "bounded_no_A_log":
        kw["A_log"] = None
    opts = opts_for(kw, chunk_size=16)
    opts = KDAOptions(**{**opts.__dict__, "scale": 0.37})
    dt_bias = kw.get("dt_bias")
    o, s = impl(kw["q"], kw["k"], kw["v"], kw["g"], kw["beta"], opts=opts, initial_state=kw["initial_state"],
                A_log=kw.get("A_log"), dt_bias=None if dt_bias is None else dt_bias.reshape(2, 24))
    ro, rs = naive_recurrent_kda(**kw, scale=0.37, output_final_state=True)
    assert rel(o, ro) <= TOL[torch.float64] and rel(s, rs) <= TOL[torch.float64]


def test_chunk_sizes_agree_and_no_grad():
    kw = kda_inputs(2, 150, 2, 2, 32, 32, gate="softplus", extreme=True, initial_state=True)
    outs = [call_impl(chunk_kda_torch, kw, c) for c in (16, 32, 64)]
    with torch.no_grad():
        outs.append(call_impl(recurrent_kda_torch, kw))
    for o, s in outs[1:]:
        assert rel(o, outs[0][0]) <= 1e-5 and rel(s, outs[0][1]) <= 1e-5


def test_grouped_recompute_path(monkeypatch):
    """Past PAIRWISE_BUDGET the intra-chunk blocks run in checkpointed groups: same values and grads."""
    kw = kda_inputs(1, 200, 1, 2, 24, 16, gate="softplus", extreme=True, initial_state=True,
                    seqlens=[70, 130], dtype=torch.float64)
    base = check_against_oracle(kw, chunk_kda_torch, torch.float64, 32)
    monkeypatch.setattr(torch_impl, "PAIRWISE_BUDGET", 32 * 16 * 24 * 3)  # groups of 3 chunk-heads
    grouped = check_against_oracle(kw, chunk_kda_torch, torch.float64, 32)
    assert set(base) == set(grouped)


@pytest.mark.parametrize("impl,chunk_size", [(chunk_kda_torch, 16), (chunk_kda_torch, 64),
                                             (recurrent_kda_torch, 64)], ids=["chunk16", "chunk64", "recurrent"])
@pytest.mark.parametrize("gate", ["softplus", "bounded"])
def test_exact_causality(impl, chunk_size, gate):
    """Changing every token at or after t changes no output before t, bit for bit (also across sequences)."""
    kw = kda_inputs(1, 150, 2, 2, 32, 32, gate=gate, extreme=True, initial_state=True, beta_sigmoid=True)
    o_ref, _ = call_impl(impl, kw, chunk_size)
    for t in (1, 7, 16, 40, 64, 100, 149):
        other = kda_inputs(1, 150, 2, 2, 32, 32, gate=gate, extreme=True, initial_state=True,
                           beta_sigmoid=True, seed=t + 1)
        mixed = dict(kw)
        for name in ("q", "k", "v", "g", "beta"):
            mixed[name] = torch.cat([kw[name][:, :t], other[name][:, t:]], 1)
        o, _ = call_impl(impl, mixed, chunk_size)
        assert torch.equal(o[:, :t], o_ref[:, :t]), f"output before t={t} changed"
        assert not torch.equal(o[:, t:], o_ref[:, t:])
    # packed sequences: rewriting the second sequence leaves the first untouched
    packed = dict(cu_seqlens=torch.tensor([0, 70, 150]), initial_state=kw["initial_state"].repeat(2, 1, 1, 1))
    o1, _ = call_impl(impl, dict(kw, **packed), chunk_size)
    o2, _ = call_impl(impl, dict(mixed, **packed), chunk_size)
    assert torch.equal(o1[:, :70], o2[:, :70])


@pytest.mark.parametrize("gate", ["none", "softplus"])
def test_decode_equivalence(gate, monkeypatch):
    """Prefill with chunk_kda, then decode token by token with fused_recurrent_kda carrying the state,
    equals one chunk_kda call over the whole sequence (public functions, torch backend)."""
    monkeypatch.setenv("FASTATTN_BACKEND", "torch")
    T, P = 90, 37
    kw = kda_inputs(2, T, 2, 4, 32, 16, gate=gate, extreme=True, initial_state=True, beta_sigmoid=True)
    full_o, full_s = fastattn.chunk_kda(**kw, output_final_state=True, chunk_size=32)
    part = {n: kw[n][:, :P] for n in ("q", "k", "v", "g", "beta")}
    o, state = fastattn.chunk_kda(**dict(kw, **part), output_final_state=True)
    outs = [o]
    for t in range(P, T):
        step = {n: kw[n][:, t:t + 1] for n in ("q", "k", "v", "g", "beta")}
        o, state = fastattn.fused_recurrent_kda(**dict(kw, **step, initial_state=state), output_final_state=True)
        outs.append(o)
    assert rel(torch.cat(outs, 1), full_o) <= 1e-5 and rel(state, full_s) <= 1e-5


@pytest.mark.parametrize("fn", [fastattn.chunk_kda, fastattn.fused_recurrent_kda], ids=["chunk", "recurrent"])
@pytest.mark.parametrize("dtype,tol_o,tol_g", [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 1e-2, 2e-2),
                                               (torch.float16, 2e-3, 5e-3)], ids=["f32", "bf16", "f16"])
def test_public_api_torch_backend(fn, dtype, tol_o, tol_g, monkeypatch):
    """fastattn.chunk_kda / fused_recurrent_kda on CPU: dtypes, GVA, varlen, gradients to every input."""
    monkeypatch.setenv("FASTATTN_BACKEND", "torch")
    kw = kda_inputs(1, 80, 1, 2, 32, 24, gate="softplus", initial_state=True, beta_sigmoid=True,
                    seqlens=[30, 50], dtype=dtype)
    mine, ref = leaves(kw, dtype), leaves(kw, torch.float64)
    for n in ("initial_state", "A_log", "dt_bias"):  # the public API takes these in fp32
        mine[n] = kw[n].detach().float().requires_grad_()
    o, s = fn(**mine, output_final_state=True)
    assert o.dtype == dtype and s.dtype == torch.float32 and s.shape == (2, 2, 32, 24)
    ro, rs = naive_recurrent_kda(**ref, output_final_state=True)
    assert rel(o, ro) <= tol_o and rel(s, rs) <= tol_o
    do, ds = torch.randn_like(ro), torch.randn_like(rs)
    ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
    ((ro * do).sum() + (rs * ds).sum()).backward()
    for n in GRAD_INPUTS:
        assert mine[n].grad.dtype == mine[n].dtype
        assert rel(mine[n].grad, ref[n].grad) <= tol_g, n
    o2, s2 = fn(**{n: (x.detach() if isinstance(x, torch.Tensor) else x) for n, x in mine.items()})
    assert s2 is None and torch.equal(o2, o.detach())
