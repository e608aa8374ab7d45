"""Qwen3 attention mixer (GQA, per-head q/k RMSNorm, RoPE, SDPA) and the per-call step info."""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import HybridConfig
from .layers import RMSNorm, apply_rope


@dataclass
class StepInfo:
    """What every mixer needs to know about one forward call (built once by the model).

    cos, sin: RoPE tables of the new tokens, ``[T, D]`` (shared) or ``[B, T, D]`` (per row).
    past: tokens already in the cache (pads included). new_valid: ``[B, T]`` bool, False on left
    padding, None when the call has no padding. attn_mask / is_causal: the SDPA mask of the new tokens
    against all cached keys (None + is_causal for a plain causal prefill).
    """
    cos: torch.Tensor
    sin: torch.Tensor
    past: int
    new_valid: Optional[torch.Tensor]
    attn_mask: Optional[torch.Tensor]
    is_causal: bool


def build_attention_mask(past: int, T: int, key_valid: Optional[torch.Tensor], device):
    """SDPA mask ``(attn_mask, is_causal)`` for T new queries after ``past`` cached keys.

    ``key_valid [B, past+T]`` marks real keys; padded queries may attend to themselves so that no row of
    the softmax is empty (their outputs are discarded, but must stay finite).
    """
    if key_valid is None:
        if T == 1:
            return None, False
        if past == 0:
            return None, True
    L = past + T
    q_idx = torch.arange(past, L, device=device)[:, None]
    k_idx = torch.arange(L, device=device)[None, :]
    causal = k_idx <= q_idx                                   # [T, L]
    if key_valid is None:
        return causal, False
    mask = causal[None] & (key_valid[:, None, :] | (k_idx == q_idx)[None])
    return mask[:, None], False                               # [B, 1, T, L]


class AttentionMixer(nn.Module):
    """Qwen3 self-attention: q/k/v/o projections, per-head RMSNorm on q and k, RoPE, causal SDPA with GQA."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = D = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * D, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * D, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(D, config.rms_norm_eps)
        self.k_norm = RMSNorm(D, config.rms_norm_eps)

    def project(self, x: torch.Tensor, info: StepInfo):
        """Position-encoded ``q [B, T, H, D]``, ``k, v [B, T, Hkv, D]``."""
        B, T, _ = x.shape
        D = self.head_dim
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, D))
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, D))
        v = self.v_proj(x).view(B, T, self.num_kv_heads, D)
        return apply_rope(q, info.cos, info.sin), apply_rope(k, info.cos, info.sin), v

    def forward(self, x: torch.Tensor, info: StepInfo, cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, info)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=info.attn_mask, is_causal=info.is_causal,
                                           scale=self.head_dim ** -0.5,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
