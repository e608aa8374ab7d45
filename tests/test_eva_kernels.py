"""FlashEVA Triton kernels at small shapes: through TRITON_INTERPRET=1 on the CPU (fp32 / fp16), or on
CUDA when present. Run the CPU lane with
``TRITON_INTERPRET=1 FASTATTN_BACKEND=triton python -m pytest -m interpret tests/test_eva_kernels.py``."""
import os

import pytest
import torch
from hypothesis import given, strategies as st

import fastattn
from reference.eva import eva_landmarks_ref, flash_eva_ref
from test_eva_utils import assert_prefix_unchanged, rel

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
pytestmark = [pytest.mark.interpret,
              pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or a CUDA device")]
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 1e-2)}  # (outputs, gradients)


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "triton")


def make_inputs(B, T, H, HKV, D, dtype, params=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (H, HKV, HKV))
    mu = torch.randn(HKV, D, generator=g) * D ** -0.5 if params else None
    phi = torch.randn(HKV, D, generator=g) * D ** -0.5 if params else None
    qkv = [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]
    ps = [x.to(DEVICE).requires_grad_() if x is not None else None for x in (mu, phi)]
    return (*qkv, *ps)


def fwd_bwd(fn, q, k, v, mu, phi, **kw):
    """o, lse and the gradients of (o * do).sum() + (lse * dlse).sum() w.r.t. every given input."""
    o, lse = fn(q, k, v, mu=mu, phi=phi, return_lse=True, **kw)
    g = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=g).to(DEVICE)
    dlse = torch.randn(lse.shape, generator=g).to(DEVICE)
    loss = (o.double() * do.double()).sum() + (lse.double() * dlse.double()).sum()
    inputs = [x for x in (q, k, v, mu, phi) if x is not None]
    return o, lse, torch.autograd.grad(loss, inputs)


def check_against_oracle(dtype, B, T, H, HKV, D, W, C, local, cu=None, params=True):
    q, k, v, mu, phi = make_inputs(B, T, H, HKV, D, dtype, params)
    kw = dict(window_size=W, chunk_size=C, local=local,
              cu_seqlens=None if cu is None else torch.tensor(cu, device=DEVICE, dtype=torch.int32))
    o, lse, grads = fwd_bwd(fastattn.flash_eva, q, k, v, mu, phi, **kw)
    ro, rlse, rgrads = fwd_bwd(flash_eva_ref, q, k, v, mu, phi, **kw)
    tol_o, tol_g = TOL[dtype]
    assert o.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (B, H, T)
    assert rel(o, ro) < tol_o and rel(lse, rlse) < tol_o
    for name, g, rg in zip("q k v mu phi".split(), grads, rgrads):
        assert g.dtype == {"mu": torch.float32, "phi": torch.float32}.get(name, dtype)
        assert rel(g, rg) < tol_g, name


KERNEL_CASES = [
    # dtype, B, T, H, HKV, D, W, C, local, cu_seqlens
    (torch.float32, 2, 67, 4, 2, 32, 16, 4, "block", None),
    (torch.float32, 1, 100, 2, 2, 24, 24, 8, "sliding", None),       # D not a power of two
    (torch.float32, 1, 130, 4, 1, 64, 64, 16, "block", None),        # GQA 4:1, several windows
    (torch.float32, 1, 97, 2, 1, 16, 8, 8, "sliding", None),         # W == C
    (torch.float32, 1, 90, 4, 2, 16, 12, 3, "sliding", [0, 30, 31, 90]),  # packed, a 1-token sequence
    (torch.float32, 1, 77, 2, 1, 40, 32, 16, "block", [0, 5, 60, 77]),
    (torch.float32, 1, 50, 6, 2, 8, 4, 2, "block", None),            # 3 query heads per kv head
    (torch.float16, 1, 100, 4, 2, 32, 32, 8, "sliding", None),
    (torch.float16, 2, 70, 2, 2, 64, 16, 16, "block", None),
]


@pytest.mark.parametrize("dtype,B,T,H,HKV,D,W,C,local,cu", KERNEL_CASES)
def test_kernels_match_oracle(dtype, B, T, H, HKV, D, W, C, local, cu):
    """Forward (o, lse) and backward (q, k, v, mu, phi, through o and lse) against the float64 oracle."""
    check_against_oracle(dtype, B, T, H, HKV, D, W, C, local, cu)


@given(lens=st.lists(st.integers(1, 40), min_size=1, max_size=3), W_chunks=st.integers(1, 3),
       C=st.sampled_from([2, 4, 5, 8]), D=st.sampled_from([8, 16, 20]), heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
       local=st.sampled_from(["block", "sliding"]), params=st.booleans())
def test_kernels_property(lens, W_chunks, C, D, heads, local, params):
    """fp32 kernels against the oracle over small shapes (ragged T, W/C pairs, GQA, mu/phi zero or random,
    several sequences packed with cu_seqlens)."""
    cu = [0] + torch.tensor(lens).cumsum(0).tolist() if len(lens) > 1 else None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTATTN_BACKEND", "triton")
        check_against_oracle(torch.float32, 1, sum(lens), heads[0], heads[1], D, W_chunks * C, C, local, cu=cu,
                             params=params)


@pytest.mark.parametrize("local", ["block", "sliding"])
def test_kernels_causal_exact(local):
    """Outputs before position p are bit-identical when every token from p on changes."""
    q, k, v, mu, phi = make_inputs(1, 96, 2, 1, 16, torch.float32)
    assert_prefix_unchanged(fastattn.flash_eva, q, k, v, 45, window_size=16, chunk_size=4, mu=mu, phi=phi,
                            local=local)


def test_kernels_plain_causal_when_window_covers():
    """W >= T with block windows is plain causal softmax attention."""
    q, k, v, _, _ = make_inputs(1, 70, 4, 2, 16, torch.float32, params=False)
    with torch.no_grad():
        o = fastattn.flash_eva(q, k, v, window_size=128, chunk_size=8)
        kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2).double(), kk.transpose(1, 2).double(), vv.transpose(1, 2).double(),
            is_causal=True).transpose(1, 2)
    assert rel(o, ref) < 1e-5


def test_kernel_landmarks():
    """Triton pooling with its backward against the oracle (non-power-of-two C, a partial trailing chunk)."""
    _, k, v, mu, phi = make_inputs(2, 47, 1, 2, 24, torch.float32)
    kl, vl = fastattn.eva_landmarks(k, v, chunk_size=6, mu=mu, phi=phi)
    rkl, rvl = eva_landmarks_ref(k, v, 6, mu, phi)
    assert kl.shape == (2, 7, 2, 24)
    assert rel(kl, rkl) < 1e-5 and rel(vl, rvl) < 1e-5
    w1, w2 = torch.randn_like(rkl), torch.randn_like(rvl)
    g = torch.autograd.grad((kl.double() * w1).sum() + (vl.double() * w2).sum(), (k, v, mu, phi))
    rg = torch.autograd.grad((rkl * w1).sum() + (rvl * w2).sum(), (k, v, mu, phi))
    for name, a, b in zip("k v mu phi".split(), g, rg):
        assert rel(a, b) < 1e-4, name


@pytest.mark.parametrize("local,T0", [("block", 21), ("sliding", 30)])
def test_kernel_decode_equals_forward(local, T0):
    """Prefill, then the Triton decode step token by token: equals one full forward."""
    B, T, H, HKV, D, W, C = 2, 40, 4, 2, 16, 16, 4
    q, k, v, mu, phi = (x.detach() if x is not None else None for x in make_inputs(B, T, H, HKV, D, torch.float32))
    ref = fastattn.flash_eva(q, k, v, window_size=W, chunk_size=C, mu=mu, phi=phi, local=local)
    cache = fastattn.EvaCache(window_size=W, chunk_size=C, local=local)
    outs = [cache.prefill(q[:, :T0], k[:, :T0], v[:, :T0], mu=mu, phi=phi)]
    outs += [cache.decode(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], mu=mu, phi=phi) for t in range(T0, T)]
    assert rel(torch.cat(outs, 1), ref) < 1e-5


@pytest.mark.no_poison
def test_kernels_compile_graph():
    """The registered ops trace with torch.compile(fullgraph=True) (aot_eager: no codegen needed) and
    give the eager result, forward and backward."""
    q, k, v, mu, phi = make_inputs(1, 40, 2, 1, 16, torch.float32)

    def f(q, k, v, mu, phi):
        o = fastattn.flash_eva(q, k, v, window_size=16, chunk_size=4, mu=mu, phi=phi, local="sliding")
        kl, _ = fastattn.eva_landmarks(k, v, chunk_size=4, mu=mu, phi=phi)
        return o.sum() + kl.square().sum()

    ref = torch.autograd.grad(f(q, k, v, mu, phi), (q, k, v, mu, phi))
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, mu, phi),
                              (q, k, v, mu, phi))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_kernel_ops_opcheck():
    """torch.library.opcheck: schema and fake-tensor registrations of the forward op."""
    from fastattn.eva.op import eva_fwd_op
    q, k, v, mu, phi = (x.detach() for x in make_inputs(1, 24, 2, 1, 16, torch.float32))
    torch.library.opcheck(eva_fwd_op, (q, k, v, mu, phi, None, 0.25, 8, 4, False),
                          test_utils=("test_schema", "test_faketensor"))
