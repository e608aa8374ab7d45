"""Triton helpers shared by the KDA kernels: program prologues, gate parameters, in-kernel gate, beta
sigmoid and l2norm (fwd and bwd).

All math in fp32; offsets int64. The gate returns the natural-log decay g <= 0; kernels multiply by LOG2E
themselves before exp2.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def seq_program(cu_seqlens, T, H: tl.constexpr, HV: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Prologue of the (V tiles, N*HV)-grid kernels: (i_v, i_nh, i_n, i_hv, i_h, bos, seq_len), int64.

    bos / seq_len: first token and length of sequence i_n (from cu_seqlens, else i_n*T and T)."""
    i_v, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        bos = i_n * T
        seq_len = i_n * 0 + T
    return i_v, i_nh, i_n, i_hv, i_h, bos, seq_len


@triton.jit
def state_tile(i_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Offsets and masks of state tile i_v [BK, BV] (all K rows, columns i_v*BV...) of a row-major [K, V] state:
    (o_k, o_v, m_k, m_v, m_kv, o_kv); int32 (a tile offset is below K*V), callers add int64 bases."""
    o_k = tl.arange(0, BK)
    o_v = (i_v * BV).to(tl.int32) + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    return o_k, o_v, m_k, m_v, m_k[:, None] & m_v[None, :], o_k[:, None] * V + o_v[None, :]


@triton.jit
def load_state(p, i_nh, o_kv, m_kv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               USE: tl.constexpr):
    """fp32 state tile [BK, BV] of program i_nh from p [N*HV, K, V]; zeros without USE."""
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE:
        b_s += tl.load(p + i_nh * K * V + o_kv, mask=m_kv, other=0.)
    return b_s


@triton.jit
def chunk_program(chunk_indices, cu_seqlens, H: tl.constexpr, HV: tl.constexpr, BT: tl.constexpr):
    """Prologue of the (chunks, HV)-grid kernels: (i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t), int64.

    Program i_t is chunk i_c of sequence i_n; tok are the token ids of its BT rows, m_t marks valid rows."""
    i_t, i_hv = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    return chunk_of(chunk_indices, cu_seqlens, i_t, i_hv, H, HV, BT)


@triton.jit
def chunk_tile_program(chunk_indices, cu_seqlens, H: tl.constexpr, HV: tl.constexpr, BT: tl.constexpr,
                       NJ: tl.constexpr):
    """Prologue of the (chunks * NJ, HV)-grid kernels, the NJ tile programs of a chunk adjacent in launch order (they
    share the chunk's operands in L2): (i_j, then chunk_program's tuple); i_j int32."""
    i_tj = tl.program_id(0)
    i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t = chunk_of(chunk_indices, cu_seqlens, (i_tj // NJ).to(tl.int64),
                                                              tl.program_id(1).to(tl.int64), H, HV, BT)
    return i_tj % NJ, i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t


@triton.jit
def chunk_of(chunk_indices, cu_seqlens, i_t, i_hv, H: tl.constexpr, HV: tl.constexpr, BT: tl.constexpr):
    """chunk_program's tuple for chunk i_t and value head i_hv (int64)."""
    i_h = i_hv // (HV // H)
    i_n = tl.load(chunk_indices + 2 * i_t).to(tl.int64)
    i_c = tl.load(chunk_indices + 2 * i_t + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    o_t = tl.arange(0, BT)
    tok = bos + i_c * BT + o_t
    m_t = (i_c * BT + o_t) < seq_len
    return i_t, i_n, i_c, i_hv, i_h, bos, seq_len, tok, m_t


@triton.jit
def load_gate_params(A_log, dt_bias, i_hv, o_k, m_k, K: tl.constexpr, BK: tl.constexpr,
                     HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(a, b) of the in-kernel gate of value head i_hv on channels o_k: a = exp(A_log) (1 without A_log),
    b = dt_bias row [BK] (0 without dt_bias)."""
    if HAS_A:
        b_a = tl.exp(tl.load(A_log + i_hv).to(tl.float32))
    else:
        b_a = 1.0
    if HAS_BIAS:
        b_bias = tl.load(dt_bias + i_hv * K + o_k, mask=m_k, other=0.).to(tl.float32)
    else:
        b_bias = tl.zeros([BK], dtype=tl.float32)
    return b_a, b_bias


@triton.jit
def load_beta(beta, tok, m_t, i_hv, HV: tl.constexpr, USE_SIGMOID: tl.constexpr):
    """beta of the rows of one chunk in fp32 (0 on invalid rows), through the sigmoid when asked."""
    b_beta = tl.load(beta + tok * HV + i_hv, mask=m_t, other=0.).to(tl.float32)
    if USE_SIGMOID:
        b_beta = tl.where(m_t, tl.sigmoid(b_beta), 0.)
    return b_beta


@triton.jit
def load_rstd(rstd_q, rstd_k, tok, m_t, i_hv, HV: tl.constexpr, BT: tl.constexpr, USE_L2NORM: tl.constexpr):
    """l2norm factors (rq, rk) [BT] of the rows tok of value head i_hv, fp32 (ones without USE_L2NORM)."""
    if USE_L2NORM:
        b_rq = tl.load(rstd_q + tok * HV + i_hv, mask=m_t, other=0.)
        b_rk = tl.load(rstd_k + tok * HV + i_hv, mask=m_t, other=0.)
    else:
        b_rq = tl.full([BT], 1.0, dtype=tl.float32)
        b_rk = tl.full([BT], 1.0, dtype=tl.float32)
    return b_rq, b_rk


@triton.jit
def load_qk_tile(q, k, rstd_q, rstd_k, row, tok, m_t, o_t, i_h, i_hv, c0, H: tl.constexpr, HV: tl.constexpr,
                 K: tl.constexpr, BK: tl.constexpr, USE_L2NORM: tl.constexpr):
    """fp32 q and k tiles [BT, BK] (columns c0 ...) of the chunk starting at token row, l2-normalised when asked
    (rstd of value head i_hv), and their mask."""
    b_q, m = load_row_tile(q + row * H * K + i_h * K, o_t, m_t, H * K, c0, K, BK)
    b_k, m = load_row_tile(k + row * H * K + i_h * K, o_t, m_t, H * K, c0, K, BK)
    if USE_L2NORM:
        b_q = b_q * tl.load(rstd_q + tok * HV + i_hv, mask=m_t, other=0.)[:, None]
        b_k = b_k * tl.load(rstd_k + tok * HV + i_hv, mask=m_t, other=0.)[:, None]
    return b_q, b_k, m


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
def gate_grad_tile(g, A_log, dt_bias, x_b, o_t, m_t, m, i_hv, o_k, m_k, c0, b_dg, HV: tl.constexpr, K: tl.constexpr,
                   BK: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr,
                   LB: tl.constexpr):
    """Gate backward of one [BT, BK] tile (raw gate rows o_t, columns c0 ... at g + x_b) given dL/dg:
    (dL/dx, zero outside the mask m; the tile's sum of the dL/dA_log terms)."""
    p_g, _ = row_tile(g + x_b, o_t, m_t, HV * K, c0, K, BK)
    b_x = tl.load(p_g, mask=m, other=0.).to(tl.float32)
    b_a, b_bias = load_gate_params(A_log, dt_bias, i_hv, o_k, m_k, K, BK, HAS_A, HAS_BIAS)
    b_dx, b_dal = gate_bwd(b_x, b_a, b_bias[None, :], b_dg, HAS_LB, LB)
    return tl.where(m, b_dx, 0.), tl.sum(tl.sum(tl.where(m, b_dal, 0.), axis=1), axis=0)


@triton.jit
def l2norm_rstd(x):
    """1 / sqrt(sum(x^2) + eps) along the last axis of a 2-D block x (fp32)."""
    return 1.0 / tl.sqrt(tl.sum(x * x, axis=1) + 1e-6)


@triton.jit
def l2norm_bwd(x, rstd, dy):
    """Backward of y = x * rstd[:, None] for 2-D blocks: dx = rstd * (dy - y * sum(dy * y))."""
    y = x * rstd[:, None]
    return rstd[:, None] * (dy - y * tl.sum(dy * y, axis=1)[:, None])


@triton.jit
def row_tile(base, o_t, m_t, stride: tl.constexpr, c0, NCOL: tl.constexpr, BCOL: tl.constexpr):
    """Pointers and mask of the [len(o_t), BCOL] tile at rows o_t, columns c0 ... of a row-major matrix with
    row stride `stride` and NCOL columns starting at `base` (a scalar pointer carrying every int64 offset);
    the in-tile offsets stay int32, which keeps the pointer tiles out of extra registers."""
    o_c = c0 + tl.arange(0, BCOL)
    return base + (o_t[:, None] * stride + o_c[None, :]), m_t[:, None] & (o_c < NCOL)[None, :]


@triton.jit
def load_row_tile(base, o_t, m_t, stride: tl.constexpr, c0, NCOL: tl.constexpr, BCOL: tl.constexpr):
    """row_tile's tile loaded in fp32 (0 outside the mask), and its mask."""
    p_x, m_x = row_tile(base, o_t, m_t, stride, c0, NCOL, BCOL)
    return tl.load(p_x, mask=m_x, other=0.).to(tl.float32), m_x


@triton.jit
def load_pass_chunk(w, qg, kd, Aqk, Gc, bos, seq_len, i_c, i_hv, o_t, o_k, m_k, HV: tl.constexpr, K: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr):
    """Operands of chunk i_c in the two sequential state passes, in their stored dtypes:
    (row = first token, m_t, W, qg, kd [BT, BK], Aqk [BT, BT], G_last [BK])."""
    row = bos + i_c * BT
    m_t = (i_c * BT + o_t) < seq_len
    last = bos + tl.minimum(i_c * BT + BT, seq_len) - 1
    x_b = row * HV * K + i_hv * K
    p_x, m_tk = row_tile(w + x_b, o_t, m_t, HV * K, 0, K, BK)
    b_w = tl.load(p_x, mask=m_tk, other=0.)
    p_x, m_tk = row_tile(qg + x_b, o_t, m_t, HV * K, 0, K, BK)
    b_q = tl.load(p_x, mask=m_tk, other=0.)
    p_x, m_tk = row_tile(kd + x_b, o_t, m_t, HV * K, 0, K, BK)
    b_kd = tl.load(p_x, mask=m_tk, other=0.)
    p_a, m_a = row_tile(Aqk + row * HV * BT + i_hv * BT, o_t, m_t, HV * BT, 0, BT, BT)
    b_A = tl.load(p_a, mask=m_a, other=0.)
    b_gl = tl.load(Gc + (last * HV + i_hv) * K + o_k, mask=m_k, other=0.)
    return row, m_t, b_w, b_q, b_kd, b_A, b_gl
