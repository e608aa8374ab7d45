"""Triton helpers shared by the KDA kernels: in-kernel gate, beta sigmoid and l2norm, fwd and bwd.

All math in fp32. The gate returns the natural-log decay g <= 0; kernels multiply by LOG2E
themselves before exp2.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def gate_fwd(x, a, b, HAS_LB: tl.constexpr, LB: tl.constexpr):
    """Log-decay from raw gate input x (any shape); a = exp(A_log) (scalar), b = dt_bias (broadcast).

    softplus gate: g = -a * softplus(x + b);  bounded gate: g = LB * sigmoid(a * (x + b)).
    """
    z = x + b
    if HAS_LB:
        s = tl.sigmoid(a * z)
        g = LB * s
    else:
        sp = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
        g = -a * sp
    return g


@triton.jit
def gate_bwd(x, a, b, dg, HAS_LB: tl.constexpr, LB: tl.constexpr):
    """Given dL/dg, return (dL/dx, dL/dA_log elementwise terms); dL/d dt_bias equals dL/dx."""
    z = x + b
    if HAS_LB:
        s = tl.sigmoid(a * z)
        ds = LB * s * tl.sigmoid(-a * z) * dg  # s(1 - s) without the cancellation of 1 - s
        dx = ds * a
        da_log = ds * a * z
    else:
        s = tl.sigmoid(z)
        sp = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
        dx = -a * s * dg
        da_log = -a * sp * dg
    return dx, da_log


@triton.jit
def l2norm_rstd(x):
    """1 / sqrt(sum(x^2) + eps) along the last axis of a 2-D block x (fp32)."""
    return 1.0 / tl.sqrt(tl.sum(x * x, axis=1) + 1e-6)


@triton.jit
def l2norm_bwd(x, rstd, dy):
    """Backward of y = x * rstd[:, None] for 2-D blocks: dx = rstd * (dy - y * sum(dy * y))."""
    y = x * rstd[:, None]
    return rstd[:, None] * (dy - y * tl.sum(dy * y, axis=1)[:, None])
