"""fastattn.eval lm-eval adapter: the core functions against hand computations (lm_eval not needed), the adapter
class on a stand-in base, and the clear ImportError without lm_eval."""
import importlib.util
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, strategies as st

from fastattn.eval import (chat_text, encode_text, lm_generate_until, lm_loglikelihood, lm_loglikelihood_rolling,
                           make_lm_eval_model, rolling_windows)
from fastattn.eval.lm_eval_adapter import (LMEvalOptions, _adapter_class, _generate_until, _loglikelihood,
                                           _loglikelihood_rolling)
from test_eval_utils import IM_END, TOK, BigramRule, PromptScript, ScriptedLM, direct_greedy, direct_logprob, follow
from test_models_utils import make_model

EOS = TOK.eos_id


def tiny(preset="attention"):
    return make_model(preset, vocab_size=TOK.vocab_size, num_hidden_layers=2)


def test_loglikelihood_matches_direct_forward():
    model = tiny()
    pairs = [("The sky is", " blue"), ("", "hello"), ("a", "b"), ("<|im_start|>user\nhi<|im_end|>\n", "ok"),
             ("2 + 2 =", " 4\n")]
    got = lm_loglikelihood(model, TOK, pairs, batch_size=2)
    assert _loglikelihood is lm_loglikelihood
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        ctx_ids = encode_text(TOK, ctx) if ctx else [EOS]
        ref_lp, ref_greedy = direct_logprob(model, ctx_ids, TOK.encode(cont))
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy
    assert encode_text(TOK, pairs[3][0])[0] == TOK.im_start_id


def test_loglikelihood_greedy_flag_and_truncation():
    model = ScriptedLM(lambda hist: {ord("x"): 10.0})
    (lp_xx, g_xx), (lp_xy, g_xy) = lm_loglikelihood(model, TOK, [("ab", "xx"), ("ab", "xy")])
    assert g_xx and not g_xy
    one = torch.log_softmax(torch.tensor([10.0] + [0.0] * (TOK.vocab_size - 1)), 0)
    assert lp_xx == pytest.approx(2 * float(one[0]), abs=1e-5)
    assert lp_xy == pytest.approx(float(one[0] + one[1]), abs=1e-5)
    real = tiny()
    ctx, cont = "abcdefghij", "kl"
    (lp, _), = lm_loglikelihood(real, TOK, [(ctx, cont)], max_length=5)   # input = last 5 of the 12 tokens
    assert lp == pytest.approx(direct_logprob(real, TOK.encode(ctx)[-4:], TOK.encode(cont))[0], abs=1e-4)
    with pytest.raises(ValueError, match="more than max_length"):
        lm_loglikelihood(real, TOK, [("a", "bcdef")], max_length=3)
    with pytest.raises(ValueError, match="no tokens"):
        lm_loglikelihood(real, TOK, [("a", "")])
    with pytest.raises(TypeError, match=r"pairs\[0\]"):
        lm_loglikelihood(real, TOK, [("a",)])


@given(n=st.integers(0, 40), max_length=st.integers(1, 12))
def test_rolling_windows_cover_every_token_once(n, max_length):
    windows = rolling_windows(n, max_length)
    scored = [j for _, s, e in windows for j in range(s, e)]
    assert scored == list(range(1, n + 1))
    for a, s, e in windows:
        assert 0 <= a < s < e and e - 1 - a <= max_length
        assert a == max(0, e - 1 - max_length)     # as much left context as the budget allows


def test_loglikelihood_rolling_full_and_windowed():
    model = tiny()
    texts = ["hello world", "x", ""]
    got = lm_loglikelihood_rolling(model, TOK, texts, batch_size=2)
    assert _loglikelihood_rolling is lm_loglikelihood_rolling
    for text, lp in zip(texts, got):
        ref = direct_logprob(model, [EOS], TOK.encode(text))[0] if text else 0.0
        assert lp == pytest.approx(ref, abs=1e-4)
    # A bigram model's scores do not depend on how much context a window has: any windowing gives the full sum.
    bigram = ScriptedLM(BigramRule(seed=3))
    text = "the quick brown fox"
    full = direct_logprob(bigram, [EOS], TOK.encode(text))[0]
    for max_length in (1, 2, 5, 64):
        (lp,) = lm_loglikelihood_rolling(bigram, TOK, [text], max_length=max_length)
        assert lp == pytest.approx(full, abs=1e-3)


def _hello_model(prompts):
    target = TOK.encode("hello world") + [IM_END]
    return ScriptedLM(PromptScript({tuple(encode_text(TOK, p)): follow(target) for p in prompts}))


def test_generate_until_stop_strings_and_budget():
    model = _hello_model(["Say hi", "Other"])
    requests = [("Say hi", {"until": ["o w"], "max_gen_toks": 20}), ("Say hi", {"max_gen_toks": 4}),
                ("Other", {"until": "l"}), ("Say hi", {}), ("Other", {"until": ["zz", "d", "wor"]}),
                ("Say hi", {"until": ["o"], "do_sample": False, "temperature": 0.0})]
    got = lm_generate_until(model, TOK, requests, batch_size=2)
    assert _generate_until is lm_generate_until
    assert got == ["hell", "hell", "he", "hello world", "hello ", "hell"]


def test_generate_until_matches_direct_greedy():
    model = tiny("hybrid-kda")
    contexts = ["Q: 1+1?\nA:", "Once upon", "x"]
    got = lm_generate_until(model, TOK, [(c, {"max_gen_toks": 5}) for c in contexts], batch_size=2)
    assert got == [direct_greedy(model, TOK.encode(c), 5) for c in contexts]
    cut = lm_generate_until(model, TOK, [(contexts[0], {"max_gen_toks": 3})], max_length=7)
    assert cut == [direct_greedy(model, TOK.encode(contexts[0])[-4:], 3)]    # prompt keeps 7 - 3 tokens


def test_generate_until_rejects_bad_kwargs():
    model = tiny()
    with pytest.raises(ValueError, match="unsupported generation kwargs"):
        lm_generate_until(model, TOK, [("a", {"num_beams": 2})])
    with pytest.raises(TypeError, match="'until'"):
        lm_generate_until(model, TOK, [("a", {"until": 3})])
    with pytest.raises(ValueError, match="max_gen_toks"):
        lm_generate_until(model, TOK, [("a", {"max_gen_toks": 0})])
    with pytest.raises(ValueError, match="leave room"):
        lm_generate_until(model, TOK, [("a", {"max_gen_toks": 8})], max_length=8)


def test_chat_text_round_trips_through_encode_text():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "What is 2 + 3?"}]
    text = chat_text(TOK, msgs)
    assert encode_text(TOK, text) == list(TOK.render_chat(msgs, add_generation_prompt=True).ids)
    assert encode_text(TOK, "plain <|im_end") == TOK.encode("plain <|im_end")


def test_adapter_class_on_stand_in_base():
    target = TOK.encode("hello world") + [IM_END]
    prompt = chat_text(TOK, [{"role": "user", "content": "hi"}])
    model = ScriptedLM(PromptScript({tuple(encode_text(TOK, prompt)): follow(target)}))
    lm = _adapter_class(object)(model, TOK, LMEvalOptions(batch_size=2, max_length=64, max_gen_toks=16))
    assert lm.apply_chat_template([{"role": "user", "content": "hi"}]) == prompt
    assert lm.tokenizer_name == "ByteTokenizer"
    req = SimpleNamespace
    assert lm.generate_until([req(args=(prompt, {"until": [" "]}))]) == ["hello"]
    ll = lm.loglikelihood([req(args=(prompt, "hello")), req(args=(prompt, "help"))])
    assert ll[0][1] is True and ll[1][1] is False and ll[0][0] > ll[1][0]
    assert lm.loglikelihood_rolling([req(args=("hey",))]) == pytest.approx(
        lm_loglikelihood_rolling(model, TOK, ["hey"], max_length=64))
    with pytest.raises(ValueError, match="batch_size"):
        LMEvalOptions(batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        LMEvalOptions(max_length=0)
    with pytest.raises(ValueError, match="max_gen_toks must be < max_length"):
        LMEvalOptions(max_length=64)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm_eval is installed")
def test_make_lm_eval_model_needs_lm_eval():
    with pytest.raises(ImportError, match="pip install lm-eval"):
        make_lm_eval_model(tiny(), TOK)
