"""Distillation data: local jsonl records, the tokenizer protocol, a byte-level tokenizer, packing and batching.

Stages 1-2 read plain-text records ``{"text": "..."}``; stage 3 reads chat records
``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``. Loading only reads:
nothing is ever written. A malformed line or a missing/ill-typed field raises :class:`DataFormatError`
naming the file and the 1-based line number.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

ROLES = ("system", "user", "assistant")


class DataFormatError(ValueError):
    """A jsonl record that cannot be used; ``path`` and ``line`` (1-based) say where it is."""

    def __init__(self, path: str, line: int, message: str):
        self.path, self.line = path, line
        super().__init__(f"{path}:{line}: {message}")


@dataclass(frozen=True)
class RenderedChat:
    """A conversation rendered to token ids.

    ``spans`` are half-open ``(start, end)`` index ranges into ``ids``, one per assistant message,
    covering that message's content tokens and the end-of-turn token that closes it (and nothing of
    the role header or of any system/user turn).
    """
    ids: Tuple[int, ...]
    spans: Tuple[Tuple[int, int], ...]


@runtime_checkable
class Tokenizer(Protocol):
    """What the distillation pipeline needs from a tokenizer.

    ``encode(text) -> list[int]`` (no special tokens added), ``decode(ids) -> str``, integer ``eos_id``
    and ``pad_id``, ``vocab_size``, and ``render_chat(messages)`` returning a :class:`RenderedChat`.
    """
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> List[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> RenderedChat: ...


class ByteTokenizer:
    """Byte-level tokenizer: ids 0-255 are UTF-8 bytes, then four special tokens.

    Specials: ``im_start_id`` (256, opens a turn), ``im_end_id`` (257, the end-of-turn token),
    ``eos_id`` (258), ``pad_id`` (259); ``vocab_size`` = 260. Chats are rendered ChatML-style:
    ``<im_start>role\\n{content}<im_end>\\n`` per message.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.decode(tok.encode("héllo"))
        'héllo'
        >>> r = tok.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
        >>> [tok.decode(r.ids[s:e]) for s, e in r.spans]
        ['yo<|im_end|>']
    """
    im_start_id = 256
    im_end_id = 257
    eos_id = 258
    pad_id = 259
    vocab_size = 260
    _NAMES = {256: "<|im_start|>", 257: "<|im_end|>", 258: "<|endoftext|>", 259: "<|pad|>"}

    def encode(self, text: str) -> List[int]:
        """UTF-8 bytes of ``text`` as ids (no special tokens)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of :meth:`encode`; special tokens print as their names, invalid UTF-8 as U+FFFD."""
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            if i not in self._NAMES:
                raise ValueError(f"ids must be in [0, {self.vocab_size}), got {i}")
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            out.append(self._NAMES[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> RenderedChat:
        """Render ``messages`` ChatML-style; ``add_generation_prompt`` appends an open assistant header.

        Returns a :class:`RenderedChat` whose spans cover each assistant content plus its ``<im_end>``.
        """
        return render_chatml(self, messages, add_generation_prompt)


def _check_messages(messages, where: str = "messages") -> None:
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"{where} must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"{where}[{i}] must be a dict, got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f"{where}[{i}]['role'] must be one of {ROLES}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise TypeError(f"{where}[{i}]['content'] must be a str, got {type(m.get('content')).__name__}")



def render_chatml(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> RenderedChat:
    """ChatML rendering shared by the tokenizers: ``<im_start>role\\n{content}<im_end>\\n`` per message.

    ``tokenizer`` needs ``encode``, ``im_start_id`` and ``im_end_id``; each piece is encoded on its own. The
    returned spans cover each assistant content plus the ``<im_end>`` closing it.
    """
    _check_messages(messages)
    ids: List[int] = []
    spans: List[Tuple[int, int]] = []
    newline = tokenizer.encode("\n")
    for m in messages:
        ids.append(tokenizer.im_start_id)
        ids.extend(tokenizer.encode(m["role"] + "\n"))
        start = len(ids)
        ids.extend(tokenizer.encode(m["content"]))
        ids.append(tokenizer.im_end_id)
        if m["role"] == "assistant":
            spans.append((start, len(ids)))
        ids.extend(newline)
    if add_generation_prompt:
        ids.append(tokenizer.im_start_id)
        ids.extend(tokenizer.encode("assistant\n"))
    return RenderedChat(ids=tuple(ids), spans=tuple(spans))

def _read_jsonl(path: str) -> Iterable[Tuple[int, dict]]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {path!r} is not a file")
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(path, lineno, f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataFormatError(path, lineno, f"record must be a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def load_text_jsonl(path: str, field: str = "text") -> List[str]:
    """Read plain-text records (stages 1-2) from a jsonl file.

    Args:
        path: file with one JSON object per line; blank lines are skipped.
        field: key holding the text (default ``"text"``); it must be present and a str.
    Returns:
        list of the texts, in file order.
    Raises:
        DataFormatError: bad JSON, a non-object record, or a missing/non-str field; the message names the
            file and the 1-based line. FileNotFoundError when ``path`` is not a file.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "t.jsonl")
        >>> _ = open(p, "w").write('{"text": "a b"}\\n{"text": "c"}\\n')
        >>> load_text_jsonl(p)
        ['a b', 'c']
    """
    out = []
    for lineno, rec in _read_jsonl(path):
        if field not in rec:
            raise DataFormatError(os.fspath(path), lineno, f"missing field {field!r}")
        if not isinstance(rec[field], str):
            raise DataFormatError(os.fspath(path), lineno,
                                  f"field {field!r} must be a string, got {type(rec[field]).__name__}")
        out.append(rec[field])
    return out


def load_chat_jsonl(path: str) -> List[List[dict]]:
    """Read chat records (stage 3) ``{"messages": [{"role": ..., "content": ...}, ...]}`` from a jsonl file.

    Roles must be ``system``, ``user`` or ``assistant``; contents must be strings; ``messages`` must be
    a non-empty list. Returns the list of conversations (each a list of ``{"role", "content"}`` dicts).
    Raises :class:`DataFormatError` naming the file and 1-based line for any malformed record.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "c.jsonl")
        >>> _ = open(p, "w").write('{"messages": [{"role": "user", "content": "1+1?"},'
        ...                        ' {"role": "assistant", "content": "2"}]}\\n')
        >>> load_chat_jsonl(p)[0][1]["content"]
        '2'
    """
    out = []
    for lineno, rec in _read_jsonl(path):
        msgs = rec.get("messages")
        if "messages" not in rec:
            raise DataFormatError(os.fspath(path), lineno, "missing field 'messages'")
        if not isinstance(msgs, list) or not msgs:
            raise DataFormatError(os.fspath(path), lineno,
                                  f"field 'messages' must be a non-empty list, got {msgs!r:.60}")
        try:
            _check_messages(msgs, "messages")
        except (TypeError, ValueError) as e:
            raise DataFormatError(os.fspath(path), lineno, str(e)) from None
        out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    return out


def pack_blocks(sequences: Iterable[Sequence[int]], block_len: int, eos_id: int) -> torch.Tensor:
    """Concatenate token sequences (each followed by ``eos_id``) and cut the stream into fixed blocks.

    Args:
        sequences: token-id lists (e.g. encoded texts).
        block_len: tokens per block, >= 2.
        eos_id: separator appended after every sequence.
    Returns:
        int64 tensor ``[N, block_len]`` with ``N = total // block_len``; the tail shorter than a block is
        dropped. Raises ValueError when the stream is shorter than one block.

    Example:
        >>> pack_blocks([[1, 2], [3]], block_len=2, eos_id=0).tolist()
        [[1, 2], [0, 3]]
    """
    if not isinstance(block_len, int) or isinstance(block_len, bool) or block_len < 2:
        raise ValueError(f"block_len must be an int >= 2, got {block_len!r}")
    stream: List[int] = []
    for s in sequences:
        stream.extend(int(t) for t in s)
        stream.append(int(eos_id))
    n = len(stream) // block_len
    if n == 0:
        raise ValueError(f"sequences hold {len(stream)} tokens (with separators), fewer than block_len={block_len}")
    return torch.tensor(stream[: n * block_len], dtype=torch.int64).view(n, block_len)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, masks: Optional[Sequence[Sequence[bool]]] = None,
              max_len: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Right-pad (and right-truncate to ``max_len``) variable-length sequences into one batch.

    Right padding is safe for causal models: pads come after every real token, so they change no real
    position's output (recurrent mixers that ignore attention masks included).

    Args:
        sequences: B token-id lists, each non-empty.
        pad_id: fill value for ``ids``.
        masks: optional per-token boolean lists (same lengths as ``sequences``), e.g. completion masks.
        max_len: optional cap on the length; the batch length is ``min(max_len, longest)``.
    Returns:
        ``(ids [B, L] int64, valid [B, L] bool, mask [B, L] bool or None)``; pads are False in both masks.

    Example:
        >>> ids, valid, m = pad_batch([[5, 6, 7], [8]], pad_id=0, masks=[[0, 1, 1], [1]])
        >>> ids.tolist(), valid.tolist(), m.tolist()
        ([[5, 6, 7], [8, 0, 0]], [[True, True, True], [True, False, False]], [[False, True, True], [True, False, False]])
    """
    if len(sequences) == 0:
        raise ValueError("sequences must hold at least one sequence, got 0")
    if masks is not None and len(masks) != len(sequences):
        raise ValueError(f"masks must hold one mask per sequence ({len(sequences)}), got {len(masks)}")
    if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
    for i, s in enumerate(sequences):
        if len(s) == 0:
            raise ValueError(f"sequences[{i}] is empty")
        if masks is not None and len(masks[i]) != len(s):
            raise ValueError(f"masks[{i}] must have length {len(s)} (like sequences[{i}]), got {len(masks[i])}")
    L = max(len(s) for s in sequences)
    if max_len is not None:
        L = min(L, max_len)
    B = len(sequences)
    ids = torch.full((B, L), int(pad_id), dtype=torch.int64)
    valid = torch.zeros(B, L, dtype=torch.bool)
    mask = torch.zeros(B, L, dtype=torch.bool) if masks is not None else None
    for i, s in enumerate(sequences):
        n = min(len(s), L)
        ids[i, :n] = torch.tensor([int(t) for t in s[:n]], dtype=torch.int64)
        valid[i, :n] = True
        if mask is not None:
            mask[i, :n] = torch.tensor([bool(b) for b in masks[i][:n]], dtype=torch.bool)
    return ids, valid, mask
