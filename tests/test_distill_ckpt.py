"""Checkpoints: atomic writes, resume after a crash or SIGTERM equals an uninterrupted run, Qwen3 export."""
import os
import pickle
import signal

import pytest
import torch

from fastattn.distill import TrainConfig, load_checkpoint, run_stage, save_qwen3_teacher, student_from_teacher
from fastattn.distill.checkpoint import atomic_torch_save, atomic_write_json, checkpoint_path
from fastattn.models import HybridConfig, HybridLM, convert_qwen3

SHAPE = dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, kda_chunk_size=16, rope_theta=10000.0)


def make_pair(preset="hybrid-kda"):
    torch.manual_seed(0)
    teacher = HybridLM(HybridConfig.from_preset("attention", **SHAPE))
    teacher.reset_parameters(std=0.15)
    torch.manual_seed(1)
    return teacher.eval(), student_from_teacher(teacher, preset)


def blocks(n=32, t=32):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(5))


def cfg(tmp_path, **kw):
    base = dict(steps=8, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=2, seq_len=32, device="cpu",
                ckpt_dir=str(tmp_path / "ckpt"), ckpt_every=3, metrics_path=str(tmp_path / "metrics.json"))
    base.update(kw)
    return TrainConfig(**base)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


class _Trip:
    """Forward hook acting on the ``at``-th student forward call (1-based)."""

    def __init__(self, at, action):
        self.calls, self.at, self.action = 0, at, action

    def __call__(self, module, args, out):
        self.calls += 1
        if self.calls == self.at:
            self.action()


def _crash():
    raise RuntimeError("simulated crash")


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_after_crash_equals_uninterrupted(tmp_path, stage):
    teacher, ref = make_pair()
    full = run_stage(stage, teacher, ref, blocks(), cfg(tmp_path / "a"))

    _, student = make_pair()
    hooked = student.layers[1].mixer if stage == 1 else student
    handle = hooked.register_forward_hook(_Trip(at=2 * 5 + 1, action=_crash))     # crash inside step 6
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(stage, teacher, student, blocks(), cfg(tmp_path / "b"))
    handle.remove()
    blob = load_checkpoint(checkpoint_path(tmp_path / "b" / "ckpt", stage))
    assert blob["step"] == 3 and not blob["done"] and blob["optimizer"] is not None

    _, resumed = make_pair()          # fresh process state: weights come from the checkpoint
    out = run_stage(stage, teacher, resumed, blocks(), cfg(tmp_path / "b", resume=True))
    assert out["resumed_from"] == 3 and out["completed_steps"] == 8
    assert_same_weights(resumed, ref)
    assert [r["loss"] for r in out["steps"]] == pytest.approx([r["loss"] for r in full["steps"]], rel=1e-6)
    done = load_checkpoint(checkpoint_path(tmp_path / "b" / "ckpt", stage))
    assert done["done"] and done["step"] == 8 and done["optimizer"] is None


def test_sigterm_writes_checkpoint_and_resume_matches(tmp_path):
    teacher, ref = make_pair()
    run_stage(2, teacher, ref, blocks(), cfg(tmp_path / "a", grad_accum=1, ckpt_every=0))

    _, student = make_pair()
    handle = student.register_forward_hook(_Trip(at=4, action=lambda: os.kill(os.getpid(), signal.SIGTERM)))
    previous = signal.getsignal(signal.SIGTERM)
    out = run_stage(2, teacher, student, blocks(), cfg(tmp_path / "b", grad_accum=1, ckpt_every=0))
    handle.remove()
    assert signal.getsignal(signal.SIGTERM) == previous           # handler restored
    assert out["interrupted"] and out["completed_steps"] == 4
    blob = load_checkpoint(checkpoint_path(tmp_path / "b" / "ckpt", 2))
    assert blob["step"] == 4 and not blob["done"]

    _, resumed = make_pair()
    out = run_stage(2, teacher, resumed, blocks(), cfg(tmp_path / "b", grad_accum=1, ckpt_every=0, resume=True))
    assert not out["interrupted"] and out["completed_steps"] == 8 and len(out["steps"]) == 8
    assert_same_weights(resumed, ref)


def test_finished_stage_is_skipped_on_resume(tmp_path):
    teacher, ref = make_pair()
    first = run_stage(2, teacher, ref, blocks(), cfg(tmp_path, steps=3), eval_data=blocks(4))
    _, again = make_pair()
    out = run_stage(2, teacher, again, blocks(), cfg(tmp_path, steps=3, resume=True, progress=True))
    assert out["resumed_from"] == 3 and out["steps"] == first["steps"]
    assert out["final_eval"] == first["final_eval"]
    assert_same_weights(again, ref)


def test_resume_refuses_changed_settings(tmp_path):
    teacher, student = make_pair()
    run_stage(2, teacher, student, blocks(), cfg(tmp_path, steps=2))
    with pytest.raises(ValueError, match=r"\['lr'\]"):
        run_stage(2, teacher, student, blocks(), cfg(tmp_path, steps=2, lr=1e-2, resume=True))


def test_atomic_writes_leave_old_file_on_failure(tmp_path):
    path = tmp_path / "x.pt"
    atomic_torch_save({"a": torch.ones(2)}, path)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        atomic_torch_save({"bad": lambda: 0}, path)           # lambdas cannot be pickled
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    atomic_write_json(tmp_path / "m.json", {"k": [1, 2]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "x.pt"]     # no temp files left


def test_save_qwen3_teacher_round_trip(tmp_path):
    teacher, _ = make_pair()
    save_qwen3_teacher(teacher, tmp_path / "t")
    back = convert_qwen3(tmp_path / "t", "attention")
    ids = blocks(2, 16)
    with torch.no_grad():
        assert torch.equal(back(ids), teacher(ids))
    student = convert_qwen3(tmp_path / "t", "hybrid-kda", kda_chunk_size=16)
    assert student.config.layer_types == ("attention", "kda", "kda", "kda")
    with pytest.raises(ValueError, match="only attention layers"):
        save_qwen3_teacher(student, tmp_path / "s")
