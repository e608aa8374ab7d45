"""The two float64 KDA oracles (token recurrence and chunked WY form) agree, and match closed forms."""
import pytest
import torch
from hypothesis import given, strategies as st

from reference.kda import kda_gate_ref, kda_inputs, l2norm_ref, naive_chunk_kda, naive_recurrent_kda

TOL = 1e-10


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref||_rms / ||ref||_rms (absolute when ref is ~0); NaN/inf never pass."""
    assert torch.isfinite(x).all() and torch.isfinite(ref).all()
    d = (x.double() - ref.double()).pow(2).mean().sqrt()
    return (d / ref.double().pow(2).mean().sqrt().clamp_min(1e-8)).item()


def _oracles_agree(kw, chunk_size=64, grads=False):
    kw = dict(kw, output_final_state=True)
    if grads:
        for name in ("q", "k", "v", "g", "beta", "initial_state", "A_log", "dt_bias"):
            if kw.get(name) is not None:
                kw[name] = kw[name].double().requires_grad_()
    o1, s1 = naive_recurrent_kda(**kw)
    o2, s2 = naive_chunk_kda(**kw, chunk_size=chunk_size)
    assert rel(o2, o1) <= TOL and rel(s2, s1) <= TOL
    if grads:
        leaves = [x for x in kw.values() if isinstance(x, torch.Tensor) and x.requires_grad]
        do, ds = torch.randn_like(o1), torch.randn_like(s1)
        g1 = torch.autograd.grad((o1 * do).sum() + (s1 * ds).sum(), leaves)
        g2 = torch.autograd.grad((o2 * do).sum() + (s2 * ds).sum(), leaves)
        for a, b in zip(g2, g1):
            assert rel(a, b) <= TOL


# (B, T, H, HV, K, V, gate, extreme, beta_mode, initial_state, seqlens, chunk_size)
CASES = [
    (1, 1, 1, 1, 16, 16, "none", False, "rand", False, None, 64),
    (2, 2, 2, 2, 24, 32, "softplus", False, "rand", True, None, 64),
    (1, 63, 1, 2, 32, 16, "bounded", False, "rand", True, None, 64),
    (2, 65, 2, 4, 48, 24, "softplus", True, "rand", True, None, 64),
    (1, 130, 2, 2, 64, 64, "none", True, "rand", False, None, 32),
    (1, 130, 1, 3, 16, 48, "softplus", True, "one", True, [1, 64, 65], 64),
    (1, 100, 2, 2, 24, 16, "bounded", True, "zero", True, [37, 63], 16),
    (2, 40, 2, 2, 16, 16, "none", False, "one", True, None, 16),
]


@pytest.mark.parametrize("B,T,H,HV,K,V,gate,extreme,beta_mode,h0,seqlens,chunk_size", CASES)
def test_oracles_agree(B, T, H, HV, K, V, gate, extreme, beta_mode, h0, seqlens, chunk_size):
    kw = kda_inputs(B, T, H, HV, K, V, gate=gate, extreme=extreme, beta_mode=beta_mode,
                    initial_state=h0, seqlens=seqlens, dtype=torch.float64)
    _oracles_agree(kw, chunk_size, grads=T <= 65)


@given(T=st.sampled_from([1, 2, 17, 63, 65, 130]), K=st.sampled_from([16, 24, 32, 48, 64]),
       V=st.sampled_from([16, 24, 32, 48, 64]), heads=st.sampled_from([(1, 1), (1, 2), (2, 2), (2, 4)]),
       gate=st.sampled_from(["none", "softplus", "bounded"]), extreme=st.booleans(),
       beta_mode=st.sampled_from(["rand", "zero", "one"]), h0=st.booleans(), varlen=st.booleans(),
       flags=st.tuples(st.booleans(), st.booleans()), chunk_size=st.sampled_from([16, 32, 64]),
       seed=st.integers(0, 2 ** 16))
def test_oracles_agree_hypothesis(T, K, V, heads, gate, extreme, beta_mode, h0, varlen, flags, chunk_size, seed):
    gen = torch.Generator().manual_seed(seed)
    seqlens = None
    if varlen and T > 1:
        cuts = sorted(torch.randperm(T - 1, generator=gen)[:2].add(1).tolist())
        seqlens = [b - a for a, b in zip([0] + cuts, cuts + [T])]
    B = 1 if seqlens is not None else 2
    kw = kda_inputs(B, T, heads[0], heads[1], K, V, gate=gate, extreme=extreme, beta_mode=beta_mode,
                    l2norm=flags[0], beta_sigmoid=flags[1], initial_state=h0, seqlens=seqlens,
                    dtype=torch.float64, seed=seed)
    _oracles_agree(kw, chunk_size)


def test_single_token_closed_form():
    """T = 1, zero state: S = beta k v^T, so o = beta (scale q . k) v."""
    kw = kda_inputs(2, 1, 2, 2, 16, 24, l2norm=False, dtype=torch.float64)
    o, s = naive_recurrent_kda(**kw, scale=0.3, output_final_state=True)
    q, k, v, beta = kw["q"], kw["k"], kw["v"], kw["beta"]
    expect = beta[..., None] * 0.3 * (q * k).sum(-1, keepdim=True) * v
    assert rel(o, expect) <= 1e-14
    assert rel(s, torch.einsum("bhk,bhv->bhkv", k[:, 0], beta[:, 0, :, None] * v[:, 0])) <= 1e-14


def test_no_write_no_decay_reads_initial_state():
    """g = 0 and beta = 0: the state never changes and o_t = S0^T (scale q_t)."""
    kw = kda_inputs(1, 20, 1, 2, 16, 16, beta_mode="zero", initial_state=True, l2norm=False,
                    dtype=torch.float64)
    kw["g"] = torch.zeros_like(kw["g"])
    for fn in (naive_recurrent_kda, naive_chunk_kda):
        o, s = fn(**kw, output_final_state=True)
        h0 = kw["initial_state"].double()
        expect = torch.einsum("nhkv,bthk->bthv", h0, kw["q"].repeat_interleave(2, 2) * 16 ** -0.5)
        assert rel(o, expect) <= 1e-14 and rel(s, h0) <= 1e-14


def test_gate_and_l2norm_formulas():
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64) * 30
    A_log, dt_bias = torch.randn(4), torch.randn(32)
    a, xb = A_log.double().exp()[:, None], x + dt_bias.double().reshape(4, 8)
    assert rel(kda_gate_ref(x, A_log, dt_bias), -a * torch.log1p(torch.exp(-xb.abs())) - a * xb.clamp_min(0)) <= 1e-15
    assert rel(kda_gate_ref(x, A_log, dt_bias.reshape(4, 8), lower_bound=-5.0), -5 * torch.sigmoid(a * xb)) <= 1e-15
    assert rel(kda_gate_ref(x, None, None, lower_bound=-2.0), -2 * torch.sigmoid(x)) <= 1e-15
    assert (kda_gate_ref(x, A_log, dt_bias) <= 0).all()
    y = torch.randn(3, 5, 7)
    assert rel(l2norm_ref(y), y.double() / (y.double().pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()) <= 1e-15
