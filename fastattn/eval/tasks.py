"""Synthetic templated chat tasks with exact answers, deterministic by seed.

Three kinds, all short enough for a byte-level tokenizer on a CPU (prompts well under ~120 bytes with four
options):

* ``mc`` — multiple choice. A category question ("Which of these is a fruit?") or a number comparison
  ("Which number is the largest?"), the options listed as ``"A. pear\\nB. red\\n..."`` and the instruction
  ``"Answer with the letter."``. The answer is the letter. Over one call of :func:`make_tasks` the correct
  letter is balanced exactly: the counts of A, B, C, ... differ by at most one. ``mc_questions`` picks the
  question types (:data:`MC_QUESTIONS`); the extra type ``number`` ("Which of these is a number?", one
  number 0-99 among words of the categories) follows a purely lexical rule that a tiny model learns quickly.
* ``kv`` — key-value recall: ``kv_pairs`` (default three) ``"key: value"`` lines (distinct keys, distinct
  values) then ``"What is the value of <key>?"``; the answer is that key's value.
* ``arith`` — ``a + b`` or ``a - b`` (``arith_ops``) with ``0 <= a, b <= arith_max`` (default 50) and a
  non-negative result; the answer is the decimal result.

Every answer is lowercase or a digit string or a capital letter, so the normalisation of
:func:`fastattn.eval.normalize_text` leaves it unchanged.

The assistant reply is ``Item.reply``: the answer put into the item's ``reply_format``. With
``reply_style="bare"`` (default) the reply is the answer itself (one letter token for multiple choice); with
``"sentence"`` it is a multi-token sentence (:data:`REPLY_FORMATS`): ``"The answer is (B)."`` for multiple
choice, ``"The answer is 42."`` otherwise. Generation must then produce the whole sentence, and
:func:`fastattn.eval.extract_answer` accepts only that form, so a model that loses the format shows invalid
answers while log-likelihood ranking (which scores each option's reply) can still be right.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from ..distill.data import _check_messages

KINDS = ("mc", "kv", "arith")
LETTERS = "ABCDEFGH"
MAX_OPTIONS = len(LETTERS)
KV_PAIRS = 3
ARITH_MAX = 50
REPLY_STYLES = ("bare", "sentence")
#: ``{style: (multiple-choice format, free-form format)}``; ``{}`` stands for the letter / the answer.
REPLY_FORMATS = {"bare": ("{}", "{}"), "sentence": ("The answer is ({}).", "The answer is {}.")}
MC_QUESTIONS = ("animal", "colour", "fruit", "vehicle", "largest", "smallest", "number")
DEFAULT_MC_QUESTIONS = MC_QUESTIONS[:6]

CATEGORIES = {
    "colour": ("red", "blue", "green", "yellow", "pink", "brown", "black", "white", "grey", "purple"),
    "fruit": ("apple", "pear", "plum", "grape", "lemon", "mango", "peach", "cherry", "lime", "melon"),
    "animal": ("cat", "dog", "horse", "cow", "mouse", "sheep", "goat", "lion", "bear", "fox"),
    "vehicle": ("car", "bus", "train", "boat", "bike", "truck", "plane", "van", "taxi", "tram"),
}
_ARTICLE = {"colour": "a", "fruit": "a", "animal": "an", "vehicle": "a"}
_NUMBER_QUESTIONS = {"largest": max, "smallest": min}
_ARITH_TEMPLATES = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?")
_CONSONANTS = "bcdfghklmnprstvz"
_VOWELS = "aeiou"
_KV_WORDS = CATEGORIES["colour"] + CATEGORIES["fruit"] + CATEGORIES["animal"]


@dataclass(frozen=True)
class Item:
    """One task instance: the prompt turns, the exact answer text and (multiple choice) the option texts.

    Args:
        kind: task family (``"mc"``, ``"kv"``, ``"arith"``, or any name of the caller's).
        messages: the prompt as ``{"role", "content"}`` dicts (optional system turn, user turn(s)), without the
            assistant answer; lists are stored as tuples.
        answer: the exact target completion (``"B"``, ``"42"``, ``"blue"``).
        options: for multiple choice, the option texts in letter order A, B, C, ...; then ``answer`` must be one
            of the first ``len(options)`` letters. Empty for free-form items.
        reply_format: the assistant reply with ``{}`` (exactly once, no other braces) standing for the answer;
            default ``"{}"`` (the reply is the answer). E.g. ``"The answer is ({})."``.

    Example:
        >>> it = Item("arith", ({"role": "user", "content": "What is 2 + 3?"},), "5")
        >>> it.chat()[-1]
        {'role': 'assistant', 'content': '5'}
        >>> Item("arith", it.messages, "5", reply_format="The answer is {}.").reply
        'The answer is 5.'
    """
    kind: str
    messages: tuple
    answer: str
    options: tuple = ()
    reply_format: str = "{}"

    def __post_init__(self):
        if not isinstance(self.kind, str) or not self.kind:
            raise TypeError(f"kind must be a non-empty str, got {self.kind!r}")
        if isinstance(self.messages, list):
            object.__setattr__(self, "messages", tuple(self.messages))
        if not isinstance(self.messages, tuple) or not self.messages:
            raise TypeError(f"messages must be a non-empty tuple of {{'role', 'content'}} dicts, got {self.messages!r}")
        _check_messages(self.messages)
        if any(m["role"] == "assistant" for m in self.messages):
            raise ValueError("messages must hold only the prompt (system/user turns), got an assistant turn")
        if not isinstance(self.answer, str) or not self.answer:
            raise TypeError(f"answer must be a non-empty str, got {self.answer!r}")
        if isinstance(self.options, list):
            object.__setattr__(self, "options", tuple(self.options))
        if not isinstance(self.options, tuple) or not all(isinstance(o, str) for o in self.options):
            raise TypeError(f"options must be a tuple of str, got {self.options!r}")
        if len(self.options) == 1 or len(self.options) > MAX_OPTIONS:
            raise ValueError(f"options must hold 0 or 2..{MAX_OPTIONS} texts, got {len(self.options)}")
        if self.options and self.answer not in LETTERS[:len(self.options)]:
            raise ValueError(f"answer must be one of the letters {LETTERS[:len(self.options)]!r} for "
                             f"{len(self.options)} options, got {self.answer!r}")
        if not isinstance(self.reply_format, str):
            raise TypeError(f"reply_format must be a str, got {type(self.reply_format).__name__}")
        if self.reply_format.count("{}") != 1 or any(c in self.reply_format.replace("{}", "") for c in "{}\n"):
            raise ValueError(f"reply_format must be one line holding '{{}}' exactly once and no other braces, "
                             f"got {self.reply_format!r}")

    @property
    def is_mc(self) -> bool:
        """True for multiple-choice items (those with options)."""
        return bool(self.options)

    @property
    def letters(self) -> str:
        """The valid option letters (``"ABCD"`` for four options, ``""`` for free-form items)."""
        return LETTERS[:len(self.options)]

    @property
    def answer_index(self) -> int:
        """Index of the correct option (multiple choice only; ValueError otherwise)."""
        if not self.options:
            raise ValueError(f"answer_index needs a multiple-choice item, got kind {self.kind!r} without options")
        return LETTERS.index(self.answer)

    @property
    def reply(self) -> str:
        """The exact assistant reply: ``answer`` put into ``reply_format``."""
        return self.reply_with(self.answer)

    def reply_with(self, answer: str) -> str:
        """The reply this item's format gives for ``answer`` (e.g. another option letter, for LL ranking)."""
        return self.reply_format.replace("{}", answer)

    def chat(self) -> List[dict]:
        """The prompt turns followed by the assistant reply (a training conversation); fresh dicts."""
        return [dict(m) for m in self.messages] + [{"role": "assistant", "content": self.reply}]


def _mc_item(rng: random.Random, letter_pos: int, num_options: int, system: Optional[str],
             questions: Sequence[str] = DEFAULT_MC_QUESTIONS) -> Item:
    qtype = rng.choice(questions)
    if qtype in CATEGORIES:
        correct = rng.choice(CATEGORIES[qtype])
        pool = [w for c in sorted(CATEGORIES) if c != qtype for w in CATEGORIES[c]]
        others = rng.sample(pool, num_options - 1)
        question = f"Which of these is {_ARTICLE[qtype]} {qtype}?"
    elif qtype == "number":
        correct = str(rng.randrange(100))
        others = rng.sample([w for c in sorted(CATEGORIES) for w in CATEGORIES[c]], num_options - 1)
        question = "Which of these is a number?"
    else:
        numbers = rng.sample(range(100), num_options)
        correct = _NUMBER_QUESTIONS[qtype](numbers)
        others = [x for x in numbers if x != correct]
        rng.shuffle(others)
        correct, others = str(correct), [str(x) for x in others]
        question = f"Which number is the {qtype}?"
    options = others[:letter_pos] + [correct] + others[letter_pos:]
    lines = [question] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)] + ["Answer with the letter."]
    return Item("mc", _prompt(system, "\n".join(lines)), LETTERS[letter_pos], tuple(options))


def _kv_item(rng: random.Random, system: Optional[str], pairs: int = KV_PAIRS) -> Item:
    keys: List[str] = []
    while len(keys) < pairs:
        key = rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + rng.choice(_CONSONANTS)
        if key not in keys:
            keys.append(key)
    values: List[str] = []
    while len(values) < pairs:
        value = rng.choice(_KV_WORDS) if rng.random() < 0.5 else str(rng.randint(10, 99))
        if value not in values:
            values.append(value)
    asked = rng.randrange(pairs)
    lines = [f"{k}: {v}" for k, v in zip(keys, values)] + [f"What is the value of {keys[asked]}?"]
    return Item("kv", _prompt(system, "\n".join(lines)), values[asked])


def _arith_item(rng: random.Random, system: Optional[str], top: int = ARITH_MAX, ops: str = "+-") -> Item:
    a, b = rng.randint(0, top), rng.randint(0, top)
    op = rng.choice(ops)
    if op == "-" and a < b:
        a, b = b, a
    text = rng.choice(_ARITH_TEMPLATES).format(a=a, op=op, b=b)
    return Item("arith", _prompt(system, text), str(a + b if op == "+" else a - b))


def _prompt(system: Optional[str], user: str) -> tuple:
    turns = [] if system is None else [{"role": "system", "content": system}]
    return tuple(turns + [{"role": "user", "content": user}])


def _key(item: Item) -> Tuple:
    return (item.kind, tuple((m["role"], m["content"]) for m in item.messages))


def make_tasks(n: int, *, kinds: Sequence[str] = KINDS, seed: int = 0, num_options: int = 4,
               system: Optional[str] = None, exclude: Iterable[Item] = (),
               mc_questions: Optional[Sequence[str]] = None, kv_pairs: int = KV_PAIRS, arith_max: int = ARITH_MAX,
               arith_ops: str = "+-", reply_style: str = "bare") -> List[Item]:
    """Generate ``n`` synthetic task items, the same ones for the same arguments.

    Kinds are spread evenly (counts differ by at most one, order shuffled). Among the ``mc`` items the correct
    letter position is assigned from a shuffled list holding each position ``n_mc // num_options`` or one more
    times, so letter counts differ by at most one.

    Args:
        n: number of items, >= 1.
        kinds: non-empty subset of ``("mc", "kv", "arith")`` (repeats allowed, they weight the mix).
        seed: seed of the private ``random.Random`` (the global RNGs are not touched).
        num_options: options per multiple-choice item, 2..8.
        system: optional system turn put before every user turn.
        exclude: items that must not be produced again (compared by kind and prompt), e.g. the training set
            when building a held-out set; an excluded draw is redrawn with the same kind and letter position.
        mc_questions: the multiple-choice question types to draw from, a non-empty subset of
            :data:`MC_QUESTIONS` (repeats weight the draw); None (default) = every type except ``"number"``.
        kv_pairs: ``"key: value"`` lines per key-value item, 1..8 (default 3).
        arith_max: largest operand of the arithmetic items, >= 1 (default 50; 9 gives single-digit sums).
        arith_ops: the operators to draw from, a non-empty string of ``"+"`` and/or ``"-"`` (default ``"+-"``).
        reply_style: ``"bare"`` (default: the reply is the answer) or ``"sentence"`` (``"The answer is (B)."``,
            ``"The answer is 42."``; see :data:`REPLY_FORMATS`). It sets ``Item.reply_format``; the items are
            otherwise the same for the same seed.
    Returns:
        list of :class:`Item`. Items may repeat within one call (the arithmetic space is finite).
    Raises:
        ValueError: bad ``n``/``kinds``/``num_options``, or ``exclude`` leaves too few distinct prompts.

    Example:
        >>> items = make_tasks(8, kinds=("mc",), seed=3)
        >>> sorted(it.answer for it in items)
        ['A', 'A', 'B', 'B', 'C', 'C', 'D', 'D']
        >>> make_tasks(3, seed=1) == make_tasks(3, seed=1)
        True
        >>> make_tasks(1, kinds=("arith",), arith_max=9, arith_ops="+")[0].messages[0]["content"]
        'Compute 6 + 6.'
        >>> make_tasks(1, kinds=("mc",), reply_style="sentence")[0].chat()[-1]["content"]
        'The answer is (A).'
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(kinds, str) or not isinstance(kinds, (list, tuple)) or not kinds:
        raise ValueError(f"kinds must be a non-empty tuple drawn from {KINDS}, got {kinds!r}")
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"kinds must only hold names from {KINDS}, got {k!r}")
    if isinstance(num_options, bool) or not isinstance(num_options, int) or not 2 <= num_options <= MAX_OPTIONS:
        raise ValueError(f"num_options must be an int in [2, {MAX_OPTIONS}], got {num_options!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"system must be a str or None, got {type(system).__name__}")
    if mc_questions is None:
        mc_questions = DEFAULT_MC_QUESTIONS
    if isinstance(mc_questions, str) or not isinstance(mc_questions, (list, tuple)) or not mc_questions or \
            any(q not in MC_QUESTIONS for q in mc_questions):
        raise ValueError(f"mc_questions must be None or a non-empty tuple drawn from {MC_QUESTIONS}, "
                         f"got {mc_questions!r}")
    mc_questions = tuple(mc_questions)
    if isinstance(kv_pairs, bool) or not isinstance(kv_pairs, int) or not 1 <= kv_pairs <= 8:
        raise ValueError(f"kv_pairs must be an int in [1, 8], got {kv_pairs!r}")
    if isinstance(arith_max, bool) or not isinstance(arith_max, int) or arith_max < 1:
        raise ValueError(f"arith_max must be an int >= 1, got {arith_max!r}")
    if not isinstance(arith_ops, str) or not arith_ops or any(op not in "+-" for op in arith_ops):
        raise ValueError(f"arith_ops must be a non-empty str of '+' and/or '-', got {arith_ops!r}")
    if reply_style not in REPLY_STYLES:
        raise ValueError(f"reply_style must be one of {REPLY_STYLES}, got {reply_style!r}")
    mc_format, free_format = REPLY_FORMATS[reply_style]
    excluded = set()
    for it in exclude:
        if not isinstance(it, Item):
            raise TypeError(f"exclude must hold Item objects, got {type(it).__name__}")
        excluded.add(_key(it))
    rng = random.Random(seed)
    plan = [kinds[i % len(kinds)] for i in range(n)]
    rng.shuffle(plan)
    n_mc = plan.count("mc")
    positions = [i % num_options for i in range(n_mc)]
    rng.shuffle(positions)
    items: List[Item] = []
    for kind in plan:
        pos = positions.pop() if kind == "mc" else 0
        for _ in range(1000):
            if kind == "mc":
                item = _mc_item(rng, pos, num_options, system, mc_questions)
            elif kind == "kv":
                item = _kv_item(rng, system, kv_pairs)
            else:
                item = _arith_item(rng, system, arith_max, arith_ops)
            if _key(item) not in excluded:
                break
        else:
            raise ValueError(f"exclude holds {len(excluded)} items: could not draw a new {kind!r} item in 1000 tries")
        items.append(dataclasses.replace(item, reply_format=mc_format if item.is_mc else free_format))
    return items


def write_jsonl(items: Sequence[Item], path) -> int:
    """Write items as chat records ``{"messages": [... prompt turns ..., assistant answer]}``, one per line.

    The file loads back with :func:`fastattn.distill.load_chat_jsonl` (stage-3 chat data).

    Args:
        items: the :class:`Item` list.
        path: output file (str or PathLike); overwritten; its directory must exist.
    Returns:
        the number of records written.

    Example:
        >>> import tempfile, os
        >>> from fastattn.distill import load_chat_jsonl
        >>> p = os.path.join(tempfile.mkdtemp(), "chat.jsonl")
        >>> write_jsonl(make_tasks(2, kinds=("arith",)), p)
        2
        >>> load_chat_jsonl(p)[0][-1]["role"]
        'assistant'
    """
    items = _check_items(items)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({"messages": it.chat()}, ensure_ascii=False) + "\n")
    return len(items)


def items_to_texts(items: Sequence[Item]) -> List[str]:
    """Plain-text renderings for stage-1/2 text data: the message contents then the reply, one per line.

    Example:
        >>> items_to_texts([Item("arith", ({"role": "user", "content": "What is 2 + 3?"},), "5")])
        ['What is 2 + 3?\\n5']
    """
    items = _check_items(items)
    return ["\n".join([m["content"] for m in it.messages] + [it.reply]) for it in items]


def _check_items(items) -> List[Item]:
    if isinstance(items, Item) or not isinstance(items, (list, tuple)):
        raise TypeError(f"items must be a list of Item, got {type(items).__name__}")
    for i, it in enumerate(items):
        if not isinstance(it, Item):
            raise TypeError(f"items[{i}] must be an Item, got {type(it).__name__}")
    return list(items)
