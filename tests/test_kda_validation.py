"""Bad input to fastattn.chunk_kda / fused_recurrent_kda raises ValueError/TypeError naming the argument
(DESIGN.md §4); non-contiguous input gives the same result as contiguous input."""
import pytest
import torch

import fastattn
from reference.kda import kda_inputs

FNS = [fastattn.chunk_kda, fastattn.fused_recurrent_kda]
FN_IDS = ["chunk", "recurrent"]
B, T, H, HV, K, V = 2, 10, 2, 4, 16, 8


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "torch")


def good(**over):
    """Valid arguments (softplus gate, GVA), with ``over`` replacing some of them."""
    kw = kda_inputs(B, T, H, HV, K, V, gate="softplus", initial_state=True)
    kw.update(over)
    return kw


def packed(**over):
    kw = kda_inputs(1, T, H, HV, K, V, seqlens=[3, 7], initial_state=True)
    kw.update(over)
    return kw


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


BAD = [
    # (id, kwargs, exception, message pattern)
    ("q_not_tensor", good(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    ("beta_not_tensor", good(beta=0.5), TypeError, "beta must be a torch.Tensor"),
    ("q_rank", good(q=t(B, T, H * K)), ValueError, "q must have 4 dimensions"),
    ("k_rank", good(k=t(B, T, H, K, 1)), ValueError, "k must have 4 dimensions"),
    ("v_rank", good(v=t(B, T, HV * V)), ValueError, "v must have 4 dimensions"),
    ("g_rank", good(g=t(B, T, HV)), ValueError, "g must have 4 dimensions"),
    ("beta_rank", good(beta=t(B, T, HV, 1)), ValueError, "beta must have 3 dimensions"),
    ("k_shape", good(k=t(B, T, H, K + 1)), ValueError, r"k must have shape \(2, 10, 2, 16\)"),
    ("v_batch", good(v=t(B, T + 1, HV, V)), ValueError, r"v must have shape \[B=2, T=10"),
    ("hv_not_multiple", good(v=t(B, T, 3, V), g=t(B, T, 3, K), beta=t(B, T, 3)), ValueError,
     "HV must be a multiple of q's H=2, got HV=3"),
    ("g_shape", good(g=t(B, T, HV, K + 2)), ValueError, r"g must have shape \(2, 10, 4, 16\)"),
    ("beta_shape", good(beta=t(B, T, H)), ValueError, r"beta must have shape \(2, 10, 4\)"),
    ("K_too_big", good(q=t(1, 2, 1, 257), k=t(1, 2, 1, 257), v=t(1, 2, 1, 8), g=t(1, 2, 1, 257), beta=t(1, 2, 1),
                       A_log=t(1), dt_bias=t(257), initial_state=None), ValueError, "K must be <= 256, got K=257"),
    ("V_too_big", good(v=t(B, T, HV, 300), initial_state=None), ValueError, "V must be <= 256, got V=300"),
    ("empty_T", good(q=t(B, 0, H, K), k=t(B, 0, H, K), v=t(B, 0, HV, V), g=t(B, 0, HV, K), beta=t(B, 0, HV)),
     ValueError, "empty inputs"),
    ("empty_heads", good(q=t(B, T, 0, K), k=t(B, T, 0, K)), ValueError, "empty inputs"),
    ("k_dtype", good(k=t(B, T, H, K, dtype=torch.float16)), TypeError, "k must have q's dtype"),
    ("q_float64", good(q=t(B, T, H, K, dtype=torch.float64), k=t(B, T, H, K, dtype=torch.float64)), TypeError,
     "q must have dtype in"),
    ("v_int", good(v=torch.ones(B, T, HV, V, dtype=torch.int32)), TypeError, "v must have dtype in"),
    ("beta_bool", good(beta=torch.ones(B, T, HV, dtype=torch.bool)), TypeError, "beta must have dtype in"),
    ("scale_type", good(scale="0.1"), TypeError, "scale must be a float"),
    ("h0_shape", good(initial_state=t(B, HV, V, K)), ValueError, r"initial_state must have shape \(2, 4, 16, 8\)"),
    ("h0_rank", good(initial_state=t(HV, K, V)), ValueError, "initial_state must have 4 dimensions"),
    ("h0_dtype", good(initial_state=torch.zeros(B, HV, K, V, dtype=torch.int64)), TypeError,
     "initial_state must have dtype"),
    ("h0_not_tensor", good(initial_state=[0.0]), TypeError, "initial_state must be a torch.Tensor"),
    ("A_log_missing", good(A_log=None), ValueError, "A_log is required by the softplus gate"),
    ("A_log_size", good(A_log=t(HV + 1)), ValueError, "A_log must have HV=4 elements"),
    ("A_log_not_tensor", good(A_log=1.0), TypeError, "A_log must be a torch.Tensor"),
    ("dt_bias_size", good(dt_bias=t(HV * K - 1)), ValueError, "dt_bias must have HV\\*K=64 elements"),
    ("dt_bias_int", good(dt_bias=torch.zeros(HV * K, dtype=torch.int64)), TypeError, "dt_bias must have dtype"),
    ("A_log_without_gate", good(use_gate_in_kernel=False), ValueError, "only used with use_gate_in_kernel"),
    ("lower_bound_without_gate", good(use_gate_in_kernel=False, A_log=None, dt_bias=None, lower_bound=-1.0),
     ValueError, "lower_bound is only used with use_gate_in_kernel"),
    ("lower_bound_low", good(lower_bound=-5.5), ValueError, r"lower_bound must be a float in \[-5, 0\), got -5.5"),
    ("lower_bound_zero", good(lower_bound=0.0), ValueError, r"lower_bound must be a float in \[-5, 0\), got 0.0"),
    ("lower_bound_positive", good(lower_bound=1.0), ValueError, "lower_bound must be a float"),
    ("lower_bound_nan", good(lower_bound=float("nan")), ValueError, "lower_bound must be a float"),
    ("lower_bound_str", good(lower_bound="-1"), ValueError, "lower_bound must be a float"),
    ("cu_batch", good(cu_seqlens=torch.tensor([0, 4, T]), initial_state=None), ValueError,
     "cu_seqlens needs batch size 1"),
    ("cu_start", packed(cu_seqlens=torch.tensor([1, 4, T])), ValueError, r"cu_seqlens\[0\] must be 0, got 1"),
    ("cu_end", packed(cu_seqlens=torch.tensor([0, 4, T - 1])), ValueError,
     r"cu_seqlens\[-1\] must equal the packed length T=10, got 9"),
    ("cu_not_increasing", packed(cu_seqlens=torch.tensor([0, 6, 4, T]), initial_state=None), ValueError,
     "cu_seqlens must be strictly increasing"),
    ("cu_repeated", packed(cu_seqlens=torch.tensor([0, 4, 4, T]), initial_state=None), ValueError,
     "cu_seqlens must be strictly increasing"),
    ("cu_too_short", packed(cu_seqlens=torch.tensor([0]), initial_state=None), ValueError,
     "cu_seqlens must hold at least 2"),
    ("cu_float", packed(cu_seqlens=torch.tensor([0.0, 3.0, 10.0])), TypeError, "cu_seqlens must have dtype"),
    ("cu_rank", packed(cu_seqlens=torch.tensor([[0, 3, 10]])), ValueError, "cu_seqlens must have 1 dimensions"),
    ("cu_h0_count", packed(initial_state=t(1, HV, K, V)), ValueError,
     r"initial_state must have shape \(2, 4, 16, 8\)"),
]


@pytest.mark.parametrize("fn", FNS, ids=FN_IDS)
@pytest.mark.parametrize("kwargs,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)


@pytest.mark.parametrize("chunk_size", [0, 8, 48, 128, "64", None, 64.0, True])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match=f"chunk_size must be one of .*got {chunk_size!r}"):
        fastattn.chunk_kda(**good(), chunk_size=chunk_size)


@pytest.mark.parametrize("scale", [True, "0.1", torch.tensor(0.1)])
def test_bad_scale_type(scale):
    with pytest.raises(TypeError, match="scale must be a float or None"):
        fastattn.chunk_kda(**good(), scale=scale)


@pytest.mark.parametrize("name", ["k", "v", "g", "beta", "initial_state", "A_log", "dt_bias"])
def test_device_mismatch(name):
    """Inputs on another device than q (a meta tensor stands in for a second device on CPU)."""
    kw = good()
    kw[name] = kw[name].to("meta")
    with pytest.raises(ValueError, match=f"{name} must be on cpu"):
        fastattn.chunk_kda(**kw)


@pytest.mark.parametrize("fn", FNS, ids=FN_IDS)
def test_bad_backend_env(fn, monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTATTN_BACKEND must be one of"):
        fn(**good())
    if not torch.cuda.is_available():
        monkeypatch.setenv("FASTATTN_BACKEND", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="FASTATTN_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1"):
            fn(**good())


@pytest.mark.parametrize("fn", FNS, ids=FN_IDS)
def test_non_contiguous_inputs(fn):
    """Transposed / strided views give bit-identical results and gradients to contiguous copies."""
    kw = kda_inputs(B, T, H, HV, K, V, gate="bounded", initial_state=True, beta_sigmoid=True)
    strided = {}
    for name in ("q", "k", "v", "g", "beta", "initial_state", "dt_bias", "A_log"):
        x = kw[name]
        if x.dim() >= 2:  # same values, swapped memory layout
            x = x.transpose(0, 1).contiguous().transpose(0, 1)
        else:  # every other element of a longer buffer
            x = torch.stack([x, torch.zeros_like(x)], -1)[..., 0]
        assert not x.is_contiguous()
        strided[name] = x
    base = {n: (x.clone().requires_grad_() if n in strided else x) for n, x in kw.items()}
    other = {n: (strided[n].detach().requires_grad_() if n in strided else x) for n, x in kw.items()}
    o1, s1 = fn(**base, output_final_state=True)
    o2, s2 = fn(**other, output_final_state=True)
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
    (o1.sum() + s1.sum()).backward()
    (o2.sum() + s2.sum()).backward()
    for name in strided:
        assert torch.equal(base[name].grad, other[name].grad), name


def test_int32_cu_seqlens_and_dt_bias_2d():
    """cu_seqlens may be int32; dt_bias may be given as [HV, K]: both equal their canonical forms."""
    kw = kda_inputs(1, T, H, HV, K, V, gate="softplus", seqlens=[4, 6])
    o1, _ = fastattn.chunk_kda(**kw)
    o2, _ = fastattn.chunk_kda(**dict(kw, cu_seqlens=kw["cu_seqlens"].int(), dt_bias=kw["dt_bias"].reshape(HV, K)))
    assert torch.equal(o1, o2)


def test_cu_seqlens_checked_once_per_tensor_version():
    """check_cu_seqlens remembers its result per tensor (no host sync on later calls with the same offsets) and
    validates again after an in-place write or for a new tensor with the same values."""
    from fastattn._checks import check_cu_seqlens
    cu = torch.tensor([0, 4, T], dtype=torch.int32)
    first = check_cu_seqlens(cu, 1, T, torch.device("cpu"))
    assert first.dtype == torch.int64 and first.tolist() == [0, 4, T]
    assert check_cu_seqlens(cu, 1, T, torch.device("cpu")) is first
    cu[1] = T + 1                                      # in place: the cached result must not be trusted
    with pytest.raises(ValueError, match="strictly increasing"):
        check_cu_seqlens(cu, 1, T, torch.device("cpu"))
    with pytest.raises(ValueError, match="packed length"):
        check_cu_seqlens(torch.tensor([0, 4, T]), 1, T + 1, torch.device("cpu"))


def test_kda_chunk_layout_follows_cu_seqlens_writes():
    """The packed chunk layout is rebuilt when the offsets change in place, reused while they do not."""
    from fastattn.kda.chunk_launch import chunk_layout
    cu = torch.tensor([0, 70, 100], dtype=torch.int64)
    a = chunk_layout(1, 100, cu, 64, "cpu")
    assert a[3] == 3 and a[1].tolist() == [[0, 0], [0, 1], [1, 0]] and a[2].tolist() == [0, 2, 3]
    assert chunk_layout(1, 100, cu, 64, "cpu")[1] is a[1]
    cu[1] = 10
    b = chunk_layout(1, 100, cu, 64, "cpu")
    assert b[3] == 3 and b[1].tolist() == [[0, 0], [1, 0], [1, 1]] and b[2].tolist() == [0, 1, 3]
    assert chunk_layout(1, 100, cu, 32, "cpu")[3] == 4
