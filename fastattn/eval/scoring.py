"""Score models on task items two ways: log-likelihood ranking of the options and greedy generation.

Log-likelihood (LL) scoring ranks the *letter* continuations, not the option texts: for option ``L`` the
continuation is what a correct chat completion would hold, the assistant span of
``render_chat(messages + [{"role": "assistant", "content": item.reply_with(L)}])`` (the reply for letter
``L`` in the item's reply format, e.g. ``"B"`` or ``"The answer is (B)."``, and the end-of-turn token),
scored after the prompt rendered with the generation header. That is exactly what greedy generation has to
produce, so the gap between LL accuracy and generation accuracy measures generation failures (an "always A"
collapse, a lost or drifting reply format) rather than a difference between two questions. With a multi-token
format the LL scorer reads the format tokens teacher-forced, while generation has to produce them itself.

Batches are left-padded with an attention mask (models whose layers are all attention/KDA) or made of rows of
equal length (models with EVA layers, which cannot skip padding). Log-probabilities are computed in fp32.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .extract import extract_answer, normalize_text
from .tasks import LETTERS, Item, _check_items

Pair = Tuple[Sequence[int], Sequence[int]]


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(model.parameters()).device


def _needs_equal_lengths(model) -> bool:
    layer_types = getattr(getattr(model, "config", None), "layer_types", None) or ()
    return "eva" in layer_types


@contextlib.contextmanager
def _inference(model):
    """Eval mode and no autograd for the duration; the training flag is restored afterwards."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def _batches(lengths: Sequence[int], batch_size: int, equal_lengths: bool) -> List[List[int]]:
    """Index batches, longest first; with ``equal_lengths`` every batch holds rows of one length."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if not equal_lengths:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    out: List[List[int]] = []
    start = 0
    while start < len(order):
        end = start
        while end < len(order) and end - start < batch_size and lengths[order[end]] == lengths[order[start]]:
            end += 1
        out.append(order[start:end])
        start = end
    return out


def continuation_logprobs(model, pairs: Sequence[Pair], *, batch_size: int = 16) -> List[Tuple[float, bool]]:
    """Summed log-probability of each continuation after its context, and whether greedy decoding produces it.

    Args:
        model: a causal LM called as ``model(ids [B, T], attention_mask=..., logits_to_keep=K)`` returning logits
            ``[B, K, V]`` (a :class:`~fastattn.models.HybridLM`).
        pairs: ``(context_ids, continuation_ids)`` token lists; the context must hold at least one token (it
            predicts the first continuation token) and the continuation at least one.
        batch_size: rows per forward pass.
    Returns:
        one ``(sum_t log p(cont_t | context, cont_<t), is_greedy)`` per pair, where ``is_greedy`` is True when
        every continuation token is the argmax of its distribution.

    Example:
        >>> from fastattn.models import HybridConfig, HybridLM
        >>> cfg = HybridConfig.from_preset("attention", vocab_size=16, hidden_size=32, intermediate_size=64,
        ...                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        ...                                head_dim=16)
        >>> lp, greedy = continuation_logprobs(HybridLM(cfg), [([1, 2, 3], [4, 5])])[0]
        >>> lp < 0
        True
    """
    _check_batch_size(batch_size)
    if not isinstance(pairs, (list, tuple)):
        raise TypeError(f"pairs must be a list of (context_ids, continuation_ids), got {type(pairs).__name__}")
    rows: List[Tuple[List[int], int]] = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TypeError(f"pairs[{i}] must be a (context_ids, continuation_ids) pair, got {pair!r:.80}")
        ctx, cont = [int(t) for t in pair[0]], [int(t) for t in pair[1]]
        if not ctx:
            raise ValueError(f"pairs[{i}] has an empty context; it needs at least one token (e.g. a BOS/EOS id)")
        if not cont:
            raise ValueError(f"pairs[{i}] has an empty continuation; it needs at least one token")
        rows.append((ctx + cont, len(cont)))
    results: List[Tuple[float, bool]] = [(0.0, False)] * len(rows)
    if not rows:
        return results
    device = _device(model)
    lengths = [len(seq) for seq, _ in rows]
    with _inference(model):
        for batch in _batches(lengths, batch_size, _needs_equal_lengths(model)):
            L = max(lengths[i] for i in batch)
            K = max(rows[i][1] for i in batch)
            ids = torch.zeros(len(batch), L, dtype=torch.long)
            mask = torch.zeros(len(batch), L, dtype=torch.long)
            for r, i in enumerate(batch):
                seq = rows[i][0]
                ids[r, L - len(seq):] = torch.tensor(seq, dtype=torch.long)
                mask[r, L - len(seq):] = 1
            ids, mask = ids.to(device), mask.to(device)
            attn = None if bool(mask.bool().all()) else mask[:, :-1]
            # The last token is never an input that matters: drop it; the last K logits predict ids[:, L-K:].
            logits = model(ids[:, :-1], attention_mask=attn, logits_to_keep=K)
            logp = torch.log_softmax(logits[:, -K:].float(), dim=-1)
            targets = ids[:, L - K:]
            token_lp = logp.gather(-1, targets[..., None]).squeeze(-1)
            greedy = logp.argmax(dim=-1) == targets
            for r, i in enumerate(batch):
                c = rows[i][1]
                results[i] = (float(token_lp[r, K - c:].sum()), bool(greedy[r, K - c:].all()))
    return results


def stop_token_ids(tokenizer) -> Tuple[int, ...]:
    """Token ids that end an assistant turn: the end-of-turn token, then ``tokenizer.eos_id`` (deduplicated).

    The end-of-turn token is read from the tokenizer's own chat rendering (the first token of the assistant span
    of an empty assistant message), so any tokenizer following the ``fastattn.distill.Tokenizer`` protocol works.

    Example:
        >>> from fastattn.distill import ByteTokenizer
        >>> stop_token_ids(ByteTokenizer())
        (257, 258)
    """
    rendered = tokenizer.render_chat([{"role": "assistant", "content": ""}])
    ids: List[int] = []
    if rendered.spans and rendered.spans[0][1] > rendered.spans[0][0]:
        ids.append(int(rendered.ids[rendered.spans[0][0]]))
    eos = getattr(tokenizer, "eos_id", None)
    if eos is not None and int(eos) not in ids:
        ids.append(int(eos))
    if not ids:
        raise ValueError("tokenizer has neither an end-of-turn token in its chat rendering nor an eos_id")
    return tuple(ids)


def _prompt_ids(tokenizer, item: Item) -> List[int]:
    return list(tokenizer.render_chat(list(item.messages), add_generation_prompt=True).ids)


def option_logprobs(model, tokenizer, items: Sequence[Item], *, batch_size: int = 16) -> List[List[float]]:
    """Per multiple-choice item, the summed log-probability of each option letter's assistant continuation.

    Args:
        model: causal LM (see :func:`continuation_logprobs`).
        tokenizer: a ``fastattn.distill.Tokenizer`` (e.g. ``ByteTokenizer``).
        items: multiple-choice :class:`Item` objects (TypeError/ValueError for others).
        batch_size: rows (item x option) per forward pass.
    Returns:
        ``scores[i][j]`` = log p(reply for letter j + end-of-turn | rendered prompt of item i with generation
        header), the reply being ``items[i].reply_with(letter)``.

    Example:
        >>> from fastattn.distill import ByteTokenizer
        >>> from fastattn.eval.tasks import make_tasks
        >>> from fastattn.models import HybridConfig, HybridLM
        >>> cfg = HybridConfig.from_preset("attention", vocab_size=260, hidden_size=32, intermediate_size=64,
        ...                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        ...                                head_dim=16)
        >>> scores = option_logprobs(HybridLM(cfg), ByteTokenizer(), make_tasks(2, kinds=("mc",)))
        >>> [len(s) for s in scores]
        [4, 4]
    """
    items = _check_items(items)
    pairs: List[Pair] = []
    for i, it in enumerate(items):
        if not it.is_mc:
            raise ValueError(f"items[{i}] must be multiple choice (with options), got kind {it.kind!r}")
        prompt = _prompt_ids(tokenizer, it)
        for letter in it.letters:
            full = tokenizer.render_chat(list(it.messages) + [{"role": "assistant", "content": it.reply_with(letter)}])
            s, e = full.spans[-1]
            pairs.append((prompt, list(full.ids[s:e])))
    flat = continuation_logprobs(model, pairs, batch_size=batch_size)
    out, k = [], 0
    for it in items:
        out.append([lp for lp, _ in flat[k:k + len(it.options)]])
        k += len(it.options)
    return out


def loglik_choice(model, tokenizer, items: Sequence[Item], *, batch_size: int = 16) -> List[int]:
    """Index of the best option per multiple-choice item by :func:`option_logprobs` (first index on ties).

    Example:
        >>> from fastattn.distill import ByteTokenizer
        >>> from fastattn.eval.tasks import make_tasks
        >>> from fastattn.models import HybridConfig, HybridLM
        >>> cfg = HybridConfig.from_preset("attention", vocab_size=260, hidden_size=32, intermediate_size=64,
        ...                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        ...                                head_dim=16)
        >>> choices = loglik_choice(HybridLM(cfg), ByteTokenizer(), make_tasks(3, kinds=("mc",)))
        >>> all(0 <= c < 4 for c in choices)
        True
    """
    scores = option_logprobs(model, tokenizer, items, batch_size=batch_size)
    return [max(range(len(s)), key=lambda j: (s[j], -j)) for s in scores]


def decode_until_stop(tokenizer, tokens: Sequence[int], stops: Sequence[int]) -> str:
    """Decode ``tokens`` up to (excluding) the first token in ``stops``.

    Example:
        >>> from fastattn.distill import ByteTokenizer
        >>> decode_until_stop(ByteTokenizer(), [66, 257, 65], (257,))
        'B'
    """
    stop_set = {int(s) for s in stops}
    kept: List[int] = []
    for t in tokens:
        if int(t) in stop_set:
            break
        kept.append(int(t))
    return tokenizer.decode(kept)


def generate_token_ids(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int,
                       stops: Sequence[int], **generate_kwargs) -> List[List[int]]:
    """Greedy (or sampled, through ``generate_kwargs``) continuations of token prompts, batched by length.

    Args:
        model: a model with ``generate(list_of_prompt_ids, max_new_tokens=..., eos_token_id=[...], **kwargs)``.
        prompts: token-id lists (each non-empty).
        max_new_tokens: generation budget, >= 1.
        batch_size: prompts per ``generate`` call (longest first, to limit padding).
        stops: stop token ids (a row ends after emitting one); empty for none.
        generate_kwargs: passed on (e.g. ``do_sample=True, temperature=0.7``).
    Returns:
        the new tokens per prompt, in prompt order (the stop token included when one was emitted, the padding
        after it removed).

    Example:
        >>> from fastattn.models import HybridConfig, HybridLM
        >>> cfg = HybridConfig.from_preset("attention", vocab_size=16, hidden_size=32, intermediate_size=64,
        ...                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        ...                                head_dim=16)
        >>> [len(t) for t in generate_token_ids(HybridLM(cfg), [[1, 2], [3]], max_new_tokens=3, batch_size=2,
        ...                                     stops=())]
        [3, 3]
    """
    _check_batch_size(batch_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"model must have a generate() method (a HybridLM), got {type(model).__name__}")
    stop_list = [int(s) for s in stops]
    out: List[List[int]] = [[] for _ in prompts]
    lengths = [len(p) for p in prompts]
    with _inference(model):
        for batch in _batches(lengths, batch_size, equal_lengths=False):
            new = model.generate([list(prompts[i]) for i in batch], max_new_tokens=max_new_tokens,
                                 eos_token_id=stop_list, **generate_kwargs)
            for r, i in enumerate(batch):
                toks = []
                for t in new[r].tolist():
                    toks.append(int(t))
                    if t in stop_list:
                        break
                out[i] = toks
    return out


def reply_budget(tokenizer, items: Sequence[Item]) -> int:
    """The default generation budget for ``items``: the longest gold reply in tokens plus 2, at least 8.

    Example:
        >>> from fastattn.distill import ByteTokenizer
        >>> from fastattn.eval.tasks import make_tasks
        >>> reply_budget(ByteTokenizer(), make_tasks(4, kinds=("mc",))), reply_budget(ByteTokenizer(),
        ...     make_tasks(4, kinds=("mc",), reply_style="sentence"))
        (8, 20)
    """
    return max([8] + [len(tokenizer.encode(it.reply)) + 2 for it in _check_items(items)])


def generate_answers(model, tokenizer, items: Sequence[Item], *, max_new_tokens: Optional[int] = None,
                     batch_size: int = 16) -> List[str]:
    """Greedy assistant replies to each item's prompt, decoded up to the end-of-turn (or eos) token.

    Args:
        model: a model with ``generate(list_of_prompt_ids, max_new_tokens=..., eos_token_id=[...])``.
        tokenizer: ``fastattn.distill.Tokenizer``; prompts are ``render_chat(messages, add_generation_prompt=True)``.
        items: :class:`Item` list (any kinds).
        max_new_tokens: generation budget per item; None (default): :func:`reply_budget` of the items.
        batch_size: prompts per ``generate`` call (sorted by length to limit padding).
    Returns:
        one decoded text per item, without the stop token.

    Example:
        >>> from fastattn.distill import ByteTokenizer
        >>> from fastattn.eval.tasks import make_tasks
        >>> from fastattn.models import HybridConfig, HybridLM
        >>> cfg = HybridConfig.from_preset("attention", vocab_size=260, hidden_size=32, intermediate_size=64,
        ...                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        ...                                head_dim=16)
        >>> len(generate_answers(HybridLM(cfg), ByteTokenizer(), make_tasks(3), max_new_tokens=2))
        3
    """
    items = _check_items(items)
    if max_new_tokens is None:
        max_new_tokens = reply_budget(tokenizer, items)
    stops = stop_token_ids(tokenizer)
    prompts = [_prompt_ids(tokenizer, it) for it in items]
    new = generate_token_ids(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, stops=stops)
    return [decode_until_stop(tokenizer, toks, stops) for toks in new]


def is_correct(item: Item, prediction: Optional[str]) -> bool:
    """Whether an extracted answer is right: the letter for multiple choice, normalised equality otherwise.

    Args:
        item: the :class:`Item`.
        prediction: the output of :func:`extract_answer` for the item (None counts as wrong).
    Returns:
        True when the prediction matches ``item.answer``.

    Example:
        >>> is_correct(Item("kv", ({"role": "user", "content": "a: Blue\\nWhat is the value of a?"},), "blue"), "Blue")
        True
    """
    if prediction is None:
        return False
    if item.is_mc:
        return prediction == item.answer
    return normalize_text(prediction) == normalize_text(item.answer)


@dataclass
class EvalReport:
    """Result of :func:`evaluate`.

    Fields: ``n`` items; ``ll_acc`` LL accuracy over multiple-choice items (None without any); ``gen_acc``
    generation exact-match accuracy over all items; ``gen_acc_mc`` the same over multiple-choice items (None
    without any); ``gap = ll_acc - gen_acc_mc`` (None without MC items); ``invalid_rate`` fraction of all
    generations with no extractable answer; ``letter_hist`` generated letters over MC items (every valid letter,
    zeros included, plus ``"invalid"``; sums to ``n_mc``); ``ll_letter_hist`` LL-chosen letters (letters only;
    sums to ``n_mc``); ``per_kind`` generation accuracy per item kind; ``n_mc`` multiple-choice item count;
    ``generations`` the raw generated texts in item order.
    """
    n: int
    ll_acc: Optional[float]
    gen_acc: float
    gen_acc_mc: Optional[float]
    gap: Optional[float]
    invalid_rate: float
    letter_hist: Dict[str, int]
    ll_letter_hist: Dict[str, int]
    per_kind: Dict[str, float]
    n_mc: int = 0
    generations: Tuple[str, ...] = field(default=(), repr=False)

    def to_dict(self, include_generations: bool = False) -> dict:
        """Plain-dict form (JSON-serialisable); the raw generations only when asked."""
        d = asdict(self)
        if include_generations:
            d["generations"] = list(self.generations)
        else:
            del d["generations"]
        return d


def evaluate(model, tokenizer, items: Sequence[Item], *, max_new_tokens: Optional[int] = None,
             batch_size: int = 16) -> EvalReport:
    """Score ``items`` by LL ranking (multiple-choice items) and greedy generation with answer extraction.

    Args:
        model: a :class:`~fastattn.models.HybridLM` (or any model with the same forward/generate calls) on any
            device; it is put in eval mode for the call (its training flag is restored) and run without autograd.
        tokenizer: ``fastattn.distill.Tokenizer`` (e.g. ``ByteTokenizer``).
        items: at least one :class:`Item`; generations are read with each item's ``reply_format``
            (:func:`~fastattn.eval.extract_answer`).
        max_new_tokens: generation budget per item; None (default): :func:`reply_budget` of the items.
        batch_size: rows per forward / prompts per generate call.
    Returns:
        an :class:`EvalReport`.

    Example:
        >>> from fastattn.distill import ByteTokenizer
        >>> from fastattn.eval.tasks import make_tasks
        >>> from fastattn.models import HybridConfig, HybridLM
        >>> cfg = HybridConfig.from_preset("attention", vocab_size=260, hidden_size=32, intermediate_size=64,
        ...                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        ...                                head_dim=16)
        >>> rep = evaluate(HybridLM(cfg), ByteTokenizer(), make_tasks(6), max_new_tokens=3)
        >>> rep.n, sum(rep.letter_hist.values()) == rep.n_mc
        (6, True)
    """
    items = _check_items(items)
    if not items:
        raise ValueError("items must hold at least one Item, got 0")
    mc_idx = [i for i, it in enumerate(items) if it.is_mc]
    letters = sorted({c for i in mc_idx for c in items[i].letters})
    ll_hist = {c: 0 for c in letters}
    ll_acc = None
    if mc_idx:
        choices = loglik_choice(model, tokenizer, [items[i] for i in mc_idx], batch_size=batch_size)
        for i, c in zip(mc_idx, choices):
            ll_hist[LETTERS[c]] += 1
        ll_acc = sum(c == items[i].answer_index for i, c in zip(mc_idx, choices)) / len(mc_idx)
    texts = generate_answers(model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
    preds = [extract_answer(t, it.options, it.reply_format) for t, it in zip(texts, items)]
    correct = [is_correct(it, p) for it, p in zip(items, preds)]
    gen_hist = {c: 0 for c in letters}
    gen_hist["invalid"] = 0
    for i in mc_idx:
        gen_hist[preds[i] if preds[i] is not None else "invalid"] += 1
    gen_acc_mc = sum(correct[i] for i in mc_idx) / len(mc_idx) if mc_idx else None
    per_kind: Dict[str, float] = {}
    for kind in sorted({it.kind for it in items}):
        idx = [i for i, it in enumerate(items) if it.kind == kind]
        per_kind[kind] = sum(correct[i] for i in idx) / len(idx)
    return EvalReport(
        n=len(items), ll_acc=ll_acc, gen_acc=sum(correct) / len(items), gen_acc_mc=gen_acc_mc,
        gap=None if ll_acc is None else ll_acc - gen_acc_mc,
        invalid_rate=sum(p is None for p in preds) / len(items),
        letter_hist=gen_hist if mc_idx else {}, ll_letter_hist=ll_hist, per_kind=per_kind, n_mc=len(mc_idx),
        generations=tuple(texts))


def _fmt_rate(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def _fmt_hist(hist: Dict[str, int]) -> str:
    if not hist:
        return "-"
    return " ".join(f"{'inv' if k == 'invalid' else k}:{v}" for k, v in hist.items())


def format_report_table(reports: Dict[str, EvalReport], *, extra: Optional[Dict[str, Dict[str, str]]] = None,
                        kinds: Sequence[str] = ()) -> str:
    """Fixed-width text table, one row per model: n, LL acc, generation acc (all / MC), gap, invalid rate and the
    generated and LL letter histograms, then optional extra columns and per-kind generation accuracy.

    Args:
        reports: model name -> :class:`EvalReport` (insertion order kept), at least one.
        extra: more columns, right-aligned after the histograms: column name -> {model name -> cell text}; a
            model missing from a column shows ``-``.
        kinds: item kinds whose generation accuracy (``EvalReport.per_kind``) gets a column each, last;
            ``-`` for a report without items of that kind.
    Returns:
        the table as one string (header, rule, rows), every line the same width.

    Example:
        >>> rep = EvalReport(n=4, ll_acc=1.0, gen_acc=0.25, gen_acc_mc=0.25, gap=0.75, invalid_rate=0.0,
        ...                  letter_hist={"A": 4, "B": 0, "invalid": 0}, ll_letter_hist={"A": 2, "B": 2},
        ...                  per_kind={"mc": 0.25}, n_mc=4)
        >>> print(format_report_table({"student": rep}).splitlines()[2].split()[:6])
        ['student', '4', '1.000', '0.250', '0.250', '+0.750']
        >>> table = format_report_table({"s": rep}, extra={"kl": {"s": "0.12"}}, kinds=("mc", "kv"))
        >>> table.splitlines()[2].split()[-3:]
        ['0.12', '0.250', '-']
    """
    if not isinstance(reports, dict) or not reports:
        raise ValueError(f"reports must be a non-empty dict of name -> EvalReport, got {reports!r:.80}")
    extra = {} if extra is None else extra
    if not isinstance(extra, dict) or not all(isinstance(col, dict) for col in extra.values()):
        raise TypeError(f"extra must be a dict of column name -> {{model name -> str}}, got {extra!r:.80}")
    if isinstance(kinds, str) or not isinstance(kinds, (list, tuple)):
        raise TypeError(f"kinds must be a tuple of item kinds, got {kinds!r:.80}")
    header = ["model", "n", "ll_acc", "gen_acc", "gen_mc", "gap", "invalid", "gen letters", "ll letters"]
    header += [str(c) for c in extra] + [str(k) for k in kinds]
    rows = []
    for name, r in reports.items():
        if not isinstance(r, EvalReport):
            raise TypeError(f"reports[{name!r}] must be an EvalReport, got {type(r).__name__}")
        rows.append([str(name), str(r.n), _fmt_rate(r.ll_acc), _fmt_rate(r.gen_acc), _fmt_rate(r.gen_acc_mc),
                     "-" if r.gap is None else f"{r.gap:+.3f}", _fmt_rate(r.invalid_rate),
                     _fmt_hist(r.letter_hist), _fmt_hist(r.ll_letter_hist)]
                    + [str(col.get(name, "-")) for col in extra.values()]
                    + [_fmt_rate(r.per_kind.get(k)) for k in kinds])
    widths = [max(len(row[c]) for row in rows + [header]) for c in range(len(header))]

    def line(cells):
        parts = [cells[0].ljust(widths[0])] + [cells[c].rjust(widths[c]) for c in range(1, 7)]
        parts += [cells[c].ljust(widths[c]) for c in range(7, 9)]
        parts += [cells[c].rjust(widths[c]) for c in range(9, len(header))]
        return "  ".join(parts)
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(r) for r in rows])
