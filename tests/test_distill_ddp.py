"""Data parallelism: two Gloo CPU processes (as under torchrun; DDP, and FSDP2 with a crash and resume) train
to the weights of one process."""
import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from fastattn.distill import ByteTokenizer, TrainConfig, run_stage, student_from_teacher
from fastattn.distill.dist import fsdp_available
from fastattn.models import HybridConfig, HybridLM

SHAPE = dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, kda_chunk_size=16, rope_theta=10000.0)


def _setup():
    torch.manual_seed(0)
    teacher = HybridLM(HybridConfig.from_preset("attention", **SHAPE))
    teacher.reset_parameters(std=0.15)
    torch.manual_seed(1)
    student = student_from_teacher(teacher.eval(), "hybrid-kda")
    g = torch.Generator().manual_seed(5)
    text = torch.randint(0, 256, (24, 24), generator=g)
    chats = []
    for i in range(24):
        a, b = (int(x) for x in torch.randint(0, 999, (2,), generator=g))
        chats.append([{"role": "user", "content": f"{a}*{b}" + "?" * (i % 5)},
                      {"role": "assistant", "content": str(a * b)}])
    return teacher, student, text, chats


def _run(teacher, student, text, chats, grad_accum, out_dir):
    common = dict(batch_size=4, grad_accum=grad_accum, lr=3e-3, warmup_steps=1, device="cpu", seed=3)
    run_stage(1, teacher, student, text, TrainConfig(steps=3, seq_len=24, **common))
    return run_stage(3, teacher, student, chats, TrainConfig(steps=3, seq_len=40, ckpt_dir=os.path.join(out_dir, "ck"),
                                                             metrics_path=os.path.join(out_dir, "m.json"), **common),
                     tokenizer=ByteTokenizer(), eval_data=chats[:5])


class _CrashAt:
    def __init__(self, call):
        self.calls, self.call = 0, call

    def __call__(self, module, args, out):
        self.calls += 1
        if self.calls == self.call:
            raise RuntimeError("simulated crash")


def _run_fsdp(out_dir):
    """Stage 1, then stage 3 with FSDP2: crash in step 3 on every rank, resume from the step-2 checkpoint."""
    teacher, student, text, chats = _setup()
    common = dict(batch_size=4, grad_accum=1, lr=3e-3, warmup_steps=1, device="cpu", seed=3, fsdp=True,
                  ckpt_dir=os.path.join(out_dir, "fsdp_ck"), ckpt_every=2)
    run_stage(1, teacher, student, text, TrainConfig(steps=3, seq_len=24, **common))
    handle = student.register_forward_hook(_CrashAt(2 + 3))       # 2 eval forwards (uneven shards), then step 3
    try:
        run_stage(3, teacher, student, chats, TrainConfig(steps=3, seq_len=40, **common), tokenizer=ByteTokenizer(),
                  eval_data=chats[:5])
    except RuntimeError as e:
        assert "simulated crash" in str(e)
    handle.remove()
    metrics = run_stage(3, teacher, student, chats, TrainConfig(steps=3, seq_len=40, resume=True, **common),
                        tokenizer=ByteTokenizer(), eval_data=chats[:5])
    return student, metrics


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    teacher, student, text, chats = _setup()
    metrics = _run(teacher, student, text, chats, 1, out_dir)
    torch.save({"state": student.state_dict(), "metrics": metrics}, os.path.join(out_dir, f"rank{rank}.pt"))
    if fsdp_available():
        student, metrics = _run_fsdp(out_dir)
        torch.save({"state": student.state_dict(), "metrics": metrics}, os.path.join(out_dir, f"fsdp{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_one_process(tmp_path):
    teacher, student, text, chats = _setup()
    single = _run(teacher, student, text, chats, 2, str(tmp_path / "single"))
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    ctx = mp.spawn(_worker, args=(2, _free_port(), str(ddp_dir)), nprocs=2, join=False)
    deadline = time.time() + 300
    while not ctx.join(timeout=1):          # raises if a worker failed
        if time.time() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("the two ranks did not finish within 300 s (a collective mismatch hangs them)")
    results = [torch.load(ddp_dir / f"rank{r}.pt") for r in range(2)]
    for res in results:
        assert res["metrics"]["world_size"] == 2
        for k, v in student.state_dict().items():
            torch.testing.assert_close(res["state"][k], v, rtol=1e-5, atol=1e-7, msg=k)
    ddp = results[0]["metrics"]
    assert len(ddp["steps"]) == len(single["steps"]) == 3
    for a, b in zip(ddp["steps"], single["steps"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["tokens"] == b["tokens"] and a["loss_tokens"] == b["loss_tokens"]
    assert abs(ddp["final_eval"]["loss"] - single["final_eval"]["loss"]) <= 1e-5 * single["final_eval"]["loss"]
    assert json.loads((ddp_dir / "m.json").read_text())["world_size"] == 2
    assert (ddp_dir / "ck" / "stage3.pt").is_file()
    if fsdp_available():      # FSDP2 (fully_shard) with a crash and a resume: same weights again
        for r in range(2):
            res = torch.load(ddp_dir / f"fsdp{r}.pt")
            assert res["metrics"]["resumed_from"] == 2 and res["metrics"]["completed_steps"] == 3
            assert res["metrics"]["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
            for k, v in student.state_dict().items():
                torch.testing.assert_close(res["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
