"""KDA mixer: the Hybrid-KDA layer (DESIGN.md section 5) on top of fastattn.chunk_kda / fused_recurrent_kda.

x -> q/k/v projections of the teacher's shapes (one matmul with the gate down-projections and beta, see
``KDAMixer.in_proj``) -> one depthwise causal conv over [q; k; v] (identity
at init) -> k, v repeated to the q heads (GQA) -> KDA recurrence with q/k L2 norm, the low-rank
per-channel gate ``-exp(A_log) * softplus(f_b(f_a(x)) + dt_bias)`` and ``beta = sigmoid(b_proj(x))``
computed in the kernel -> per-head RMSNorm gated by ``sigmoid(g_b(g_a(x)))`` -> o_proj. No positions.
Conv + split + repeat and the gated RMSNorm go through ``fastattn.models.fused`` (Triton kernels at
inference, the PyTorch reference when autograd needs it).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..kda import chunk_kda, fused_recurrent_kda
from .attention import StepInfo
from .cache import KDACache
from .config import HybridConfig
from .fused import causal_conv_heads, gated_rms_norm
from .fused.api import causal_conv_torch
from .layers import DerivedWeights, RMSNorm

RECURRENT_MAX_T = 15     # calls with fewer new tokens than the smallest chunk run token by token
PAD_LOGIT = -1e4         # beta and gate inputs at padded tokens: beta = 0, decay = 1, state untouched


def conv_tail(x: torch.Tensor, tail: Optional[torch.Tensor], width: int) -> torch.Tensor:
    """The last ``width - 1`` conv inputs ``[B, C, width-1]`` once ``x [B, T, C]`` has followed ``tail``
    (None: zeros, a fresh sequence), contiguous, in x's dtype: the conv state of the next call."""
    B, T, C = x.shape
    keep = width - 1
    xt = x[:, max(T - keep, 0):].transpose(1, 2)
    if xt.shape[2] < keep:   # fewer new tokens than the window: the rest comes from the old tail
        prev = tail.to(x.dtype) if tail is not None else x.new_zeros(B, C, keep)
        xt = torch.cat([prev, xt], dim=2)[:, :, -keep:]
    return xt.contiguous()


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                tail: Optional[torch.Tensor], keep_tail: bool):
    """Depthwise causal conv of ``x [B, T, C]`` with ``weight [C, 1, W]``, continuing from ``tail [B, C, W-1]``
    (None: zeros, a fresh sequence), through the PyTorch reference of ``fused.causal_conv_heads``.

    Returns ``(y [B, T, C], new_tail)``; new_tail (the last W-1 inputs) is None unless ``keep_tail``.
    """
    y = causal_conv_torch(x, weight[:, 0], bias, tail)
    return y, (conv_tail(x, tail, weight.shape[-1]) if keep_tail else None)


class KDAMixer(nn.Module):
    """Kimi Delta Attention layer with teacher-shaped q/k/v/o (copyable from a Qwen3 attention layer).

    State: ``H`` heads (the q heads) of ``D x D``; k and v heads are repeated to H. Parameters beyond the
    teacher's: ``conv_weight/conv_bias`` (identity init), ``f_a, f_b`` (gate, rank r), ``A_log [H]``,
    ``dt_bias [H*D]``, ``b_proj`` (beta logits), ``g_a, g_b`` (output gate, g_b zero so the gate starts at
    0.5) and ``o_norm`` (per-head RMSNorm).
    """

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config
        self.num_heads = H = config.num_attention_heads
        self.num_kv_heads = Hkv = config.num_key_value_heads
        self.head_dim = D = config.head_dim
        hid, r, bias = config.hidden_size, config.gate_rank, config.attention_bias
        self.q_proj = nn.Linear(hid, H * D, bias=bias)
        self.k_proj = nn.Linear(hid, Hkv * D, bias=bias)
        self.v_proj = nn.Linear(hid, Hkv * D, bias=bias)
        self.o_proj = nn.Linear(H * D, hid, bias=bias)
        channels = (H + 2 * Hkv) * D
        self.conv_weight = nn.Parameter(torch.zeros(channels, 1, config.kda_conv_size))
        self.conv_bias = nn.Parameter(torch.zeros(channels))
        self.f_a = nn.Linear(hid, r, bias=False)
        self.f_b = nn.Linear(r, H * D, bias=False)
        self.A_log = nn.Parameter(torch.zeros(H))
        self.dt_bias = nn.Parameter(torch.zeros(H * D))
        self.b_proj = nn.Linear(hid, H, bias=False)
        self.g_a = nn.Linear(hid, r, bias=False)
        self.g_b = nn.Linear(r, H * D, bias=True)
        self.o_norm = RMSNorm(D, config.rms_norm_eps)
        self.derived = DerivedWeights()
        self.reset_kda_parameters()

    @torch.no_grad()
    def reset_kda_parameters(self) -> None:
        """Identity conv, A = U(1, 16), dt = logU(1e-3, 1e-1) (dt_bias = softplus^-1(dt)), zero output gate."""
        self.conv_weight.zero_()
        self.conv_weight[:, 0, -1] = 1.0
        self.conv_bias.zero_()
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0).log())
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1))).clamp_min(1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.g_b.weight.zero_()
        self.g_b.bias.zero_()

    def _in_proj_params(self):
        projs = (self.q_proj, self.k_proj, self.v_proj, self.f_a, self.g_a, self.b_proj)
        return [p.weight for p in projs] + [p.bias for p in projs[:3]]

    def _build_in_proj(self):
        w = self._in_proj_params()
        bias = None
        if w[6] is not None:    # attention_bias: q/k/v biases, none on the gate and beta projections
            bias = torch.cat(w[6:] + [w[6].new_zeros(w[3].shape[0] + w[4].shape[0] + w[5].shape[0])])
        return torch.cat(w[:6]), bias

    def in_proj(self, x: torch.Tensor):
        """All projections of ``x [B, T, hidden]`` as one matmul: ``(qkv, f_a(x), g_a(x), b_proj(x))`` as column
        views of one ``[B, T, (H + 2 Hkv) D + 2 r + H]`` tensor. The concatenated weight is kept between
        inference calls in eval mode (``DerivedWeights``: +(H + 2 Hkv) D + 2 r + H rows of hidden, ~8.7 MB per
        layer at the Qwen3-0.6B shape in bf16) and rebuilt on every call otherwise."""
        w, b = self.derived.get("in_proj", self._in_proj_params(), self._build_in_proj, self.training)
        C = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        r = self.f_a.weight.shape[0]
        return F.linear(x, w, b).split([C, r, r, self.num_heads], dim=-1)

    def _gate_params(self):
        """A_log and dt_bias in fp32 (the kernels' dtype), cast once per parameter state at inference."""
        return self.derived.get("gate", (self.A_log, self.dt_bias), lambda: (self.A_log.float(), self.dt_bias.float()),
                                self.training)

    def train(self, mode: bool = True):
        self.derived.clear()   # see DerivedWeights: eval() starts from the parameters as they are now
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.derived.clear()   # .to() / .cuda() / .half(): do not keep the old device's or dtype's copies alive
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor, info: StepInfo, cache: Optional[KDACache] = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv, f_low, g_low, beta = self.in_proj(x)
        valid = info.new_valid
        if valid is not None:
            qkv = qkv * valid[..., None].to(qkv.dtype)   # pads read as the zeros of a fresh conv tail
        tail = cache.conv if cache is not None else None
        activation = "silu" if self.config.kda_conv_activation == "silu" else None
        q, k, v = causal_conv_heads(qkv, self.conv_weight[:, 0], self.conv_bias, tail, H, Hkv, D, activation)
        if cache is not None:
            tail = conv_tail(qkv, tail, self.conv_weight.shape[-1])
        # 2-D inputs: a 3-D column view would make F.linear add g_b's bias in a separate pass over [B, T, H*D]
        # (0.75 ms per layer at 128K tokens on an H200); on 2-D views cuBLAS reads the row stride and fuses it
        g = self.f_b(f_low.reshape(B * T, -1)).view(B, T, H, D)
        if valid is not None:
            g = g.masked_fill(~valid[..., None, None], PAD_LOGIT)
            beta = beta.masked_fill(~valid[..., None], PAD_LOGIT)
        A_log, dt_bias = self._gate_params()
        kernel_kwargs = dict(
            initial_state=cache.state if cache is not None else None, output_final_state=cache is not None,
            use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
            A_log=A_log, dt_bias=dt_bias, lower_bound=self.config.kda_lower_bound)
        if T <= RECURRENT_MAX_T:
            o, state = fused_recurrent_kda(q, k, v, g, beta, **kernel_kwargs)
        else:
            o, state = chunk_kda(q, k, v, g, beta, chunk_size=self.config.kda_chunk_size, **kernel_kwargs)
        if cache is not None:
            cache.state, cache.conv = state, tail
        gate = self.g_b(g_low.reshape(B * T, -1)).view(B, T, H * D)
        o = gated_rms_norm(o, gate, self.o_norm.weight, self.o_norm.eps)
        return self.o_proj(o)
