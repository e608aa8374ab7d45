"""GenDistill stages: what trains, what the losses count, and that each stage lowers its loss."""
import pytest
import torch

from fastattn.distill import (ByteTokenizer, TrainConfig, batch_indices, ce_loss, chat_example, evaluate_stage,
                              new_mixer_layers, pad_batch, run_stage, student_from_teacher)
from fastattn.distill.stages import StageObjective, prepare_data
from fastattn.models import HybridConfig, HybridLM

SHAPE = dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, kda_chunk_size=16, rope_theta=10000.0)
TOK = ByteTokenizer()


def make_teacher(seed=0):
    torch.manual_seed(seed)
    teacher = HybridLM(HybridConfig.from_preset("attention", **SHAPE))
    teacher.reset_parameters(std=0.15)
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return teacher.eval()


def blocks(n, t=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t), generator=g)


def chats(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b = (int(x) for x in torch.randint(0, 50, (2,), generator=g))
        msgs = [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}]
        if a % 2:
            msgs = [{"role": "system", "content": "add"}] + msgs
        out.append(msgs)
    return out


def cfg(**kw):
    base = dict(steps=12, batch_size=8, lr=3e-3, seq_len=32, device="cpu", warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_all_attention_student_matches_teacher():
    teacher = make_teacher()
    student = student_from_teacher(teacher, "attention")
    assert evaluate_stage(2, teacher, student, blocks(4), cfg())["loss"] == 0.0
    out = evaluate_stage(3, teacher, student, chats(6), cfg(seq_len=64), tokenizer=TOK)
    assert out["loss"] == 0.0 and out["tokens"] > 0
    prompts = [list(TOK.render_chat(c[:-1], add_generation_prompt=True).ids) for c in chats(3)]
    assert torch.equal(teacher.generate(prompts, max_new_tokens=8), student.generate(prompts, max_new_tokens=8))


def test_hybrid_student_starts_off_teacher():
    teacher = make_teacher()
    student = student_from_teacher(teacher, "hybrid-kda")
    assert new_mixer_layers(teacher, student) == [1, 2, 3]
    assert evaluate_stage(2, teacher, student, blocks(4), cfg())["loss"] > 1e-3
    torch.testing.assert_close(student.layers[2].mixer.v_proj.weight, teacher.layers[2].mixer.v_proj.weight,
                               rtol=0, atol=0)


def test_stage1_lowers_alignment_and_trains_only_new_mixers():
    teacher = make_teacher()
    student = student_from_teacher(teacher, "hybrid-kda")
    held = blocks(8, seed=9)
    before_t, before_s = state(teacher), state(student)
    m = run_stage(1, teacher, student, blocks(64), cfg(steps=15), eval_data=held)
    assert m["trained_layers"] == [1, 2, 3] and m["completed_steps"] == 15
    for i in (1, 2, 3):
        assert m["final_eval"]["layer_loss"][str(i)] < 0.8 * m["initial_eval"]["layer_loss"][str(i)]
    assert m["final_eval"]["loss"] == m["eval_loss"] < m["initial_eval"]["loss"]
    after = state(student)
    new_prefixes = tuple(f"layers.{i}.mixer." for i in (1, 2, 3))
    for name, value in after.items():
        if name.startswith(new_prefixes):
            continue
        assert torch.equal(value, before_s[name]), name
    for i in (1, 2, 3):
        changed = [n for n in after if n.startswith(f"layers.{i}.mixer.") and not torch.equal(after[n], before_s[n])]
        assert len(changed) >= 5, (i, changed)
    assert all(torch.equal(v, before_t[k]) for k, v in state(teacher).items())
    assert all(p.requires_grad for p in student.parameters())          # flags restored after the stage


def test_stage1_alignment_matches_manual_computation():
    teacher = make_teacher()
    student = student_from_teacher(teacher, "hybrid-kda")
    ids = blocks(2, t=20)
    hidden = teacher(ids, output_hidden_states=True)[1]
    info = teacher._step_info(ids, None, None)
    num = 0.0
    with torch.no_grad():
        for i in (1, 2, 3):
            x = student.layers[i].input_layernorm(hidden[i])
            ref = teacher.layers[i].mixer(teacher.layers[i].input_layernorm(hidden[i]), info)
            err = (student.layers[i].mixer(x, info) - ref).pow(2).mean(-1)
            num += float(err.mean()) / 3
    out = evaluate_stage(1, teacher, student, ids, cfg(batch_size=2))
    assert out["loss"] == pytest.approx(num, rel=1e-5)


def test_stage2_lowers_kl_and_freeze_option():
    teacher = make_teacher()
    student = student_from_teacher(teacher, "hybrid-kda")
    held = blocks(8, seed=9)
    before = state(student)
    m = run_stage(2, teacher, student, blocks(64), cfg(steps=15, freeze_attention=True), eval_data=held)
    assert m["final_eval"]["loss"] < 0.8 * m["initial_eval"]["loss"]
    assert m["frozen_layers"] == [0]
    after = state(student)
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("layers.0."))
    assert not torch.equal(after["embed_tokens.weight"], before["embed_tokens.weight"])
    losses = [r["loss"] for r in m["steps"]]
    assert len(losses) == 15 and all(r["tokens"] == 8 * 32 for r in m["steps"])
    assert all(r["lr"] > 0 and r["grad_norm"] > 0 for r in m["steps"])


class _NoisyTeacher(torch.nn.Module):
    """Teacher logits plus large noise wherever ``noise_mask [B, T]`` is True (a fixed test batch)."""

    def __init__(self, teacher, noise_mask):
        super().__init__()
        self.teacher, self.noise_mask = teacher, noise_mask
        self.config = teacher.config

    def forward(self, ids, **kw):
        logits = self.teacher(ids, **kw)
        g = torch.Generator().manual_seed(3)
        noise = 5.0 * torch.randn(logits.shape, generator=g)
        return logits + noise * self.noise_mask[..., None]


def _chat_batch(convs):
    pairs = [chat_example(TOK, c) for c in convs]
    ids, valid, mask = pad_batch([p[0] for p in pairs], TOK.pad_id, masks=[p[1] for p in pairs])
    return ids, valid, mask


def test_stage3_loss_counts_only_assistant_tokens():
    teacher = make_teacher()
    student = student_from_teacher(teacher, "hybrid-kda")
    convs = chats(4)
    ids, valid, mask = _chat_batch(convs)
    c = cfg(batch_size=4, seq_len=64)
    base = evaluate_stage(3, teacher, student, convs, c, tokenizer=TOK)
    # the logits at position t predict token t+1: positions whose next token is not assistant carry no loss
    no_loss = torch.ones_like(mask)
    no_loss[:, :-1] = ~mask[:, 1:]
    noisy = evaluate_stage(3, _NoisyTeacher(teacher, no_loss), student, convs, c, tokenizer=TOK)
    assert noisy["loss"] == pytest.approx(base["loss"], rel=1e-6)
    assert noisy["tokens"] == base["tokens"] == int(mask[:, 1:].sum())
    with_loss = torch.zeros_like(mask)
    with_loss[:, :-1] = mask[:, 1:]
    changed = evaluate_stage(3, _NoisyTeacher(teacher, with_loss), student, convs, c, tokenizer=TOK)
    assert abs(changed["loss"] - base["loss"]) > 1e-3
    # sft: cross-entropy of exactly the assistant targets
    sft = evaluate_stage(3, teacher, student, convs, cfg(batch_size=4, seq_len=64, loss="sft"), tokenizer=TOK)
    with torch.no_grad():
        ref = ce_loss(student(ids)[:, :-1], ids[:, 1:], mask[:, 1:] & valid[:, 1:])
    assert sft["loss"] == pytest.approx(float(ref), rel=1e-5)
    mixed = evaluate_stage(3, teacher, student, convs, cfg(batch_size=4, seq_len=64, loss="kl+ce", ce_weight=0.25),
                           tokenizer=TOK)
    assert mixed["loss"] == pytest.approx(0.75 * base["loss"] + 0.25 * sft["loss"], rel=1e-5)


def test_stage3_freezes_attention_layers_and_lowers_loss():
    teacher = make_teacher()
    student = student_from_teacher(teacher, "hybrid-kda")
    before = state(student)
    m = run_stage(3, teacher, student, chats(48), cfg(steps=10, seq_len=64), tokenizer=TOK,
                  eval_data=chats(8, seed=7))
    assert m["frozen_layers"] == [0]
    assert m["final_eval"]["loss"] < m["initial_eval"]["loss"]
    after = state(student)
    for k in after:
        if k.startswith("layers.0."):
            assert torch.equal(after[k], before[k]), k
    for i in (1, 2, 3):
        assert not torch.equal(after[f"layers.{i}.mixer.q_proj.weight"], before[f"layers.{i}.mixer.q_proj.weight"])
        assert not torch.equal(after[f"layers.{i}.mlp.up_proj.weight"], before[f"layers.{i}.mlp.up_proj.weight"])


def test_loss_token_count_uses_shifted_completion_mask():
    data = prepare_data(3, chats(3), seq_len=64, vocab_size=260, tokenizer=TOK)
    batch = data.batch([0, 1, 2])
    expected = sum(sum(chat_example(TOK, c)[1][1:]) for c in chats(3))
    assert int(StageObjective.loss_tokens(3, batch)) == expected
    assert int(StageObjective.loss_tokens(1, batch)) == int(batch.valid.sum())


def test_batch_indices_cover_each_epoch_and_depend_only_on_seed_and_step():
    n, b = 10, 4
    stream = [i for s in range(5) for i in batch_indices(n, b, seed=3, step=s)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert batch_indices(n, b, 3, 4) == stream[16:20]
    assert stream[:10] != [i for s in range(3) for i in batch_indices(n, b, seed=4, step=s)][:10]


@pytest.mark.parametrize("field,value", [("steps", 0), ("lr", 0.0), ("batch_size", 6), ("loss", "mse"),
                                         ("ce_weight", 1.5), ("temperature", -1.0), ("clip", -1.0),
                                         ("freeze_attention", "yes"), ("min_lr_ratio", 2.0), ("resume", True)])
def test_train_config_rejects_bad_values(field, value):
    kw = {"batch_size": 8, "grad_accum": 4 if field == "batch_size" else 1, field: value}
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**kw)


def test_run_stage_rejects_bad_inputs():
    teacher = make_teacher()
    student = student_from_teacher(teacher, "hybrid-kda")
    with pytest.raises(ValueError, match="stage must be one of"):
        run_stage(4, teacher, student, blocks(8), cfg())
    with pytest.raises(TypeError, match="stage 3 must be a list of conversations"):
        run_stage(3, teacher, student, blocks(8), cfg())
    with pytest.raises(ValueError, match="tokenizer must be given"):
        run_stage(3, teacher, student, chats(8), cfg())
    with pytest.raises(ValueError, match="stage 1 needs at least one"):
        run_stage(1, teacher, student_from_teacher(teacher, "attention"), blocks(8), cfg())
    with pytest.raises(TypeError, match="float32"):
        run_stage(2, teacher, student_from_teacher(teacher, "hybrid-kda").to(torch.bfloat16), blocks(8), cfg())
    with pytest.raises(ValueError, match="vocab_size"):
        run_stage(2, teacher, student, torch.full((8, 8), 300), cfg())


@pytest.mark.gpu
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
def test_stages_on_cuda_with_bf16_autocast(teacher_dtype):
    teacher = make_teacher().to("cuda", teacher_dtype)
    student = student_from_teacher(make_teacher(), "hybrid-kda").cuda()
    c = dict(steps=15, batch_size=8, lr=3e-3, warmup_steps=2, device="cuda", amp=True)
    m1 = run_stage(1, teacher, student, blocks(64, 64), TrainConfig(seq_len=64, **c), eval_data=blocks(8, 64, seed=9))
    assert m1["final_eval"]["loss"] < m1["initial_eval"]["loss"]
    m2 = run_stage(2, teacher, student, blocks(64, 64), TrainConfig(seq_len=64, **c), eval_data=blocks(8, 64, seed=9))
    assert m2["final_eval"]["loss"] < m2["initial_eval"]["loss"]
    before = state(student)
    m3 = run_stage(3, teacher, student, chats(48), TrainConfig(seq_len=64, **c), tokenizer=TOK,
                   eval_data=chats(8, seed=7))
    assert m3["final_eval"]["loss"] < m3["initial_eval"]["loss"]
    after = state(student)
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("layers.0."))
    assert all(p.dtype == torch.float32 for p in student.parameters())
