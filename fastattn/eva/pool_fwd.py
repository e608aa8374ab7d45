"""FlashEVA landmark pooling, forward.

Per complete chunk c and kv head: kl_c = sum_m softmax_m(mu.k_m) k_m and
vl_c = sum_m softmax_m(s (phi.k_m - |k_m|^2 / 2)) v_m, by an online softmax over token tiles of BS.
Grid (chunk groups of NCB, Hkv, B); reads k, v, mu, phi once; writes k_lm, v_lm [B, N_LM, Hkv, D]
(k's dtype) and the two per-chunk log2-sum-exps lm_lse [B, N_LM, Hkv, 2] fp32 for the backward.
"""
import triton
import triton.language as tl

from ._common import K_LOG2E, seq_layout


@triton.jit
def pool_logits(b_k, b_mu2, b_phi, m, v_scale2):
    """Log2-unit logits of both poolings for a [NCB, BS, BD] key tile (-inf where m is False)."""
    z_k = tl.sum(b_k * b_mu2[None, None, :], 2)
    z_v = (tl.sum(b_k * b_phi[None, None, :], 2) - 0.5 * tl.sum(b_k * b_k, 2)) * v_scale2
    return tl.where(m, z_k, float("-inf")), tl.where(m, z_v, float("-inf"))


@triton.jit
def load_chunk_tile(x, bos, o_c, s, m, i_hk, o_d, m_d, C, HKV: tl.constexpr, D: tl.constexpr):
    """Tokens s of chunks o_c as a [NCB, BS, BD] fp32 tile (0 where masked)."""
    tok = bos + o_c[:, None] * C + s[None, :]
    p = x + ((tok * HKV + i_hk) * D)[:, :, None] + o_d[None, None, :]
    return tl.load(p, mask=m[:, :, None] & m_d[None, None, :], other=0.).to(tl.float32)


@triton.jit(do_not_specialize=["T", "N_LM", "C"])
def eva_pool_fwd_kernel(k, v, mu, phi, k_lm, v_lm, lm_lse, cu_seqlens, lm_offsets, blk_seq, blk_idx,
                        v_scale2, T, N_LM, C,
                        HKV: tl.constexpr, D: tl.constexpr, NCB: tl.constexpr, BS: tl.constexpr,
                        BD: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_z, i_hk, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_blk, bos, seq_len, lm_bos = seq_layout(cu_seqlens, lm_offsets, blk_seq, blk_idx, i_b, i_z, T, N_LM,
                                                  IS_VARLEN)
    if i_n < 0:
        return
    o_c = i_blk * NCB + tl.arange(0, NCB)
    m_c = o_c < seq_len // C
    o_s = tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_mu2 = tl.load(mu + i_hk * D + o_d, mask=m_d, other=0.).to(tl.float32) * K_LOG2E
    b_phi = tl.load(phi + i_hk * D + o_d, mask=m_d, other=0.).to(tl.float32)

    m_k = tl.full([NCB], -1e30, dtype=tl.float32)
    m_v = tl.full([NCB], -1e30, dtype=tl.float32)
    l_k = tl.zeros([NCB], dtype=tl.float32)
    l_v = tl.zeros([NCB], dtype=tl.float32)
    acc_k = tl.zeros([NCB, BD], dtype=tl.float32)
    acc_v = tl.zeros([NCB, BD], dtype=tl.float32)
    for i in range(0, C, BS):
        s = i + o_s
        m = m_c[:, None] & (s < C)[None, :]
        b_k = load_chunk_tile(k, bos, o_c, s, m, i_hk, o_d, m_d, C, HKV, D)
        b_v = load_chunk_tile(v, bos, o_c, s, m, i_hk, o_d, m_d, C, HKV, D)
        z_k, z_v = pool_logits(b_k, b_mu2, b_phi, m, v_scale2)
        mk_new = tl.maximum(m_k, tl.max(z_k, 1))
        p_k = tl.exp2(z_k - mk_new[:, None])
        a_k = tl.exp2(m_k - mk_new)
        l_k = l_k * a_k + tl.sum(p_k, 1)
        acc_k = acc_k * a_k[:, None] + tl.sum(p_k[:, :, None] * b_k, 1)
        m_k = mk_new
        mv_new = tl.maximum(m_v, tl.max(z_v, 1))
        p_v = tl.exp2(z_v - mv_new[:, None])
        a_v = tl.exp2(m_v - mv_new)
        l_v = l_v * a_v + tl.sum(p_v, 1)
        acc_v = acc_v * a_v[:, None] + tl.sum(p_v[:, :, None] * b_v, 1)
        m_v = mv_new

    l_k = tl.where(m_c, l_k, 1.)
    l_v = tl.where(m_c, l_v, 1.)
    o_row = (lm_bos + o_c) * HKV + i_hk
    m_out = m_c[:, None] & m_d[None, :]
    tl.store(k_lm + o_row[:, None] * D + o_d[None, :], (acc_k / l_k[:, None]).to(k_lm.dtype.element_ty), mask=m_out)
    tl.store(v_lm + o_row[:, None] * D + o_d[None, :], (acc_v / l_v[:, None]).to(v_lm.dtype.element_ty), mask=m_out)
    tl.store(lm_lse + o_row * 2, m_k + tl.log2(l_k), mask=m_c)
    tl.store(lm_lse + o_row * 2 + 1, m_v + tl.log2(l_v), mask=m_c)
