"""Depthwise causal conv over packed q/k/v projections, split into per-head q, k, v (GQA heads repeated).

y[t, c] = act(bias[c] + sum_j weight[c, j] * x[t - (W-1) + j, c]), tokens t < 0 read the tail (zeros without
one), fp32 accumulation and one rounding. Grid (cdiv(T, BT), 3*H, B): segment s = 0/1/2 of axis 1 writes
q/k/v head h, reading input head h (q) or h // (H // HKV) (k, v). Reads x [B, T, C] (any batch/token strides:
a column slice of a wider projection), weight [C, W], bias [C], tail [B, C, W-1]; writes q, k, v [B, T, H, D].
"""
import triton
import triton.language as tl

from ..._launch import launch


@triton.jit(do_not_specialize=["T", "SXB"])
def conv_heads_fwd_kernel(x, weight, bias, tail, q, k, v, T, SXB, SXT,
                          H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, W: tl.constexpr,
                          BT: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TAIL: tl.constexpr,
                          USE_SILU: tl.constexpr):
    i_t, i_sh, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_s, i_h = i_sh // H, i_sh % H
    C: tl.constexpr = (H + 2 * HKV) * D
    # first input channel of the head: q head i_h, or k/v head i_h // (H // HKV) after the H q heads
    i_head = tl.where(i_s == 0, i_h, H + (i_s - 1) * HKV + i_h // (H // HKV))
    o_c = i_head.to(tl.int64) * D + tl.arange(0, BD)
    m_d = tl.arange(0, BD) < D
    o_t = (i_t * BT + tl.arange(0, BT)).to(tl.int64)

    b_y = tl.zeros([BT, BD], dtype=tl.float32)
    if HAS_BIAS:
        b_y += tl.load(bias + o_c, mask=m_d, other=0.).to(tl.float32)[None, :]
    for j in tl.static_range(W):
        o_src = o_t + (j - (W - 1))
        m_x = (o_src >= 0) & (o_src < T)
        p_x = x + i_b * SXB + o_src[:, None] * SXT + o_c[None, :]
        b_x = tl.load(p_x, mask=m_x[:, None] & m_d[None, :], other=0.).to(tl.float32)
        if HAS_TAIL:
            m_p = o_src < 0
            p_p = tail + (i_b * C + o_c[None, :]) * (W - 1) + (o_src + (W - 1))[:, None]
            b_x += tl.load(p_p, mask=m_p[:, None] & m_d[None, :], other=0.).to(tl.float32)
        b_w = tl.load(weight + o_c * W + j, mask=m_d, other=0.).to(tl.float32)
        b_y += b_x * b_w[None, :]
    if USE_SILU:
        b_y = b_y * tl.sigmoid(b_y)

    if i_s == 0:
        p_o = q
    elif i_s == 1:
        p_o = k
    else:
        p_o = v
    o_o = ((i_b * T + o_t) * H + i_h)[:, None] * D + tl.arange(0, BD)[None, :]
    tl.store(p_o + o_o, b_y.to(p_o.dtype.element_ty), mask=(o_t < T)[:, None] & m_d[None, :])


def launch_conv_heads_fwd(x, weight, bias, tail, q, k, v, num_kv_heads: int, use_silu: bool) -> None:
    """Launch the kernel on x [B, T, C] (unit channel stride), contiguous weight [C, W], bias [C] or None,
    tail [B, C, W-1] or None, writing the contiguous outputs q, k, v [B, T, H, D]."""
    B, T, H, D = q.shape
    W = weight.shape[1]
    BD = triton.next_power_of_2(D)
    BT = min(max(16, 4096 // BD), triton.next_power_of_2(T))
    has_tail = tail is not None and W > 1
    launch(conv_heads_fwd_kernel, (triton.cdiv(T, BT), 3 * H, B),
        x, weight, bias if bias is not None else x, tail if has_tail else x, q, k, v, T, x.stride(0), x.stride(1),
        H=H, HKV=num_kv_heads, D=D, W=W, BT=BT, BD=BD, HAS_BIAS=bias is not None, HAS_TAIL=has_tail,
        USE_SILU=use_silu, num_warps=4 if BT * BD >= 2048 else 2)
