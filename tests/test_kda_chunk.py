"""chunk_kda through the Triton kernels: outputs and every gradient against the float64 oracle.

Interpreter lane: ``TRITON_INTERPRET=1 FASTATTN_BACKEND=triton python -m pytest -m interpret`` (fp32/fp16,
small shapes). GPU lane: ``python -m pytest -m gpu`` (bf16/fp16/fp32 at real sizes, torch.compile,
32-bit-overflowing offsets).
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastattn
from kda_utils import TOL, call, check_against_oracle, loss_and_grads, make_case, needs_kernels, rel
from reference.kda import naive_chunk_kda


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "triton")


# (B, T, H, HV, K, V, chunk, gate, l2, sig, h0, varlen)
CASES = [
    (1, 40, 1, 1, 16, 16, 16, "none", False, False, False, None),
    (2, 65, 1, 2, 24, 20, 32, "softplus", True, True, True, None),
    (1, 130, 2, 2, 32, 32, 64, "lb", True, False, True, None),
    (1, 63, 1, 1, 48, 16, 64, "none", True, True, True, None),
    (1, 99, 1, 2, 16, 48, 32, "softplus", False, True, False, [0, 5, 40, 57, 99]),
    (1, 2, 2, 4, 16, 24, 64, "lb", True, True, True, None),
    (1, 40, 1, 1, 144, 16, 64, "softplus", True, True, True, None),  # K > 128: 32-row chunks inside
]


def _id(c):
    B, T, H, HV, K, V, BT, gate, l2, sig, h0, cu = c
    return f"B{B}-T{T}-H{H}-HV{HV}-K{K}-V{V}-C{BT}-{gate}-l2{int(l2)}-sig{int(sig)}-h0{int(h0)}-vl{int(cu is not None)}"


# every case in fp32; fp16 on two representative ones (GVA + softplus gate, varlen) to bound interpreter time
MATRIX = [(c, torch.float32) for c in CASES] + [(CASES[1], torch.float16), (CASES[4], torch.float16)]


@pytest.mark.interpret
@needs_kernels
@pytest.mark.parametrize("case,dtype", MATRIX, ids=[f"{_id(c)}-{str(d)[6:]}" for c, d in MATRIX])
def test_chunk_matches_oracle(case, dtype):
    B, T, H, HV, K, V, BT, gate, l2, sig, h0, cu = case
    x, kw = make_case(B, T, H, HV, K, V, dtype, gate=gate, l2=l2, sig=sig, h0=h0, cu=cu)
    check_against_oracle(fastattn.chunk_kda, x, kw, dtype, chunk_size=BT)


@pytest.mark.interpret
@needs_kernels
@settings(max_examples=8)
@given(T=st.integers(1, 70), K=st.sampled_from([16, 24, 32]), V=st.sampled_from([16, 20, 32]),
       hv_per_h=st.sampled_from([1, 2]), gate=st.sampled_from(["none", "softplus", "lb"]),
       l2=st.booleans(), sig=st.booleans(), h0=st.booleans(), chunk=st.sampled_from([16, 32, 64]),
       beta=st.sampled_from(["random", "binary"]), seed=st.integers(0, 2 ** 16))
def test_chunk_property(T, K, V, hv_per_h, gate, l2, sig, h0, chunk, beta, seed):
    x, kw = make_case(1, T, 1, hv_per_h, K, V, torch.float32, gate=gate, l2=l2, sig=sig, h0=h0, beta=beta, seed=seed)
    check_against_oracle(fastattn.chunk_kda, x, kw, torch.float32, chunk_size=chunk)


@pytest.mark.interpret
@needs_kernels
@pytest.mark.parametrize("gate", ["softplus", "none"])
def test_chunk_extreme_gates(gate):
    """Per-step decays down to about -30 (and huge raw gates): no overflow, no NaN, still exact.
    dA_log sums g * dg where dg at a wiping step is an O(1) sum that cancels to ~0, so fp32 rounding
    there is amplified by |g|: it gets a 50x looser bound (measured ~2e-3)."""
    x, kw = make_case(1, 67, 1, 2, 20, 12, torch.float32, gate=gate, gscale=30.0 if gate == "softplus" else 15.0,
                      h0=True, seed=3)
    o, ht = call(fastattn.chunk_kda, x, kw)
    ro, rht = call(naive_chunk_kda, x, kw)
    assert rel(o, ro) < 1e-4 and rel(ht, rht) < 1e-4
    got, ref = loss_and_grads(o, ht, x), loss_and_grads(ro, rht, x)
    for name in got:
        tol = 5e-3 if name == "A_log" else 1e-4 * (3 if name in ("g", "dt_bias") else 1)
        assert rel(got[name], ref[name]) < tol, (name, rel(got[name], ref[name]))


@pytest.mark.interpret
@needs_kernels
@pytest.mark.parametrize("K,T,HV,cu,steep", [(16, 64, 1, None, -0.2), (64, 100, 1, [0, 37, 100], -0.2),
                                              (144, 70, 2, None, -0.2), (64, 100, 1, [0, 37, 100], -14.0),
                                              (64, 100, 1, [0, 37, 100], -40.0)],
                         ids=["one-k-tile", "two-k-tiles-varlen", "wide-head-gva", "centred-halves", "halving-levels"])
def test_chunk_decay_across_the_diagonal_anchor_limit(K, T, HV, cu, steep):
    """Decays that cross DIAG_RANGE (chunk_intra.py) inside 16-row sub-blocks: a sub-block's early rows take the
    anchored product, its later rows the exact paths (chunk_intra.py's column loop, chunk_bwd_fix.py), in the same
    chunk; every row must match the oracle. With K = 64 only the first backward K tile (channels < 32) is flagged
    unless `steep`: log2 decay 20 per step on channels >= 32 puts that tile in the fix's centred-halves tier (a strip
    spans 300 > CENTER_RANGE, a half 140), 58 per step in its halving levels, while the first tile (4.3 per step)
    takes the whole-strip centred tier; the varlen split puts the steep rows in partial chunks, K = 144 runs 32-row
    chunks with two value heads per head."""
    x, kw = make_case(1, T, 1, HV, K, 16, torch.float32, gate="none", h0=True, cu=cu, seed=7)
    with torch.no_grad():  # log2 decay 4.3 per step on even channels: the anchor limit 48 falls at row ~11
        x["g"][..., :32:2] = -3.0
        x["g"][..., 1::2] = -0.05
        x["g"][..., 32::2] = steep
    check_against_oracle(fastattn.chunk_kda, x, kw, torch.float32)


@pytest.mark.interpret
@needs_kernels
def test_chunk_large_operands_with_steep_decays():
    """q, k, v scaled by 600 (no l2norm) with a log2 decay of 13.7 per step: a strip spans ~205, inside the backward
    fix's centred tier by decay alone, but its products would pass 2^128 with factors up to 2^103 on operands this
    large; the tier's cap must shrink (chunk_bwd_fix.py) so every gradient stays finite and matches the oracle (the
    problem's own conditioning leaves ~1.5e-4 in fp32)."""
    x, kw = make_case(1, 64, 1, 1, 32, 16, torch.float32, gate="none", l2=False, seed=1)
    with torch.no_grad():
        x["g"][...] = -9.5
        for n in ("q", "k", "v"):
            x[n].mul_(600.0)
    o, ht = call(fastattn.chunk_kda, x, kw)
    ro, rht = call(naive_chunk_kda, x, kw)
    assert rel(o, ro) < 1e-3 and rel(ht, rht) < 1e-3
    got, ref = loss_and_grads(o, ht, x), loss_and_grads(ro, rht, x)
    for name in got:
        assert rel(got[name], ref[name]) < 1e-3, (name, rel(got[name], ref[name]))


@pytest.mark.interpret
@needs_kernels
@pytest.mark.parametrize("chunk", [16, 64])
def test_chunk_causality_is_exact(chunk):
    """Changing tokens after position t changes no output before t, bit for bit."""
    x, kw = make_case(1, 90, 1, 1, 16, 16, torch.float32, gate="softplus", gscale=10.0, seed=5)
    kw["output_final_state"] = False
    with torch.no_grad():
        o1, _ = call(fastattn.chunk_kda, x, kw, chunk_size=chunk)
        t = 37
        y = {n: v.detach().clone() for n, v in x.items()}
        for n in ("q", "k", "v", "g", "beta"):
            y[n][:, t:] = torch.randn_like(y[n][:, t:]) * 5
        o2, _ = call(fastattn.chunk_kda, y, kw, chunk_size=chunk)
    assert torch.equal(o1[:, :t], o2[:, :t])
    assert not torch.equal(o1[:, t:], o2[:, t:])


@pytest.mark.interpret
@needs_kernels
def test_chunk_prefill_then_recurrent_decode():
    """chunk_kda on a prefix, then fused_recurrent_kda token by token carrying the state, equals chunk_kda
    on the whole sequence."""
    x, kw = make_case(1, 40, 1, 2, 16, 16, torch.float32, gate="softplus", h0=True, seed=7)
    with torch.no_grad():
        full, ht_full = call(fastattn.chunk_kda, x, kw)
        pre = {n: (v[:, :33] if n in ("q", "k", "v", "g", "beta") else v) for n, v in x.items()}
        o_pre, state = call(fastattn.chunk_kda, pre, kw)
        outs = [o_pre]
        for t in range(33, 40):
            step = {n: (v[:, t:t + 1] if n in ("q", "k", "v", "g", "beta") else v) for n, v in x.items()}
            step["initial_state"] = state
            o_t, state = call(fastattn.fused_recurrent_kda, step, kw)
            outs.append(o_t)
    assert rel(torch.cat(outs, 1), full) < 1e-5
    assert rel(state, ht_full) < 1e-5


# ----------------------------------------------------------------------------------------- GPU lane
GPU_CASES = [  # (B, T, H, HV, K, V, gate, varlen)
    (2, 4096, 16, 16, 128, 128, "none", None),
    (1, 2048, 4, 8, 128, 128, "softplus", None),
    (1, 3000, 4, 4, 100, 72, "lb", [0, 1300, 1847, 2900, 3000]),
    (1, 1024, 2, 2, 256, 256, "softplus", None),
]


GPU_MATRIX = [(c, d) for c in GPU_CASES for d in (torch.bfloat16, torch.float16)] + [(GPU_CASES[1], torch.float32)]


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype", GPU_MATRIX,
                         ids=[f"B{c[0]}-T{c[1]}-H{c[2]}-HV{c[3]}-K{c[4]}-V{c[5]}-{c[6]}-{str(d)[6:]}" for c, d in GPU_MATRIX])
def test_chunk_gpu_matches_oracle(case, dtype):
    B, T, H, HV, K, V, gate, cu = case
    x, kw = make_case(B, T, H, HV, K, V, dtype, gate=gate, h0=True, cu=cu, device="cuda")
    errs = check_against_oracle(fastattn.chunk_kda, x, kw, dtype, oracle="chunk")
    print(f"\n{dtype} {case}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))


@pytest.mark.gpu
def test_chunk_gpu_long_sequence_forward():
    """T = 65536, H = 16, K = V = 128, bf16: forward and final state against the float64 chunked oracle."""
    x, kw = make_case(1, 65536, 16, 16, 128, 128, torch.bfloat16, gate="softplus", device="cuda")
    with torch.no_grad():
        o, ht = call(fastattn.chunk_kda, x, kw)
        ro, rht = call(naive_chunk_kda, x, kw)
    assert rel(o, ro) <= TOL[torch.bfloat16][0] and rel(ht, rht) <= TOL[torch.bfloat16][0]


@pytest.mark.gpu
@pytest.mark.bigmem
def test_chunk_gpu_offsets_beyond_int32():
    """Buffers with more than 2^31 elements (Gc is [T, HV, K] fp32): the tail sequence of a packed batch
    must equal the same sequence run alone, forward and backward."""
    HV, K = 64, 128
    V = 64   # v-side buffers at half size keep the peak inside one 141 GB card; h and dh still exceed 2^31
    T_long, T_tail = (2 ** 31) // (HV * K) + 4096, 300
    T = T_long + T_tail
    dev = "cuda"
    q, k = (torch.randn(1, T, HV, K, device=dev, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, T, HV, V, device=dev, dtype=torch.bfloat16)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, HV, K, device=dev))
    beta = torch.rand(1, T, HV, device=dev, dtype=torch.bfloat16)
    cu = torch.tensor([0, T_long, T], device=dev)
    tail = [t[:, T_long:].clone().requires_grad_() for t in (q, k, v, g, beta)]
    full = [t.requires_grad_() for t in (q, k, v, g, beta)]
    o, _ = fastattn.chunk_kda(*full, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    o1, _ = fastattn.chunk_kda(*tail, use_qk_l2norm_in_kernel=True)
    assert torch.equal(o[:, T_long:], o1)
    do = torch.randn_like(o1)
    g_full = torch.autograd.grad(o[:, T_long:], full, do)
    g_tail = torch.autograd.grad(o1, tail, do)
    for a, b in zip(g_full, g_tail):
        assert torch.equal(a[:, T_long:], b)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["softplus", "lb"])
def test_chunk_gpu_small_all_features(gate):
    """Small ragged/varlen/GVA case with every option on: the shape the compute-sanitizer run uses."""
    x, kw = make_case(1, 300, 2, 4, 72, 40, torch.bfloat16, gate=gate, h0=True, cu=[0, 17, 150, 300],
                      device="cuda")
    check_against_oracle(fastattn.chunk_kda, x, kw, torch.bfloat16, oracle="chunk")


class _KDABlock(torch.nn.Module):
    def __init__(self, HV, K):
        super().__init__()
        self.A_log = torch.nn.Parameter(torch.zeros(HV))
        self.dt_bias = torch.nn.Parameter(torch.zeros(HV * K))

    def forward(self, q, k, v, g, beta):
        o, _ = fastattn.chunk_kda(q, k, v, g, beta, A_log=self.A_log, dt_bias=self.dt_bias,
                                  use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                                  use_beta_sigmoid_in_kernel=True)
        return o * 2.0


@pytest.mark.gpu
@pytest.mark.no_poison
def test_chunk_torch_compile_fullgraph():
    torch._dynamo.reset()
    mod = _KDABlock(4, 64).cuda()
    x, _ = make_case(2, 200, 2, 4, 64, 64, torch.bfloat16, gate="softplus", device="cuda", use_A=False,
                     use_bias=False)
    args = [x[n] for n in ("q", "k", "v", "g", "beta")]
    compiled = torch.compile(mod, fullgraph=True)
    out_c = compiled(*args)
    grads_c = torch.autograd.grad(out_c.float().sum(), args + list(mod.parameters()))
    out_e = mod(*args)
    grads_e = torch.autograd.grad(out_e.float().sum(), args + list(mod.parameters()))
    assert torch.equal(out_c, out_e)
    for a, b in zip(grads_c, grads_e):
        assert rel(a, b) < 1e-6
