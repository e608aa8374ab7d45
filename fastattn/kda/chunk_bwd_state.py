"""Stage 1 of the chunked KDA backward: the reverse sequential pass over state gradients.

With dS the gradient of the state leaving a chunk and the forward's factors W, qg, kd, Aqk (recomputed in the
input dtype): dVn = Aqk^T dO + kd dS, and the state entering the chunk gets 2^(G_last) dS + qg^T dO - W^T dVn.
Grid (V tiles, N*HV), chunks in reverse; fp32 accumulation. Reads w, qg, kd, Aqk, Gc (last row), dO, dht.
Writes dh [NT, HV, K, V] (state_dtype; gradient of the state leaving every chunk) and dh0 (fp32).
"""
import triton
import triton.language as tl

from ._common import load_pass_chunk, load_state, row_tile, seq_program, state_tile


@triton.jit(do_not_specialize=["T"])
def kda_state_bwd_kernel(w, qg, kd, Aqk, Gc, do, dht, dh, dh0, cu_seqlens, chunk_offsets, T,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_DHT: tl.constexpr,
                         USE_H0: tl.constexpr, DOT_PREC: tl.constexpr):
    i_v, i_nh, i_n, i_hv, i_h, bos, seq_len = seq_program(cu_seqlens, T, H, HV, True)
    boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    o_k, o_v, m_k, m_v, m_kv, o_kv = state_tile(i_v, K, V, BK, BV)
    st = w.dtype.element_ty
    b_dh = load_state(dht, i_nh, o_kv, m_kv, K, V, BK, BV, USE_DHT)
    o_t = tl.arange(0, BT)
    NT = tl.cdiv(seq_len, BT)
    for i_r in range(0, NT):
        i_c = NT - 1 - i_r
        tl.store(dh + ((boh + i_c) * HV + i_hv) * K * V + o_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        row, m_t, b_w, b_q, b_kd, b_A, b_gl = load_pass_chunk(w, qg, kd, Aqk, Gc, bos, seq_len, i_c, i_hv, o_t, o_k,
                                                              m_k, HV, K, BT, BK)
        p_o, m_tv = row_tile(do + row * HV * V + i_hv * V, o_t, m_t, HV * V, i_v * BV, V, BV)
        b_do = tl.load(p_o, mask=m_tv, other=0.).to(st)
        b_A = b_A.to(st)

        b_dvn = (tl.dot(tl.trans(b_A), b_do, input_precision=DOT_PREC)
                 + tl.dot(b_kd, b_dh.to(st), input_precision=DOT_PREC)).to(st)
        b_dh = (b_dh * tl.exp2(b_gl)[:, None] + tl.dot(tl.trans(b_q), b_do, input_precision=DOT_PREC)
                - tl.dot(tl.trans(b_w), b_dvn, input_precision=DOT_PREC))
    if USE_H0:
        tl.store(dh0 + i_nh * K * V + o_kv, b_dh, mask=m_kv)
