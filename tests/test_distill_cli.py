"""``python -m fastattn.distill``: a full run, resume, SIGTERM, and clear errors on bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastattn.distill import EXIT_PREEMPTED, load_checkpoint, save_qwen3_teacher
from fastattn.distill.cli import main
from fastattn.models import HybridConfig, HybridLM, convert_qwen3

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, rope_theta=10000.0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny Qwen3-format teacher directory, a text jsonl and a chat jsonl."""
    d = tmp_path_factory.mktemp("cli_inputs")
    torch.manual_seed(0)
    teacher = HybridLM(HybridConfig.from_preset("attention", **SHAPE))
    teacher.reset_parameters(std=0.15)
    save_qwen3_teacher(teacher, d / "teacher")
    words = "the quick brown fox jumps over a lazy dog while seven cats watch".split()
    with open(d / "text.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(8))}) + "\n")
    with open(d / "chat.jsonl", "w") as f:
        for i in range(30):
            msgs = [{"role": "user", "content": f"{i}+{i}?"}, {"role": "assistant", "content": str(2 * i)}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return d


def args(inputs, out, *extra, stages="1,2,3"):
    return ["--teacher", str(inputs / "teacher"), "--preset", "hybrid-kda", "--stages", stages,
            "--text-data", str(inputs / "text.jsonl"), "--chat-data", str(inputs / "chat.jsonl"), "--out", str(out),
            "--steps", "3", "--batch-size", "4", "--seq-len", "48", "--device", "cpu", "--no-progress",
            "--log-every", "1", *extra]


def weights(path):
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


def test_full_run_then_resume_skips_finished_stages(inputs, tmp_path):
    out = tmp_path / "run"
    assert main(args(inputs, out, "--steps", "3,2,3", "--lr", "3e-3,1e-3,1e-3", "--ckpt-every", "2")) == 0
    for s in (1, 2, 3):
        assert (out / f"stage{s}" / "config.json").is_file() and (out / f"stage{s}" / "model.safetensors").is_file()
        m = json.loads((out / f"stage{s}" / "metrics.json").read_text())
        assert m["completed_steps"] == (3, 2, 3)[s - 1] and m["eval_loss"] is not None
        assert load_checkpoint(out / "checkpoints" / f"stage{s}.pt")["done"]
    summary = json.loads((out / "metrics.json").read_text())
    assert sorted(summary) == ["stage1", "stage2", "stage3"]
    w1, w2, w3 = (weights(out / f"stage{s}") for s in (1, 2, 3))
    teacher = convert_qwen3(inputs / "teacher", "attention").state_dict()
    assert torch.equal(w1["layers.0.mlp.up_proj.weight"], teacher["layers.0.mlp.up_proj.weight"])   # stage 1
    assert not torch.equal(w2["layers.0.mlp.up_proj.weight"], w1["layers.0.mlp.up_proj.weight"])   # stage 2
    assert all(torch.equal(w3[k], w2[k]) for k in w3 if k.startswith("layers.0."))                  # stage 3
    assert not torch.equal(w3["layers.1.mixer.f_a.weight"], w2["layers.1.mixer.f_a.weight"])
    student = HybridLM.from_pretrained(out / "stage3")
    assert student.config.layer_types == ("attention", "kda", "kda", "kda")

    assert main(args(inputs, out, "--steps", "3,2,3", "--lr", "3e-3,1e-3,1e-3", "--ckpt-every", "2",
                     "--resume")) == 0
    again = weights(out / "stage3")
    assert all(torch.equal(again[k], w3[k]) for k in w3)
    assert json.loads((out / "stage3" / "metrics.json").read_text())["resumed_from"] == 3


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastattn.distill: error: "), err
    return err[0]


@pytest.mark.parametrize("case", ["no_teacher", "no_config", "bad_preset", "bad_jsonl", "bad_chat", "no_data",
                                  "bad_steps", "bad_batch"])
def test_bad_input_exits_with_one_line_and_creates_nothing(inputs, tmp_path, capsys, case):
    out = tmp_path / "out"
    argv = args(inputs, out)
    if case == "no_teacher":
        argv[1] = str(tmp_path / "missing")
        expected = "is not a directory"
    elif case == "no_config":
        (tmp_path / "empty_teacher").mkdir()
        argv[1] = str(tmp_path / "empty_teacher")
        expected = "has no config.json"
    elif case == "bad_preset":
        argv[3] = "hybrid-mamba"
        expected = "--preset must be one of attention, hybrid-kda, eva, hybrid-kda-eva, got 'hybrid-mamba'"
    elif case == "bad_jsonl":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "ok"}\n\n{"text": "ok"\n')
        argv[argv.index("--text-data") + 1] = str(bad)
        expected = f"{bad}:3: not valid JSON"
    elif case == "bad_chat":
        bad = tmp_path / "bad_chat.jsonl"
        bad.write_text('{"messages": [{"role": "bot", "content": "x"}]}\n')
        argv[argv.index("--chat-data") + 1] = str(bad)
        expected = f"{bad}:1: messages[0]['role'] must be one of"
    elif case == "no_data":
        i = argv.index("--chat-data")
        del argv[i:i + 2]
        expected = "--chat-data is required for stage(s) [3]"
    elif case == "bad_steps":
        argv += ["--steps", "3,4"]
        expected = "--steps must hold one value or one per stage (3"
    else:
        argv += ["--batch-size", "3", "--grad-accum", "2"]
        expected = "TrainConfig.batch_size must be a multiple of grad_accum=2, got 3"
    assert main(argv) == 2
    assert expected in _error_line(capsys)
    assert not out.exists()


def test_non_empty_out_needs_resume_or_overwrite(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    assert main(args(inputs, out, stages="2")) == 2
    assert "is not empty; pass --resume" in _error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert main(args(inputs, out, "--overwrite", stages="2")) == 0
    assert (out / "stage2" / "model.safetensors").is_file() and (out / "keep.txt").read_text() == "user file"


def test_module_entry_point_reports_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastattn.distill", "--teacher", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "o"), "--stages", "2", "--text-data", "x.jsonl"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fastattn.distill: error: --teacher")
    assert not (tmp_path / "o").exists()


def test_sigterm_checkpoint_then_resume_equals_uninterrupted(inputs, tmp_path):
    common = ["--steps", "40", "--ckpt-every", "2", "--batch-size", "2", "--seq-len", "16", "--eval-size", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fastattn.distill", *args(inputs, out, *common, stages="2")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = out / "checkpoints" / "stage2.pt"
    deadline = time.time() + 120
    while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert ckpt.is_file(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    blob = load_checkpoint(ckpt)
    assert not blob["done"] and 2 <= blob["step"] < 40
    assert not (out / "stage2" / "model.safetensors").exists()          # only the partial metrics
    assert main(args(inputs, out, *common, "--resume", stages="2")) == 0
    ref = tmp_path / "ref"
    assert main(args(inputs, ref, *common, stages="2")) == 0
    a, b = weights(out / "stage2"), weights(ref / "stage2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = json.loads((out / "stage2" / "metrics.json").read_text())
    assert resumed["resumed_from"] == blob["step"] and len(resumed["steps"]) == 40


def test_hf_tokenizer_option(inputs, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for f in (inputs / "teacher").iterdir():
        (teacher / f.name).write_bytes(f.read_bytes())
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=260, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox"], trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(teacher)
    argv = args(inputs, tmp_path / "out", "--tokenizer", "hf", stages="3")
    argv[1] = str(teacher)
    assert main(argv) == 0
    m = json.loads((tmp_path / "out" / "stage3" / "metrics.json").read_text())
    assert m["completed_steps"] == 3 and m["steps"][0]["loss_tokens"] > 0
