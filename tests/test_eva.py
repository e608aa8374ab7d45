"""FlashEVA: the float64 oracle's own properties, the CPU PyTorch path against it, the decoding cache
on the PyTorch path, and argument validation. Kernel tests (interpreter / GPU) are in test_eva_kernels.py
and test_eva_gpu.py."""
import pytest
import torch
from hypothesis import given, strategies as st

import fastattn
from reference.eva import eva_landmarks_ref, eva_mask_ref, flash_eva_ref
from test_eva_utils import assert_prefix_unchanged, rel


def make_inputs(B, T, H, HKV, D, dtype=torch.float64, params=True, grad=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, HKV, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, HKV, D, generator=g, dtype=torch.float64)
    mu = torch.randn(HKV, D, generator=g, dtype=torch.float64) * D ** -0.5 if params else None
    phi = torch.randn(HKV, D, generator=g, dtype=torch.float64) * D ** -0.5 if params else None
    out = [x.to(device=device, dtype=dtype) if x is not None else None for x in (q, k, v)]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    ps = [x.to(device=device, dtype=pdt) if x is not None else None for x in (mu, phi)]
    if grad:
        for x in out + ps:
            if x is not None:
                x.requires_grad_(True)
    return (*out, *ps)


def run_with_grads(fn, q, k, v, mu, phi, seed=1, **kw):
    """o, lse and the gradients of (o * do).sum() + (lse * dlse).sum() w.r.t. q, k, v, mu, phi."""
    o, lse = fn(q, k, v, mu=mu, phi=phi, return_lse=True, **kw)
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(o.device)
    loss = (o.double() * do).sum() + (lse.double() * dlse).sum()
    inputs = [x for x in (q, k, v, mu, phi) if x is not None]
    grads = torch.autograd.grad(loss, inputs)
    return o, lse, grads


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "torch")


# ---------------------------------------------------------------------------------------------------
# The oracle itself
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,W,C,local", [(50, 8, 4, "block"), (50, 8, 4, "sliding"), (33, 16, 16, "sliding"),
                                          (40, 12, 3, "sliding")])
def test_oracle_mask_structure(T, W, C, local):
    """Local and remote sets never overlap, remote chunks are complete and lie before the local window,
    and the local window has the documented size."""
    mask = eva_mask_ref(T, W, C, local)
    for t in range(T):
        loc = mask[t, :T].nonzero().flatten()
        rem = mask[t, T:].nonzero().flatten()
        assert loc.max().item() == t and (loc.diff() == 1).all()
        size = loc.numel()
        if local == "block":
            assert size == t % W + 1
        else:
            assert min(t + 1, W) <= size <= W + C - 1
        if rem.numel():
            assert (rem.diff() == 1).all() and rem[0].item() == 0
            assert (rem.max().item() + 1) * C == loc.min().item()  # chunks end exactly where the window starts
        else:
            assert loc.min().item() == 0 or local == "block"


def test_oracle_mean_key_and_plain_causal():
    """mu = 0 pools the mean key; W >= T with block windows is plain causal softmax attention."""
    q, k, v, _, _ = make_inputs(2, 24, 4, 2, 8, grad=False)
    kl, _ = eva_landmarks_ref(k, v, 4)
    torch.testing.assert_close(kl, k.reshape(2, 6, 4, 2, 8).mean(2), rtol=0, atol=1e-12)
    o = flash_eva_ref(q, k, v, window_size=32, chunk_size=4)
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                                           is_causal=True).transpose(1, 2)
    torch.testing.assert_close(o, ref, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# CPU PyTorch path
# ---------------------------------------------------------------------------------------------------

TORCH_CASES = [
    # B, T, H, HKV, D, W, C, local, cu_seqlens
    (2, 37, 4, 2, 16, 8, 4, "block", None),
    (1, 70, 2, 2, 24, 16, 8, "sliding", None),
    (1, 300, 4, 1, 8, 64, 16, "block", None),    # > one query block of the PyTorch path
    (1, 300, 2, 1, 8, 64, 16, "sliding", None),
    (1, 50, 3, 3, 12, 12, 3, "sliding", None),    # non-power-of-two W, C, D
    (1, 61, 4, 2, 16, 8, 4, "block", [0, 3, 20, 61]),
    (1, 61, 2, 1, 16, 16, 8, "sliding", [0, 40, 41, 61]),
]


@pytest.mark.parametrize("B,T,H,HKV,D,W,C,local,cu", TORCH_CASES)
def test_torch_path_float64(torch_backend, B, T, H, HKV, D, W, C, local, cu):
    """The PyTorch backend in float64 matches the oracle (outputs, lse, all gradients) to ~1e-12."""
    q, k, v, mu, phi = make_inputs(B, T, H, HKV, D)
    kw = dict(window_size=W, chunk_size=C, local=local, cu_seqlens=None if cu is None else torch.tensor(cu))
    o, lse, grads = run_with_grads(fastattn.flash_eva, q, k, v, mu, phi, **kw)
    ro, rlse, rgrads = run_with_grads(flash_eva_ref, q, k, v, mu, phi, **kw)
    assert rel(o, ro) < 1e-12 and rel(lse, rlse) < 1e-12
    for name, g, rg in zip("q k v mu phi".split(), grads, rgrads):
        assert rel(g, rg) < 1e-10, name


@given(lens=st.lists(st.integers(1, 40), min_size=1, max_size=3), W_chunks=st.integers(1, 4),
       C=st.sampled_from([1, 2, 3, 4, 8]), D=st.sampled_from([4, 8, 12]),
       heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]), local=st.sampled_from(["block", "sliding"]),
       params=st.booleans())
def test_torch_path_property(lens, W_chunks, C, D, heads, local, params):
    """fp32 PyTorch path against the oracle over the space of shapes (<= 1e-5); several lengths are
    packed with cu_seqlens."""
    H, HKV = heads
    q, k, v, mu, phi = make_inputs(1, sum(lens), H, HKV, D, dtype=torch.float32, params=params)
    cu = torch.tensor([0] + lens).cumsum(0) if len(lens) > 1 else None
    kw = dict(window_size=W_chunks * C, chunk_size=C, local=local, cu_seqlens=cu)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTATTN_BACKEND", "torch")
        o, lse, grads = run_with_grads(fastattn.flash_eva, q, k, v, mu, phi, **kw)
    ro, rlse, rgrads = run_with_grads(flash_eva_ref, q, k, v, mu, phi, **kw)
    assert o.dtype == torch.float32
    assert rel(o, ro) < 1e-5 and rel(lse, rlse) < 1e-5
    for g, rg in zip(grads, rgrads):
        assert rel(g, rg) < 1e-4


@pytest.mark.parametrize("local", ["block", "sliding"])
def test_torch_path_causal(torch_backend, local):
    """Changing tokens from position p on leaves every output before p bit-identical."""
    q, k, v, mu, phi = make_inputs(1, 90, 2, 1, 8, dtype=torch.float32, grad=False)
    assert_prefix_unchanged(fastattn.flash_eva, q, k, v, 53, window_size=16, chunk_size=4, mu=mu, phi=phi,
                            local=local)


def test_torch_landmarks(torch_backend):
    """eva_landmarks (PyTorch path) matches the oracle with gradients; a partial chunk gets no landmark."""
    _, k, v, mu, phi = make_inputs(2, 23, 1, 2, 8)
    kl, vl = fastattn.eva_landmarks(k, v, chunk_size=5, mu=mu, phi=phi)
    rkl, rvl = eva_landmarks_ref(k, v, 5, mu, phi)
    assert kl.shape == (2, 4, 2, 8) and kl.dtype == torch.float64
    assert rel(kl, rkl) < 1e-12 and rel(vl, rvl) < 1e-12
    g = torch.autograd.grad((kl * rkl.detach()).sum() + vl.sum(), (k, v, mu, phi))
    rg = torch.autograd.grad((rkl * rkl.detach()).sum() + rvl.sum(), (k, v, mu, phi))
    for a, b in zip(g, rg):
        assert rel(a, b) < 1e-10


@pytest.mark.parametrize("local,T0", [("block", 13), ("sliding", 1), ("sliding", 29)])
def test_torch_decode_equals_forward(torch_backend, local, T0):
    """Prefill T0 tokens, then decode one by one (and once three at a time): equals one full forward."""
    B, T, H, HKV, D, W, C = 2, 45, 4, 2, 8, 12, 4
    q, k, v, mu, phi = make_inputs(B, T, H, HKV, D, dtype=torch.float32, grad=False)
    ref = fastattn.flash_eva(q, k, v, window_size=W, chunk_size=C, mu=mu, phi=phi, local=local)
    cache = fastattn.EvaCache(window_size=W, chunk_size=C, local=local)
    outs = [cache.prefill(q[:, :T0], k[:, :T0], v[:, :T0], mu=mu, phi=phi),
            cache.decode(q[:, T0:T0 + 3], k[:, T0:T0 + 3], v[:, T0:T0 + 3], mu=mu, phi=phi)]
    outs += [cache.decode(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], mu=mu, phi=phi) for t in range(T0 + 3, T)]
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-5, atol=1e-5)
    assert cache.seq_len == T and cache.k_win.shape[1] == W + C  # O(W + T / C) memory


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------

def _qkv(B=1, T=16, H=2, HKV=1, D=8, dtype=torch.float32):
    return torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, T, HKV, D, dtype=dtype), torch.randn(B, T, HKV, D, dtype=dtype)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(window_size=12, chunk_size=8), ValueError, "multiple of chunk_size"),
    (dict(window_size=0), ValueError, "window_size must be >= 1"),
    (dict(chunk_size=2.0), TypeError, "chunk_size must be an int"),
    (dict(local="global"), ValueError, "local must be one of"),
    (dict(softmax_scale="1"), TypeError, "softmax_scale"),
    (dict(mu=torch.zeros(2, 8)), ValueError, r"mu must have shape \(1, 8\)"),
    (dict(phi=torch.zeros(1, 8, dtype=torch.int32)), TypeError, "phi must have dtype"),
    (dict(cu_seqlens=torch.tensor([0, 9, 5, 16])), ValueError, "strictly increasing"),
    (dict(cu_seqlens=torch.tensor([0, 10])), ValueError, r"cu_seqlens\[-1\]"),
    (dict(return_lse=1), TypeError, "return_lse"),
])
def test_bad_options(torch_backend, kwargs, exc, match):
    q, k, v = _qkv()
    kwargs = {"window_size": 8, "chunk_size": 4, **kwargs}
    with pytest.raises(exc, match=match):
        fastattn.flash_eva(q, k, v, **kwargs)


def test_bad_tensors(torch_backend):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        fastattn.flash_eva(q.numpy(), k, v)
    with pytest.raises(ValueError, match="q's head count H must be a multiple"):
        fastattn.flash_eva(*_qkv(H=3, HKV=2))
    with pytest.raises(ValueError, match="k must have shape"):
        fastattn.flash_eva(q, k[:, :8], v[:, :8])
    with pytest.raises(ValueError, match="v must have shape"):
        fastattn.flash_eva(q, k, v[..., :4])
    with pytest.raises(TypeError, match="k and v must have q's dtype"):
        fastattn.flash_eva(q, k.half(), v.half())
    with pytest.raises(TypeError, match="v must have k's dtype"):
        fastattn.flash_eva(q, k, v.half())
    with pytest.raises(ValueError, match="head dim D must be <= 256"):
        fastattn.flash_eva(*_qkv(D=264))
    with pytest.raises(ValueError, match="must have 4 dimensions"):
        fastattn.flash_eva(q[0], k, v)
    with pytest.raises(ValueError, match="cu_seqlens needs batch size 1"):
        fastattn.flash_eva(*_qkv(B=2), cu_seqlens=torch.tensor([0, 16]))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fastattn.eva_landmarks(k, v, chunk_size=0)


def test_float64_needs_torch_backend(monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="float64 inputs run only on the PyTorch backend"):
        fastattn.flash_eva(*_qkv(dtype=torch.float64))


def test_cache_misuse(torch_backend):
    q, k, v = _qkv()
    cache = fastattn.EvaCache(window_size=8, chunk_size=4)
    with pytest.raises(ValueError, match="prefilled cache"):
        cache.decode(q[:, :1], k[:, :1], v[:, :1])
    cache.prefill(q, k, v)
    with pytest.raises(ValueError, match="empty cache"):
        cache.prefill(q, k, v)
    with pytest.raises(TypeError, match="cache's dtype"):
        cache.decode(q[:, :1].half(), k[:, :1].half(), v[:, :1].half())
    with pytest.raises(ValueError, match=r"k must have shape"):
        cache.decode(q[:, :1], k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        fastattn.EvaCache(window_size=10, chunk_size=4)
