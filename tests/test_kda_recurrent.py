"""fused_recurrent_kda (token-by-token Triton path): outputs and every gradient against the float64 oracle.

Interpreter lane (fp32/fp16, small shapes):
``TRITON_INTERPRET=1 FASTATTN_BACKEND=triton python -m pytest -m interpret tests/test_kda_recurrent.py``.
GPU lane (``-m gpu``): bf16/fp16/fp32 at real sizes and torch.compile.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import fastattn
from kda_utils import call, make_case as _make_case, needs_kernels, rel
from reference.kda import naive_recurrent_kda


def interpret(fn):
    """Interpreter-lane test: runs under TRITON_INTERPRET=1 (CPU) or on CUDA, skips otherwise."""
    return pytest.mark.interpret(needs_kernels(fn))


TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 4e-3), torch.bfloat16: (5e-3, 1e-2)}


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "triton")


def make_case(*dims, sig=True, beta="random", **opts):
    """kda_utils.make_case with this file's inputs: without l2, q and k scaled by K^-0.5; softplus-gate
    a = exp(A_log) in [1, 16]; beta logits 2 randn; g in the input dtype; binary beta (0/1) without sigmoid."""
    return _make_case(*dims, sig=sig and beta != "binary", beta=beta, unit_qk="scale", wide_A=True,
                      beta_scale=2.0, low_g=True, **opts)


def run_both(x, kw):
    """(ours, oracle): each a dict of o, final state and the gradients of (o*do).sum() + (ht*dht).sum()."""
    ours = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    ref = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    o, ht = call(fastattn.fused_recurrent_kda, ours, kw)
    ro, rht = call(naive_recurrent_kda, ref, kw)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen).to(o.device)
    loss, rloss = (o.float() * do).sum(), (ro * do.double()).sum()
    if kw["output_final_state"]:
        dht = torch.randn(ht.shape, generator=gen).to(o.device)
        loss, rloss = loss + (ht * dht).sum(), rloss + (rht * dht.double()).sum()
    else:
        assert ht is None
    names = list(ours)
    grads = torch.autograd.grad(loss, [ours[n] for n in names])
    rgrads = torch.autograd.grad(rloss, [ref[n] for n in names])
    a = dict(o=o, ht=ht, **{"d" + n: gr for n, gr in zip(names, grads)})
    b = dict(o=ro, ht=rht, **{"d" + n: gr for n, gr in zip(names, rgrads)})
    return a, b


def reduced_scale(x, kw, dg_raw):
    """rms of the sums of |per-token terms| that make up dA_log [HV] and ddt_bias [HV, K] (float64).

    Both are sums over tokens (and channels) that may cancel; their error is judged against the size of
    the summed terms, whose own accuracy the dg check already covers."""
    HV, K = dg_raw.shape[-2:]
    z = x["g"].double() + (x["dt_bias"].double().view(HV, K) if "dt_bias" in x else 0.)
    if kw.get("lower_bound") is None:
        da = dg_raw * (F.softplus(z) / torch.sigmoid(z))      # dg/dA_log over dg/dg_raw
    else:
        da = dg_raw * z
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    return dict(dA_log=rms(da.abs().sum((0, 1, 3))), ddt_bias=rms(dg_raw.abs().sum((0, 1))))


def check(x, kw, dtype, tol=None):
    """Assert outputs and all gradients are within the tolerance of the dtype; return the error table."""
    a, b = run_both(x, kw)
    assert a["o"].dtype == x["v"].dtype and a["o"].shape == b["o"].shape
    t_out, t_grad = tol or TOL[dtype]
    errs = {}
    scales = reduced_scale(x, kw, b["dg"]) if kw.get("use_gate_in_kernel") else {}
    for name, ref in b.items():
        if ref is None:
            continue
        assert a[name].shape == ref.shape, name
        if name.startswith("d"):  # gradients come back in their input's dtype
            assert a[name].dtype == x[name[1:]].dtype, name
        errs[name] = rel(a[name], ref, scales.get(name))
        lim = t_out if name in ("o", "ht") else (2 * t_grad if name in ("dg", "dbeta") and dtype != torch.float32
                                                 else t_grad)
        assert errs[name] <= lim, f"{name}: rel {errs[name]:.2e} > {lim:.0e} (all: {errs})"
    return errs


# ----------------------------------------------------------------------------------------- interpreter lane
F32, F16 = torch.float32, torch.float16
MATRIX = [
    # id, (B, T, H, HV, K, V), dtype, options
    ("decode-plain", (1, 1, 1, 1, 16, 16), F32, dict(l2=False, sig=False)),
    ("gva-softplus-h0", (1, 7, 2, 4, 24, 48), F32, dict(gate="softplus", h0=True)),
    ("batch2", (2, 7, 1, 1, 32, 32), F32, dict(gate="lb", h0=True)),
    ("fp16-all-flags", (1, 33, 1, 1, 32, 16), F16, dict(gate="softplus", h0=True)),
    ("lb-two-segments", (1, 70, 1, 1, 16, 16), F32, dict(gate="lb", lower_bound=-3.0)),
    ("lb-no-A-no-bias", (1, 7, 1, 1, 16, 24), F32, dict(gate="lb", use_A=False, use_bias=False, h0=True)),
    ("varlen-gva", (1, 33, 1, 2, 16, 16), F32, dict(gate="softplus", h0=True, cu=[0, 1, 9, 33])),
    ("varlen-segments-fp16", (1, 80, 1, 1, 16, 16), F16, dict(h0=True, cu=[0, 5, 75, 80], sig=False)),
    ("odd-dims-no-ht", (1, 2, 1, 1, 48, 24), F32, dict(l2=False, sig=False, out_ht=False)),
    ("beta-binary", (1, 9, 1, 1, 16, 16), F32, dict(beta="binary", h0=True)),
    ("extreme-g", (1, 9, 1, 2, 16, 16), F32, dict(gscale=40.0, h0=True)),  # log decays around -30
    ("extreme-softplus", (1, 9, 1, 2, 16, 16), F32, dict(gate="softplus", gscale=30.0, h0=True)),
    ("extreme-lb", (1, 9, 1, 2, 16, 16), F32, dict(gate="lb", gscale=30.0, h0=True)),
]


@pytest.mark.parametrize("case", MATRIX, ids=[c[0] for c in MATRIX])
@interpret
def test_matrix(case):
    _, dims, dtype, opts = case
    x, kw = make_case(*dims, dtype, **opts)
    check(x, kw, dtype)


@interpret
def test_extreme_constant_gate():
    """g = -30 on every channel and step (the state is wiped each token): finite and exact."""
    x, kw = make_case(1, 7, 1, 1, 16, 16, F32, l2=True, h0=True)
    x["g"] = torch.full_like(x["g"], -30.0)
    check(x, kw, F32)


@st.composite
def cases(draw):
    T = draw(st.sampled_from([1, 2, 7, 33]))
    long = T > 7  # the interpreter runs programs one after the other: keep (B * HV * V tiles) * T small
    B = 1 if long else draw(st.sampled_from([1, 2]))
    H, G = draw(st.sampled_from([(1, 1), (1, 2)] if long else [(1, 1), (1, 2), (2, 1)]))
    K = draw(st.sampled_from([16, 24, 32, 48]))
    V = draw(st.sampled_from([16, 24, 32] if long else [16, 24, 32, 48]))
    cu = None
    if B == 1 and T > 2 and draw(st.booleans()):
        cuts = sorted(draw(st.sets(st.integers(1, T - 1), min_size=1, max_size=3)))
        cu = [0, *cuts, T]
    opts = dict(gate=draw(st.sampled_from(["none", "softplus", "lb"])), l2=draw(st.booleans()),
                sig=draw(st.booleans()), h0=draw(st.booleans()), out_ht=draw(st.booleans()), cu=cu,
                beta=draw(st.sampled_from(["random", "random", "binary"])), gscale=draw(st.sampled_from([1.0, 8.0])),
                lower_bound=draw(st.sampled_from([-5.0, -1.0, -0.1])), use_A=draw(st.booleans()),
                use_bias=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))
    return (B, T, H, H * G, K, V), draw(st.sampled_from([F32, F16])), opts


@interpret
@given(case=cases())
def test_hypothesis(case):
    dims, dtype, opts = case
    x, kw = make_case(*dims, dtype, **opts)
    check(x, kw, dtype)


def decode_vs_full(dims, dtype, **opts):
    """Token-by-token calls carrying the state equal one call on the whole sequence (values and grads)."""
    x, kw = make_case(*dims, dtype, h0=True, **opts)
    kw = dict(kw, output_final_state=True)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    extra = {n: leaves[n] for n in ("A_log", "dt_bias") if n in leaves}
    o, ht = fastattn.fused_recurrent_kda(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["beta"],
                                         initial_state=leaves["initial_state"], **extra, **kw)
    state, outs = leaves["initial_state"], []
    for t in range(x["q"].shape[1]):
        sl = slice(t, t + 1)
        o_t, state = fastattn.fused_recurrent_kda(leaves["q"][:, sl], leaves["k"][:, sl], leaves["v"][:, sl],
                                                  leaves["g"][:, sl], leaves["beta"][:, sl], initial_state=state,
                                                  **extra, **kw)
        outs.append(o_t)
    o2 = torch.cat(outs, 1)
    torch.testing.assert_close(o2, o, rtol=1e-5 if dtype == F32 else 1e-3, atol=1e-5 if dtype == F32 else 1e-3)
    torch.testing.assert_close(state, ht, rtol=1e-5, atol=1e-5)
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(o.shape, generator=gen).to(o.device, o.dtype)
    dht = torch.randn(ht.shape, generator=gen).to(o.device)
    names = list(leaves)
    g1 = torch.autograd.grad((o * do).float().sum() + (ht * dht).sum(), [leaves[n] for n in names])
    g2 = torch.autograd.grad((o2 * do).float().sum() + (state * dht).sum(), [leaves[n] for n in names])
    for n, a, b in zip(names, g1, g2):
        assert rel(b, a) <= (1e-5 if dtype == F32 else 2e-3), n


@interpret
def test_decode_matches_full():
    decode_vs_full((2, 6, 1, 2, 16, 24), F32, gate="softplus")


class _Mixer(torch.nn.Module):
    def __init__(self, HV, K, device):
        super().__init__()
        self.A_log = torch.nn.Parameter(torch.log(torch.linspace(1, 16, HV, device=device)))
        self.dt_bias = torch.nn.Parameter(torch.zeros(HV * K, device=device))

    def forward(self, q, k, v, g, beta, h0):
        return fastattn.fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                            use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                                            use_beta_sigmoid_in_kernel=True, A_log=self.A_log, dt_bias=self.dt_bias)


def compiled_matches_eager(dims, dtype, backend):
    """torch.compile(fullgraph=True) of a module calling fused_recurrent_kda: same values and grads as eager."""
    B, T, H, HV, K, V = dims
    x, _ = make_case(B, T, H, HV, K, V, dtype, gate="softplus", h0=True)
    m = _Mixer(HV, K, x["q"].device)
    cm = torch.compile(m, fullgraph=True, backend=backend)
    results = []
    for fn in (cm, m):
        leaves = [x[n].detach().clone().requires_grad_() for n in ("q", "k", "v", "g", "beta", "initial_state")]
        o, ht = fn(*leaves)
        grads = torch.autograd.grad(o.float().sum() + ht.square().sum(), leaves + [m.A_log, m.dt_bias])
        results.append((o, ht, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.no_poison
@interpret
def test_compile_fullgraph_interpret():
    compiled_matches_eager((1, 5, 1, 2, 16, 16), F32, "aot_eager")


# ----------------------------------------------------------------------------------------------- GPU lane
GPU_SHAPES = [
    ("train", (2, 512, 4, 8, 128, 128), dict(gate="softplus", h0=True)),
    ("decode", (8, 1, 4, 8, 128, 128), dict(gate="lb", h0=True)),
    ("varlen", (1, 300, 2, 4, 64, 100), dict(gate="softplus", h0=True, cu=[0, 17, 150, 151, 300])),
    ("head256-plain", (1, 130, 1, 2, 256, 256), dict(l2=True, sig=False, h0=True)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_SHAPES, ids=[c[0] for c in GPU_SHAPES])
def test_gpu_matches_oracle(case, dtype):
    _, dims, opts = case
    x, kw = make_case(*dims, dtype, device="cuda", **opts)
    check(x, kw, dtype)


@pytest.mark.gpu
def test_gpu_decode_matches_full():
    decode_vs_full((2, 16, 4, 8, 128, 128), F32, gate="lb")


@pytest.mark.gpu
@pytest.mark.no_poison
def test_gpu_compile_fullgraph():
    compiled_matches_eager((2, 64, 2, 4, 64, 64), torch.bfloat16, "inductor")
