"""fastattn.eval tasks + extraction: determinism, exact letter balance, answers consistent with prompts, jsonl round
trip, answer extraction and exact match on hand cases."""
import re
from collections import Counter

import pytest
from hypothesis import given, strategies as st

from fastattn.distill import ByteTokenizer, load_chat_jsonl, load_text_jsonl
from fastattn.eval import (LETTERS, Item, exact_match, extract_answer, items_to_texts, make_tasks, normalize_text,
                           write_jsonl)
from fastattn.eval.tasks import CATEGORIES, REPLY_FORMATS

CATEGORIES_WORDS = {w for words in CATEGORIES.values() for w in words}


def _user(item):
    return item.messages[-1]["content"]


def test_deterministic_by_seed():
    a, b = make_tasks(40, seed=7), make_tasks(40, seed=7)
    assert a == b
    assert a != make_tasks(40, seed=8)
    assert Counter(it.kind for it in a) == Counter({"mc": 14, "kv": 13, "arith": 13})


@given(n=st.integers(1, 60), num_options=st.integers(2, 8), seed=st.integers(0, 10_000),
       kinds=st.sampled_from([("mc",), ("mc", "kv"), ("mc", "kv", "arith"), ("arith", "mc", "mc")]))
def test_letter_and_kind_balance_exact(n, num_options, seed, kinds):
    items = make_tasks(n, kinds=kinds, seed=seed, num_options=num_options)
    assert len(items) == n
    plan = Counter(kinds[i % len(kinds)] for i in range(n))
    assert Counter(it.kind for it in items) == plan
    mc = [it for it in items if it.kind == "mc"]
    counts = Counter(it.answer for it in mc)
    per_letter = [counts.get(c, 0) for c in LETTERS[:num_options]]
    assert sum(per_letter) == len(mc)
    assert max(per_letter) - min(per_letter) <= 1
    assert all(len(it.options) == num_options for it in mc)


def test_mc_answers_consistent_with_prompts():
    items = make_tasks(120, kinds=("mc",), seed=3)
    kinds_seen = set()
    for it in items:
        lines = _user(it).split("\n")
        assert lines[-1] == "Answer with the letter."
        shown = [re.fullmatch(r"([A-H])\. (.+)", line).groups() for line in lines[1:-1]]
        assert [c for c, _ in shown] == list(it.letters)
        assert tuple(o for _, o in shown) == it.options
        assert len(set(it.options)) == len(it.options)
        right = it.options[it.answer_index]
        cat = re.fullmatch(r"Which of these is an? (\w+)\?", lines[0])
        if cat:
            kinds_seen.add(cat.group(1))
            members = CATEGORIES[cat.group(1)]
            assert right in members and not any(o in members for o in it.options if o != right)
        else:
            which = re.fullmatch(r"Which number is the (largest|smallest)\?", lines[0]).group(1)
            kinds_seen.add(which)
            nums = [int(o) for o in it.options]
            assert int(right) == (max(nums) if which == "largest" else min(nums))
    assert kinds_seen == set(CATEGORIES) | {"largest", "smallest"}


def test_kv_and_arith_answers_consistent_with_prompts():
    for it in make_tasks(150, kinds=("kv", "arith"), seed=11):
        text = _user(it)
        if it.kind == "arith":
            a, op, b = re.search(r"(\d+) ([+-]) (\d+)", text).groups()
            assert int(it.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            assert int(it.answer) >= 0
        else:
            *pairs, question = text.split("\n")
            table = dict(p.split(": ") for p in pairs)
            assert len(table) == len(pairs) == 3 and len(set(table.values())) == 3
            key = re.fullmatch(r"What is the value of (\w+)\?", question).group(1)
            assert table[key] == it.answer
        assert normalize_text(it.answer) == it.answer


@given(seed=st.integers(0, 10_000), num_options=st.integers(2, 8), n=st.integers(1, 40))
def test_mc_number_question_is_lexical_and_balanced(seed, num_options, n):
    items = make_tasks(n, kinds=("mc",), seed=seed, num_options=num_options, mc_questions=("number",))
    for it in items:
        lines = _user(it).split("\n")
        assert lines[0] == "Which of these is a number?" and lines[-1] == "Answer with the letter."
        digits = [i for i, o in enumerate(it.options) if o.isdigit()]
        assert digits == [it.answer_index] and 0 <= int(it.options[it.answer_index]) <= 99
        assert all(o in CATEGORIES_WORDS for i, o in enumerate(it.options) if i != it.answer_index)
    counts = Counter(it.answer for it in items)
    per_letter = [counts.get(c, 0) for c in LETTERS[:num_options]]
    assert max(per_letter) - min(per_letter) <= 1


def test_mc_questions_subset_and_weighting():
    items = make_tasks(200, kinds=("mc",), seed=5, mc_questions=("colour", "number", "number"))
    firsts = Counter(_user(it).split("\n")[0] for it in items)
    assert set(firsts) == {"Which of these is a colour?", "Which of these is a number?"}
    assert firsts["Which of these is a number?"] > firsts["Which of these is a colour?"]


@pytest.mark.parametrize("pairs", [1, 2, 5])
def test_kv_pairs_option(pairs):
    for it in make_tasks(40, kinds=("kv",), seed=pairs, kv_pairs=pairs):
        *lines, question = _user(it).split("\n")
        table = dict(line.split(": ") for line in lines)
        assert len(lines) == len(table) == len(set(table.values())) == pairs
        assert table[re.fullmatch(r"What is the value of (\w+)\?", question).group(1)] == it.answer


def test_arith_options():
    items = make_tasks(300, kinds=("arith",), seed=9, arith_max=9, arith_ops="+")
    seen = set()
    for it in items:
        a, op, b = re.search(r"(\d+) ([+-]) (\d+)", _user(it)).groups()
        assert op == "+" and 0 <= int(a) <= 9 and 0 <= int(b) <= 9 and int(it.answer) == int(a) + int(b)
        seen.add((int(a), int(b)))
    assert len(seen) > 80                    # most of the 100 operand pairs occur
    minus = make_tasks(50, kinds=("arith",), seed=9, arith_max=3, arith_ops="-")
    assert all(" - " in _user(it) and 0 <= int(it.answer) <= 3 for it in minus)


def test_new_options_keep_the_defaults():
    assert make_tasks(60, seed=4) == make_tasks(60, seed=4, mc_questions=None, kv_pairs=3, arith_max=50,
                                                 arith_ops="+-", reply_style="bare")


@pytest.mark.parametrize("kinds", [("mc", "kv", "arith"), ("mc",), ("kv", "arith")])
def test_sentence_reply_style(kinds):
    bare = make_tasks(30, kinds=kinds, seed=6, kv_pairs=2, arith_max=9)
    sentence = make_tasks(30, kinds=kinds, seed=6, kv_pairs=2, arith_max=9, reply_style="sentence")
    assert [(it.kind, it.messages, it.answer, it.options) for it in bare] == \
        [(it.kind, it.messages, it.answer, it.options) for it in sentence]      # only the reply changes
    assert all(it.reply_format == "{}" and it.reply == it.answer for it in bare)
    for it in sentence:
        expected = f"The answer is ({it.answer})." if it.is_mc else f"The answer is {it.answer}."
        assert it.reply == expected and it.chat()[-1] == {"role": "assistant", "content": expected}
        assert it.reply_format == REPLY_FORMATS["sentence"][0 if it.is_mc else 1]
        assert extract_answer(it.reply, it.options, it.reply_format) == it.answer
        assert extract_answer(it.answer, it.options, it.reply_format) is None    # the bare answer misses the format
    assert items_to_texts(sentence[:1])[0].endswith("\n" + sentence[0].reply)


def test_reply_format_validation_and_reply_with():
    user = ({"role": "user", "content": "q"},)
    it = Item("mc", user, "B", ("x", "y"), reply_format="Answer: ({}).")
    assert it.reply == "Answer: (B)." and it.reply_with("A") == "Answer: (A)."
    for bad in ["", "no slot", "{} and {}", "{x} {}", "}{}", "two\nlines {}"]:
        with pytest.raises(ValueError, match="reply_format must be"):
            Item("kv", user, "a", reply_format=bad)
    with pytest.raises(TypeError, match="reply_format must be a str"):
        Item("kv", user, "a", reply_format=None)
    with pytest.raises(ValueError, match="reply_style"):
        make_tasks(3, reply_style="letter")


def test_prompts_short_and_system_turn():
    tok = ByteTokenizer()
    items = make_tasks(90, seed=2, system="Be brief.")
    assert all(it.messages[0] == {"role": "system", "content": "Be brief."} for it in items)
    assert max(len(tok.encode(_user(it))) for it in make_tasks(300, seed=0)) < 120


def test_jsonl_round_trip_and_texts(tmp_path):
    items = make_tasks(9, seed=4, system="sys")
    path = tmp_path / "chat.jsonl"
    assert write_jsonl(items, path) == 9
    assert load_chat_jsonl(path) == [it.chat() for it in items]
    texts = items_to_texts(items)
    assert all(t.startswith("sys\n" + _user(it)) and t.endswith("\n" + it.answer) for t, it in zip(texts, items))
    with pytest.raises(ValueError):   # a chat jsonl is not a text jsonl
        load_text_jsonl(path)


def test_chat_ends_with_answer_and_does_not_alias():
    it = make_tasks(1, kinds=("kv",), seed=0)[0]
    chat = it.chat()
    assert chat[-1] == {"role": "assistant", "content": it.answer}
    chat[0]["content"] = "changed"
    assert it.messages[0]["content"] != "changed"


def test_exclude_gives_disjoint_balanced_set():
    train = make_tasks(200, seed=0)
    held = make_tasks(60, seed=1, exclude=train)
    keys = {(it.kind, _user(it)) for it in train}
    assert not any((it.kind, _user(it)) in keys for it in held)
    counts = Counter(it.answer for it in held if it.kind == "mc")
    assert max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(n=0), ValueError, "n must be"),
    (dict(n=3, kinds=()), ValueError, "kinds must be"),
    (dict(n=3, kinds="mc"), ValueError, "kinds must be"),
    (dict(n=3, kinds=("mc", "poem")), ValueError, "kinds must only"),
    (dict(n=3, num_options=1), ValueError, "num_options"),
    (dict(n=3, num_options=9), ValueError, "num_options"),
    (dict(n=3, seed="x"), TypeError, "seed"),
    (dict(n=3, exclude=[1]), TypeError, "exclude"),
    (dict(n=3, mc_questions=()), ValueError, "mc_questions"),
    (dict(n=3, mc_questions="number"), ValueError, "mc_questions"),
    (dict(n=3, mc_questions=("planet",)), ValueError, "mc_questions"),
    (dict(n=3, kv_pairs=0), ValueError, "kv_pairs"),
    (dict(n=3, kv_pairs=9), ValueError, "kv_pairs"),
    (dict(n=3, arith_max=0), ValueError, "arith_max"),
    (dict(n=3, arith_ops=""), ValueError, "arith_ops"),
    (dict(n=3, arith_ops="*"), ValueError, "arith_ops"),
])
def test_make_tasks_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_tasks(**kwargs)


def test_item_validation():
    user = ({"role": "user", "content": "q"},)
    with pytest.raises(ValueError, match="answer must be one of the letters"):
        Item("mc", user, "E", ("a", "b", "c", "d"))
    with pytest.raises(ValueError, match="assistant turn"):
        Item("x", user + ({"role": "assistant", "content": "a"},), "a")
    with pytest.raises(ValueError, match="options must hold"):
        Item("mc", user, "A", ("a",))
    with pytest.raises(TypeError, match="answer must be"):
        Item("x", user, "")
    with pytest.raises(ValueError, match="answer_index"):
        _ = Item("x", user, "a").answer_index
    assert Item("x", list(user), "a").messages == user


OPTS = ("cat", "pear", "red", "bus")


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("B.", "B"), (" B\n", "B"), ("(B)", "B"), ("B) pear", "B"), ("B. pear", "B"),
    ("The answer is B", "B"), ("answer: C", "C"), ("Answer (D)", "D"), ("I think B", "B"),
    ("The answer is B, not A", "B"), ("pear", "B"), ("Pear.", "B"), ("D<|im_end|>A", "D"),
    ("\n\nC\nA", "C"),
    ("A or B", None), ("A B", None), ("AB", None), ("E", None), ("The answer is E", None), ("", None),
    ("b", None), ("zzzz", None), ("<|im_end|>B", None), ("apple", None),
])
def test_extract_mc(text, expected):
    assert extract_answer(text, OPTS) == expected


MC_SENTENCE, FREE_SENTENCE = REPLY_FORMATS["sentence"]


@pytest.mark.parametrize("text, expected", [
    ("The answer is (B).", "B"), ("  The answer is (B).  \nThe answer is (C).", "B"),
    ("The answer is (B).<|im_end|>junk", "B"), ("The answer is (pear).", "B"), ("The answer is (B) ).", "B"),
    ("B", None), ("(B)", None), ("The answer is B.", None), ("The answer is (B)", None), ("The answer (B).", None),
    ("the answer is (B).", None), ("The answer is (E).", None), ("The answer is (A or B).", None),
    ("The answer is ().", None), ("Sure. The answer is (B).", None), ("", None), ("The answer is (", None),
])
def test_extract_mc_sentence_format(text, expected):
    assert extract_answer(text, OPTS, MC_SENTENCE) == expected


@pytest.mark.parametrize("text, expected", [
    ("The answer is 42.", "42"), ("The answer is Blue.", "blue"), ("\nThe answer is two  words.\nx", "two words"),
    ("The answer is 7.<|im_end|>", "7"), ("42", None), ("The answer is 42", None), ("The answer is .", None),
    ("The answer is  .", None), ("<|im_end|>The answer is 7.", None),
])
def test_extract_free_form_sentence_format(text, expected):
    assert extract_answer(text, (), FREE_SENTENCE) == expected


def test_extract_mc_respects_option_count():
    assert extract_answer("D", ("x", "y")) is None
    assert extract_answer("D", ("x", "y", "z", "w")) == "D"
    assert extract_answer("y", ("x", "y")) == "B"
    assert extract_answer("same", ("same", "same")) is None   # text matches two options: ambiguous


@pytest.mark.parametrize("text, expected", [
    ("42", "42"), (" 42.\nbecause", "42"), ("Blue", "blue"), ("  two   words ", "two words"),
    ("\n\nplum<|im_end|>x", "plum"), ("", None), ("   \n ", None), ("<|endoftext|>7", None),
])
def test_extract_free_form(text, expected):
    assert extract_answer(text) == expected


def test_extract_rejects_bad_arguments():
    with pytest.raises(TypeError, match="text must be a str"):
        extract_answer(None)
    with pytest.raises(TypeError, match="options must be"):
        extract_answer("A", "ABCD")
    with pytest.raises(ValueError, match="at most 8"):
        extract_answer("A", tuple("abcdefghi"))
    with pytest.raises(ValueError, match="reply_format must hold"):
        extract_answer("A", OPTS, "no slot")
    with pytest.raises(TypeError, match="reply_format must be a str"):
        extract_answer("A", OPTS, None)


def test_exact_match():
    assert exact_match(["42", "Blue.", None, "7 "], ["42", "blue", "7", "8"]) == pytest.approx(0.5)
    assert exact_match(["a"], ["a"]) == 1.0
    with pytest.raises(ValueError, match="one entry per answer"):
        exact_match(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        exact_match([], [])
    with pytest.raises(TypeError, match=r"predictions\[0\]"):
        exact_match([3], ["3"])
