"""The minimal distillation demo (examples/distill_minimal.py): its --quick path end to end, in-process."""
import contextlib
import importlib.util
import io
import json
import math
import re
import sys
from pathlib import Path

import pytest

from fastattn.eval import extract_answer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "distill_minimal.py"
ROWS = ("teacher", "student:init", "student:stage1", "student:stage2", "student:stage3")
COLUMNS = ("model", "n", "ll_acc", "gen_acc", "gen_mc", "gap", "invalid", "gen letters", "ll letters", "kl_chat",
           "mc", "kv", "arith")


def _load_example():
    spec = importlib.util.spec_from_file_location("distill_minimal_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Run ``main(["--quick", ...])`` once; return (module, out dir, stdout, exit status)."""
    demo = _load_example()
    out = tmp_path_factory.mktemp("distill_minimal")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = demo.main(["--quick", "--out", str(out), "--device", "cpu", "--seed", "1"])
    return demo, out, buf.getvalue(), status


def _table_lines(stdout: str):
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["model", "n", "ll_acc"])
    return lines[start], lines[start + 2:start + 2 + len(ROWS)]


def test_quick_run_prints_the_full_table(quick_run):
    _, _, stdout, status = quick_run
    assert status == 0
    header, rows = _table_lines(stdout)
    for col in COLUMNS:
        assert col in header, f"column {col!r} missing from {header!r}"
    assert [r.split()[0] for r in rows] == list(ROWS)
    for row in rows:
        cells = row.split()
        n = int(cells[1])
        assert n > 0
        for value in cells[2:5] + [cells[6]]:           # ll_acc, gen_acc, gen_mc, invalid
            assert 0.0 <= float(value) <= 1.0, row
        assert -1.0 <= float(cells[5]) <= 1.0            # the gap
        assert math.isfinite(float(cells[-4])) and float(cells[-4]) >= 0.0   # kl_chat
        for value in cells[-3:]:                         # per-kind generation accuracy
            assert 0.0 <= float(value) <= 1.0, row
    assert float(rows[0].split()[-4]) == 0.0              # the teacher's KL to itself
    assert "gap = ll_acc - gen_mc" in stdout
    for stage in (1, 2, 3):
        assert f"stage {stage} step" in stdout          # sparse progress lines of every stage


def test_quick_run_writes_metrics_json(quick_run):
    _, out, stdout, _ = quick_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["rows"]) == set(ROWS)
    assert sorted(metrics["stages"]) == ["1", "2", "3"]
    for stage, m in metrics["stages"].items():
        assert m["completed_steps"] == metrics["config"]["stage_steps"][int(stage) - 1]
        assert all(math.isfinite(r["loss"]) for r in m["steps"])
        assert m["final_eval"] is not None
    for name, row in metrics["rows"].items():
        rep = row["report"]
        assert 0.0 <= rep["gen_acc"] <= 1.0 and 0.0 <= rep["ll_acc"] <= 1.0
        assert sum(rep["letter_hist"].values()) == rep["n_mc"] == sum(rep["ll_letter_hist"].values())
        assert len(rep["generations"]) == rep["n"]
        assert row["kl_chat"] >= 0.0
    history = metrics["teacher"]["history"]
    assert history["completed_steps"] >= 1 and history["evals"]
    assert metrics["student_layer_types"][0] == "attention" and "kda" in metrics["student_layer_types"]
    assert metrics["table"] in stdout


def test_quick_run_plot(quick_run):
    _, out, stdout, _ = quick_run
    png = out / "distill_minimal.png"
    if importlib.util.find_spec("matplotlib") is None:
        assert not png.exists()
        assert "matplotlib is not installed" in stdout
    else:
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_is_deterministic_in_its_data(quick_run):
    demo = quick_run[0]
    cfg = demo.DemoConfig.quick(seed=1)
    a, b = demo.build_tasks(cfg), demo.build_tasks(cfg)
    assert a == b
    train, dev, test = a
    keys = {tuple(m["content"] for m in it.messages) for it in train}
    assert not any(tuple(m["content"] for m in it.messages) in keys for it in dev + test)
    letters = [it.answer for it in test if it.is_mc]
    counts = [letters.count(c) for c in "ABCD"]
    assert len(letters) > 0 and max(counts) - min(counts) <= 1          # balanced gold letters in the table
    assert {it.kind for it in test} == {"mc", "kv", "arith"}
    for it in train[:50] + test:                  # generation must produce the multi-token sentence reply
        assert it.chat()[-1]["content"] == it.reply == (f"The answer is ({it.answer})." if it.is_mc
                                                         else f"The answer is {it.answer}.")


def test_quick_run_scores_the_sentence_format(quick_run):
    demo, out, _, _ = quick_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["reply_style"] == "sentence"
    test = demo.build_tasks(demo.DemoConfig.quick(seed=1))[2]
    for row in metrics["rows"].values():
        rep = row["report"]
        preds = [extract_answer(g, it.options, it.reply_format) for g, it in zip(rep["generations"], test)]
        assert rep["invalid_rate"] == pytest.approx(sum(p is None for p in preds) / len(test))
        for g, p in zip(rep["generations"], preds):
            if not re.fullmatch(r"The answer is .+\.", g.strip().split("\n")[0] if g.strip() else ""):
                assert p is None, g                  # a reply outside the trained format has no answer


def test_bad_arguments(tmp_path):
    demo = _load_example()
    with pytest.raises(SystemExit):
        demo.main(["--steps", "1,2", "--out", str(tmp_path)])
    assert demo.main(["--quick", "--num-options", "1", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="teacher_steps"):
        demo.DemoConfig.quick(teacher_steps=0)
    with pytest.raises(ValueError, match="stage_steps"):
        demo.DemoConfig.full(stage_steps=(1, 2))
    with pytest.raises(ValueError, match="DemoConfig.kv_pairs must be an int in"):
        demo.DemoConfig.full(kv_pairs=0)
    with pytest.raises(ValueError, match="DemoConfig.reply_style must be one of"):
        demo.DemoConfig.full(reply_style="letter")
    with pytest.raises(ValueError, match="DemoConfig.stage_lr"):
        demo.DemoConfig.full(stage_lr=(1e-3, 0.0, 1e-3))
    assert demo.main(["--quick", "--device", "tpu", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()
