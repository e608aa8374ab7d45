"""The shared GenDistill trainer: :class:`TrainConfig`, :func:`run_stage`, :func:`evaluate_stage`, :func:`distill`.

One optimizer step reads the global batch ``batch_indices(N, batch_size, seed, step)``; under ``torchrun``
rank ``r`` of ``W`` takes its contiguous ``batch_size / W`` rows and splits them into ``grad_accum``
micro-batches. Each micro-batch adds ``sum of its per-token losses / tokens in the global batch`` to the
gradient (times ``W`` to undo DDP's averaging), so the update equals a one-process step on the global
batch. AdamW on fp32 master weights (bf16 autocast only on CUDA with ``amp``), cosine LR with linear
warmup, gradient-norm clipping.

Fault tolerance: with ``ckpt_dir`` set, a checkpoint is written atomically every ``ckpt_every`` steps and
when the stage ends; ``resume=True`` continues from it (a finished stage is skipped, its weights loaded).
SIGTERM sets a flag; the loop finishes the current step, writes a checkpoint and returns metrics with
``interrupted=True`` (the CLI then exits with :data:`EXIT_PREEMPTED`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..models import HybridLM
from . import dist as D
from .checkpoint import atomic_write_json, checkpoint_path, load_checkpoint, save_checkpoint, set_rng_state
from .stages import (LOSSES, STAGES, StageData, StageObjective, batch_indices, new_mixer_layers, prepare_data,
                     set_trainable)

log = logging.getLogger("fastattn.distill")
EXIT_PREEMPTED = 75     # sysexits EX_TEMPFAIL: stopped by SIGTERM after writing a checkpoint; run again with resume
# config fields that may change between a checkpoint and its resumption (they do not alter the trajectory)
_RESUMABLE_CHANGES = ("log_every", "ckpt_dir", "ckpt_every", "resume", "metrics_path", "device", "progress", "fsdp")

__all__ = ["TrainConfig", "CosineSchedule", "run_stage", "evaluate_stage", "distill", "EXIT_PREEMPTED",
           "preemption_guard", "preempted"]


def _num(name, value, lo=None, hi=None, integer=False, lo_open=False):
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"TrainConfig.{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"TrainConfig.{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"TrainConfig.{name} must be <= {hi}, got {value!r}")


@dataclass
class TrainConfig:
    """Options of one distillation stage.

    Attributes:
        steps: optimizer steps (>= 1).
        lr: peak learning rate; min_lr_ratio: the cosine ends at ``lr * min_lr_ratio``; warmup_steps: linear
            warmup from ``lr / warmup_steps``.
        weight_decay: AdamW decoupled weight decay (betas 0.9/0.95, eps 1e-8).
        batch_size: global batch, sequences per optimizer step (all ranks together).
        grad_accum: micro-batches per rank per step; ``batch_size`` must divide by ``grad_accum * world``.
        seq_len: maximum tokens per sequence (longer blocks/conversations are right-truncated).
        clip: max gradient norm (0 disables clipping; the norm is logged anyway).
        temperature: KL temperature (stages 2-3; the loss is scaled by ``temperature**2``).
        loss: ``kl`` | ``sft`` | ``kl+ce`` (stages 2-3; stage 1 always uses the alignment loss).
        ce_weight: CE weight ``w`` of ``kl+ce``: ``(1 - w) * KL + w * CE``.
        freeze_attention: freeze the whole decoder layers whose mixer is ``attention``; None = the stage's
            default (False for stage 2, True for stage 3; ignored by stage 1, where only new mixers train).
        seed: data order (``batch_indices``) and RNG seed.
        log_every: log a line every this many steps.
        ckpt_dir: checkpoint directory (None: no checkpoints, SIGTERM is not intercepted).
        ckpt_every: checkpoint every this many steps (0: only at the end or on SIGTERM).
        resume: continue from ``{ckpt_dir}/stage{N}.pt`` when it exists.
        metrics_path: JSON file for the stage's metrics (written by rank 0), or None.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        amp: bf16 autocast for forward passes on CUDA (ignored on the CPU); weights stay fp32.
        fsdp: shard the student with FSDP2 ``fully_shard`` instead of DDP in a distributed run.
        progress: show a tqdm progress bar (when tqdm is installed) on rank 0.

    Example:
        >>> TrainConfig(steps=10, batch_size=4).lr
        0.001
        >>> TrainConfig(steps=0)
        Traceback (most recent call last):
        ...
        ValueError: TrainConfig.steps must be >= 1, got 0
    """
    steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 512
    clip: float = 1.0
    temperature: float = 1.0
    loss: str = "kl"
    ce_weight: float = 0.5
    freeze_attention: Optional[bool] = None
    seed: int = 0
    log_every: int = 10
    ckpt_dir: Optional[str] = None
    ckpt_every: int = 0
    resume: bool = False
    metrics_path: Optional[str] = None
    device: str = "auto"
    amp: bool = True
    fsdp: bool = False
    progress: bool = False

    def __post_init__(self):
        _num("steps", self.steps, 1, integer=True)
        _num("lr", self.lr, 0.0, lo_open=True)
        _num("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _num("warmup_steps", self.warmup_steps, 0, integer=True)
        _num("weight_decay", self.weight_decay, 0.0)
        _num("batch_size", self.batch_size, 1, integer=True)
        _num("grad_accum", self.grad_accum, 1, integer=True)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"TrainConfig.batch_size must be a multiple of grad_accum={self.grad_accum}, "
                             f"got {self.batch_size}")
        _num("seq_len", self.seq_len, 2, integer=True)
        _num("clip", self.clip, 0.0)
        _num("temperature", self.temperature, 0.0, lo_open=True)
        if self.loss not in LOSSES:
            raise ValueError(f"TrainConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        _num("ce_weight", self.ce_weight, 0.0, 1.0)
        if self.freeze_attention is not None and not isinstance(self.freeze_attention, bool):
            raise ValueError(f"TrainConfig.freeze_attention must be None, True or False, got {self.freeze_attention!r}")
        _num("seed", self.seed, 0, integer=True)
        _num("log_every", self.log_every, 1, integer=True)
        _num("ckpt_every", self.ckpt_every, 0, integer=True)
        if self.ckpt_dir is not None and not isinstance(self.ckpt_dir, str):
            raise ValueError(f"TrainConfig.ckpt_dir must be a str path or None, got {self.ckpt_dir!r}")
        if self.metrics_path is not None and not isinstance(self.metrics_path, str):
            raise ValueError(f"TrainConfig.metrics_path must be a str path or None, got {self.metrics_path!r}")
        if self.resume and self.ckpt_dir is None:
            raise ValueError("TrainConfig.resume=True needs a ckpt_dir to resume from, got ckpt_dir=None")
        for name in ("resume", "amp", "fsdp", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"TrainConfig.device must be a str ('auto', 'cpu', 'cuda', 'cuda:N'), got {self.device!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class CosineSchedule:
    """LR multiplier of step ``s``: ``(s+1)/warmup`` during warmup, then cosine from 1 to ``min_ratio``.

    Example:
        >>> f = CosineSchedule(steps=10, warmup=2, min_ratio=0.1)
        >>> [round(f(s), 3) for s in (0, 1, 2, 10)]
        [0.5, 1.0, 1.0, 0.1]
    """

    def __init__(self, steps: int, warmup: int, min_ratio: float):
        self.steps, self.warmup, self.min_ratio = steps, warmup, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        progress = min(1.0, progress)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Preemption:
    """Process-wide SIGTERM state shared by nested :func:`preemption_guard` s."""
    flag = False
    depth = 0
    previous = None


def _on_sigterm(signum, frame):
    _Preemption.flag = True


@contextmanager
def preemption_guard(enabled: bool = True):
    """Context manager that turns SIGTERM into a flag the training loop polls (see the module docstring).

    Re-entrant: the outermost guard (in the main thread only) clears the flag, installs the handler and
    restores the previous one on exit. ``run_stage`` enters it when it has a ``ckpt_dir``; the CLI enters
    it around all stages so that a SIGTERM between two stages also stops the run cleanly.

    Example:
        >>> with preemption_guard():
        ...     preempted()
        False
    """
    active = enabled and threading.current_thread() is threading.main_thread()
    if active:
        if _Preemption.depth == 0:
            _Preemption.flag = False
            _Preemption.previous = signal.signal(signal.SIGTERM, _on_sigterm)
        _Preemption.depth += 1
    try:
        yield
    finally:
        if active:
            _Preemption.depth -= 1
            if _Preemption.depth == 0:
                signal.signal(signal.SIGTERM, _Preemption.previous)
                _Preemption.previous = None


def preempted() -> bool:
    """Whether SIGTERM arrived inside the current :class:`preemption_guard`."""
    return _Preemption.flag


def _check_models(teacher, student) -> None:
    if not isinstance(student, HybridLM):
        raise TypeError(f"student must be a fastattn.models.HybridLM, got {type(student).__name__}")
    if not isinstance(teacher, torch.nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module (a HybridLM), got {type(teacher).__name__}")
    bad = [n for n, p in student.named_parameters() if p.dtype != torch.float32]
    if bad:
        raise TypeError(f"student parameters must be float32 (fp32 master weights), got "
                        f"{student.get_parameter(bad[0]).dtype} for {bad[0]!r}; call student.float()")
    tcfg = getattr(teacher, "config", None)
    if tcfg is not None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if getattr(tcfg, name) != getattr(student.config, name):
                raise ValueError(f"teacher config.{name} must equal the student's {getattr(student.config, name)}, "
                                 f"got {getattr(tcfg, name)}")


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _shard(indices: Sequence[int], info: D.DistInfo, grad_accum: int):
    per_rank = len(indices) // info.world_size
    mine = indices[info.rank * per_rank:(info.rank + 1) * per_rank]
    size = per_rank // grad_accum
    return [mine[i * size:(i + 1) * size] for i in range(grad_accum)]


def _eval(objective: StageObjective, data: StageData, micro: int, info: D.DistInfo, device, amp: bool) -> dict:
    """Token-weighted mean loss over all of ``data`` (sharded over ranks); stage 1 adds per-layer errors."""
    stage = objective.stage
    rows = list(range(info.rank, len(data), info.world_size))
    keys = ["loss_sum", "count"] + [f"{k}.{i}" for i in objective.layers for k in ("sq_err", "sq_ref")]
    acc = torch.zeros(len(keys), dtype=torch.float64, device=device)
    # every rank runs the same number of forwards (FSDP gathers weights inside each); a rank out of rows
    # repeats example 0 and discards the result
    n_iter = math.ceil(math.ceil(len(data) / info.world_size) / micro)
    with torch.no_grad(), _autocast(device, amp):
        for it in range(n_iter):
            chunk = rows[it * micro:(it + 1) * micro]
            batch = data.batch(chunk or [0]).to(device)
            count = StageObjective.loss_tokens(stage, batch).to(torch.float32)
            _, stats = objective(batch, count, layer_stats=stage == 1)
            stats["count"] = count
            for j, k in enumerate(keys):
                if k in stats and chunk:
                    acc[j] += stats[k].double()
    D.all_reduce_sum(acc, info)
    vals = dict(zip(keys, acc.tolist(), strict=True))
    out = {"loss": vals["loss_sum"] / max(1.0, vals["count"]), "tokens": int(vals["count"])}
    if stage == 1:
        out["layer_loss"] = {str(i): vals[f"sq_err.{i}"] / max(1e-30, vals[f"sq_ref.{i}"]) for i in objective.layers}
    return out


def _setup(stage, teacher, student, data, cfg, tokenizer):
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if isinstance(stage, bool) or stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    _check_models(teacher, student)
    info, device = D.setup_distributed(cfg.device)
    prepared = prepare_data(stage, data, cfg.seq_len, student.config.vocab_size, tokenizer)
    return info, device, prepared


def evaluate_stage(stage: int, teacher, student: HybridLM, data, cfg: Optional[TrainConfig] = None,
                   tokenizer=None) -> dict:
    """The stage's loss on ``data`` without training (token-weighted mean over every example).

    Both models are moved to ``cfg.device``; nothing else about them changes.

    Args:
        stage: 1, 2 or 3 (the objective to measure; see :mod:`fastattn.distill.stages`).
        teacher, student: HybridLMs of the same shape (the student in fp32).
        data: as in :func:`run_stage`.
        cfg: uses ``seq_len``, ``loss``, ``temperature``, ``ce_weight``, ``device``, ``amp`` and the micro-batch
            size ``batch_size // grad_accum``; default ``TrainConfig()``.
        tokenizer: needed when ``data`` is a list of conversations.
    Returns:
        ``{"loss": float, "tokens": int}`` (tokens = positions counted); stage 1 adds
        ``"layer_loss": {layer: relative error}`` (the squared error over the teacher output's square, summed
        over the data; 1.0 = as bad as zeros).

    Example:
        >>> from fastattn.models import HybridConfig
        >>> t = HybridLM(HybridConfig.from_preset("attention", vocab_size=64, hidden_size=32,
        ...              intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        ...              num_key_value_heads=1, head_dim=16))
        >>> evaluate_stage(2, t, t, torch.randint(0, 64, (2, 8)), TrainConfig(device="cpu"))["loss"]
        0.0
    """
    cfg = cfg if cfg is not None else TrainConfig()
    info, device, prepared = _setup(stage, teacher, student, data, cfg, tokenizer)
    teacher.to(device).eval()
    student.to(device)
    layers = new_mixer_layers(teacher, student) if stage == 1 else []
    if stage == 1 and not layers:
        raise ValueError("stage 1 needs at least one student layer whose mixer differs from the teacher's, got none")
    objective = StageObjective(stage, teacher, student, layers, cfg.loss, cfg.temperature, cfg.ce_weight)
    was_training = student.training
    student.eval()
    try:
        return _eval(objective, prepared, max(1, cfg.batch_size // cfg.grad_accum), info, device, cfg.amp)
    finally:
        student.train(was_training)


def _tqdm(total: int, initial: int, enabled: bool, stage: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=f"stage {stage}", dynamic_ncols=True)


def run_stage(stage: int, teacher, student: HybridLM, data, cfg: TrainConfig, tokenizer=None,
              eval_data=None) -> dict:
    """Train ``student`` in place for one GenDistill stage; return its metrics.

    Args:
        stage: 1 (per-layer alignment of the new mixers), 2 (end-to-end KL on text) or 3 (chat KD with
            completion-only masking, attention layers frozen); see :mod:`fastattn.distill.stages`.
        teacher: frozen HybridLM (e.g. ``convert_qwen3(dir, preset="attention")``, fp32 or bf16); never
            modified except being moved to ``cfg.device`` and put in eval mode.
        student: fp32 HybridLM of the same shape (e.g. ``convert_qwen3(dir, preset="hybrid-kda")``).
        data: stages 1-2: ``LongTensor [N, T]`` of token blocks (or a list of conversations, every token
            counting); stage 3: a list of conversations (lists of ``{"role", "content"}`` dicts); or a
            :class:`~fastattn.distill.stages.StageData` from ``prepare_data``.
        cfg: a :class:`TrainConfig`.
        tokenizer: a :class:`~fastattn.distill.Tokenizer` (needed for conversations).
        eval_data: optional held-out data of the same kind; evaluated before and after training.
    Returns:
        metrics dict: ``stage``, ``config``, ``world_size``, ``trained_layers``, ``frozen_layers``,
        ``trainable_params``, ``steps`` (one record per step: ``step``, ``loss`` (token-weighted mean over the
        global batch), ``lr``, ``grad_norm`` (before clipping), ``tokens`` (real input tokens in the global
        batch), ``loss_tokens`` (positions the loss counts), ``time_s`` (since the stage began)),
        ``completed_steps``, ``tokens_seen``, ``wall_time_s``, ``initial_eval`` and ``final_eval``
        (:func:`evaluate_stage` dicts or None), ``eval_loss`` (final eval loss or None),
        ``interrupted`` (True when SIGTERM stopped it after a checkpoint), ``resumed_from`` (step or None).

    Example:
        >>> from fastattn.models import HybridConfig
        >>> t = HybridLM(HybridConfig.from_preset("attention", vocab_size=64, hidden_size=32,
        ...              intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        ...              num_key_value_heads=1, head_dim=16, kda_chunk_size=16))
        >>> from fastattn.distill import student_from_teacher
        >>> s = student_from_teacher(t, "hybrid-kda")
        >>> m = run_stage(1, t, s, torch.randint(0, 64, (8, 16)), TrainConfig(steps=2, batch_size=4, device="cpu"))
        >>> m["completed_steps"], m["trained_layers"]
        (2, [1])
    """
    info, device, prepared = _setup(stage, teacher, student, data, cfg, tokenizer)
    eval_prepared = prepare_data(stage, eval_data, cfg.seq_len, student.config.vocab_size, tokenizer) \
        if eval_data is not None else None
    if cfg.batch_size % (cfg.grad_accum * info.world_size):
        raise ValueError(f"TrainConfig.batch_size must be a multiple of grad_accum * world_size = "
                         f"{cfg.grad_accum} * {info.world_size}, got {cfg.batch_size}")
    if cfg.fsdp and info.distributed and not D.fsdp_available():
        raise ValueError("TrainConfig.fsdp=True needs torch.distributed.fsdp.fully_shard (torch >= 2.6), "
                         f"not found in torch {torch.__version__}")
    torch.manual_seed(cfg.seed)
    freeze = cfg.freeze_attention if cfg.freeze_attention is not None else stage == 3
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    teacher.to(device).eval()
    student.to(device)
    try:
        return _train(stage, teacher, student, prepared, eval_prepared, cfg, info, device, freeze)
    finally:
        for n, p in student.named_parameters():
            p.requires_grad_(flags[n])


def _train(stage, teacher, student, data, eval_data, cfg, info, device, freeze):
    scope = set_trainable(stage, teacher, student, freeze)
    sharded = cfg.fsdp and info.distributed
    model = D.shard_fsdp(student, device) if sharded else student
    trainable = [p for p in model.parameters() if p.requires_grad]
    objective = StageObjective(stage, teacher, model, scope["trained_layers"] if stage == 1 else [],
                               cfg.loss, cfg.temperature, cfg.ce_weight)
    has_eva = any(t == "eva" for t in student.config.layer_types)
    runner = D.wrap_ddp(objective, device, has_eva) if info.distributed and not sharded else objective
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, CosineSchedule(cfg.steps, cfg.warmup_steps,
                                                                            cfg.min_lr_ratio))
    micro = cfg.batch_size // (cfg.grad_accum * info.world_size)
    metrics = {"stage": stage, "config": cfg.to_dict(), "world_size": info.world_size,
               "trained_layers": scope["trained_layers"], "frozen_layers": scope["frozen_layers"],
               "trainable_params": int(sum(p.numel() for n, p in student.named_parameters() if p.requires_grad)),
               "steps": [], "completed_steps": 0, "tokens_seen": 0, "wall_time_s": 0.0, "initial_eval": None,
               "final_eval": None, "eval_loss": None, "interrupted": False, "resumed_from": None}
    start = 0
    path = checkpoint_path(cfg.ckpt_dir, stage) if cfg.ckpt_dir is not None else None
    if cfg.resume and path is not None and path.is_file():
        start, metrics = _resume(path, stage, cfg, model, optimizer, scheduler, metrics, sharded, info)
    if start == 0 and eval_data is not None:
        model.eval()
        metrics["initial_eval"] = _eval(objective, eval_data, micro, info, device, cfg.amp)
    done = start >= cfg.steps
    model.train()
    bar = _tqdm(cfg.steps, start, cfg.progress and info.is_main and not done, stage)
    t0 = time.perf_counter() - metrics["wall_time_s"]
    step = start
    with preemption_guard(path is not None):
        while step < cfg.steps:
            stop = torch.tensor([1.0 if preempted() else 0.0], device=device)
            if path is not None and D.all_reduce_sum(stop, info).item() > 0:
                metrics["interrupted"] = True
                _save(path, stage, step, cfg, model, optimizer, scheduler, metrics, info, sharded, done=False)
                log.warning("stage %d: SIGTERM received; checkpoint at step %d written to %s", stage, step, path)
                break
            rec = _step(runner, objective, model, optimizer, scheduler, data, cfg, info, device, step, micro,
                        trainable, sharded)
            step += 1
            metrics["tokens_seen"] += rec["tokens"]
            rec["time_s"] = round(time.perf_counter() - t0, 4)
            metrics["steps"].append(rec)
            metrics["completed_steps"], metrics["wall_time_s"] = step, rec["time_s"]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4g}", lr=f"{rec['lr']:.2e}")
            if info.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
                log.info("stage %d step %d/%d loss %.5g lr %.3g grad_norm %.3g tokens %d", stage, step, cfg.steps,
                         rec["loss"], rec["lr"], rec["grad_norm"], rec["tokens"])
            if path is not None and cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
                _save(path, stage, step, cfg, model, optimizer, scheduler, metrics, info, sharded, done=False)
    if bar is not None:
        bar.close()
    if not metrics["interrupted"]:
        if not done and eval_data is not None:
            model.eval()
            metrics["final_eval"] = _eval(objective, eval_data, micro, info, device, cfg.amp)
            metrics["eval_loss"] = metrics["final_eval"]["loss"]
        if path is not None and not done:
            _save(path, stage, step, cfg, model, optimizer, scheduler, metrics, info, sharded, done=True)
    model.train()
    if sharded:
        D.load_full_state_dict(student, D.full_state_dict(model, True), sharded=False)
    if info.is_main and cfg.metrics_path is not None:
        atomic_write_json(cfg.metrics_path, metrics)
    D.barrier(info)
    return metrics


def _step(runner, objective, model, optimizer, scheduler, data, cfg, info, device, step, micro, trainable, sharded):
    """One optimizer step on the global batch of ``step``; returns its log record."""
    micro_batches = [data.batch(ix).to(device) for ix in _shard(batch_indices(len(data), cfg.batch_size, cfg.seed,
                                                                              step), info, cfg.grad_accum)]
    local = torch.stack([StageObjective.loss_tokens(objective.stage, b) for b in micro_batches]).sum()
    counts = torch.stack([local.double(), sum(b.valid.sum() for b in micro_batches).double()])
    D.all_reduce_sum(counts, info)
    total = counts[0].to(torch.float32)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for j, batch in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        if sharded:
            model.set_requires_gradient_sync(last)
            sync = nullcontext()
        else:
            sync = runner.no_sync() if (info.distributed and not last) else nullcontext()
        with sync:
            with _autocast(device, cfg.amp):
                loss, stats = runner(batch, total)
            (loss * info.world_size).backward()
        loss_sum += stats["loss_sum"].double()
    D.all_reduce_sum(loss_sum, info)
    max_norm = cfg.clip if cfg.clip > 0 else float("inf")
    grad_norm = D.local_grad_norm_value(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return {"step": step + 1, "loss": float(loss_sum) / max(1.0, float(counts[0])), "lr": lr,
            "grad_norm": grad_norm, "tokens": int(counts[1]), "loss_tokens": int(counts[0])}


def _save(path, stage, step, cfg, model, optimizer, scheduler, metrics, info, sharded, done):
    state = D.full_state_dict(model, sharded)
    opt = None if done else D.optimizer_state(model, optimizer, sharded)
    if info.is_main:
        save_checkpoint(path, student_state=state, optimizer_state=opt,
                        scheduler_state=None if done else scheduler.state_dict(), step=step, config=cfg.to_dict(),
                        metrics=metrics, done=done, stage=stage, sharded=sharded)
        if cfg.metrics_path is not None:
            atomic_write_json(cfg.metrics_path, metrics)
    D.barrier(info)


def _resume(path, stage, cfg, model, optimizer, scheduler, metrics, sharded, info):
    blob = load_checkpoint(path)
    if blob["stage"] != stage:
        raise ValueError(f"checkpoint {path} must belong to stage {stage}, got stage {blob['stage']}")
    old, new = blob["config"], cfg.to_dict()
    diff = sorted(k for k in new if k not in _RESUMABLE_CHANGES and old.get(k) != new[k])
    if diff:
        raise ValueError(f"cannot resume from {path}: TrainConfig fields {diff} differ from the checkpoint's "
                         f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); use the same settings or a new ckpt_dir")
    D.load_full_state_dict(model, blob["student"], sharded)
    if not blob["done"]:
        fmt = "fsdp-full" if sharded else "plain"
        if blob.get("optimizer_format") != fmt:
            raise ValueError(f"checkpoint {path} holds a {blob.get('optimizer_format')!r} optimizer state, this run "
                             f"needs {fmt!r} (resume with the same --fsdp setting)")
        D.load_optimizer_state(model, optimizer, blob["optimizer"], sharded)
        scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    restored = blob["metrics"]
    restored["config"] = metrics["config"]
    restored["resumed_from"] = blob["step"]
    restored["interrupted"] = False
    if info.is_main:
        log.info("stage %d: resumed from %s at step %d%s", stage, path, blob["step"],
                 " (finished)" if blob["done"] else "")
    return blob["step"], restored


def distill(teacher, student: HybridLM, stages: Sequence[int], data: dict, cfg, tokenizer=None,
            eval_data: Optional[dict] = None) -> dict:
    """Run several stages in order on the same student (a thin loop over :func:`run_stage`).

    Args:
        teacher, student: as in :func:`run_stage`.
        stages: e.g. ``(1, 2, 3)``.
        data: ``{stage: data}`` for every stage in ``stages``.
        cfg: one :class:`TrainConfig` for every stage, or ``{stage: TrainConfig}``.
        tokenizer: for conversation data.
        eval_data: optional ``{stage: held-out data}``.
    Returns:
        ``{stage: metrics}``; stops after a stage that was interrupted by SIGTERM.

    Example:
        >>> from fastattn.models import HybridConfig
        >>> from fastattn.distill import student_from_teacher
        >>> t = HybridLM(HybridConfig.from_preset("attention", vocab_size=64, hidden_size=32,
        ...              intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        ...              num_key_value_heads=1, head_dim=16, kda_chunk_size=16))
        >>> s = student_from_teacher(t, "hybrid-kda")
        >>> blocks = torch.randint(0, 64, (8, 16))
        >>> out = distill(t, s, (1, 2), {1: blocks, 2: blocks}, TrainConfig(steps=1, batch_size=4, device="cpu"))
        >>> sorted(out)
        [1, 2]
    """
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or not stages:
        raise ValueError(f"stages must be a non-empty sequence of stage numbers {STAGES}, got {stages!r}")
    if not isinstance(data, dict):
        raise TypeError(f"data must be a dict {{stage: data}}, got {type(data).__name__}")
    results = {}
    for stage in stages:
        if stage not in data:
            raise ValueError(f"data must hold an entry for stage {stage}, got keys {sorted(data)}")
        stage_cfg = cfg[stage] if isinstance(cfg, dict) else cfg
        held = eval_data.get(stage) if eval_data else None
        results[stage] = run_stage(stage, teacher, student, data[stage], stage_cfg, tokenizer, eval_data=held)
        if results[stage]["interrupted"]:
            break
    return results
