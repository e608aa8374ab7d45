"""A Hugging Face tokenizer behind the distillation :class:`~fastattn.distill.Tokenizer` protocol.

Chats are rendered ChatML-style, the format of Qwen's chat template without a thinking block:
``<|im_start|>role\\n{content}<|im_end|>\\n`` per message, each content tokenised on its own (no special
tokens added). The tokenizer must know ``<|im_start|>`` and ``<|im_end|>``; ``<|im_end|>`` is the
end-of-turn token that closes each assistant span.
"""
from __future__ import annotations

import os
from typing import List, Sequence

from .data import RenderedChat, render_chatml

__all__ = ["HFChatTokenizer", "load_hf_tokenizer"]


class HFChatTokenizer:
    """Wrap a transformers tokenizer (anything with ``encode``/``decode``/``convert_tokens_to_ids``).

    Args:
        tokenizer: e.g. ``transformers.AutoTokenizer.from_pretrained(teacher_dir)``.

    Attributes ``eos_id`` (the tokenizer's EOS, else ``<|im_end|>``), ``pad_id`` (its PAD, else EOS) and
    ``vocab_size`` (``len(tokenizer)``, specials included).

    Example:
        >>> tok = HFChatTokenizer(AutoTokenizer.from_pretrained("Qwen/Qwen3-0.6B"))   # doctest: +SKIP
        >>> r = tok.render_chat([{"role": "user", "content": "hi"},                    # doctest: +SKIP
        ...                      {"role": "assistant", "content": "yo"}])
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        ids = {}
        unk = getattr(tokenizer, "unk_token_id", None)
        for name in ("<|im_start|>", "<|im_end|>"):
            i = tokenizer.convert_tokens_to_ids(name)
            if i is None or (unk is not None and i == unk):
                raise ValueError(f"tokenizer must know the ChatML token {name!r} (Qwen-style chat format), got none")
            ids[name] = int(i)
        self.im_start_id, self.im_end_id = ids["<|im_start|>"], ids["<|im_end|>"]
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_id = int(eos) if eos is not None else self.im_end_id
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` without special tokens."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens kept)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> RenderedChat:
        """ChatML rendering; spans cover each assistant content plus its ``<|im_end|>``."""
        return render_chatml(self, messages, add_generation_prompt)


def load_hf_tokenizer(path) -> HFChatTokenizer:
    """``HFChatTokenizer(AutoTokenizer.from_pretrained(path))`` with clear errors.

    Raises:
        ImportError: transformers is not installed.
        ValueError: ``path`` holds no loadable tokenizer, or it lacks the ChatML tokens.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError("--tokenizer hf needs the transformers package: pip install transformers "
                          "(or fastattn[models]); use --tokenizer byte otherwise") from e
    try:
        tok = AutoTokenizer.from_pretrained(os.fspath(path))
    except Exception as e:  # transformers raises OSError/ValueError/KeyError depending on what is missing
        raise ValueError(f"no Hugging Face tokenizer could be loaded from {os.fspath(path)!r} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return HFChatTokenizer(tok)
