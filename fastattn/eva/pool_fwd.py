"""FlashEVA landmark pooling, forward.

Per complete chunk c and kv head: kl_c = sum_m softmax_m(mu.k_m) k_m and
vl_c = sum_m softmax_m(s (phi.k_m - |k_m|^2 / 2)) v_m, by an online softmax over token tiles of BS.
Grid (chunk groups of NCB, Hkv, B); reads k, v, mu, phi once; writes k_lm, v_lm [B, N_LM, Hkv, D]
(k's dtype) and the two per-chunk log2-sum-exps lm_lse [B, N_LM, Hkv, 2] fp32 for the backward.
"""
import triton
import triton.language as tl

from ._common import K_LOG2E, seq_layout, store_rows


@triton.jit
def chunk_group(i_blk, i_hk, seq_len, mu, phi, C, D: tl.constexpr, NCB: tl.constexpr, BS: tl.constexpr,
                BD: tl.constexpr):
    """(o_c, m_c, o_s, o_d, m_d, b_mu, b_phi) of a program over chunks i_blk * NCB + [0, NCB) of kv head
    i_hk: chunk ids and which are complete, token / feature offsets, and mu, phi of the head in fp32."""
    o_c = i_blk * NCB + tl.arange(0, NCB)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_mu = tl.load(mu + i_hk * D + o_d, mask=m_d, other=0.).to(tl.float32)
    b_phi = tl.load(phi + i_hk * D + o_d, mask=m_d, other=0.).to(tl.float32)
    return o_c, o_c < seq_len // C, tl.arange(0, BS), o_d, m_d, b_mu, b_phi


@triton.jit
def load_chunk_tile(x, bos, o_c, s, m, i_hk, o_d, m_d, C, HKV: tl.constexpr, D: tl.constexpr):
    """Tokens s of chunks o_c as a [NCB, BS, BD] fp32 tile (0 where masked)."""
    tok = bos + o_c[:, None] * C + s[None, :]
    p = x + ((tok * HKV + i_hk) * D)[:, :, None] + o_d[None, None, :]
    return tl.load(p, mask=m[:, :, None] & m_d[None, None, :], other=0.).to(tl.float32)


@triton.jit
def pool_tile(k, v, bos, o_c, m_c, s, i_hk, o_d, m_d, b_mu2, b_phi, v_scale2, C, HKV: tl.constexpr,
              D: tl.constexpr):
    """Tokens s of chunks o_c: (mask m, fp32 tiles b_k, b_v [NCB, BS, BD], log2-unit logits z_k, z_v of
    both poolings, -inf where m is False)."""
    m = m_c[:, None] & (s < C)[None, :]
    b_k = load_chunk_tile(k, bos, o_c, s, m, i_hk, o_d, m_d, C, HKV, D)
    b_v = load_chunk_tile(v, bos, o_c, s, m, i_hk, o_d, m_d, C, HKV, D)
    z_k = tl.sum(b_k * b_mu2[None, None, :], 2)
    z_v = (tl.sum(b_k * b_phi[None, None, :], 2) - 0.5 * tl.sum(b_k * b_k, 2)) * v_scale2
    return m, b_k, b_v, tl.where(m, z_k, float("-inf")), tl.where(m, z_v, float("-inf"))


@triton.jit
def pool_step(acc, m_i, l_i, z, b_x):
    """One online-softmax step of the per-chunk weighted sum acc [NCB, BD] with logits z over tile b_x."""
    m_new = tl.maximum(m_i, tl.max(z, 1))
    p = tl.exp2(z - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * b_x, 1)
    return acc, m_new, l_i


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
    o_c, m_c, o_s, o_d, m_d, b_mu, b_phi = chunk_group(i_blk, i_hk, seq_len, mu, phi, C, D, NCB, BS, BD)
    b_mu2 = b_mu * K_LOG2E

    m_k = tl.full([NCB], -1e30, dtype=tl.float32)
    m_v = tl.full([NCB], -1e30, dtype=tl.float32)
    l_k = tl.zeros([NCB], dtype=tl.float32)
    l_v = tl.zeros([NCB], dtype=tl.float32)
    acc_k = tl.zeros([NCB, BD], dtype=tl.float32)
    acc_v = tl.zeros([NCB, BD], dtype=tl.float32)
    for i in range(0, C, BS):
        m, b_k, b_v, z_k, z_v = pool_tile(k, v, bos, o_c, m_c, i + o_s, i_hk, o_d, m_d, b_mu2, b_phi, v_scale2,
                                          C, HKV, D)
        acc_k, m_k, l_k = pool_step(acc_k, m_k, l_k, z_k, b_k)
        acc_v, m_v, l_v = pool_step(acc_v, m_v, l_v, z_v, b_v)

    l_k = tl.where(m_c, l_k, 1.)
    l_v = tl.where(m_c, l_v, 1.)
    store_rows(k_lm, acc_k / l_k[:, None], lm_bos + o_c, i_hk, m_c, o_d, m_d, HKV, D)
    store_rows(v_lm, acc_v / l_v[:, None], lm_bos + o_c, i_hk, m_c, o_d, m_d, HKV, D)
    o_row = (lm_bos + o_c) * HKV + i_hk
    tl.store(lm_lse + o_row * 2, m_k + tl.log2(l_k), mask=m_c)
    tl.store(lm_lse + o_row * 2 + 1, m_v + tl.log2(l_v), mask=m_c)
