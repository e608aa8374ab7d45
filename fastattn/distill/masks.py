"""Completion-only loss masks for chat distillation (stage 3).

Two masks, two index conventions:

* token mask ``m[t]`` (length T, over *input positions*): True when token ``ids[t]`` is assistant
  content or the end-of-turn token closing an assistant message. Built by :func:`completion_mask`.
* loss mask (length T-1, over *logit positions*): the logits at position ``t`` predict token ``t+1``,
  so the loss at ``t`` counts when ``m[t+1]`` is True. Use it with ``logits[:, :-1]`` and targets
  ``ids[:, 1:]``; :func:`next_token_targets` returns exactly that pair.

So the last header token (``"\\n"`` after ``assistant``) is the first position with loss, predicting the
first content token, and the last content token predicts the end-of-turn token; nothing of the system
or user turns nor any role header is ever a target.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .._checks import check_tensor
from .data import RenderedChat, Tokenizer


def completion_mask(rendered: RenderedChat) -> torch.Tensor:
    """Token mask of a rendered conversation: True exactly on the assistant spans.

    Args:
        rendered: :class:`RenderedChat` (from ``tokenizer.render_chat``) with ``T`` ids.
    Returns:
        bool tensor ``[T]``, True on every position inside ``rendered.spans`` (assistant content plus
        each assistant message's end-of-turn token), False elsewhere.

    Example:
        >>> from fastattn.distill.data import ByteTokenizer
        >>> tok = ByteTokenizer()
        >>> r = tok.render_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
        >>> tok.decode([i for i, m in zip(r.ids, completion_mask(r).tolist()) if m])
        'a<|im_end|>'
    """
    if not isinstance(rendered, RenderedChat):
        raise TypeError(f"rendered must be a RenderedChat, got {type(rendered).__name__}")
    T = len(rendered.ids)
    m = torch.zeros(T, dtype=torch.bool)
    for s, e in rendered.spans:
        if not (0 <= s <= e <= T):
            raise ValueError(f"rendered.spans must lie in [0, {T}], got ({s}, {e})")
        m[s:e] = True
    return m


def next_token_targets(ids: torch.Tensor, token_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shift ids and a token mask for next-token losses.

    Args:
        ids: int64 ``[..., T]`` token ids, T >= 2.
        token_mask: bool ``[..., T]`` (e.g. from :func:`completion_mask`, padded positions False).
    Returns:
        ``(targets, loss_mask)``, both ``[..., T-1]``: ``targets = ids[..., 1:]`` and
        ``loss_mask = token_mask[..., 1:]``, aligned with ``logits[..., :-1, :]``.

    Example:
        >>> t, m = next_token_targets(torch.tensor([1, 2, 3]), torch.tensor([False, True, True]))
        >>> t.tolist(), m.tolist()
        ([2, 3], [True, True])
    """
    check_tensor("ids", ids, dtypes=(torch.int64, torch.int32))
    check_tensor("token_mask", token_mask, dtypes=(torch.bool,))
    if token_mask.shape != ids.shape:
        raise ValueError(f"token_mask must have shape {tuple(ids.shape)} (like ids), got {tuple(token_mask.shape)}")
    if ids.dim() == 0 or ids.shape[-1] < 2:
        raise ValueError(f"ids must have at least 2 positions in the last dimension, got shape {tuple(ids.shape)}")
    return ids[..., 1:], token_mask[..., 1:]


def chat_example(tokenizer: Tokenizer, messages: Sequence[dict]) -> Tuple[list, list]:
    """Render one conversation and its completion token mask as plain lists (ready for ``pad_batch``).

    Returns ``(ids, mask)``: ``ids`` the rendered token ids, ``mask`` the per-token booleans of
    :func:`completion_mask`.

    Example:
        >>> from fastattn.distill.data import ByteTokenizer
        >>> ids, mask = chat_example(ByteTokenizer(), [{"role": "user", "content": "q"},
        ...                                            {"role": "assistant", "content": "a"}])
        >>> sum(mask)
        2
    """
    rendered = tokenizer.render_chat(messages)
    return list(rendered.ids), completion_mask(rendered).tolist()
