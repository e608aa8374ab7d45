"""Answer extraction from generated text, and exact-match scoring.

Rules (applied to the text up to the first end-of-turn marker, ``<|im_end|>``, ``<|endoftext|>``,
``<|im_start|>`` or ``<|pad|>``, as :meth:`ByteTokenizer.decode` and Qwen-style tokenizers print them):

Reply format first (strict match): when the item has a ``reply_format`` other than ``"{}"`` (e.g.
``"The answer is ({})."``, see :attr:`fastattn.eval.Item.reply_format`), the first non-empty line, stripped,
must be exactly that format with a non-empty text in place of ``{}``; otherwise there is no answer (None). The
text in place of ``{}`` then goes through the rules below as the whole reply. So ``"The answer is (B)."``
gives B, while ``"B"``, ``"The answer is B."`` or ``"The answer (B)."`` give None: a model that loses the
trained format shows invalid answers even when it ranks the right option first by log-likelihood.

Multiple choice (``options`` non-empty, valid letters = the first ``len(options)`` of ``ABCDEFGH``):

1. An explicit phrase ``answer is X`` / ``answer: X`` / ``answer X`` (``answer`` in any case, ``X`` a capital
   letter, optionally in parentheses) decides: X if it is a valid letter, else None.
2. Otherwise the first non-empty line is scanned for standalone capital letters (not part of a word:
   ``"B"``, ``"B."``, ``"(B)"``, ``"B) pear"``). Letters outside the valid range are ignored. Exactly one
   distinct valid letter -> that letter; two or more (``"A or B"``) -> None (ambiguous).
3. Otherwise, when that line equals one option's text (after :func:`normalize_text`) and no other option's,
   that option's letter.
4. Otherwise None.

Lowercase letters never count as answers (``"a"`` is too often the article).

Free form (``options`` empty): the first non-empty line, normalised by :func:`normalize_text`
(lowercased, whitespace collapsed, trailing ``.``/``!`` dropped); None when nothing is left.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from .tasks import LETTERS

END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|pad|>")
_PHRASE = re.compile(r"(?i:answer)\s*(?:(?i:is)\s*)?[:\-]?\s*\(?([A-Z])\)?(?![A-Za-z0-9])")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")


def cut_turn(text: str) -> str:
    """``text`` up to (excluding) the first end-of-turn marker of :data:`END_MARKERS`.

    Example:
        >>> cut_turn("B<|im_end|>\\nmore")
        'B'
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    cut = len(text)
    for marker in END_MARKERS:
        i = text.find(marker)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def normalize_text(text: str) -> str:
    """Normal form for free-form comparison: lowercase, whitespace runs -> one space, stripped, trailing ``.``/``!``
    removed.

    Example:
        >>> normalize_text("  Blue  Sky. ")
        'blue sky'
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return " ".join(text.lower().split()).rstrip(".!").rstrip()


def _first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.split("\n", 1)[0].strip() if stripped else ""


def extract_answer(text: str, options: Sequence[str] = (), reply_format: str = "{}") -> Optional[str]:
    """The answer a generation gives, following the module rules.

    Args:
        text: the generated assistant text (special tokens printed by name are allowed; text after the first
            end-of-turn marker is ignored).
        options: the option texts of a multiple-choice item (letter order), or empty for a free-form item.
        reply_format: the item's reply format (``{}`` once, standing for the answer); ``"{}"`` (default)
            accepts any reply, another format is matched strictly against the first non-empty line.
    Returns:
        multiple choice: a valid capital letter or None (no valid letter, an ambiguous answer, or the reply
        format not matched); free form: the normalised first non-empty line (or the normalised text in place
        of ``{}``), or None when empty or when the format is not matched.

    Example:
        >>> opts = ("cat", "pear", "red", "bus")
        >>> [extract_answer(t, opts) for t in ["B", "B.", "The answer is B", "(B)", "pear", "A or B", "E", ""]]
        ['B', 'B', 'B', 'B', 'B', None, None, None]
        >>> extract_answer(" 42.\\nbecause", ())
        '42'
        >>> [extract_answer(t, opts, "The answer is ({}).") for t in ["The answer is (B).", "B", "The answer is B."]]
        ['B', None, None]
        >>> extract_answer("The answer is 42.", (), "The answer is {}.")
        '42'
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if isinstance(options, str) or not isinstance(options, (list, tuple)):
        raise TypeError(f"options must be a tuple of option texts, got {type(options).__name__}")
    if len(options) > len(LETTERS):
        raise ValueError(f"options must hold at most {len(LETTERS)} texts, got {len(options)}")
    if not isinstance(reply_format, str):
        raise TypeError(f"reply_format must be a str, got {type(reply_format).__name__}")
    if reply_format.count("{}") != 1:
        raise ValueError(f"reply_format must hold '{{}}' exactly once, got {reply_format!r}")
    text = cut_turn(text)
    if reply_format != "{}":
        head, tail = reply_format.split("{}")
        match = re.fullmatch(re.escape(head) + "(.+?)" + re.escape(tail), _first_line(text))
        if match is None:
            return None
        text = match.group(1)
    if not options:
        line = normalize_text(_first_line(text))
        return line or None
    valid = LETTERS[:len(options)]
    phrase = _PHRASE.search(text)
    if phrase is not None:
        return phrase.group(1) if phrase.group(1) in valid else None
    line = _first_line(text)
    found = sorted({c for c in _STANDALONE.findall(line) if c in valid})
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        return None
    norm = normalize_text(line)
    hits = [i for i, o in enumerate(options) if norm and normalize_text(str(o)) == norm]
    return valid[hits[0]] if len(hits) == 1 else None


def exact_match(predictions: Sequence[Optional[str]], answers: Sequence[str]) -> float:
    """Fraction of predictions equal to their answers after :func:`normalize_text` (None counts as wrong).

    Args:
        predictions: extracted answers (str or None), e.g. from :func:`extract_answer`.
        answers: the reference answers, same length, at least one.
    Returns:
        accuracy in [0, 1].

    Example:
        >>> exact_match(["42", "Blue.", None], ["42", "blue", "7"])
        0.6666666666666666
    """
    if not isinstance(predictions, (list, tuple)) or not isinstance(answers, (list, tuple)):
        raise TypeError(f"predictions and answers must be lists, got {type(predictions).__name__} and "
                        f"{type(answers).__name__}")
    if len(predictions) != len(answers):
        raise ValueError(f"predictions must have one entry per answer ({len(answers)}), got {len(predictions)}")
    if not answers:
        raise ValueError("answers must hold at least one answer, got 0")
    hits = 0
    for i, (p, a) in enumerate(zip(predictions, answers)):
        if not isinstance(a, str):
            raise TypeError(f"answers[{i}] must be a str, got {type(a).__name__}")
        if p is not None and not isinstance(p, str):
            raise TypeError(f"predictions[{i}] must be a str or None, got {type(p).__name__}")
        hits += p is not None and normalize_text(p) == normalize_text(a)
    return hits / len(answers)
