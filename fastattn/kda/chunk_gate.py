"""Stage 1a-0 of the chunked KDA forward: the gate's in-chunk cumsum, streamed ahead of the decayed products.

Gc_id = sum_{j <= i in the chunk} g_jd * log2(e), g the raw gate or, with USE_GATE, the in-kernel gate of it.
Grid (chunks, HV, K tiles): one [BT, BK] tile per program (pure streaming, no dependent products).
Reads g (A_log, dt_bias). Writes Gc [T, HV, K] fp32.
"""
import triton
import triton.language as tl

from ._common import LOG2E, chunk_program, gate_fwd, load_gate_params, load_row_tile, row_tile


@triton.jit(do_not_specialize=["T"])
def kda_gate_cumsum_fwd_kernel(g, A_log, dt_bias, Gc, cu_seqlens, chunk_indices, T, H: tl.constexpr,
                               HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                               USE_GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
                               HAS_LB: tl.constexpr, LB: tl.constexpr):
    i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t = chunk_program(chunk_indices, cu_seqlens, H, HV, BT)
    i_k = tl.program_id(2)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    x_b = (bos + i_c * BT) * HV * K + i_hv * K
    b_g, m = load_row_tile(g + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
    if USE_GATE:
        b_a, b_bias = load_gate_params(A_log, dt_bias, i_hv, o_k, m_k, K, BK, HAS_A, HAS_BIAS)
        b_g = gate_fwd(b_g, b_a, b_bias[None, :], HAS_LB, LB)
    b_g = tl.where(m, b_g * LOG2E, 0.)
    p_G, _ = row_tile(Gc + x_b, o_t, m_t, HV * K, i_k * BK, K, BK)
    tl.store(p_G, tl.cumsum(b_g, axis=0), mask=m)
