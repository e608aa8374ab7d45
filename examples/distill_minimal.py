"""Minimal GenDistill run, fully offline: a tiny attention teacher -> a Hybrid-KDA student, stages 1-3.

What it does
  1. Makes its own data with :func:`fastattn.eval.make_tasks`: templated chat tasks with exact answers, split
     into test / dev (early stopping) / train with no shared prompt. The mix (``DemoConfig``): multiple choice
     "Which of these is a number?" (one number 0-99 among three words, letters balanced exactly), single-digit
     addition (``arith_max=9``, ``+``) and key-value recall with one pair (``kv_pairs=1``), weighted 2 : 2 : 1.
     Every reply is a sentence (``reply_style="sentence"``): ``"The answer is (B)."``, ``"The answer is 7."``,
     ``"The answer is grape."``; generation must produce it exactly for the answer to count.
  2. Trains a tiny Qwen3-shaped teacher (``HybridLM``, preset ``attention``, 0.82M parameters, byte-level
     ``ByteTokenizer``) with cross-entropy on the assistant tokens only. Every ``teacher_eval_every`` steps it
     scores greedy generation on the dev set and stops once every task kind reaches ``teacher_target`` (0.8)
     or when the step budget is spent; whatever it reaches is printed and used.
  3. Converts it to a Hybrid-KDA student (``student_from_teacher``: attention kept at layer 0, KDA mixers
     initialised from the teacher's q/k/v/o elsewhere) and runs GenDistill stages 1 (per-layer alignment),
     2 (end-to-end KL on the transcripts as plain text) and 3 (chat KL on assistant tokens, attention frozen).
  4. Scores the teacher, the converted student and the student after every stage on the test set, prints one
     table and writes ``metrics.json`` and ``distill_minimal.png`` (loss curves, accuracies, KL) to ``--out``.

How to run (from the repository root)::

    python examples/distill_minimal.py                      # full run, out: runs/distill_minimal
    python examples/distill_minimal.py --quick --out /tmp/q  # CI-sized run: same table, fewer items/steps
    python examples/distill_minimal.py --teacher-steps 3000 --steps 200,400,400 --device cuda

Runtime, measured with ``time`` on this project's 2-core development CPU (OMP_NUM_THREADS=2, torch 2.13 CPU,
machine otherwise idle): full run 6 min 30 s wall (teacher 207 s, stages 1-3 28 + 51 + 54 s, evaluation 45 s),
``--quick`` 80 s with one thread; one thread, full run: 11 min 44 s. ``--device auto`` picks CUDA when present.
The run is deterministic given ``--seed`` on one machine and thread count.

The table (test set, one row per model): ``ll_acc`` multiple-choice accuracy by log-likelihood (the option
whose whole assistant reply, ``"The answer is (L)."`` + end-of-turn, is most likely, read teacher-forced);
``gen_acc`` greedy generation with answer extraction, exact match over all items, ``gen_mc`` over the
multiple-choice items; ``gap`` = ``ll_acc - gen_mc``; ``invalid`` generations without an extractable answer
(the extraction accepts only the trained sentence, see :func:`fastattn.eval.extract_answer`); ``gen letters`` /
``ll letters`` letter histograms (the gold letters are balanced, so a collapse shows at once); ``kl_chat`` mean
KL(teacher || model) per assistant token; ``mc`` ``kv`` ``arith`` generation accuracy per task kind.

What the teacher reaches (seed 0, full run): all 600 steps (dev at step 600: MC 1.00, kv 0.84, arithmetic
0.89), test gen_acc 0.973 = multiple choice 1.000 (ll 1.000), key-value recall 0.933, arithmetic 0.967. With
``make_tasks``' default mix (category and largest/smallest questions, three kv pairs, operands up to 50) a
teacher of this size stayed at chance after 1000-3000 steps, answering one letter for everything.

Key-value recall uses one pair (find the value after ``"<key>: "`` and copy it; no choice between keys). With
two pairs the asked key must be matched against the listed ones, and that stayed at chance (0.5) in every
variant measured: kv-only runs of 400-2500 steps, one-letter keys, one-digit values, key alphabets of 2-4
letters, the key echoed in the reply, value-first lines, batch 128, 2 layers x 8 heads, head_dim 64, no GQA,
attention biases, q/k-norm gain 3, lr 1e-3 to 1e-2, a copy-task curriculum, a loss on the prompt tokens.

What the students show (same run): the converted student ranks letters by LL at 0.600 but loses the reply
format (48 of 60 multiple-choice replies lack the letter, e.g. "The answer is pise."): gap +0.417, invalid
0.393. Stage 1 brings the format back and collapses the letters onto A and B (MC 0.633); stages 2-3 bring KL to
0.04 and MC to 0.967, while key-value recall stays at 0.300 (teacher 0.933): the student does not copy the value.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fastattn.distill import (ByteTokenizer, TrainConfig, ce_loss, chat_example, evaluate_stage,  # noqa: E402
                              pad_batch, run_stage, student_from_teacher)
from fastattn.distill.dist import resolve_device  # noqa: E402
from fastattn.distill.stages import batch_indices, prepare_data  # noqa: E402
from fastattn.distill.train import CosineSchedule  # noqa: E402
from fastattn.eval import EvalReport, Item, evaluate, format_report_table, make_tasks  # noqa: E402
from fastattn.models import HybridConfig, HybridLM  # noqa: E402

DEFAULT_OUT = "runs/distill_minimal"
STAGE_NAMES = {1: "stage 1: per-layer alignment", 2: "stage 2: end-to-end KL on text",
               3: "stage 3: chat KD, completion mask"}
KIND_COLUMNS = ("mc", "kv", "arith")


def _check(name: str, value, lo, hi=None, integer=True, open_lo=False) -> None:
    kind = "an int" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or value < lo \
            or (open_lo and value == lo) or (hi is not None and value > hi):
        bounds = f"{'>' if open_lo else '>='} {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"DemoConfig.{name} must be {kind} {bounds}, got {value!r}")


@dataclass
class DemoConfig:
    """Every knob of the demo (data, teacher shape and training, the three stages).

    Attributes:
        kinds / num_options / mc_questions / kv_pairs / arith_max / arith_ops / reply_style: the ``make_tasks``
            arguments (kinds may repeat to weight the mix; num_options 2..8; reply_style ``"sentence"``: the
            teacher learns and generation must produce ``"The answer is (B)."`` / ``"The answer is 42."``).
        n_train / n_dev / n_test: items for training, for the teacher's early stopping, for the table.
        hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size, rope_theta: teacher shape.
        teacher_steps / teacher_batch / teacher_lr / teacher_warmup: teacher training budget and optimiser.
        teacher_eval_every / teacher_target: dev evaluation period (steps) and the generation accuracy that
            every task kind must reach on dev to stop training early.
        stage_steps / stage_lr: steps and peak learning rate of stages 1, 2, 3.
        stage_batch: sequences per step in stages 1-3; eval_batch: rows per forward in evaluation.
        seq_len: maximum tokens per conversation; kda_chunk_size: the student's KDA chunk (16, 32 or 64).
        seed: everything random (data, initialisation, batch order) derives from it.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        log_every: a progress line every this many steps (teacher and stages).

    Example:
        >>> DemoConfig.quick().teacher_steps < DemoConfig.full().teacher_steps
        True
        >>> DemoConfig.full(num_options=1)
        Traceback (most recent call last):
        ...
        ValueError: DemoConfig.num_options must be an int in [2, 8], got 1
    """
    kinds: Tuple[str, ...] = ("mc", "arith", "mc", "arith", "kv")
    num_options: int = 4
    mc_questions: Tuple[str, ...] = ("number",)
    kv_pairs: int = 1
    arith_max: int = 9
    arith_ops: str = "+"
    reply_style: str = "sentence"
    n_train: int = 20000
    n_dev: int = 96
    n_test: int = 150
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    rope_theta: float = 10000.0
    teacher_steps: int = 600
    teacher_batch: int = 32
    teacher_lr: float = 3e-3
    teacher_warmup: int = 50
    teacher_eval_every: int = 100
    teacher_target: float = 0.8
    stage_steps: Tuple[int, int, int] = (50, 80, 80)
    stage_lr: Tuple[float, float, float] = (3e-3, 3e-4, 3e-4)
    stage_batch: int = 16
    eval_batch: int = 64
    seq_len: int = 256
    kda_chunk_size: int = 16
    seed: int = 0
    device: str = "auto"
    log_every: int = 50

    def __post_init__(self):
        for name in ("n_train", "n_dev", "n_test", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "teacher_steps", "teacher_batch", "teacher_eval_every",
                     "stage_batch", "eval_batch", "seq_len", "log_every"):
            _check(name, getattr(self, name), 1)
        _check("seed", self.seed, 0)
        _check("teacher_warmup", self.teacher_warmup, 0)
        _check("teacher_lr", self.teacher_lr, 0, integer=False, open_lo=True)
        _check("teacher_target", self.teacher_target, 0.0, 1.0, integer=False)
        for name in ("kinds", "mc_questions", "stage_steps", "stage_lr"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        for name in ("stage_steps", "stage_lr"):
            if not isinstance(getattr(self, name), tuple) or len(getattr(self, name)) != 3:
                raise ValueError(f"DemoConfig.{name} must hold 3 values (stages 1, 2, 3), got {getattr(self, name)!r}")
        for i in range(3):
            _check(f"stage_steps[{i}]", self.stage_steps[i], 1)
            _check(f"stage_lr[{i}]", self.stage_lr[i], 0, integer=False, open_lo=True)
        if self.kda_chunk_size not in (16, 32, 64):
            raise ValueError(f"DemoConfig.kda_chunk_size must be 16, 32 or 64, got {self.kda_chunk_size!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"DemoConfig.device must be a str ('auto', 'cpu', 'cuda', 'cuda:N'), got {self.device!r}")
        try:                            # make_tasks checks its own arguments (ValueError naming the argument)
            make_tasks(1, kinds=self.kinds, num_options=self.num_options, mc_questions=self.mc_questions,
                       kv_pairs=self.kv_pairs, arith_max=self.arith_max, arith_ops=self.arith_ops,
                       reply_style=self.reply_style)
        except ValueError as e:
            raise ValueError(f"DemoConfig.{e}") from None

    @classmethod
    def full(cls, **overrides) -> "DemoConfig":
        """The default run (the README's main job); ``overrides`` set any field."""
        return cls(**overrides)

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """A CI-sized run: fewer items and steps, the same pipeline and table; ``overrides`` set any field."""
        base = dict(n_train=2000, n_dev=16, n_test=40, teacher_steps=60, teacher_eval_every=30,
                    stage_steps=(10, 10, 10), stage_batch=8, log_every=10)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        """Plain-JSON dict of the fields."""
        return dataclasses.asdict(self)


def build_tasks(cfg: DemoConfig) -> Tuple[List[Item], List[Item], List[Item]]:
    """Train, dev and test items from ``make_tasks``; dev and test share no prompt with train or each other.

    The held-out sets are drawn first and the training set excludes them: single-digit arithmetic has only 300
    distinct prompts (100 sums x 3 templates), which a large training set would otherwise exhaust. A held-out
    sum is usually still seen in training under another template; the prompt itself is new.

    Args:
        cfg: the :class:`DemoConfig` (``kinds``, ``num_options``, ``mc_questions``, ``kv_pairs``, ``arith_max``,
            ``arith_ops``, ``reply_style``, ``n_train``, ``n_dev``, ``n_test``, ``seed``).
    Returns:
        ``(train, dev, test)`` lists of :class:`~fastattn.eval.Item`.

    Example:
        >>> tr, dv, te = build_tasks(DemoConfig.quick(n_train=30, n_dev=6, n_test=9))
        >>> len(tr), len(dv), len(te)
        (30, 6, 9)
    """
    common = dict(kinds=cfg.kinds, num_options=cfg.num_options, mc_questions=cfg.mc_questions,
                  kv_pairs=cfg.kv_pairs, arith_max=cfg.arith_max, arith_ops=cfg.arith_ops,
                  reply_style=cfg.reply_style)
    test = make_tasks(cfg.n_test, seed=3 * cfg.seed + 2, **common)
    dev = make_tasks(cfg.n_dev, seed=3 * cfg.seed + 1, exclude=test, **common)
    train = make_tasks(cfg.n_train, seed=3 * cfg.seed, exclude=dev + test, **common)
    return train, dev, test


def build_teacher(cfg: DemoConfig, vocab_size: int) -> HybridLM:
    """A freshly initialised tiny Qwen3-shaped attention model (seeded by ``cfg.seed``).

    Example:
        >>> build_teacher(DemoConfig.quick(hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16,
        ...                                intermediate_size=64, num_layers=2), 260).config.layer_types
        ('attention', 'attention')
    """
    config = HybridConfig.from_preset(
        "attention", vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, max_position_embeddings=max(512, cfg.seq_len),
        kda_chunk_size=cfg.kda_chunk_size)
    torch.manual_seed(cfg.seed)
    return HybridLM(config)


def train_teacher(teacher: HybridLM, tokenizer, train: Sequence[Item], dev: Sequence[Item], cfg: DemoConfig,
                  device: torch.device, log=print) -> dict:
    """Train ``teacher`` in place on the chat items: cross-entropy on the assistant tokens (and end-of-turn).

    AdamW (betas 0.9/0.95), linear warmup then cosine decay to 10 %, gradient clipping at 1.0, batches read
    in a seeded order (:func:`~fastattn.distill.stages.batch_indices`). Every ``cfg.teacher_eval_every``
    steps (and at the end) the dev items are scored with :func:`~fastattn.eval.evaluate`; training stops
    as soon as the dev generation accuracy of every task kind reaches ``cfg.teacher_target``.

    Args:
        teacher: the model (moved to ``device``, left in eval mode).
        tokenizer: a ``fastattn.distill`` tokenizer (``ByteTokenizer``).
        train, dev: non-empty :class:`~fastattn.eval.Item` lists.
        cfg: the :class:`DemoConfig`.
        device: where to train.
        log: a ``print``-like callable for the progress lines.
    Returns:
        ``{"steps": [{"step", "loss", "lr"}], "evals": [{"step", "gen_acc", "ll_acc", "per_kind"}],
        "completed_steps", "stopped_early", "wall_time_s", "params"}``.

    Example:
        >>> cfg = DemoConfig.quick(hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
        ...                        num_layers=1, teacher_steps=2, teacher_eval_every=2, teacher_batch=2,
        ...                        n_train=8, n_dev=2, n_test=2)
        >>> tr, dv, _ = build_tasks(cfg)
        >>> h = train_teacher(build_teacher(cfg, 260), ByteTokenizer(), tr, dv, cfg, torch.device("cpu"),
        ...                   log=lambda *a: None)
        >>> h["completed_steps"], len(h["evals"])
        (2, 1)
    """
    if not train or not dev:
        raise ValueError(f"train and dev must hold items, got {len(train)} and {len(dev)}")
    examples = [chat_example(tokenizer, it.chat()) for it in train]
    teacher.to(device).train()
    params = [p for p in teacher.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.teacher_lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    schedule = CosineSchedule(cfg.teacher_steps, cfg.teacher_warmup, 0.1)
    history = {"steps": [], "evals": [], "completed_steps": 0, "stopped_early": False, "wall_time_s": 0.0,
               "params": int(sum(p.numel() for p in teacher.parameters()))}
    t0 = time.perf_counter()
    window: List[float] = []
    for step in range(cfg.teacher_steps):
        lr = cfg.teacher_lr * schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = batch_indices(len(examples), cfg.teacher_batch, cfg.seed, step)
        ids, valid, mask = pad_batch([examples[i][0][:cfg.seq_len] for i in rows], tokenizer.pad_id,
                                     masks=[examples[i][1][:cfg.seq_len] for i in rows])
        ids, valid, mask = ids.to(device), valid.to(device), mask.to(device)
        logits = teacher(ids)[:, :-1]
        loss = ce_loss(logits, ids[:, 1:], mask[:, 1:] & valid[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        value = float(loss.detach())
        window.append(value)
        history["steps"].append({"step": step + 1, "loss": value, "lr": lr})
        history["completed_steps"] = step + 1
        done = step + 1 == cfg.teacher_steps
        if (step + 1) % cfg.log_every == 0 or done:
            log(f"  teacher step {step + 1}/{cfg.teacher_steps} loss {sum(window) / len(window):.4f} "
                f"lr {lr:.2e} ({time.perf_counter() - t0:.0f}s)")
            window = []
        if (step + 1) % cfg.teacher_eval_every == 0 or done:
            rep = evaluate(teacher, tokenizer, list(dev), batch_size=cfg.eval_batch)
            teacher.train()
            history["evals"].append({"step": step + 1, "gen_acc": rep.gen_acc, "ll_acc": rep.ll_acc,
                                     "per_kind": rep.per_kind})
            kinds = " ".join(f"{k} {v:.2f}" for k, v in rep.per_kind.items())
            log(f"  teacher dev eval at step {step + 1}: gen_acc {rep.gen_acc:.3f} ({kinds})")
            if min(rep.per_kind.values()) >= cfg.teacher_target and not done:
                history["stopped_early"] = True
                log(f"  teacher reached gen_acc {cfg.teacher_target} on every task kind on dev: stopping early")
                break
    history["wall_time_s"] = round(time.perf_counter() - t0, 2)
    teacher.eval()
    return history


def score(model: HybridLM, teacher: HybridLM, tokenizer, test: Sequence[Item], test_chats, cfg: DemoConfig,
          device: torch.device) -> Tuple[EvalReport, float]:
    """The test-set :class:`~fastattn.eval.EvalReport` of ``model`` and its KL to the teacher on the test chats.

    Args:
        model: the model to score (fp32 HybridLM; the teacher itself gives KL 0).
        teacher: the reference for the KL.
        tokenizer: ``ByteTokenizer``.
        test: test items; test_chats: the same conversations as stage-3 data (``prepare_data(3, ...)``: the
            KL counts the assistant tokens and end-of-turn only).
        cfg: uses ``eval_batch`` and ``seq_len``; device: where to run.
    Returns:
        ``(report, kl)`` with ``kl`` the mean KL(teacher || model) per assistant token.

    Example:
        >>> cfg = DemoConfig.quick(hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
        ...                        num_layers=1, n_train=4, n_dev=2, n_test=3)
        >>> _, _, te = build_tasks(cfg)
        >>> tok, t = ByteTokenizer(), build_teacher(cfg, 260)
        >>> chats = prepare_data(3, [it.chat() for it in te], cfg.seq_len, 260, tok)
        >>> rep, kl = score(t, t, tok, te, chats, cfg, torch.device("cpu"))
        >>> rep.n, kl
        (3, 0.0)
    """
    model.to(device)
    report = evaluate(model, tokenizer, list(test), batch_size=cfg.eval_batch)
    kl_cfg = TrainConfig(steps=1, batch_size=cfg.eval_batch, seq_len=cfg.seq_len, loss="kl", device=str(device),
                         amp=False)
    kl = evaluate_stage(3, teacher, model, test_chats, kl_cfg, tokenizer)["loss"]
    return report, float(kl)


def save_plot(path: Path, teacher_history: dict, stage_metrics: Dict[int, dict],
              rows: Dict[str, Tuple[EvalReport, float]]) -> Optional[str]:
    """Write the loss curves (teacher and each stage), both accuracies and the KL per model to ``path`` (PNG).

    Args:
        path: the PNG file.
        teacher_history: :func:`train_teacher`'s result; stage_metrics: ``{stage: run_stage metrics}``.
        rows: model name -> ``(EvalReport, kl)``.
    Returns:
        None when the plot was written, else why it was skipped (matplotlib is an optional dependency).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); plot skipped"
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    curves = [("teacher: CE on assistant tokens", teacher_history["steps"])]
    curves += [(STAGE_NAMES[s], m["steps"]) for s, m in sorted(stage_metrics.items())]
    for ax, (title, steps) in zip(axes.flat, curves):
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if steps and min(r["loss"] for r in steps) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    names = list(rows)
    x = list(range(len(names)))
    ax = axes.flat[4]
    bars = [("ll_acc (MC)", lambda r: r.ll_acc), ("gen_mc (MC)", lambda r: r.gen_acc_mc),
            ("gen_acc (all items)", lambda r: r.gen_acc)]
    for j, (label, get) in enumerate(bars):
        ax.bar([i + 0.27 * (j - 1) for i in x], [get(rows[n][0]) or 0.0 for n in names], width=0.27, label=label)
    ax.set_ylim(0, 1)
    ax.set_title("test accuracy per model", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes.flat[5]
    ax.bar(x, [rows[n][1] for n in names], color="tab:red")
    ax.set_title("KL(teacher || model) per assistant token, test chats", fontsize=9)
    for ax in axes.flat[4:]:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


class _ForwardLog(logging.Handler):
    """Forwards the trainer's ``fastattn.distill`` progress records to our ``log`` callable."""

    def __init__(self, log):
        super().__init__(logging.INFO)
        self._log = log

    def emit(self, record):
        self._log("  " + record.getMessage())


def _run_stages(cfg, teacher, student, tok, data, held, test_chat, test, device, rows, timings, log) -> Dict[int, dict]:
    stage_metrics: Dict[int, dict] = {}
    handler = _ForwardLog(log)
    logger = logging.getLogger("fastattn.distill")
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        for stage in (1, 2, 3):
            steps, lr = cfg.stage_steps[stage - 1], cfg.stage_lr[stage - 1]
            log(f"{STAGE_NAMES[stage]} ({steps} steps, lr {lr:g})")
            t = time.perf_counter()
            tcfg = TrainConfig(steps=steps, lr=lr, warmup_steps=min(10, steps // 10), batch_size=cfg.stage_batch,
                               seq_len=cfg.seq_len, loss="kl", seed=cfg.seed + stage, log_every=cfg.log_every,
                               device=str(device), amp=False)
            kind = "text" if stage < 3 else "chat"
            m = run_stage(stage, teacher, student, data[kind], tcfg, tokenizer=tok, eval_data=held[kind])
            stage_metrics[stage] = m
            timings[f"stage{stage}"] = time.perf_counter() - t
            t = time.perf_counter()
            name = f"student:stage{stage}"
            rows[name] = score(student, teacher, tok, test, test_chat, cfg, device)
            timings["eval"] += time.perf_counter() - t
            extra = ""
            if stage == 1:
                extra = " (relative error per KDA layer: " + ", ".join(
                    f"{k}: {v:.3f}" for k, v in m["final_eval"]["layer_loss"].items()) + ")"
            log(f"  dev loss {m['initial_eval']['loss']:.4f} -> {m['eval_loss']:.4f}{extra}; test gen_acc "
                f"{rows[name][0].gen_acc:.3f}, kl_chat {rows[name][1]:.4f}")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    return stage_metrics


def run(cfg: DemoConfig, out: Path, log=print) -> dict:
    """The whole demo: data, teacher, conversion, stages 1-3, evaluation, table, JSON and plot.

    Args:
        cfg: a :class:`DemoConfig`.
        out: output directory (created); ``metrics.json`` and ``distill_minimal.png`` are written there.
        log: ``print``-like callable for progress lines and the table.
    Returns:
        the metrics dict also written to ``metrics.json``: ``config``, ``device``, ``torch_threads``, ``data``,
        ``teacher`` (training history and config), ``student_layer_types``, ``stages`` (``run_stage`` metrics
        keyed ``"1"``-``"3"``), ``rows`` (per model: ``report`` = ``EvalReport.to_dict`` with the generations,
        ``kl_chat``), ``table``, ``timings_s``, ``plot`` (the PNG path or None).

    Example:
        >>> run(DemoConfig.quick(), Path("/tmp/distill_minimal"))["rows"].keys()   # doctest: +SKIP
        dict_keys(['teacher', 'student:init', 'student:stage1', 'student:stage2', 'student:stage3'])
    """
    if not isinstance(cfg, DemoConfig):
        raise TypeError(f"cfg must be a DemoConfig, got {type(cfg).__name__}")
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = ByteTokenizer()
    timings: Dict[str, float] = {}
    log(f"distill_minimal: device {device}, torch threads {torch.get_num_threads()}, seed {cfg.seed}, out {out}")

    t = time.perf_counter()
    train, dev, test = build_tasks(cfg)
    V = tok.vocab_size
    train_chats, dev_chats = [it.chat() for it in train], [it.chat() for it in dev]
    data = {"text": prepare_data(2, train_chats, cfg.seq_len, V, tok),     # every token counts (stages 1-2)
            "chat": prepare_data(3, train_chats, cfg.seq_len, V, tok)}     # assistant tokens only (stage 3)
    held = {"text": prepare_data(2, dev_chats, cfg.seq_len, V, tok), "chat": prepare_data(3, dev_chats, cfg.seq_len,
                                                                                          V, tok)}
    test_chat = prepare_data(3, [it.chat() for it in test], cfg.seq_len, V, tok)
    timings["data"] = time.perf_counter() - t
    log(f"data: {len(train)} train / {len(dev)} dev / {len(test)} test items from make_tasks, kinds "
        f"{','.join(cfg.kinds)}, {cfg.num_options} options")

    t = time.perf_counter()
    teacher = build_teacher(cfg, V)
    log(f"teacher: {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M params, {cfg.num_layers} attention "
        f"layers, hidden {cfg.hidden_size}; up to {cfg.teacher_steps} steps of {cfg.teacher_batch} conversations")
    history = train_teacher(teacher, tok, train, dev, cfg, device, log)
    for p in teacher.parameters():
        p.requires_grad_(False)
    timings["teacher_train"] = time.perf_counter() - t

    t = time.perf_counter()
    rows: Dict[str, Tuple[EvalReport, float]] = {}
    rows["teacher"] = score(teacher, teacher, tok, test, test_chat, cfg, device)
    log(f"teacher on test: gen_acc {rows['teacher'][0].gen_acc:.3f}, ll_acc {_rate(rows['teacher'][0].ll_acc)}")
    torch.manual_seed(cfg.seed + 1)
    student = student_from_teacher(teacher, "hybrid-kda", kda_chunk_size=cfg.kda_chunk_size).float()
    for p in student.parameters():
        p.requires_grad_(True)
    layer_types = list(student.config.layer_types)
    log(f"student (hybrid-kda from the teacher): layer types {', '.join(layer_types)}")
    rows["student:init"] = score(student, teacher, tok, test, test_chat, cfg, device)
    timings["eval"] = time.perf_counter() - t

    stage_metrics = _run_stages(cfg, teacher, student, tok, data, held, test_chat, test, device, rows, timings, log)

    table = format_report_table({name: rep for name, (rep, _) in rows.items()}, kinds=KIND_COLUMNS,
                                extra={"kl_chat": {name: f"{kl:.4f}" for name, (_, kl) in rows.items()}})
    log("")
    counts = ", ".join(f"{k}: {sum(it.kind == k for it in test)}" for k in KIND_COLUMNS)
    log(f"test set: {len(test)} held-out items ({counts})")
    log(table)
    log("gap = ll_acc - gen_mc (> 0: the right option ranks first by log-likelihood but the generated reply misses "
        "it: a wrong letter or a reply outside the trained format, counted in invalid); "
        "kl_chat = KL(teacher || model) per assistant token")
    short = {k: v for k, v in rows["teacher"][0].per_kind.items() if v < cfg.teacher_target}
    if short:
        log(f"note: on test the teacher stays below the target {cfg.teacher_target} on "
            + ", ".join(f"{k} ({v:.3f})" for k, v in short.items())
            + "; the students are measured against this teacher (see the module docstring)")
    results = {
        "config": cfg.to_dict(), "device": str(device), "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__, "data": {"train": len(train), "dev": len(dev), "test": len(test)},
        "teacher": {"history": history, "config": teacher.config.to_dict()},
        "student_layer_types": layer_types,
        "stages": {str(s): m for s, m in stage_metrics.items()},
        "rows": {name: {"report": rep.to_dict(include_generations=True), "kl_chat": kl}
                 for name, (rep, kl) in rows.items()},
        "table": table,
    }
    skipped = save_plot(out / "distill_minimal.png", history, stage_metrics, rows)
    results["plot"] = None if skipped else str(out / "distill_minimal.png")
    if skipped:
        log(f"note: {skipped}")
    timings["total"] = time.perf_counter() - t_start
    results["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    with open(out / "metrics.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    log(f"wrote {out / 'metrics.json'}" + ("" if skipped else f" and {out / 'distill_minimal.png'}")
        + f"; total {timings['total']:.0f}s")
    return results


def _rate(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def _steps_arg(text: str) -> Tuple[int, int, int]:
    try:
        parts = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be one int or three comma-separated ints, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"must be one int or three ints >= 1 (stages 1,2,3), got {text!r}")
    return parts


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (see the module docstring)."""
    p = argparse.ArgumentParser(description="Minimal offline GenDistill demo: tiny teacher -> Hybrid-KDA student, "
                                            "stages 1-3, LL vs generation table.")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the initialisation and the batch order")
    p.add_argument("--quick", action="store_true", help="CI-sized run (fewer items and steps, same table)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: CUDA when available)")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher step budget (overrides the preset)")
    p.add_argument("--steps", type=_steps_arg, default=None,
                   help="steps of stages 1,2,3: one int or three comma-separated (overrides the preset)")
    p.add_argument("--kinds", default=None,
                   help="comma-separated make_tasks kinds (mc,kv,arith; repeats weight the mix)")
    p.add_argument("--num-options", type=int, default=None, help="options per multiple-choice item (2..8)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: $OMP_NUM_THREADS when set, else min(8, CPU count))")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv``, run the demo; return 0, or 2 after printing an ``error:`` line for a bad value.

    Example:
        >>> main(["--quick", "--out", "/tmp/distill_minimal_doctest"])   # doctest: +SKIP
        0
    """
    args = build_parser().parse_args(argv)
    overrides = {"seed": args.seed, "device": args.device}
    if args.teacher_steps is not None:
        overrides["teacher_steps"] = args.teacher_steps
    if args.steps is not None:
        overrides["stage_steps"] = args.steps
    if args.kinds is not None:
        overrides["kinds"] = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if args.num_options is not None:
        overrides["num_options"] = args.num_options
    old_threads = torch.get_num_threads()
    try:
        cfg = (DemoConfig.quick if args.quick else DemoConfig.full)(**overrides)
        resolve_device(cfg.device)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        elif "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    except (ValueError, RuntimeError) as e:       # RuntimeError: torch.device() of an unknown device string
        print(f"distill_minimal: error: {e}", file=sys.stderr)
        torch.set_num_threads(old_threads)
        return 2
    try:
        run(cfg, Path(args.out))
    finally:
        torch.set_num_threads(old_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
