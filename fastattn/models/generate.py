"""Batched greedy / sampled generation with per-layer caches and stop tokens."""
from typing import Iterable, List, Optional, Sequence, Union

import torch

Prompt = Union[torch.Tensor, Sequence[Sequence[int]]]


def _left_pad(prompts: Sequence[Sequence[int]], pad: int, device):
    """Ragged token lists -> ``(ids [B, T], mask [B, T])`` left-padded."""
    if len(prompts) == 0:
        raise ValueError("input_ids must hold at least one prompt, got an empty list")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"every prompt must hold at least one token, got lengths {lengths}")
    T = max(lengths)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids.to(device), mask.to(device)


def _stop_ids(eos_token_id, config) -> List[int]:
    if eos_token_id is None:
        eos_token_id = config.eos_token_id or ()
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    if not isinstance(eos_token_id, Iterable):
        raise TypeError(f"eos_token_id must be an int, a sequence of ints or None, got {eos_token_id!r}")
    return [int(e) for e in eos_token_id]


def _select(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: Optional[int],
            top_p: Optional[float], generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next token ``[B]`` from last-position logits ``[B, V]``."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p     # keep the smallest prefix whose mass reaches top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: Prompt, *, max_new_tokens: int = 32, attention_mask: Optional[torch.Tensor] = None,
             do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token_id=None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens per prompt with the model's caches.

    Args:
        model: a :class:`~fastattn.models.HybridLM`.
        input_ids: ``[B, T]`` token ids (with ``attention_mask`` 0 on left padding), or a list of token-id
            lists of any lengths (left-padded here). Models with ``eva`` layers decode ragged prompts in
            groups of equal length.
        max_new_tokens: number of new tokens at most (>= 1).
        do_sample: False = greedy (argmax); True = sample from ``softmax(logits / temperature)`` restricted
            to the ``top_k`` best tokens and the smallest set with probability mass >= ``top_p``.
        eos_token_id: stop token(s); default ``model.config.eos_token_id``. A row stops after emitting one.
        pad_token_id: fills rows after they stopped (default: the first stop token, else 0).
        generator: a ``torch.Generator`` for reproducible sampling.

    Returns:
        ``[B, N]`` int64 new tokens (N <= max_new_tokens; decoding ends once every row stopped), stop
        tokens included, ``pad_token_id`` after them.

    Example:
        >>> import torch
        >>> from fastattn.models import HybridConfig, HybridLM
        >>> cfg = HybridConfig.from_preset("attention", vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        ...                                head_dim=16)
        >>> out = HybridLM(cfg).generate([[1, 2, 3], [4, 5]], max_new_tokens=4)
        >>> out.shape
        torch.Size([2, 4])
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if do_sample and not (temperature > 0):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    stops = _stop_ids(eos_token_id, model.config)
    pad = pad_token_id if pad_token_id is not None else (stops[0] if stops else 0)
    vocab = model.config.vocab_size
    for name, tok in [("eos_token_id", s) for s in stops] + [("pad_token_id", pad)]:
        if not (0 <= tok < vocab):
            raise ValueError(f"{name} must be in [0, vocab_size={vocab}), got {tok}")
    device = model.device
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        ids = input_ids.to(device)
        mask = attention_mask.to(device) if attention_mask is not None else None
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask is only used with a [B, T] tensor input_ids")
        ids, mask = _left_pad(input_ids, pad, device)
    if mask is not None and bool(mask.bool().all()):
        mask = None
    if mask is not None and "eva" in model.config.layer_types:
        return _generate_grouped(model, ids, mask, max_new_tokens, pad, do_sample=do_sample,
                                 temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=stops,
                                 pad_token_id=pad, generator=generator)
    B, T = ids.shape
    cache = model.new_cache(B, capacity=T + max_new_tokens)
    logits = model(ids, cache=cache, attention_mask=mask, logits_to_keep=1)[:, -1]
    stop_t = torch.tensor(stops, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        tok = _select(logits, do_sample, temperature, top_k, top_p, generator)
        tok = torch.where(finished, torch.full_like(tok, pad), tok)
        out.append(tok)
        if stops:
            finished |= torch.isin(tok, stop_t)
            if bool(finished.all()):
                break
        if step + 1 < max_new_tokens:
            logits = model(tok[:, None], cache=cache, logits_to_keep=1)[:, -1]
    return torch.stack(out, dim=1)


def _generate_grouped(model, ids, mask, max_new_tokens, pad, **kwargs) -> torch.Tensor:
    """Decode rows of equal real length together (for mixers that cannot skip padding)."""
    lengths = mask.long().sum(dim=1).tolist()
    results = [None] * ids.shape[0]
    for n in sorted(set(lengths)):
        rows = [i for i, m in enumerate(lengths) if m == n]
        sub = ids[rows][:, ids.shape[1] - n:]
        out = generate(model, sub, max_new_tokens=max_new_tokens, **kwargs)
        for i, row in zip(rows, out):
            results[i] = row
    N = max(r.shape[0] for r in results)
    return torch.stack([torch.cat([r, r.new_full((N - r.shape[0],), pad)]) for r in results])
