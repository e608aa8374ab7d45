"""fastattn.models.fused (the KDA layer's conv + head split and gated RMSNorm): Triton vs the PyTorch reference,
validation, dispatch, and the KDA model on the fused path.

Interpreter lane (fp32/fp16, small shapes):
``TRITON_INTERPRET=1 FASTATTN_BACKEND=triton python -m pytest -m interpret tests/test_models_fused.py``.
GPU lane (``-m gpu``): bf16 models, fused path vs the PyTorch path.
"""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastattn.models.fused.api as fused_api
from fastattn.models.fused import causal_conv_heads, gated_rms_norm, rms_norm
from fastattn.models.fused.api import _conv_heads_torch, _gated_norm_torch
from fastattn.models.kda import conv_tail
from test_models_utils import make_model, rel

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}   # atol = rtol, kernel vs a float64 reference rounded once


def interpret(fn):
    """Interpreter-lane test: the Triton kernels under TRITON_INTERPRET=1 (CPU) or on CUDA, skipped otherwise."""
    fn = pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or CUDA")(fn)
    return pytest.mark.interpret(fn)


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "triton")


def conv_inputs(B, T, H, Hkv, D, W, tail, bias, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    C = (H + 2 * Hkv) * D
    qkv = torch.randn(B, T, C, generator=g).to(device, dtype)
    weight = (torch.randn(C, W, generator=g) / W ** 0.5).to(device)
    b = torch.randn(C, generator=g).to(device) if bias else None
    t = torch.randn(B, C, W - 1, generator=g).to(device, dtype) if tail else None
    return qkv, weight, b, t


def check_conv(B, T, H, Hkv, D, W, tail, bias, silu, dtype):
    """Kernel vs the reference in float64 on the same (rounded) inputs, rounded once to dtype."""
    qkv, weight, b, t = conv_inputs(B, T, H, Hkv, D, W, tail, bias, dtype, KERNEL_DEVICE)
    act = "silu" if silu else None
    with torch.no_grad():
        out = causal_conv_heads(qkv, weight, b, t, H, Hkv, D, activation=act)
    dbl = [x.double() if x is not None else None for x in (qkv, weight, b, t)]
    ref = _conv_heads_torch(*dbl, H, Hkv, D, act)
    for name, o, r in zip("qkv", out, ref):
        assert o.shape == (B, T, H, D) and o.dtype == dtype and o.is_contiguous(), name
        torch.testing.assert_close(o, r.to(dtype), atol=TOL[dtype], rtol=TOL[dtype], msg=name)


def check_norm(B, T, H, D, x_dtype, gate_dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(B, T, H, D, generator=g) * 3).to(KERNEL_DEVICE, x_dtype)
    gate = (torch.randn(B, T, H * D, generator=g) * 2).to(KERNEL_DEVICE, gate_dtype)
    weight = (torch.rand(D, generator=g) + 0.5).to(KERNEL_DEVICE)
    with torch.no_grad():
        out = gated_rms_norm(x, gate, weight, 1e-6)
    ref = _gated_norm_torch(x.double(), gate.double(), weight.double(), 1e-6)
    assert out.shape == (B, T, H * D) and out.dtype == x_dtype
    torch.testing.assert_close(out, ref.to(x_dtype), atol=TOL[x_dtype], rtol=TOL[x_dtype])


# ---- interpreter lane: kernels vs the reference --------------------------------------------------------

# (T, tail, H, Hkv, D, W, silu, bias): every value of each axis, spread over the pairs
CONV_CASES = [
    (1, True, 4, 4, 24, 4, True, True), (1, False, 4, 2, 64, 2, False, False),
    (3, True, 4, 1, 40, 3, True, False), (3, False, 4, 4, 64, 4, False, True),
    (17, True, 4, 2, 24, 2, False, True), (17, False, 4, 1, 64, 3, True, True),
    (17, True, 4, 4, 40, 3, True, False), (100, True, 4, 2, 40, 4, True, True),
    (100, False, 4, 4, 24, 3, False, False), (100, True, 4, 1, 64, 2, False, False),
]


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,tail,H,Hkv,D,W,silu,bias", CONV_CASES)
def test_conv_heads_kernel(triton_backend, T, tail, H, Hkv, D, W, silu, bias, dtype):
    check_conv(1 if T == 100 else 2, T, H, Hkv, D, W, tail, bias, silu, dtype)


@interpret
@settings(max_examples=15)
@given(B=st.integers(1, 2), T=st.integers(1, 40), Hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 3]),
       D=st.integers(1, 48), W=st.integers(1, 4), tail=st.booleans(), bias=st.booleans(), silu=st.booleans(),
       fp16=st.booleans())
def test_conv_heads_kernel_hypothesis(B, T, Hkv, group, D, W, tail, bias, silu, fp16):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTATTN_BACKEND", "triton")
        check_conv(B, T, Hkv * group, Hkv, D, W, tail, bias, silu, torch.float16 if fp16 else torch.float32)


@interpret
@pytest.mark.parametrize("tail", [False, True])
def test_conv_heads_reads_a_column_slice_in_place(triton_backend, tail):
    """qkv as a column slice of a wider projection (the KDA layer's one-matmul in-projection) gives the same
    q, k, v as its contiguous copy."""
    H, Hkv, D, W = 4, 2, 24, 4
    qkv, weight, b, t = conv_inputs(2, 19, H, Hkv, D, W, tail, True, torch.float32, KERNEL_DEVICE)
    wide = torch.cat([qkv, torch.full_like(qkv[..., :37], float("nan"))], dim=-1)
    view = wide[..., :qkv.shape[-1]]
    assert not view.is_contiguous()
    with torch.no_grad():
        got = causal_conv_heads(view, weight, b, t, H, Hkv, D, activation="silu")
        want = causal_conv_heads(qkv, weight, b, t, H, Hkv, D, activation="silu")
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, atol=0, rtol=0)


@interpret
@pytest.mark.parametrize("split", [1, 2, 13])
def test_conv_heads_continuation_equals_one_shot(triton_backend, split):
    """Prefill in two calls, the second continuing from conv_tail of the first, equals one call."""
    H, Hkv, D, W = 4, 2, 24, 4
    qkv, weight, b, t0 = conv_inputs(2, 20, H, Hkv, D, W, True, True, torch.float32, KERNEL_DEVICE)
    with torch.no_grad():
        full = causal_conv_heads(qkv, weight, b, t0, H, Hkv, D, activation="silu")
        first = causal_conv_heads(qkv[:, :split], weight, b, t0, H, Hkv, D, activation="silu")
        tail = conv_tail(qkv[:, :split], t0, W)
        second = causal_conv_heads(qkv[:, split:], weight, b, tail, H, Hkv, D, activation="silu")
    assert tail.shape == t0.shape and tail.is_contiguous()
    for a, b_, f in zip(first, second, full):
        torch.testing.assert_close(torch.cat([a, b_], 1), f, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(conv_tail(qkv[:, split:], tail, W), conv_tail(qkv, t0, W), atol=0, rtol=0)


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,H,D", [(1, 4, 24), (3, 2, 40), (17, 4, 64), (100, 1, 24)])
def test_gated_norm_kernel(triton_backend, T, H, D, dtype):
    check_norm(2, T, H, D, dtype, dtype)


@interpret
def test_gated_norm_kernel_mixed_dtypes(triton_backend):
    """fp16 x with an fp32 gate and weight: output in x's dtype."""
    check_norm(1, 5, 2, 40, torch.float16, torch.float32)


@interpret
@settings(max_examples=15)
@given(B=st.integers(1, 2), T=st.integers(1, 30), H=st.integers(1, 3), D=st.integers(1, 80), fp16=st.booleans())
def test_gated_norm_kernel_hypothesis(B, T, H, D, fp16):
    dtype = torch.float16 if fp16 else torch.float32
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTATTN_BACKEND", "triton")
        check_norm(B, T, H, D, dtype, dtype)


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(1, 24), (2, 5, 40), (3, 7, 2, 64), (2, 3, 1024)])
def test_rms_norm_kernel(triton_backend, shape, dtype):
    """The plain RMSNorm (no gate) against a float64 reference rounded once."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    with torch.no_grad():
        out = rms_norm(x.to(KERNEL_DEVICE), w.to(KERNEL_DEVICE), 1e-6).cpu()
    xd = x.double()
    ref = (w.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


# ---- CPU lane: validation and dispatch -----------------------------------------------------------------

H_, HKV_, D_, W_ = 4, 2, 8, 3
C_ = (H_ + 2 * HKV_) * D_


def conv_args(**over):
    qkv, weight, b, t = conv_inputs(2, 5, H_, HKV_, D_, W_, True, True, torch.float32)
    kw = dict(qkv=qkv, weight=weight, bias=b, tail=t, num_heads=H_, num_kv_heads=HKV_, head_dim=D_,
              activation="silu")
    kw.update(over)
    return kw


def norm_args(**over):
    kw = dict(x=torch.randn(2, 5, 3, 8), gate=torch.randn(2, 5, 24), weight=torch.ones(8), eps=1e-6)
    kw.update(over)
    return kw


BAD_CONV = [
    ("qkv_not_tensor", dict(qkv=[[1.0]]), TypeError, "qkv must be a torch.Tensor"),
    ("qkv_rank", dict(qkv=torch.randn(2, 5, 4, 16)), ValueError, "qkv must have 3 dimensions"),
    ("qkv_dtype", dict(qkv=torch.zeros(2, 5, C_, dtype=torch.int32)), TypeError, "qkv must have dtype"),
    ("channels", dict(qkv=torch.randn(2, 5, C_ + 8)), ValueError, r"= 64, got 72"),
    ("empty", dict(qkv=torch.randn(2, 0, C_)), ValueError, "qkv must not be empty"),
    ("heads_ratio", dict(num_heads=3, qkv=torch.randn(2, 5, 56)), ValueError,
     "num_heads must be a multiple of num_kv_heads=2, got 3"),
    ("heads_type", dict(num_heads=4.0), TypeError, "num_heads must be an int, got float"),
    ("head_dim_zero", dict(head_dim=0), ValueError, "head_dim must be >= 1, got 0"),
    ("activation", dict(activation="gelu"), ValueError, "activation must be one of"),
    ("weight_shape", dict(weight=torch.randn(C_ - 1, W_)), ValueError, r"weight must have shape \[C=64"),
    ("weight_rank", dict(weight=torch.randn(C_, 1, W_)), ValueError, "weight must have 2 dimensions"),
    ("weight_dtype", dict(weight=torch.randn(C_, W_).double()), TypeError, "weight must have dtype"),
    ("weight_device", dict(weight=torch.randn(C_, W_, device="meta")), ValueError,
     "weight must be on qkv's device cpu, got meta"),
    ("bias_shape", dict(bias=torch.randn(C_ + 1)), ValueError, r"bias must have shape \(64,\)"),
    ("tail_shape", dict(tail=torch.randn(2, C_, W_)), ValueError, r"tail must have shape \(2, 64, 2\)"),
    ("tail_batch", dict(tail=torch.randn(1, C_, W_ - 1)), ValueError, r"tail must have shape \(2, 64, 2\)"),
    ("tail_type", dict(tail=1.0), TypeError, "tail must be a torch.Tensor"),
]


@pytest.mark.parametrize("over,exc,match", [c[1:] for c in BAD_CONV], ids=[c[0] for c in BAD_CONV])
def test_conv_heads_rejects_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        causal_conv_heads(**conv_args(**over))


BAD_NORM = [
    ("x_rank", dict(x=torch.randn(2, 5, 24)), ValueError, "x must have 4 dimensions"),
    ("x_dtype", dict(x=torch.randn(2, 5, 3, 8).double()), TypeError, "x must have dtype"),
    ("gate_shape", dict(gate=torch.randn(2, 5, 3, 8)), ValueError, "gate must have 3 dimensions"),
    ("gate_width", dict(gate=torch.randn(2, 5, 16)), ValueError, r"gate must have shape \(2, 5, 24\)"),
    ("gate_device", dict(gate=torch.randn(2, 5, 24, device="meta")), ValueError, "gate must be on x's device"),
    ("weight_shape", dict(weight=torch.ones(24)), ValueError, r"weight must have shape \(8,\)"),
    ("eps_type", dict(eps="1e-6"), TypeError, "eps must be a float, got str"),
    ("eps_zero", dict(eps=0.0), ValueError, "eps must be > 0, got 0.0"),
    ("empty", dict(x=torch.randn(2, 0, 3, 8), gate=torch.randn(2, 0, 24)), ValueError, "x must not be empty"),
]


@pytest.mark.parametrize("over,exc,match", [c[1:] for c in BAD_NORM], ids=[c[0] for c in BAD_NORM])
def test_gated_norm_rejects_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        gated_rms_norm(**norm_args(**over))


@pytest.fixture
def spy_launches(monkeypatch):
    """Backend triton through the interpreter, with both launchers replaced by recorders that write zeros."""
    monkeypatch.setenv("FASTATTN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []

    def conv(x, weight, bias, tail, q, k, v, num_kv_heads, use_silu):
        calls.append("conv")
        for o in (q, k, v):
            o.zero_()

    def norm(x, gate, weight, out, eps):
        calls.append("norm")
        out.zero_()

    monkeypatch.setattr(fused_api, "launch_conv_heads_fwd", conv)
    monkeypatch.setattr(fused_api, "launch_gated_rms_norm_fwd", norm)
    return calls


def test_dispatch_uses_kernels_without_grad(spy_launches):
    with torch.no_grad():
        kw = conv_args(weight=conv_args()["weight"].requires_grad_())
        causal_conv_heads(**kw)
        gated_rms_norm(**norm_args(weight=torch.ones(8, requires_grad=True)))
    causal_conv_heads(**conv_args())              # grad mode, but nothing requires grad
    assert spy_launches == ["conv", "norm", "conv"]


@pytest.mark.parametrize("grad_arg", ["qkv", "weight", "bias", "tail"])
def test_dispatch_conv_needs_grad_runs_torch(spy_launches, grad_arg):
    kw = conv_args()
    kw[grad_arg] = kw[grad_arg].requires_grad_()
    q, k, v = causal_conv_heads(**kw)
    assert spy_launches == [] and q.grad_fn is not None
    (q.sum() + k.sum() + v.sum()).backward()
    assert torch.isfinite(kw[grad_arg].grad).all() and kw[grad_arg].grad.abs().sum() > 0


@pytest.mark.parametrize("grad_arg", ["x", "gate", "weight"])
def test_dispatch_norm_needs_grad_runs_torch(spy_launches, grad_arg):
    kw = norm_args()
    kw[grad_arg] = kw[grad_arg].requires_grad_()
    out = gated_rms_norm(**kw)
    assert spy_launches == [] and out.grad_fn is not None
    out.sum().backward()
    assert torch.isfinite(kw[grad_arg].grad).all()


def test_dispatch_torch_backend_and_reference_values(monkeypatch):
    """FASTATTN_BACKEND=torch runs the reference; it matches the unfused math of the KDA layer."""
    monkeypatch.setenv("FASTATTN_BACKEND", "torch")
    kw = conv_args()
    q, k, v = causal_conv_heads(**kw)
    full = torch.cat([kw["tail"].transpose(1, 2), kw["qkv"]], 1)
    y = kw["bias"] + sum(full[:, j:j + 5] * kw["weight"][:, j] for j in range(W_))
    y = torch.nn.functional.silu(y)
    assert rel(q, y[..., :H_ * D_].reshape(2, 5, H_, D_)) < 1e-6
    k_ref = y[..., H_ * D_:(H_ + HKV_) * D_].reshape(2, 5, HKV_, 1, D_).expand(-1, -1, -1, 2, -1)
    assert rel(k, k_ref.reshape(2, 5, H_, D_)) < 1e-6
    assert rel(v, y[..., (H_ + HKV_) * D_:].reshape(2, 5, HKV_, 1, D_).expand(-1, -1, -1, 2, -1)
               .reshape(2, 5, H_, D_)) < 1e-6
    nk = norm_args()
    out = gated_rms_norm(**nk)
    x = nk["x"]
    ref = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * torch.sigmoid(nk["gate"]).view(2, 5, 3, 8)
    assert rel(out, ref.reshape(2, 5, 24)) < 1e-6


# ---- GPU lane: the KDA model on the fused path ---------------------------------------------------------

GPU_SHAPE = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, eva_window_size=64,
                 eva_chunk_size=16, kda_chunk_size=64)


def counting_launchers(monkeypatch):
    calls = []
    for name in ("launch_conv_heads_fwd", "launch_gated_rms_norm_fwd"):
        real = getattr(fused_api, name)

        def spy(*a, _real=real, _name=name, **kw):
            # rms_norm (every RMSNorm of the model) launches the norm kernel without a gate
            calls.append(_name if _name == "launch_conv_heads_fwd" or a[1] is not None else "rms_norm")
            return _real(*a, **kw)
        monkeypatch.setattr(fused_api, name, spy)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["identity", "silu"])
def test_model_fused_matches_torch_path_bf16(monkeypatch, activation):
    """bf16 HybridLM forward (B=2, T=1000): fused kernels vs the PyTorch path of the same two ops, and vs
    FASTATTN_BACKEND=torch (every op on PyTorch)."""
    monkeypatch.delenv("FASTATTN_BACKEND", raising=False)
    model = make_model("hybrid-kda", dtype=torch.bfloat16, device="cuda", kda_conv_activation=activation,
                       **GPU_SHAPE)
    ids = torch.randint(0, 1000, (2, 1000), device="cuda")
    n_kda = sum(t == "kda" for t in model.config.layer_types)
    calls = counting_launchers(monkeypatch)
    with torch.no_grad():
        fused = model(ids).float()
        assert len([c for c in calls if c != "rms_norm"]) == 2 * n_kda and "rms_norm" in calls
        with monkeypatch.context() as mp:
            mp.setattr(fused_api, "select_backend", lambda x: "torch")
            ops_torch = model(ids).float()
        monkeypatch.setenv("FASTATTN_BACKEND", "torch")
        all_torch = model(ids).float()
    assert torch.isfinite(fused).all()
    assert rel(fused, ops_torch) < 1e-2
    assert rel(fused, all_torch) < 3e-2


@pytest.mark.gpu
def test_model_fused_decode_equals_prefill_bf16():
    model = make_model("hybrid-kda", dtype=torch.bfloat16, device="cuda", kda_conv_activation="silu",
                       **GPU_SHAPE)
    ids = torch.randint(0, 1000, (2, 300), device="cuda")
    with torch.no_grad():
        full = model(ids).float()
        cache = model.new_cache(2)
        parts = [model(ids[:, :250], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(250, 300)]
    dec = torch.cat(parts, 1).float()
    assert torch.isfinite(dec).all() and rel(dec, full) < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("D", [40, 128])
def test_kernels_bf16_real_sizes(D):
    """bf16 kernels at prefill sizes vs the float64 reference (one bf16 rounding)."""
    H, Hkv, T = 16, 8, 3000
    qkv, weight, b, t = conv_inputs(2, T, H, Hkv, D, 4, True, True, torch.bfloat16, "cuda")
    with torch.no_grad():
        out = causal_conv_heads(qkv, weight, b, t, H, Hkv, D, activation="silu")
        ref = _conv_heads_torch(qkv.double(), weight.double(), b.double(), t.double(), H, Hkv, D, "silu")
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r.bfloat16(), atol=1e-2, rtol=1e-2)
        x, gate = out[0] * 3, torch.randn(2, T, H * D, device="cuda", dtype=torch.bfloat16)
        w = torch.rand(D, device="cuda") + 0.5
        norm = gated_rms_norm(x, gate, w, 1e-6)
        ref = _gated_norm_torch(x.double(), gate.double(), w.double(), 1e-6)
        torch.testing.assert_close(norm, ref.bfloat16(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("x,w,eps,exc,match", [
    (torch.randn(2, 8), torch.ones(7), 1e-6, ValueError, "weight must have shape"),
    (torch.randn(2, 8), torch.ones(8), 0.0, ValueError, "eps must be > 0"),
    (torch.randn(2, 8), torch.ones(8), "1e-6", TypeError, "eps must be a float"),
    (torch.randn(0, 8), torch.ones(8), 1e-6, ValueError, "non-empty"),
    (torch.randn(2, 8).long(), torch.ones(8), 1e-6, TypeError, "x must have dtype"),
], ids=["weight-shape", "eps-zero", "eps-type", "empty", "x-dtype"])
def test_rms_norm_rejects_bad_input(x, w, eps, exc, match):
    with pytest.raises(exc, match=match):
        rms_norm(x, w, eps)


def test_rms_norm_dispatch(spy_launches):
    """No grad needed: the kernel; a weight that needs a gradient: the autograd reference."""
    w = torch.ones(8, requires_grad=True)
    with torch.no_grad():
        rms_norm(torch.randn(3, 8), w, 1e-6)
    assert spy_launches == ["norm"]
    out = rms_norm(torch.randn(3, 8), w, 1e-6)
    assert spy_launches == ["norm"] and out.grad_fn is not None
