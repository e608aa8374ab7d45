"""lm-evaluation-harness adapter for fastattn models (``lm_eval`` is imported only by :func:`make_lm_eval_model`).

The adapter follows lm-eval's ``LM`` interface: ``loglikelihood(requests)`` -> ``[(logprob, is_greedy)]``,
``loglikelihood_rolling(requests)`` -> ``[logprob]`` and ``generate_until(requests)`` -> ``[text]``, each request
carrying its arguments in ``.args``. All the work happens in the plain functions :func:`lm_loglikelihood`,
:func:`lm_loglikelihood_rolling` and :func:`lm_generate_until` (also reachable as ``_loglikelihood``,
``_loglikelihood_rolling``, ``_generate_until``), which need no lm_eval.

Conventions:

* Text is encoded with :func:`encode_text`: the tokenizer's ``encode`` plus the special-token names its
  ``decode`` prints (``<|im_start|>``, ``<|im_end|>``, ...) mapped back to their ids, so chat-templated strings
  from :meth:`apply_chat_template` round-trip.
* The continuation's tokens are those of ``encode(context + continuation)`` after the context's tokens when the
  context's encoding is a prefix of it, else ``encode(continuation)``.
* An empty context (and the start of every rolling text) is the single token ``tokenizer.eos_id``.
* Sequences longer than ``max_length`` + 1 tokens lose context from the left; rolling log-likelihoods are cut
  into windows that each score up to ``max_length`` new tokens with up to ``max_length`` tokens of input.
* ``generate_until`` stops at the end-of-turn / eos tokens and after ``max_gen_toks`` tokens, then cuts the text
  at the first ``until`` string (stop strings are applied after decoding, so they cost no correctness).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .scoring import continuation_logprobs, decode_until_stop, generate_token_ids, stop_token_ids

_SPECIAL_ATTRS = ("im_start_id", "im_end_id", "eos_id", "bos_id", "pad_id")
_GEN_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")


@dataclass(frozen=True)
class LMEvalOptions:
    """Adapter options: ``batch_size`` rows per forward / generate call; ``max_length`` the longest model input
    (None: ``model.config.max_position_embeddings``, else 2048); ``max_gen_toks`` the generation budget when a
    request does not give one."""
    batch_size: int = 16
    max_length: Optional[int] = None
    max_gen_toks: int = 256

    def __post_init__(self):
        for name in ("batch_size", "max_gen_toks") + (("max_length",) if self.max_length is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.max_length is not None and self.max_gen_toks >= self.max_length:
            raise ValueError(f"max_gen_toks must be < max_length ({self.max_length}) to leave room for the prompt, "
                             f"got {self.max_gen_toks}")


def _resolve_max_length(model, max_length: Optional[int]) -> int:
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1 or None, got {max_length!r}")
        return max_length
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", 2048) or 2048)


def special_token_map(tokenizer) -> Dict[str, int]:
    """Printed name -> id for the tokenizer's special tokens that plain ``encode`` does not produce.

    Example:
        >>> from fastattn.distill import ByteTokenizer
        >>> special_token_map(ByteTokenizer())["<|im_end|>"]
        257
    """
    out: Dict[str, int] = {}
    for attr in _SPECIAL_ATTRS:
        tid = getattr(tokenizer, attr, None)
        if tid is None:
            continue
        name = tokenizer.decode([int(tid)])
        if name and list(tokenizer.encode(name)) != [int(tid)]:
            out[name] = int(tid)
    return out


def encode_text(tokenizer, text: str) -> List[int]:
    """Encode ``text``, turning the printed names of special tokens back into their ids.

    Example:
        >>> from fastattn.distill import ByteTokenizer
        >>> encode_text(ByteTokenizer(), "<|im_start|>hi<|im_end|>")
        [256, 104, 105, 257]
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    specials = special_token_map(tokenizer)
    if not specials:
        return list(tokenizer.encode(text))
    pattern = re.compile("|".join(re.escape(n) for n in sorted(specials, key=len, reverse=True)))
    ids: List[int] = []
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            ids.extend(tokenizer.encode(text[pos:m.start()]))
        ids.append(specials[m.group(0)])
        pos = m.end()
    if pos < len(text):
        ids.extend(tokenizer.encode(text[pos:]))
    return ids


def chat_text(tokenizer, chat_history: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The chat rendered by ``tokenizer.render_chat`` as a string (special tokens by name); :func:`encode_text`
    of it gives back the rendered ids.

    Example:
        >>> from fastattn.distill import ByteTokenizer
        >>> chat_text(ByteTokenizer(), [{"role": "user", "content": "hi"}])
        '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    rendered = tokenizer.render_chat(list(chat_history), add_generation_prompt=add_generation_prompt)
    return tokenizer.decode(list(rendered.ids))


def _start_ids(tokenizer) -> List[int]:
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        raise ValueError("tokenizer needs an eos_id to start an empty context")
    return [int(eos)]


def lm_loglikelihood(model, tokenizer, pairs: Sequence[Tuple[str, str]], *, batch_size: int = 16,
                     max_length: Optional[int] = None) -> List[Tuple[float, bool]]:
    """lm-eval ``loglikelihood``: ``(log p(continuation | context), is_greedy)`` per ``(context, continuation)``.

    Args:
        model: causal LM (see :func:`fastattn.eval.continuation_logprobs`).
        tokenizer: ``fastattn.distill.Tokenizer``.
        pairs: ``(context, continuation)`` strings; the continuation must encode to at least one token.
        batch_size: rows per forward pass.
        max_length: longest model input (None: the model's ``max_position_embeddings``).
    Returns:
        list of ``(float, bool)`` in request order.

    Example:
        >>> from fastattn.distill import ByteTokenizer
        >>> from fastattn.models import HybridConfig, HybridLM
        >>> cfg = HybridConfig.from_preset("attention", vocab_size=260, hidden_size=32, intermediate_size=64,
        ...                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        ...                                head_dim=16)
        >>> lp, greedy = lm_loglikelihood(HybridLM(cfg), ByteTokenizer(), [("The sky is", " blue")])[0]
        >>> lp < 0
        True
    """
    max_len = _resolve_max_length(model, max_length)
    token_pairs = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(s, str) for s in pair):
            raise TypeError(f"pairs[{i}] must be a (context, continuation) pair of str, got {pair!r:.80}")
        context, continuation = pair
        if context:
            ctx = encode_text(tokenizer, context)
            whole = encode_text(tokenizer, context + continuation)
            cont = whole[len(ctx):] if whole[:len(ctx)] == ctx and len(whole) > len(ctx) else \
                encode_text(tokenizer, continuation)
        else:
            ctx, cont = _start_ids(tokenizer), encode_text(tokenizer, continuation)
        if not cont:
            raise ValueError(f"pairs[{i}] has a continuation that encodes to no tokens: {continuation!r}")
        if len(cont) > max_len:
            raise ValueError(f"pairs[{i}] continuation holds {len(cont)} tokens, more than max_length={max_len}")
        ctx = ctx[-(max_len + 1 - len(cont)):]
        token_pairs.append((ctx, cont))
    return continuation_logprobs(model, token_pairs, batch_size=batch_size)


def rolling_windows(n_tokens: int, max_length: int) -> List[Tuple[int, int, int]]:
    """Windows ``(a, s, e)`` over a token list ``t[0..n_tokens]`` (``t[0]`` the start token) scoring every target
    ``t[1..n_tokens]`` exactly once: window ``(a, s, e)`` scores ``t[s:e]`` given ``t[a:s]``, with at most
    ``max_length`` input tokens (``e - 1 - a <= max_length``) and as much left context as that allows.

    Example:
        >>> rolling_windows(5, 3)
        [(0, 1, 4), (2, 4, 6)]
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
        raise ValueError(f"n_tokens must be an int >= 0, got {n_tokens!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
    out = []
    s = 1
    while s <= n_tokens:
        e = min(s + max_length, n_tokens + 1)
        out.append((max(0, e - 1 - max_length), s, e))
        s = e
    return out


def lm_loglikelihood_rolling(model, tokenizer, texts: Sequence[str], *, batch_size: int = 16,
                             max_length: Optional[int] = None) -> List[float]:
    """lm-eval ``loglikelihood_rolling``: the log-likelihood of each whole text after the start token (eos id),
    scored in the windows of :func:`rolling_windows` when longer than ``max_length``.

    Returns 0.0 for a text that encodes to no tokens.

    Example:
        >>> from fastattn.distill import ByteTokenizer
        >>> from fastattn.models import HybridConfig, HybridLM
        >>> cfg = HybridConfig.from_preset("attention", vocab_size=260, hidden_size=32, intermediate_size=64,
        ...                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        ...                                head_dim=16)
        >>> lm_loglikelihood_rolling(HybridLM(cfg), ByteTokenizer(), ["hello", ""], max_length=3)[1]
        0.0
    """
    max_len = _resolve_max_length(model, max_length)
    pairs, owner = [], []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        toks = _start_ids(tokenizer) + encode_text(tokenizer, text)
        for a, s, e in rolling_windows(len(toks) - 1, max_len):
            pairs.append((toks[a:s], toks[s:e]))
            owner.append(i)
    scores = continuation_logprobs(model, pairs, batch_size=batch_size)
    out = [0.0] * len(texts)
    for i, (lp, _) in zip(owner, scores):
        out[i] += lp
    return out


def _parse_gen_kwargs(i: int, kwargs, default_max: int):
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"requests[{i}] generation kwargs must be a dict, got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - set(_GEN_KEYS))
    if unknown:
        raise ValueError(f"requests[{i}] has unsupported generation kwargs {unknown}; supported: {list(_GEN_KEYS)}")
    until = kwargs.get("until") or ()
    if isinstance(until, str):
        until = (until,)
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise TypeError(f"requests[{i}] 'until' must be a str or a list of str, got {until!r}")
    max_toks = kwargs.get("max_gen_toks", default_max)
    if isinstance(max_toks, bool) or not isinstance(max_toks, int) or max_toks < 1:
        raise ValueError(f"requests[{i}] 'max_gen_toks' must be an int >= 1, got {max_toks!r}")
    temperature = float(kwargs.get("temperature", 0.0) or 0.0)
    sampling: Tuple = ()
    if kwargs.get("do_sample", False) and temperature > 0:
        sampling = (("do_sample", True), ("temperature", temperature), ("top_p", kwargs.get("top_p")),
                    ("top_k", kwargs.get("top_k")))
    return tuple(u for u in until if u), max_toks, sampling


def cut_at_stop_strings(text: str, until: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any string in ``until``.

    Example:
        >>> cut_at_stop_strings("a.b\\nc", ["\\n", "."])
        'a'
    """
    cut = len(text)
    for u in until:
        j = text.find(u) if u else -1
        if j >= 0:
            cut = min(cut, j)
    return text[:cut]


def lm_generate_until(model, tokenizer, requests: Sequence[Tuple[str, dict]], *, batch_size: int = 16,
                      max_length: Optional[int] = None, max_gen_toks: int = 256) -> List[str]:
    """lm-eval ``generate_until``: continue each context and cut at its ``until`` strings.

    Args:
        model: a model with ``generate`` (a :class:`~fastattn.models.HybridLM`).
        tokenizer: ``fastattn.distill.Tokenizer``.
        requests: ``(context, gen_kwargs)``; ``gen_kwargs`` may hold ``until`` (str or list), ``max_gen_toks``,
            ``do_sample``, ``temperature`` (sampling only when ``do_sample`` and ``temperature > 0``), ``top_p``,
            ``top_k``. Other keys raise ValueError.
        batch_size: prompts per ``generate`` call (requests with the same sampling settings share batches).
        max_length: longest model input; the prompt keeps its last ``max_length - max_gen_toks`` tokens (a budget
            of ``max_length`` tokens or more raises ValueError).
        max_gen_toks: budget for requests that give none.
    Returns:
        the generated texts (stop token excluded, cut at the first ``until`` string), in request order.

    Example:
        >>> from fastattn.distill import ByteTokenizer
        >>> from fastattn.models import HybridConfig, HybridLM
        >>> cfg = HybridConfig.from_preset("attention", vocab_size=260, hidden_size=32, intermediate_size=64,
        ...                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        ...                                head_dim=16)
        >>> out = lm_generate_until(HybridLM(cfg), ByteTokenizer(), [("Q: 1+1?\\nA:", {"max_gen_toks": 3})])
        >>> len(out)
        1
    """
    max_len = _resolve_max_length(model, max_length)
    stops = stop_token_ids(tokenizer)
    parsed = []
    for i, req in enumerate(requests):
        if not isinstance(req, (list, tuple)) or len(req) != 2 or not isinstance(req[0], str):
            raise TypeError(f"requests[{i}] must be a (context, gen_kwargs) pair, got {req!r:.80}")
        until, toks, sampling = _parse_gen_kwargs(i, req[1], max_gen_toks)
        if toks >= max_len:
            raise ValueError(f"requests[{i}] max_gen_toks must be < max_length ({max_len}) to leave room for the "
                             f"prompt, got {toks}")
        prompt = encode_text(tokenizer, req[0]) if req[0] else _start_ids(tokenizer)
        prompt = prompt[-(max_len - toks):]
        parsed.append((prompt, until, toks, sampling))
    out: List[str] = [""] * len(parsed)
    for sampling in sorted({p[3] for p in parsed}, key=repr):
        idx = [i for i, p in enumerate(parsed) if p[3] == sampling]
        idx.sort(key=lambda i: -len(parsed[i][0]))
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            budget = max(parsed[i][2] for i in chunk)
            new = generate_token_ids(model, [parsed[i][0] for i in chunk], max_new_tokens=budget,
                                     batch_size=len(chunk), stops=stops, **dict(sampling))
            for i, toks in zip(chunk, new):
                text = decode_until_stop(tokenizer, toks[:parsed[i][2]], stops)
                out[i] = cut_at_stop_strings(text, parsed[i][1])
    return out


_loglikelihood = lm_loglikelihood
_loglikelihood_rolling = lm_loglikelihood_rolling
_generate_until = lm_generate_until
_CLASSES: Dict[type, type] = {}


def _adapter_class(base: type) -> type:
    """The adapter class built on ``base`` (lm_eval's ``LM``; tests pass a stand-in)."""
    if base in _CLASSES:
        return _CLASSES[base]

    class FastattnLM(base):
        """lm-eval ``LM`` wrapping a fastattn model and tokenizer (see the module docstring)."""

        def __init__(self, model, tokenizer, options: LMEvalOptions = LMEvalOptions()):
            super().__init__()
            self.model, self.tokenizer, self.options = model, tokenizer, options

        def _kw(self) -> dict:
            return dict(batch_size=self.options.batch_size, max_length=self.options.max_length)

        def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
            return lm_loglikelihood(self.model, self.tokenizer, [tuple(r.args) for r in requests], **self._kw())

        def loglikelihood_rolling(self, requests) -> List[float]:
            return lm_loglikelihood_rolling(self.model, self.tokenizer, [r.args[0] for r in requests], **self._kw())

        def generate_until(self, requests) -> List[str]:
            reqs = [(r.args[0], r.args[1] if len(r.args) > 1 else {}) for r in requests]
            return lm_generate_until(self.model, self.tokenizer, reqs, max_gen_toks=self.options.max_gen_toks,
                                     **self._kw())

        def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
            return chat_text(self.tokenizer, chat_history, add_generation_prompt=add_generation_prompt)

        def chat_template(self, chat_template=False) -> str:
            return "fastattn-render_chat"

        @property
        def tokenizer_name(self) -> str:
            return type(self.tokenizer).__name__

    _CLASSES[base] = FastattnLM
    return FastattnLM


def make_lm_eval_model(model, tokenizer, *, batch_size: int = 16, max_length: Optional[int] = None,
                       max_gen_toks: int = 256):
    """An lm-eval ``LM`` instance evaluating ``model`` with ``tokenizer`` (pass it as ``lm_eval.simple_evaluate(
    model=...)``).

    Args:
        model: a :class:`~fastattn.models.HybridLM` (eval mode is set during each call).
        tokenizer: ``fastattn.distill.Tokenizer``.
        batch_size, max_length, max_gen_toks: see :class:`LMEvalOptions`.
    Returns:
        the adapter instance.
    Raises:
        ImportError: lm-eval-harness is not installed.

    Example (needs ``pip install lm-eval`` and network access for the task data):
        >>> import lm_eval                                                     # doctest: +SKIP
        >>> from fastattn.distill import ByteTokenizer
        >>> lm = make_lm_eval_model(model, ByteTokenizer(), batch_size=8)     # doctest: +SKIP
        >>> lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])       # doctest: +SKIP
    """
    try:
        from lm_eval.api.model import LM
    except ImportError as e:
        raise ImportError("make_lm_eval_model needs lm-eval-harness: `pip install lm-eval` (the plain functions "
                          "lm_loglikelihood / lm_loglikelihood_rolling / lm_generate_until work without it)") from e
    return _adapter_class(LM)(model, tokenizer, LMEvalOptions(batch_size, max_length, max_gen_toks))
