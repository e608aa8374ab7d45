"""Helpers for the eval tests (no tests here): a scripted fake LM whose next-token logits follow a rule."""
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import nn

from fastattn.distill import ByteTokenizer
from fastattn.eval import Item
from fastattn.models import HybridConfig, generate

TOK = ByteTokenizer()
V = TOK.vocab_size
IM_END = TOK.im_end_id
HIGH, MID = 10.0, 5.0

Scores = Dict[int, float]


class _History:
    """The fake's cache: the real tokens each row has seen."""

    def __init__(self, batch_size: int):
        self.rows = [[] for _ in range(batch_size)]


class ScriptedLM(nn.Module):
    """Causal LM stand-in: ``rule(real tokens so far) -> {token: logit}`` (missing tokens have logit 0) or a
    ``[V]`` logits tensor.

    Left padding (``attention_mask`` 0) is skipped, so padded and unpadded rows see the same history; the cache
    keeps each row's history so that ``fastattn.models.generate`` works unchanged.
    """

    def __init__(self, rule: Callable[[Tuple[int, ...]], Scores]):
        super().__init__()
        self.config = HybridConfig.from_preset("attention", vocab_size=V, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               head_dim=16)
        self.rule = rule
        self.anchor = nn.Parameter(torch.zeros(()))

    @property
    def device(self):
        return self.anchor.device

    def new_cache(self, batch_size, capacity=0):
        return _History(batch_size)

    def generate(self, input_ids, **kwargs):
        return generate(self, input_ids, **kwargs)

    def forward(self, input_ids, *, cache=None, attention_mask=None, logits_to_keep=0):
        B, T = input_ids.shape
        keep = T if logits_to_keep == 0 else min(logits_to_keep, T)
        valid = attention_mask.bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool)
        out = torch.zeros(B, keep, V)
        for b in range(B):
            hist = list(cache.rows[b]) if cache is not None else []
            for t in range(T):
                if valid[b, t]:
                    hist.append(int(input_ids[b, t]))
                if t >= T - keep and valid[b, t]:
                    scores = self.rule(tuple(hist))
                    if isinstance(scores, torch.Tensor):
                        out[b, t - (T - keep)] = scores
                        continue
                    for tok, logit in scores.items():
                        out[b, t - (T - keep), tok] = logit
            if cache is not None:
                cache.rows[b] = hist
        return out


class PromptScript:
    """Rule keyed by prompt: ``policies[prompt_ids](generated_so_far) -> {token: logit}``; unknown -> end of turn."""

    def __init__(self, policies: Dict[Tuple[int, ...], Callable[[Tuple[int, ...]], Scores]]):
        self.policies = policies
        self.longest = max(len(p) for p in policies)

    def __call__(self, hist: Tuple[int, ...]) -> Scores:
        for cut in range(min(len(hist), self.longest), 0, -1):
            policy = self.policies.get(hist[:cut])
            if policy is not None:
                return policy(hist[cut:])
        return {IM_END: HIGH}


def follow(target: Sequence[int]) -> Callable[[Tuple[int, ...]], Scores]:
    """Policy emitting ``target`` token by token, then end of turn."""
    target = tuple(target)

    def policy(gen):
        if len(gen) < len(target) and gen == target[:len(gen)]:
            return {target[len(gen)]: HIGH}
        return {IM_END: HIGH}
    return policy


def prompt_ids(item: Item) -> Tuple[int, ...]:
    return TOK.render_chat(list(item.messages), add_generation_prompt=True).ids


def task_model(items: Sequence[Item], policy: str) -> ScriptedLM:
    """A fake that knows every item's answer and behaves per ``policy``.

    ``oracle``: answers everything right. ``collapse``: free-form answers right; on multiple choice the letter "A"
    gets logit 10 and the right letter 5, and after a wrong "A" it writes "." before the end of turn, so the
    log-likelihood ranking picks the right letter while greedy generation always says "A." (a visible gap).
    ``garbage``: always "z" (no stop). ``silent``: ends the turn at once.
    """
    A, dot, z = ord("A"), ord("."), ord("z")
    policies = {}
    for it in items:
        target = TOK.encode(it.answer) + [IM_END]
        if policy == "oracle" or (policy == "collapse" and not it.is_mc):
            policies[prompt_ids(it)] = follow(target)
        elif policy == "collapse":
            right = ord(it.answer)

            def pol(gen, right=right):
                if gen == ():
                    return {A: HIGH} if right == A else {A: HIGH, right: MID}
                if gen == (A,) and right != A:
                    return {dot: HIGH}
                return {IM_END: HIGH}
            policies[prompt_ids(it)] = pol
        elif policy == "garbage":
            policies[prompt_ids(it)] = lambda gen: {z: HIGH}
        elif policy == "silent":
            policies[prompt_ids(it)] = lambda gen: {IM_END: HIGH}
        else:
            raise ValueError(policy)
    return ScriptedLM(PromptScript(policies))


class BigramRule:
    """Logits depend only on the last token: a fixed random table (for window-independent rolling scores)."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(V, V, generator=g) * 3

    def __call__(self, hist):
        return self.table[hist[-1]]


def direct_logprob(model, context: Sequence[int], continuation: Sequence[int]) -> Tuple[float, bool]:
    """Hand computation: one unbatched forward over context + continuation, sum of log_softmax at the targets."""
    ids = torch.tensor([list(context) + list(continuation)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0].float(), dim=-1)
    total, greedy = 0.0, True
    for j, tok in enumerate(continuation):
        row = logp[len(context) - 1 + j]
        total += float(row[tok])
        greedy &= int(row.argmax()) == tok
    return total, greedy


def direct_greedy(model, prompt: Sequence[int], max_new_tokens: int, stops=(IM_END, TOK.eos_id)) -> str:
    """Hand computation: greedy decoding by full forwards without caches, decoded up to the stop token."""
    ids = list(prompt)
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tok = int(model(torch.tensor([ids]))[0, -1].argmax())
            if tok in stops:
                break
            new.append(tok)
            ids.append(tok)
    return TOK.decode(new)
