"""The teacher side of ``examples/distill_minimal.py``: the demo's configuration, its task split, and a tiny
Qwen3-shaped attention teacher trained from scratch on the chat items (cross-entropy on assistant tokens, early
stopping on dev generation accuracy). Kept beside the example so the example itself reads as the GenDistill
pipeline: convert, stages 1-3, score.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from fastattn.distill import ByteTokenizer, ce_loss, chat_example, pad_batch  # noqa: F401 (doctest)
from fastattn.distill.stages import batch_indices
from fastattn.distill.train import CosineSchedule
from fastattn.eval import Item, evaluate, make_tasks
from fastattn.models import HybridConfig, HybridLM


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
    stage_steps: Tuple[int, int, int] = (50, 80, 200)
    stage_lr: Tuple[float, float, float] = (3e-3, 1e-3, 1e-3)
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
