"""RMSNorm over rows of D channels, optionally times a sigmoid gate (the KDA layer's output path).

out[r, :] = weight * x[r, :] / sqrt(mean(x[r, :]^2) + eps) (* sigmoid(gate[r, :]) with HAS_GATE) over rows r
(B*T*H head rows or B*T hidden rows) in fp32; gated: one rounding; plain: Qwen3's two (normalised row, then
the weight product) so a converted student matches its teacher. Grid (cdiv(N, BR),): BR rows of BD >= D
channels per program. Reads x [N, D], gate [N, D], weight [D]; writes out [N, D] in x's dtype.
"""
import triton
import triton.language as tl

from ..._launch import launch


@triton.jit(do_not_specialize=["N"])
def gated_rms_norm_fwd_kernel(x, gate, weight, out, eps, N, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
                              HAS_GATE: tl.constexpr):
    i_r = tl.program_id(0)
    o_r = i_r.to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m = (o_r < N)[:, None] & m_d[None, :]
    o_x = o_r[:, None] * D + o_d[None, :]

    b_x = tl.load(x + o_x, mask=m, other=0.).to(tl.float32)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
    b_w = tl.load(weight + o_d, mask=m_d, other=0.).to(tl.float32)
    if HAS_GATE:
        b_o = b_x * b_rstd[:, None] * b_w[None, :]
        b_o *= tl.sigmoid(tl.load(gate + o_x, mask=m, other=0.).to(tl.float32))
    else:   # Qwen3's rounding: the normalised row in x's dtype, then the product with weight rounded again
        b_o = (b_x * b_rstd[:, None]).to(out.dtype.element_ty).to(tl.float32) * b_w[None, :]
    tl.store(out + o_x, b_o.to(out.dtype.element_ty), mask=m)


def launch_gated_rms_norm_fwd(x, gate, weight, out, eps: float) -> None:
    """Launch the kernel on contiguous x, gate (or None: no gate), out (N rows of D) and weight [D]."""
    D = weight.shape[0]
    N = x.numel() // D
    BD = triton.next_power_of_2(D)
    BR = max(1, min(4096 // BD, triton.next_power_of_2(N)))
    launch(gated_rms_norm_fwd_kernel, (triton.cdiv(N, BR),),
        x, gate if gate is not None else x, weight, out, eps, N, D=D, BR=BR, BD=BD, HAS_GATE=gate is not None,
        num_warps=4 if BR * BD >= 2048 else 2)
