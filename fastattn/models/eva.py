"""EVA mixer: the Qwen3 attention layer computing FlashEVA (DESIGN.md section 3) with learned mu/phi.

Without a cache (training) it calls ``fastattn.flash_eva``. With a cache it fills a
``fastattn.EvaCache`` (window + landmarks) on the first call and decodes the following tokens through
it, which equals one ``flash_eva`` over the whole sequence.
"""
from typing import Optional

import torch
from torch import nn

from ..eva import flash_eva
from .attention import AttentionMixer, StepInfo
from .cache import EVALayerCache
from .config import HybridConfig


class EVAMixer(AttentionMixer):
    """Attention layer with FlashEVA; adds ``mu, phi [Hkv, D]`` (zero at init: mean-key landmarks)."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.window = config.eva_window_size
        self.chunk = config.eva_chunk_size
        self.local = config.eva_local
        self.mu = nn.Parameter(torch.zeros(self.num_kv_heads, self.head_dim))
        self.phi = nn.Parameter(torch.zeros(self.num_kv_heads, self.head_dim))

    @torch.no_grad()
    def reset_eva_parameters(self) -> None:
        self.mu.zero_()
        self.phi.zero_()

    def forward(self, x: torch.Tensor, info: StepInfo, cache: Optional[EVALayerCache] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, info)
        kwargs = dict(mu=self.mu, phi=self.phi, softmax_scale=self.head_dim ** -0.5)
        if cache is None:
            o = flash_eva(q, k, v, window_size=self.window, chunk_size=self.chunk, local=self.local, **kwargs)
        elif cache.length == 0:
            o = cache.eva.prefill(q, k, v, **kwargs)
        else:
            o = cache.eva.decode(q, k, v, **kwargs)
        if cache is not None:
            cache.record(k)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))
