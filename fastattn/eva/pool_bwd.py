"""FlashEVA landmark pooling, backward (accumulates into dk, dv in place).

alpha = softmax(mu.k), beta = softmax(s (phi.k - |k|^2/2)) per chunk, a_m = alpha_m (k_m.dkl - kl.dkl), b_m = beta_m
(v_m.dvl - vl.dvl): dk_m += alpha_m dkl + a_m mu + s b_m (phi - k_m), dv_m += beta_m dvl, dmu += sum a_m k_m, dphi +=
s sum b_m k_m (kl.dkl, vl.dvl re-summed in fp32). Grid (chunk groups of NCB, Hkv, B). Reads k, v, mu, phi, lm_lse,
dk_lm, dv_lm (NSEG slices), dk, dv; writes dk, dv (whole chunks) and per-program partial dmu, dphi [B, NZ, Hkv, D].
"""
import triton
import triton.language as tl

from ._common import K_LOG2E, load_rows, segment_rows, seq_layout
from .pool_fwd import chunk_group, pool_tile


@triton.jit
def add_tile(x, tok, g, m, i_hk, o_d, m_d, HKV: tl.constexpr, D: tl.constexpr):
    """x[tok, i_hk] += g for a [NCB, BS, BD] tile of tokens (read-modify-write where m)."""
    o_x = ((tok * HKV + i_hk) * D)[:, :, None] + o_d[None, None, :]
    m_x = m[:, :, None] & m_d[None, None, :]
    tl.store(x + o_x, (tl.load(x + o_x, mask=m_x, other=0.).to(tl.float32) + g).to(x.dtype.element_ty), mask=m_x)


@triton.jit(do_not_specialize=["T", "N_LM", "C"])
def eva_pool_bwd_kernel(k, v, mu, phi, lm_lse, dk_lm, dv_lm, dk, dv, dmu_part, dphi_part,
                        cu_seqlens, lm_offsets, blk_seq, blk_idx, scale, v_scale2, T, N_LM, C,
                        HKV: tl.constexpr, D: tl.constexpr, NCB: tl.constexpr, BS: tl.constexpr,
                        BD: tl.constexpr, IS_VARLEN: tl.constexpr, NSEG: tl.constexpr):
    i_z, i_hk, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_blk, bos, seq_len, lm_bos = seq_layout(cu_seqlens, lm_offsets, blk_seq, blk_idx, i_b, i_z, T, N_LM,
                                                  IS_VARLEN)
    if i_n < 0:
        return
    o_c, m_c, o_s, o_d, m_d, b_mu, b_phi = chunk_group(i_blk, i_hk, seq_len, mu, phi, C, D, NCB, BS, BD)
    b_mu2 = b_mu * K_LOG2E
    b_dkl = load_rows(dk_lm, lm_bos + o_c, i_hk, m_c, o_d, m_d, HKV, D).to(tl.float32)
    b_dvl = load_rows(dv_lm, lm_bos + o_c, i_hk, m_c, o_d, m_d, HKV, D).to(tl.float32)
    for i_s in range(1, NSEG):
        rows = segment_rows(i_s, N_LM) + lm_bos + o_c
        b_dkl += load_rows(dk_lm, rows, i_hk, m_c, o_d, m_d, HKV, D).to(tl.float32)
        b_dvl += load_rows(dv_lm, rows, i_hk, m_c, o_d, m_d, HKV, D).to(tl.float32)
    o_row = (lm_bos + o_c) * HKV + i_hk
    lse_k = tl.load(lm_lse + o_row * 2, mask=m_c, other=0.)
    lse_v = tl.load(lm_lse + o_row * 2 + 1, mask=m_c, other=0.)

    # pass 1: kl.dkl and vl.dvl per chunk, from the tokens
    kd = tl.zeros([NCB], dtype=tl.float32)
    vd = tl.zeros([NCB], dtype=tl.float32)
    for i in range(0, C, BS):
        m, b_k, b_v, z_k, z_v = pool_tile(k, v, bos, o_c, m_c, i + o_s, i_hk, o_d, m_d, b_mu2, b_phi, v_scale2,
                                          C, HKV, D)
        kd += tl.sum(tl.exp2(z_k - lse_k[:, None]) * tl.sum(b_k * b_dkl[:, None, :], 2), 1)
        vd += tl.sum(tl.exp2(z_v - lse_v[:, None]) * tl.sum(b_v * b_dvl[:, None, :], 2), 1)

    # pass 2: token gradients
    b_dmu = tl.zeros([BD], dtype=tl.float32)
    b_dphi = tl.zeros([BD], dtype=tl.float32)
    for i in range(0, C, BS):
        s = i + o_s
        m, b_k, b_v, z_k, z_v = pool_tile(k, v, bos, o_c, m_c, s, i_hk, o_d, m_d, b_mu2, b_phi, v_scale2, C, HKV, D)
        alpha = tl.exp2(z_k - lse_k[:, None])
        beta = tl.exp2(z_v - lse_v[:, None])
        a = alpha * (tl.sum(b_k * b_dkl[:, None, :], 2) - kd[:, None])
        b = beta * (tl.sum(b_v * b_dvl[:, None, :], 2) - vd[:, None])
        g_k = (alpha[:, :, None] * b_dkl[:, None, :] + a[:, :, None] * b_mu[None, None, :]
               + (scale * b)[:, :, None] * (b_phi[None, None, :] - b_k))
        tok = bos + o_c[:, None] * C + s[None, :]
        add_tile(dk, tok, g_k, m, i_hk, o_d, m_d, HKV, D)
        add_tile(dv, tok, beta[:, :, None] * b_dvl[:, None, :], m, i_hk, o_d, m_d, HKV, D)
        b_dmu += tl.sum(tl.sum(a[:, :, None] * b_k, 1), 0)
        b_dphi += tl.sum(tl.sum(b[:, :, None] * b_k, 1), 0)

    o_p = ((i_b * tl.num_programs(0) + i_z).to(tl.int64) * HKV + i_hk) * D + o_d
    tl.store(dmu_part + o_p, b_dmu, mask=m_d)
    tl.store(dphi_part + o_p, b_dphi * scale, mask=m_d)
