"""fastattn.distill data + masks: jsonl loading errors, byte tokenizer, chat rendering, completion masks, packing."""
import json
import os

import pytest
import torch
from hypothesis import given, strategies as st

from fastattn.distill import (ByteTokenizer, DataFormatError, chat_example, completion_mask, load_chat_jsonl,
                              load_text_jsonl, next_token_targets, pack_blocks, pad_batch)

TOK = ByteTokenizer()

# Contents may contain text that *looks* like the template (role names, "<|im_end|>", newlines).
content_st = st.one_of(st.text(max_size=12), st.sampled_from(["", "assistant\n", "<|im_end|>", "user", "\n\n", "é✓"]))
message_st = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": content_st})
conversation_st = st.lists(message_st, min_size=1, max_size=6)


def _oracle_mask(ids):
    """Independent parse of the rendered ids: a state machine over <im_start> role \\n content <im_end>."""
    mask, state, role = [], "out", b""
    for t in ids:
        if state == "out":
            assert t == TOK.im_start_id or t == ord("\n")
            state = "role" if t == TOK.im_start_id else "out"
            role = b""
            mask.append(False)
        elif state == "role":
            mask.append(False)
            if t == ord("\n"):
                state = "content"
            else:
                role += bytes([t])
        else:  # content, closed by <im_end>
            mask.append(role == b"assistant")
            if t == TOK.im_end_id:
                state = "out"
    return mask


@given(conversation_st)
def test_completion_mask_covers_exactly_assistant_spans(messages):
    rendered = TOK.render_chat(messages)
    mask = completion_mask(rendered)
    assert mask.dtype == torch.bool and mask.shape == (len(rendered.ids),)
    assert mask.tolist() == _oracle_mask(rendered.ids)
    expected = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert [TOK.decode(rendered.ids[s:e]) for s, e in rendered.spans] == expected
    assert int(mask.sum()) == sum(len(m["content"].encode()) + 1 for m in messages if m["role"] == "assistant")
    # Shifted for next-token loss: the targets under the loss mask are exactly the masked tokens, in order.
    ids = torch.tensor(rendered.ids)
    targets, loss_mask = next_token_targets(ids, mask)
    assert not bool(mask[0])  # position 0 is always <im_start>, never a target
    assert targets[loss_mask].tolist() == ids[mask].tolist()
    assert chat_example(TOK, messages) == (list(rendered.ids), mask.tolist())


def test_render_chat_text_and_generation_prompt():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    r = TOK.render_chat(msgs, add_generation_prompt=True)
    assert TOK.decode(r.ids) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                                 "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>assistant\n")
    assert [TOK.decode(r.ids[s:e]) for s, e in r.spans] == ["4<|im_end|>"]
    no_assistant = TOK.render_chat(msgs[:2])
    assert no_assistant.spans == () and not completion_mask(no_assistant).any()


@given(st.text(max_size=30))
def test_byte_tokenizer_roundtrip(text):
    ids = TOK.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert TOK.decode(ids) == text


@pytest.mark.parametrize("messages, exc, needle", [
    ("hi", TypeError, "messages"),
    ([{"role": "bot", "content": "x"}], ValueError, "messages[0]['role']"),
    ([{"role": "user", "content": 3}], TypeError, "messages[0]['content']"),
    ([["user", "x"]], TypeError, "messages[0]"),
])
def test_render_chat_rejects_bad_messages(messages, exc, needle):
    with pytest.raises(exc) as info:
        TOK.render_chat(messages)
    assert needle in str(info.value)


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return p


def test_load_valid_jsonl(tmp_path):
    p = _write(tmp_path, "t.jsonl", [json.dumps({"text": "alpha"}), "", json.dumps({"text": "β", "id": 2})])
    assert load_text_jsonl(p) == ["alpha", "β"]
    q = _write(tmp_path, "c.jsonl", [json.dumps({"messages": [{"role": "user", "content": "a", "extra": 1},
                                                              {"role": "assistant", "content": "b"}]})])
    assert load_chat_jsonl(str(q)) == [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]
    r = _write(tmp_path, "f.jsonl", [json.dumps({"body": "x"})])
    assert load_text_jsonl(r, field="body") == ["x"]


GOOD_TEXT = json.dumps({"text": "fine"})
GOOD_CHAT = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


@pytest.mark.parametrize("loader, good, bad, needle", [
    (load_text_jsonl, GOOD_TEXT, '{"text": "unterminated', "not valid JSON"),
    (load_text_jsonl, GOOD_TEXT, '["text", "x"]', "JSON object"),
    (load_text_jsonl, GOOD_TEXT, '{"txt": "x"}', "missing field 'text'"),
    (load_text_jsonl, GOOD_TEXT, '{"text": 5}', "field 'text' must be a string, got int"),
    (load_chat_jsonl, GOOD_CHAT, '{"text": "x"}', "missing field 'messages'"),
    (load_chat_jsonl, GOOD_CHAT, '{"messages": []}', "non-empty list"),
    (load_chat_jsonl, GOOD_CHAT, '{"messages": "hi"}', "non-empty list"),
    (load_chat_jsonl, GOOD_CHAT, '{"messages": [{"role": "robot", "content": "x"}]}', "messages[0]['role']"),
    (load_chat_jsonl, GOOD_CHAT, '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}',
     "messages[1]['content']"),
    (load_chat_jsonl, GOOD_CHAT, '{"messages": [7]}', "messages[0] must be a dict"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, loader, good, bad, needle):
    p = _write(tmp_path, "data.jsonl", [good, "", bad, good])  # the bad record is on line 3
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in tmp_path.iterdir()}
    with pytest.raises(DataFormatError) as info:
        loader(p)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.line == 3 and err.path == str(p)
    assert str(err).startswith(f"{p}:3: ") and needle in str(err)
    after = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in tmp_path.iterdir()}
    assert after == before  # nothing written, created or overwritten


def test_missing_file_and_bad_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_text_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(TypeError, match="path must be"):
        load_chat_jsonl(42)
    assert os.listdir(tmp_path) == []


def test_pack_blocks():
    blocks = pack_blocks([TOK.encode("abc"), TOK.encode("de")], block_len=3, eos_id=TOK.eos_id)
    stream = TOK.encode("abc") + [TOK.eos_id] + TOK.encode("de") + [TOK.eos_id]
    assert blocks.dtype == torch.int64 and blocks.shape == (2, 3)
    assert blocks.flatten().tolist() == stream[:6]
    with pytest.raises(ValueError, match="fewer than block_len=16"):
        pack_blocks([[1, 2]], block_len=16, eos_id=0)
    with pytest.raises(ValueError, match="block_len must be an int >= 2, got 1"):
        pack_blocks([[1, 2]], block_len=1, eos_id=0)


def test_pad_batch_and_chat_batch():
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo!"}],
             [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]]
    examples = [chat_example(TOK, c) for c in convs]
    ids, valid, mask = pad_batch([e[0] for e in examples], TOK.pad_id, masks=[e[1] for e in examples])
    L = max(len(e[0]) for e in examples)
    assert ids.shape == valid.shape == mask.shape == (2, L)
    for b, (seq, m) in enumerate(examples):
        n = len(seq)
        assert ids[b, :n].tolist() == seq and (ids[b, n:] == TOK.pad_id).all()
        assert valid[b].tolist() == [True] * n + [False] * (L - n)
        assert mask[b, :n].tolist() == m and not mask[b, n:].any()
    assert TOK.decode(ids[1][mask[1]].tolist()) == "<|im_end|>"  # empty answer: only the end-of-turn token
    ids2, valid2, none = pad_batch([[1, 2, 3, 4], [5]], pad_id=0, max_len=2)
    assert ids2.tolist() == [[1, 2], [5, 0]] and none is None and valid2.tolist() == [[True, True], [True, False]]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(sequences=[], pad_id=0), "at least one sequence"),
    (dict(sequences=[[1], []], pad_id=0), "sequences[1] is empty"),
    (dict(sequences=[[1, 2]], pad_id=0, masks=[[True]]), "masks[0] must have length 2"),
    (dict(sequences=[[1]], pad_id=0, masks=[]), "one mask per sequence"),
    (dict(sequences=[[1]], pad_id=0, max_len=0), "max_len must be a positive int"),
])
def test_pad_batch_errors(kwargs, needle):
    with pytest.raises(ValueError) as info:
        pad_batch(**kwargs)
    assert needle in str(info.value)


def test_next_token_targets_errors():
    with pytest.raises(ValueError, match="token_mask must have shape"):
        next_token_targets(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="token_mask must have dtype"):
        next_token_targets(torch.zeros(4, dtype=torch.int64), torch.zeros(4))
    with pytest.raises(ValueError, match="at least 2 positions"):
        next_token_targets(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.bool))
    t, m = next_token_targets(torch.arange(6).view(2, 3), torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool))
    assert t.tolist() == [[1, 2], [4, 5]] and m.tolist() == [[False, True], [True, True]]
