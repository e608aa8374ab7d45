"""Stage 1 of the chunked KDA backward: the reverse sequential pass over state gradients.

With dS the gradient of the state leaving a chunk: dVn = Aqk^T dO + (k*2^(G_last-G)) dS and the state
entering it gets 2^(G_last) * dS + (scale q*2^G)^T dO - W^T dVn, W = Tinv diag(beta) (k*2^G).
Grid (V tiles, N*HV), chunks in reverse. Reads q, k, beta, Gc, Aqk, Tinv, rstd, dO, dht.
Writes dh [NT, HV, K, V] (gradient of the state leaving every chunk) and dh0.
"""
import triton
import triton.language as tl

from ._common import load_state
from .chunk_fwd import load_chunk, state_pass_program


@triton.jit(do_not_specialize=["T"])
def kda_state_bwd_kernel(q, k, beta, Gc, Aqk, Tinv, rstd_q, rstd_k, do, dht, dh, dh0, cu_seqlens, chunk_offsets, scale, T,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_L2NORM: tl.constexpr,
                         USE_SIGMOID: tl.constexpr, USE_DHT: tl.constexpr, USE_H0: tl.constexpr, DOT_PREC: tl.constexpr):
    i_nh, i_hv, i_h, bos, seq_len, boh, NT, o_v, m_v, o_kv, m_kv = state_pass_program(
        cu_seqlens, chunk_offsets, T, H, HV, K, V, BT, BK, BV)
    b_dh = load_state(dht, i_nh, o_kv, m_kv, K, V, BK, BV, USE_DHT)
    for i_r in range(0, NT):
        i_c = NT - 1 - i_r
        tl.store(dh + ((boh + i_c) * HV + i_hv) * K * V + o_kv, b_dh, mask=m_kv)
        tok, m_t, b_q, b_k, _, b_gl, b_eg, b_kd, _, _, b_T, b_A = load_chunk(
            q, k, beta, Gc, Aqk, Tinv, rstd_q, rstd_k, bos, seq_len, i_c, i_h, i_hv,
            H, HV, K, BT, BK, USE_L2NORM, USE_SIGMOID)
        m_tv = m_t[:, None] & m_v[None, :]
        b_do = tl.load(do + ((tok * HV + i_hv) * V)[:, None] + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)

        b_w = tl.dot(b_T, b_k * b_eg, input_precision=DOT_PREC)
        b_dvn = tl.dot(tl.trans(b_A), b_do, input_precision=DOT_PREC) + tl.dot(b_kd, b_dh, input_precision=DOT_PREC)
        b_dh = (b_dh * tl.exp2(b_gl)[:, None]
                + tl.dot(tl.trans(b_q * b_eg * scale), b_do, input_precision=DOT_PREC)
                - tl.dot(tl.trans(b_w), b_dvn, input_precision=DOT_PREC))
    if USE_H0:
        tl.store(dh0 + i_nh * K * V + o_kv, b_dh, mask=m_kv)
