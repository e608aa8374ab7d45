"""fastattn.eval scoring: LL ranking and greedy generation against hand computations, scripted models that show an
"always A" collapse, a LL/generation gap and invalid answers, and the end-to-end report."""
import json
from collections import Counter

import pytest
import torch

from fastattn.eval import (LETTERS, EvalReport, continuation_logprobs, evaluate, extract_answer,
                           format_report_table, generate_answers, loglik_choice, make_tasks, option_logprobs,
                           stop_token_ids)
from fastattn.eval import reply_budget
from test_eval_utils import HIGH, IM_END, MID, TOK, PromptScript, ScriptedLM, direct_greedy, direct_logprob, follow, \
    prompt_ids, task_model
from test_models_utils import make_model


def tiny(preset="attention"):
    return make_model(preset, vocab_size=TOK.vocab_size, num_hidden_layers=2)


@pytest.mark.parametrize("preset", ["attention", "hybrid-kda", "eva"])
def test_option_logprobs_match_direct_forward(preset):
    model = tiny(preset)
    items = make_tasks(5, kinds=("mc",), seed=2) + make_tasks(2, kinds=("mc",), seed=9, system="Be brief.",
                                                              num_options=3)
    scores = option_logprobs(model, TOK, items, batch_size=3)
    choices = loglik_choice(model, TOK, items, batch_size=5)
    for it, row, choice in zip(items, scores, choices):
        manual = [direct_logprob(model, prompt_ids(it), [ord(c), TOK.im_end_id])[0] for c in it.letters]
        assert row == pytest.approx(manual, abs=1e-4)
        assert choice == max(range(len(manual)), key=manual.__getitem__)


def test_option_logprobs_score_the_sentence_reply():
    model = tiny()
    items = make_tasks(4, kinds=("mc",), seed=2, reply_style="sentence", num_options=3)
    for it, row in zip(items, option_logprobs(model, TOK, items, batch_size=5)):
        manual = [direct_logprob(model, prompt_ids(it), TOK.encode(f"The answer is ({c}).") + [IM_END])[0]
                  for c in it.letters]
        assert row == pytest.approx(manual, abs=1e-4)


def test_continuation_logprobs_ragged_batch_and_greedy_flag():
    model = tiny()
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randint(0, 256, (n,), generator=g).tolist(), torch.randint(0, 256, (c,), generator=g).tolist())
             for n, c in [(1, 1), (7, 3), (4, 6), (12, 1), (2, 2)]]
    greedy_cont = [int(model(torch.tensor([pairs[1][0]]))[0, -1].argmax())]
    pairs.append((pairs[1][0], greedy_cont))
    got = continuation_logprobs(model, pairs, batch_size=4)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        ref_lp, ref_greedy = direct_logprob(model, ctx, cont)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy
    assert got[-1][1] is True
    assert continuation_logprobs(model, []) == []


@pytest.mark.parametrize("preset", ["attention", "hybrid-kda"])
def test_generate_answers_match_direct_greedy(preset):
    model = tiny(preset)
    items = make_tasks(5, seed=6)
    texts = generate_answers(model, TOK, items, max_new_tokens=5, batch_size=2)
    assert texts == [direct_greedy(model, prompt_ids(it), 5) for it in items]


def test_generation_stops_at_end_of_turn():
    items = make_tasks(6, seed=1)
    texts = generate_answers(task_model(items, "oracle"), TOK, items, max_new_tokens=8)
    assert texts == [it.answer for it in items]
    assert stop_token_ids(TOK) == (TOK.im_end_id, TOK.eos_id)


def _letter_counts(letters, valid):
    c = Counter(letters)
    return {x: c.get(x, 0) for x in valid}


def test_oracle_model_scores_perfectly():
    items = make_tasks(18, seed=5)
    rep = evaluate(task_model(items, "oracle"), TOK, items)
    mc = [it for it in items if it.is_mc]
    assert (rep.ll_acc, rep.gen_acc, rep.gen_acc_mc, rep.gap, rep.invalid_rate) == (1.0, 1.0, 1.0, 0.0, 0.0)
    answers = _letter_counts([it.answer for it in mc], LETTERS[:4])
    assert rep.ll_letter_hist == answers
    assert rep.letter_hist == {**answers, "invalid": 0}
    assert rep.per_kind == {"arith": 1.0, "kv": 1.0, "mc": 1.0}


def test_always_A_collapse_is_visible_with_a_gap():
    items = make_tasks(24, seed=5)
    mc = [it for it in items if it.is_mc]
    n_a = sum(it.answer == "A" for it in mc)
    assert 0 < n_a < len(mc)
    rep = evaluate(task_model(items, "collapse"), TOK, items, batch_size=5)
    assert rep.letter_hist == {"A": len(mc), "B": 0, "C": 0, "D": 0, "invalid": 0}
    assert rep.ll_letter_hist == _letter_counts([it.answer for it in mc], LETTERS[:4])
    assert rep.ll_acc == 1.0
    assert rep.gen_acc_mc == pytest.approx(n_a / len(mc))
    assert rep.gap == pytest.approx(1.0 - n_a / len(mc)) and rep.gap > 0
    assert rep.per_kind["kv"] == rep.per_kind["arith"] == 1.0
    assert rep.gen_acc == pytest.approx((len(items) - len(mc) + n_a) / len(items))
    assert [g for g, it in zip(rep.generations, items) if it.is_mc] == \
        ["A" if it.answer == "A" else "A." for it in mc]
    table = format_report_table({"collapse": rep})
    assert f"A:{len(mc)}" in table and "inv:0" in table


def _format_drift_model(items):
    """Knows every answer; on multiple choice, teacher-forced after "The answer is (" it puts the right letter first,
    but greedily it writes "The answer is X." (the parentheses lost): LL right, generation invalid."""
    head, opening, closing, dot = tuple(TOK.encode("The answer is ")), ord("("), ord(")"), ord(".")
    policies = {}
    for it in items:
        if not it.is_mc:
            policies[prompt_ids(it)] = follow(TOK.encode(it.reply) + [IM_END])
            continue

        def pol(gen, right=ord(it.answer)):
            if len(gen) < len(head):
                return {head[len(gen)]: HIGH} if gen == head[:len(gen)] else {IM_END: HIGH}
            rest = gen[len(head):]
            if rest == ():                                   # greedy: the bare letter beats "("
                return {right: HIGH, opening: MID}
            if rest == (opening,):                           # teacher-forced (LL): the right letter first
                return {right: HIGH}
            if len(rest) == 2 and rest[0] == opening:
                return {closing: HIGH}
            if rest == (right,) or (len(rest) == 3 and rest[0] == opening and rest[2] == closing):
                return {dot: HIGH}
            return {IM_END: HIGH}
        policies[prompt_ids(it)] = pol
    return ScriptedLM(PromptScript(policies))


def test_sentence_format_oracle_and_format_loss_gap():
    items = make_tasks(16, seed=4, reply_style="sentence")
    mc = [it for it in items if it.is_mc]
    oracle = ScriptedLM(PromptScript({prompt_ids(it): follow(TOK.encode(it.reply) + [IM_END]) for it in items}))
    rep = evaluate(oracle, TOK, items)
    assert (rep.ll_acc, rep.gen_acc, rep.gap, rep.invalid_rate) == (1.0, 1.0, 0.0, 0.0)
    assert rep.generations == tuple(it.reply for it in items)
    assert reply_budget(TOK, items) == max(len(TOK.encode(it.reply)) for it in items) + 2
    # The bare-letter oracle of test_eval_utils knows every answer but not the sentence format.
    bare = evaluate(task_model(items, "oracle"), TOK, items)
    assert bare.gen_acc == 0.0 and bare.invalid_rate == 1.0
    drift = evaluate(_format_drift_model(items), TOK, items, batch_size=3)
    assert drift.ll_acc == 1.0 and drift.ll_letter_hist == _letter_counts([it.answer for it in mc], LETTERS[:4])
    assert drift.gen_acc_mc == 0.0 and drift.gap == 1.0 > 0
    assert drift.letter_hist["invalid"] == len(mc) and drift.invalid_rate == pytest.approx(len(mc) / len(items))
    assert drift.per_kind["kv"] == drift.per_kind["arith"] == 1.0
    assert [g for g, it in zip(drift.generations, items) if it.is_mc] == [f"The answer is {it.answer}." for it in mc]


def test_garbage_and_silent_models_count_invalid_answers():
    items = make_tasks(15, seed=8)
    mc = [it for it in items if it.is_mc]
    rep = evaluate(task_model(items, "garbage"), TOK, items, max_new_tokens=4)
    assert rep.generations == ("zzzz",) * len(items)
    assert rep.letter_hist["invalid"] == len(mc) and sum(rep.letter_hist.values()) == len(mc)
    assert rep.invalid_rate == pytest.approx(len(mc) / len(items))   # "zzzz" is a (wrong) free-form answer
    assert rep.gen_acc == 0.0
    # All letters tie under LL: the first option wins, so LL accuracy is the share of "A" answers.
    assert rep.ll_letter_hist["A"] == len(mc)
    assert rep.ll_acc == pytest.approx(sum(it.answer == "A" for it in mc) / len(mc))
    silent = evaluate(task_model(items, "silent"), TOK, items)
    assert silent.invalid_rate == 1.0 and silent.gen_acc == 0.0 and silent.generations == ("",) * len(items)


def test_evaluate_tiny_random_model_report_is_consistent():
    model = tiny("hybrid-kda").train()
    items = make_tasks(12, seed=3)
    rep = evaluate(model, TOK, items, max_new_tokens=4, batch_size=5)
    assert model.training     # the training flag is restored
    mc = [i for i, it in enumerate(items) if it.is_mc]
    assert rep.n == 12 and rep.n_mc == len(mc) == 4 and len(rep.generations) == 12
    assert sum(rep.letter_hist.values()) == rep.n_mc == sum(rep.ll_letter_hist.values())
    for x in (rep.ll_acc, rep.gen_acc, rep.gen_acc_mc, rep.invalid_rate, *rep.per_kind.values()):
        assert 0.0 <= x <= 1.0
    assert rep.gap == pytest.approx(rep.ll_acc - rep.gen_acc_mc)
    preds = [extract_answer(t, it.options) for t, it in zip(rep.generations, items)]
    assert rep.invalid_rate == pytest.approx(sum(p is None for p in preds) / 12)
    assert rep.letter_hist["invalid"] == sum(preds[i] is None for i in mc)
    assert rep.gen_acc == pytest.approx(sum(rep.per_kind[k] * 4 for k in ("mc", "kv", "arith")) / 12)
    assert rep.generations == tuple(generate_answers(model, TOK, items, max_new_tokens=4))
    d = rep.to_dict()
    assert "generations" not in d and json.loads(json.dumps(d))["n"] == 12
    assert rep.to_dict(include_generations=True)["generations"] == list(rep.generations)


def test_evaluate_without_mc_items():
    items = make_tasks(4, kinds=("kv", "arith"), seed=0)
    rep = evaluate(task_model(items, "oracle"), TOK, items)
    assert rep.ll_acc is None and rep.gen_acc_mc is None and rep.gap is None
    assert rep.letter_hist == {} and rep.ll_letter_hist == {} and rep.gen_acc == 1.0


def test_format_report_table_layout():
    items = make_tasks(9, seed=2)
    reports = {"teacher": evaluate(task_model(items, "oracle"), TOK, items),
               "student-collapsed": evaluate(task_model(items, "collapse"), TOK, items),
               "free-only": EvalReport(n=2, ll_acc=None, gen_acc=0.5, gen_acc_mc=None, gap=None, invalid_rate=0.0,
                                       letter_hist={}, ll_letter_hist={}, per_kind={"kv": 0.5})}
    lines = format_report_table(reports).splitlines()
    assert len(lines) == 2 + len(reports)
    assert len({len(line) for line in lines}) == 1     # header, rule and rows share one width
    assert [line.split()[0] for line in lines[2:]] == list(reports)
    assert lines[2].split()[2:6] == ["1.000", "1.000", "1.000", "+0.000"]
    assert lines[4].split()[2] == "-"
    wide = format_report_table(reports, extra={"kl": {"teacher": "0.0000", "free-only": "1.5"}},
                               kinds=("mc", "kv", "arith")).splitlines()
    assert wide[0].split()[-4:] == ["kl", "mc", "kv", "arith"] and len({len(line) for line in wide}) == 1
    assert wide[2].split()[-4:] == ["0.0000", "1.000", "1.000", "1.000"]     # the oracle teacher
    assert wide[3].split()[-4] == "-"                                        # no kl cell for this model
    assert wide[4].split()[-4:] == ["1.5", "-", "0.500", "-"]                # kinds it has no items of
    with pytest.raises(TypeError, match="extra must be"):
        format_report_table(reports, extra={"kl": 1.0})
    with pytest.raises(TypeError, match="kinds must be"):
        format_report_table(reports, kinds="mc")
    with pytest.raises(ValueError, match="non-empty dict"):
        format_report_table({})
    with pytest.raises(TypeError, match="must be an EvalReport"):
        format_report_table({"x": 1})


def test_scorers_reject_bad_arguments():
    model = tiny()
    items = make_tasks(3, seed=0)
    with pytest.raises(ValueError, match="at least one Item"):
        evaluate(model, TOK, [])
    with pytest.raises(TypeError, match="items must be a list"):
        evaluate(model, TOK, items[0])
    with pytest.raises(ValueError, match="batch_size"):
        generate_answers(model, TOK, items, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_answers(model, TOK, items, max_new_tokens=0)
    kv = [it for it in items if not it.is_mc]
    with pytest.raises(ValueError, match="must be multiple choice"):
        option_logprobs(model, TOK, kv)
    with pytest.raises(ValueError, match="empty context"):
        continuation_logprobs(model, [([], [1])])
    with pytest.raises(ValueError, match="empty continuation"):
        continuation_logprobs(model, [([1], [])])
    with pytest.raises(TypeError, match="generate"):
        generate_answers(torch.nn.Linear(2, 2), TOK, items)
