"""The thin hybrid decoder: Qwen3 blocks whose token mixer is attention, KDA or EVA per layer."""
import os
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMixer, StepInfo, build_attention_mask
from .cache import HybridCache
from .config import HybridConfig
from .eva import EVAMixer
from .kda import KDAMixer
from .layers import RMSNorm, SwiGLU, rope_cos_sin, rope_inv_freq

MIXER_CLASSES = {"attention": AttentionMixer, "kda": KDAMixer, "eva": EVAMixer}


class DecoderLayer(nn.Module):
    """Pre-norm residual block: ``h += mixer(norm(h)); h += mlp(norm(h))``."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = MIXER_CLASSES[self.mixer_type](config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, h: torch.Tensor, info: StepInfo, cache=None) -> torch.Tensor:
        h = h + self.mixer(self.input_layernorm(h), info, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def _check_mask(attention_mask, B: int, T: int, cache: Optional[HybridCache]):
    """Validate a left-padding mask ``[B, T]``; return it as bool, or None when it has no padding."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask must have the shape of input_ids {(B, T)} (new tokens only), "
                         f"got {tuple(attention_mask.shape)}")
    m = attention_mask.bool()
    if bool(m.all()):
        return None
    if T > 1 and bool((m[:, 1:] < m[:, :-1]).any()):
        raise ValueError("attention_mask must be left padding only (zeros before the first one in each row)")
    if cache is not None and cache.length > 0:
        started = cache.positions > 0 if cache.positions is not None else torch.ones_like(m[:, 0])
        if bool((started[:, None] & ~m).any()):
            raise ValueError("attention_mask: a row that already holds real tokens cannot be padded again")
    return m


class HybridLM(nn.Module):
    """Qwen3-shaped causal LM whose layer mixers follow ``config.layer_types``.

    Args:
        config: a :class:`HybridConfig` (e.g. ``HybridConfig.from_preset("hybrid-kda", num_hidden_layers=8)``).

    Example:
        >>> import torch
        >>> from fastattn.models import HybridConfig, HybridLM
        >>> cfg = HybridConfig.from_preset("attention", vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        ...                                head_dim=16)
        >>> model = HybridLM(cfg)
        >>> model(torch.randint(0, 64, (1, 5))).shape
        torch.Size([1, 5, 64])
    """

    def __init__(self, config: HybridConfig):
        super().__init__()
        if not isinstance(config, HybridConfig):
            raise TypeError(f"config must be a HybridConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config.head_dim, config.rope_theta), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Linear and embedding weights ~ N(0, std), biases 0, norms 1, mixer-specific inits after."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        for layer in self.layers:
            reset = getattr(layer.mixer, "reset_kda_parameters", None) or getattr(layer.mixer,
                                                                                  "reset_eva_parameters", None)
            if reset is not None:
                reset()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, batch_size: int, capacity: int = 0) -> HybridCache:
        """An empty :class:`HybridCache`; ``capacity`` pre-sizes the KV buffers (tokens per row)."""
        return HybridCache(self.config, batch_size, capacity)

    def forward(self, input_ids: torch.Tensor, *, cache: Optional[HybridCache] = None,
                attention_mask: Optional[torch.Tensor] = None, logits_to_keep: int = 0,
                output_hidden_states: bool = False):
        """Logits of ``input_ids [B, T]``, continuing from (and appending to) ``cache`` when given.

        Args:
            input_ids: ``[B, T]`` int64 token ids.
            cache: a :class:`HybridCache` from :meth:`new_cache`; updated in place.
            attention_mask: ``[B, T]`` for the new tokens only, 0 on left padding (prefill), else None.
            logits_to_keep: compute logits for the last n positions only (0 = all); 1 for prefill.
            output_hidden_states: also return the residual stream entering each layer plus the final
                (pre-norm) output, a list of L + 1 tensors ``[B, T, hidden]``.

        Returns:
            logits ``[B, n, vocab]`` (in the model dtype), or ``(logits, hidden_states)``.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids must hold at least one token, got T=0")
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"cache was built for batch size {cache.batch_size}, got input_ids with B={B}")
        info = self._step_info(input_ids, cache, attention_mask)
        h = self.embed_tokens(input_ids)
        hidden: List[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden.append(h)
            h = layer(h, info, cache.layers[i] if cache is not None else None)
        if output_hidden_states:
            hidden.append(h)
        if cache is not None:
            cache.length += T
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        h = self.norm(h)
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, weight)
        return (logits, hidden) if output_hidden_states else logits

    def _step_info(self, input_ids, cache: Optional[HybridCache], attention_mask) -> StepInfo:
        B, T = input_ids.shape
        dev = input_ids.device
        past = cache.length if cache is not None else 0
        new_valid = _check_mask(attention_mask, B, T, cache) if attention_mask is not None else None
        padded = new_valid is not None or (cache is not None and cache.valid is not None)
        if padded and any(t == "eva" for t in self.config.layer_types):
            raise ValueError("left-padded batches are not supported by eva layers; pass equal-length rows "
                             "(generate() groups ragged prompts by length for such models)")
        key_valid = None
        if padded:
            past_valid = cache.valid if cache is not None and cache.valid is not None else \
                torch.ones(B, past, dtype=torch.bool, device=dev)
            new = new_valid if new_valid is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
            key_valid = torch.cat([past_valid, new], dim=1)
            start = cache.positions if cache is not None and cache.positions is not None else \
                torch.full((B,), past, dtype=torch.long, device=dev)
            counts = torch.cumsum(new.long(), dim=1)
            positions = (start[:, None] + counts - 1).clamp_min(0)          # [B, T]
            if cache is not None:
                cache.valid, cache.positions = key_valid, start + counts[:, -1]
        else:
            positions = torch.arange(past, past + T, device=dev)          # [T]
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.dtype)
        attn_mask, is_causal = build_attention_mask(past, T, key_valid, dev)
        return StepInfo(cos=cos, sin=sin, past=past, new_valid=new_valid, attn_mask=attn_mask,
                        is_causal=is_causal)

    def generate(self, input_ids, **kwargs) -> torch.Tensor:
        """Batched greedy or sampled decoding with caches; see :func:`fastattn.models.generate`."""
        from .generate import generate
        return generate(self, input_ids, **kwargs)

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        """Write ``config.json`` and ``model.safetensors`` to directory ``path``."""
        from .io import save_pretrained
        save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device, None] = None) -> "HybridLM":
        """Load a model written by :meth:`save_pretrained`."""
        from .io import load_pretrained
        return load_pretrained(path, dtype=dtype, device=device)
