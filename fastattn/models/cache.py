"""Decoding caches, one per layer, and the model-level cache that holds them.

Byte counts (``nbytes``), for batch B, s = bytes per element of the model dtype, T tokens seen:
- attention (:class:`KVCache`): ``2 * B * Hkv * T * D * s``  (keys and values).
- kda (:class:`KDACache`): ``4 * B * H * D * D`` (fp32 state, one D x D matrix per q head)
  ``+ B * (H + 2 * Hkv) * D * (conv_size - 1) * s`` (the conv tails of q, k and v).
- eva (:class:`EVALayerCache`): ``2 * B * Hkv * (w + n) * D * s`` with w raw window tokens and
  n = floor(T / C) landmarks (see :func:`eva_cache_rows`).
:func:`cache_nbytes` predicts the total from a config without building anything.
"""
from typing import List, Optional

import torch

from .config import HybridConfig


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def eva_cache_rows(config: HybridConfig, seq_len: int):
    """``(w, n)``: raw window rows the next query needs and landmarks kept after ``seq_len`` tokens.

    The next query t = seq_len sees raw tokens from lo(t) = ``floor(t / W) * W`` (block windows) or
    ``C * floor(max(t - W + 1, 0) / C)`` (sliding); every complete chunk keeps its landmark.
    """
    W, C = config.eva_window_size, config.eva_chunk_size
    if config.eva_local == "block":
        lo = (seq_len // W) * W
    else:
        lo = C * (max(seq_len - W + 1, 0) // C)
    return seq_len - lo, seq_len // C


def cache_nbytes(config: HybridConfig, batch: int, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Predicted cache bytes after ``seq_len`` tokens: ``{"attention": .., "kda": .., "eva": .., "total": ..}``.

    Example:
        >>> from fastattn.models import HybridConfig, cache_nbytes
        >>> cache_nbytes(HybridConfig(), 1, 131072)["total"] / 2**30   # Qwen3-0.6B KV at 128K, bf16
        14.0
    """
    s = _itemsize(dtype)
    H, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    per = {
        "attention": 2 * batch * Hkv * seq_len * D * s,
        "kda": 4 * batch * H * D * D + batch * (H + 2 * Hkv) * D * (config.kda_conv_size - 1) * s,
        "eva": 2 * batch * Hkv * sum(eva_cache_rows(config, seq_len)) * D * s,
    }
    out = {m: per[m] * config.count(m) for m in per}
    out["total"] = sum(out.values())
    return out


class KVCache:
    """Keys and values of one attention layer, ``[B, Hkv, capacity, D]``, grown by doubling when full."""

    def __init__(self, capacity: int = 0):
        self.capacity = capacity
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Append ``k, v [B, Hkv, T, D]``; return all keys and values so far (views)."""
        B, Hkv, T, D = k.shape
        need = self.length + T
        if self.k is None and self.capacity <= T:       # prefill with no room reserved: keep k, v as given
            self.k, self.v, self.length = k, v, T
            return k, v
        if self.k is None or need > self.k.shape[2]:
            cap = max(need, self.capacity, 2 * (self.k.shape[2] if self.k is not None else 0))
            new_k = k.new_zeros(B, Hkv, cap, D)
            new_v = v.new_zeros(B, Hkv, cap, D)
            if self.k is not None:
                new_k[:, :, :self.length] = self.k[:, :, :self.length]
                new_v[:, :, :self.length] = self.v[:, :, :self.length]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length:need] = k
        self.v[:, :, self.length:need] = v
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need]

    @property
    def nbytes(self) -> int:
        if self.k is None:
            return 0
        B, Hkv, _, D = self.k.shape
        return 2 * B * Hkv * self.length * D * self.k.element_size()


class KDACache:
    """State of one KDA layer: fp32 recurrent state ``[B, H, D, D]`` and the conv tail ``[B, C, conv_size-1]``."""

    def __init__(self):
        self.state: Optional[torch.Tensor] = None
        self.conv: Optional[torch.Tensor] = None

    @property
    def nbytes(self) -> int:
        total = 0
        for t in (self.state, self.conv):
            if t is not None:
                total += t.numel() * t.element_size()
        return total


class EVALayerCache:
    """One EVA layer: a ``fastattn.EvaCache`` (raw window + landmarks) and the token count it holds.

    ``nbytes`` counts the rows the next query needs plus every landmark kept,
    ``2 * B * Hkv * ((T - lo(T)) + floor(T / C)) * D * s``; the EvaCache's buffers may be larger
    (a window of W + C slots, landmark storage grown by doubling).
    """

    def __init__(self, config: HybridConfig):
        from ..eva import EvaCache
        self.config = config
        self.eva = EvaCache(window_size=config.eva_window_size, chunk_size=config.eva_chunk_size,
                            local=config.eva_local)
        self.length = 0
        self._row_bytes = 0

    def record(self, k: torch.Tensor) -> None:
        """Account for new keys ``k [B, T, Hkv, D]`` (called by the mixer after each call)."""
        B, T, Hkv, D = k.shape
        self.length += T
        self._row_bytes = 2 * B * Hkv * D * k.element_size()

    @property
    def nbytes(self) -> int:
        return self._row_bytes * sum(eva_cache_rows(self.config, self.length))


class HybridCache:
    """Per-layer caches of a :class:`~fastattn.models.HybridLM` plus the token bookkeeping.

    ``length``: tokens seen per row, pads included. ``valid``: ``[B, length]`` bool mask of real tokens,
    or None when no row was padded. ``positions``: ``[B]`` next RoPE position per row (real tokens seen).
    Build one with ``model.new_cache(batch_size, capacity)``; ``forward`` and ``generate`` fill it.
    """

    def __init__(self, config: HybridConfig, batch_size: int, capacity: int = 0):
        self.config = config
        self.batch_size = batch_size
        self.layers: List[object] = []
        for mixer in config.layer_types:
            if mixer == "attention":
                self.layers.append(KVCache(capacity))
            elif mixer == "kda":
                self.layers.append(KDACache())
            else:
                self.layers.append(EVALayerCache(config))
        self.length = 0
        self.valid: Optional[torch.Tensor] = None
        self.positions: Optional[torch.Tensor] = None

    def layer_nbytes(self) -> List[int]:
        """Bytes held by each layer's cache."""
        return [c.nbytes for c in self.layers]

    @property
    def nbytes(self) -> int:
        """Bytes held by all layer caches (see the module docstring for the formula)."""
        return sum(self.layer_nbytes())

    def nbytes_by_mixer(self) -> dict:
        """``{"attention": .., "kda": .., "eva": .., "total": ..}`` bytes currently held."""
        out = {"attention": 0, "kda": 0, "eva": 0}
        for mixer, n in zip(self.config.layer_types, self.layer_nbytes()):
            out[mixer] += n
        out["total"] = sum(out.values())
        return out


__all__ = ["KVCache", "KDACache", "EVALayerCache", "HybridCache", "cache_nbytes", "eva_cache_rows"]
