"""Stage 2 of the chunked KDA forward: the sequential state pass with the output fused in.

Per chunk, with S entering it: Vn = U - W S, O = qg S + Aqk Vn, S <- 2^(G_last) * S + kd^T Vn (decays <= 1).
Grid (V tiles, N*HV), a loop over the chunks of one sequence; operands in the stage-1 dtype, fp32 state.
Reads w, u, qg, kd, Aqk, Gc (last row), h0. Writes o, the final state and (for the backward) the state
entering every chunk h [NT, HV, K, V] (state_dtype).
"""
import triton
import triton.language as tl

from ._common import load_pass_chunk, load_state, row_tile, seq_program, state_tile


@triton.jit(do_not_specialize=["T"])
def kda_state_fwd_kernel(w, u, qg, kd, Aqk, Gc, h0, o, h, ht, cu_seqlens, chunk_offsets, T,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr,
                         STORE_H: tl.constexpr, STORE_HT: tl.constexpr, DOT_PREC: tl.constexpr):
    i_v, i_nh, i_n, i_hv, i_h, bos, seq_len = seq_program(cu_seqlens, T, H, HV, True)
    boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    o_k, o_v, m_k, m_v, m_kv, o_kv = state_tile(i_v, K, V, BK, BV)
    st = w.dtype.element_ty
    b_h = load_state(h0, i_nh, o_kv, m_kv, K, V, BK, BV, USE_H0)
    o_t = tl.arange(0, BT)
    for i_c in range(0, tl.cdiv(seq_len, BT)):
        if STORE_H:
            tl.store(h + ((boh + i_c) * HV + i_hv) * K * V + o_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        row, m_t, b_w, b_q, b_kd, b_A, b_gl = load_pass_chunk(w, qg, kd, Aqk, Gc, bos, seq_len, i_c, i_hv, o_t, o_k,
                                                              m_k, HV, K, BT, BK)
        p_u, m_tv = row_tile(u + row * HV * V + i_hv * V, o_t, m_t, HV * V, i_v * BV, V, BV)
        b_u = tl.load(p_u, mask=m_tv, other=0.).to(tl.float32)

        b_hs = b_h.to(st)
        b_vn = (b_u - tl.dot(b_w, b_hs, input_precision=DOT_PREC)).to(st)
        b_o = tl.dot(b_q, b_hs, input_precision=DOT_PREC) + tl.dot(b_A.to(st), b_vn, input_precision=DOT_PREC)
        p_o, _ = row_tile(o + row * HV * V + i_hv * V, o_t, m_t, HV * V, i_v * BV, V, BV)
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_tv)
        b_h = b_h * tl.exp2(b_gl)[:, None] + tl.dot(tl.trans(b_kd), b_vn, input_precision=DOT_PREC)
    if STORE_HT:
        tl.store(ht + i_nh * K * V + o_kv, b_h, mask=m_kv)
