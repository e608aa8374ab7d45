"""``python -m fastattn.distill``: distil a Qwen3-format teacher into a hybrid student, stage by stage.

Example (one device; prefix with ``torchrun --nproc-per-node N`` for data parallelism)::

    python -m fastattn.distill --teacher qwen3-dir --preset hybrid-kda --stages 1,2,3 \\
        --text-data text.jsonl --chat-data chat.jsonl --out run1 --steps 200,400,200 --lr 1e-3,3e-4,1e-4

Output directory ``--out``:
  ``stage{N}/``            the student after stage N (``save_pretrained``: config.json + model.safetensors)
                           and ``stage{N}/metrics.json``; the last stage's directory is the final model.
  ``checkpoints/stage{N}.pt`` resumable checkpoints (every ``--ckpt-every`` steps, at the end, on SIGTERM).
  ``metrics.json``         the metrics of every stage run so far.

A non-empty ``--out`` is refused unless ``--resume`` (continue the run there: finished stages are skipped,
an interrupted one continues from its checkpoint, settings must match) or ``--overwrite`` (start afresh;
the old checkpoints there are deleted, other files are replaced as the new run writes them).

Exit status: 0 done; 2 bad input (one ``fastattn.distill: error: ...`` line on stderr, nothing created in
``--out``); 75 (:data:`~fastattn.distill.EXIT_PREEMPTED`) stopped by SIGTERM after writing a checkpoint:
run the same command with ``--resume`` to continue. Under ``torchrun``, signal the agent (it forwards
SIGTERM to every rank, which all stop after the same step) and keep one step plus a checkpoint shorter
than its shutdown timeout (30 s by default), after which it kills the ranks.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..models import PRESETS
from .data import ByteTokenizer, DataFormatError, load_chat_jsonl, load_text_jsonl, pack_blocks
from .dist import DistInfo, barrier, setup_distributed, teardown_distributed
from .stages import prepare_data
from .train import EXIT_PREEMPTED, TrainConfig, preemption_guard, run_stage

EXIT_BAD_INPUT = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

__all__ = ["main", "build_parser", "EXIT_BAD_INPUT"]


class InputError(Exception):
    """A problem with the command line or its inputs, reported as one line."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m fastattn.distill``."""
    p = argparse.ArgumentParser(prog="python -m fastattn.distill",
                                description="GenDistill: stage 1 per-layer alignment, stage 2 end-to-end KL, "
                                            "stage 3 chat KD with completion-only masking.")
    p.add_argument("--teacher", required=True, help="teacher directory in HF Qwen3 format (config.json + safetensors)")
    p.add_argument("--preset", default="hybrid-kda", help=f"student layer map, one of {', '.join(PRESETS)}")
    p.add_argument("--stages", default="1,2,3", help="comma-separated stages to run, in order (default 1,2,3)")
    p.add_argument("--text-data", help="jsonl of {\"text\": ...} records (stages 1-2)")
    p.add_argument("--chat-data", help="jsonl of {\"messages\": [...]} records (stage 3)")
    p.add_argument("--out", required=True, help="output directory (see the module docstring)")
    p.add_argument("--tokenizer", choices=("byte", "hf"), default="byte",
                   help="byte: fastattn ByteTokenizer (vocab 260); hf: AutoTokenizer from the teacher directory")
    p.add_argument("--steps", default="100", help="optimizer steps: one number, or one per stage (e.g. 200,400,200)")
    p.add_argument("--lr", default="1e-3", help="peak learning rate: one number, or one per stage")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=8, help="global batch in sequences per step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512, help="text block length / max chat length in tokens")
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--loss", choices=("kl", "sft", "kl+ce"), default="kl", help="stages 2-3 objective")
    p.add_argument("--ce-weight", type=float, default=0.5, help="CE weight of --loss kl+ce")
    p.add_argument("--freeze-attention", action=argparse.BooleanOptionalAction, default=None,
                   help="freeze the attention layers (default: stage 3 only)")
    p.add_argument("--eval-size", type=int, default=-1,
                   help="examples held out per stage for the eval loss (default min(64, N // 10))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N steps (0: end/SIGTERM only)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoints")
    mode.add_argument("--overwrite", action="store_true", help="start afresh in a non-empty --out")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--teacher-dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--fsdp", action="store_true", help="shard the student with FSDP2 under torchrun (else DDP)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def _per_stage(text: str, stages: Sequence[int], name: str, kind):
    parts = [s.strip() for s in str(text).split(",")]
    try:
        values = [kind(s) for s in parts]
    except ValueError:
        raise InputError(f"--{name} must be a {kind.__name__} or a comma-separated list, got {text!r}") from None
    if len(values) == 1:
        values = values * len(stages)
    if len(values) != len(stages):
        raise InputError(f"--{name} must hold one value or one per stage ({len(stages)} for --stages "
                         f"{','.join(map(str, stages))}), got {len(values)}")
    return dict(zip(stages, values, strict=True))


def _parse_stages(text: str) -> List[int]:
    try:
        stages = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        stages = []
    if not stages or any(s not in (1, 2, 3) for s in stages) or len(set(stages)) != len(stages):
        raise InputError(f"--stages must be distinct stage numbers from 1,2,3 separated by commas, got {text!r}")
    return stages


@dataclass
class _Plan:
    stages: List[int]
    configs: dict
    data: dict
    eval_data: dict
    tokenizer: object
    teacher: object
    student: object
    out: Path


def _check_out(out: Path, args) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise InputError(f"--out {out} is not empty; pass --resume to continue the run there or --overwrite "
                         "to start afresh")


def _split_eval(items, eval_size: int):
    n = len(items)
    k = min(64, n // 10) if eval_size < 0 else eval_size
    if k >= n:
        raise InputError(f"--eval-size must leave training data: {k} held out of {n} examples")
    if k == 0:
        return items, None
    return items[: n - k], items[n - k:]


def _plan(args, info: DistInfo) -> _Plan:
    """Validate everything and load data and models; creates nothing on disk."""
    stages = _parse_stages(args.stages)
    if args.preset not in PRESETS:
        raise InputError(f"--preset must be one of {', '.join(PRESETS)}, got {args.preset!r}")
    teacher_dir = Path(args.teacher)
    if not teacher_dir.is_dir():
        raise InputError(f"--teacher {teacher_dir} is not a directory (expected an HF Qwen3 checkpoint: "
                         "config.json + safetensors)")
    if not (teacher_dir / "config.json").is_file():
        raise InputError(f"--teacher {teacher_dir} has no config.json (expected an HF Qwen3 checkpoint)")
    for flag, value, needed in (("--text-data", args.text_data, {1, 2}), ("--chat-data", args.chat_data, {3})):
        if needed & set(stages):
            if value is None:
                raise InputError(f"{flag} is required for stage(s) {sorted(needed & set(stages))}")
            if not Path(value).is_file():
                raise InputError(f"{flag} {value} is not a file")
    out = Path(args.out)
    _check_out(out, args)
    steps = _per_stage(args.steps, stages, "steps", int)
    lrs = _per_stage(args.lr, stages, "lr", float)
    tokenizer = ByteTokenizer() if args.tokenizer == "byte" else _hf_tokenizer(teacher_dir)
    configs = {}
    for s in stages:
        configs[s] = TrainConfig(
            steps=steps[s], lr=lrs[s], min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay, batch_size=args.batch_size, grad_accum=args.grad_accum,
            seq_len=args.seq_len, clip=args.clip, temperature=args.temperature, loss=args.loss,
            ce_weight=args.ce_weight, freeze_attention=args.freeze_attention, seed=args.seed,
            log_every=args.log_every, ckpt_dir=str(out / "checkpoints"), ckpt_every=args.ckpt_every,
            resume=args.resume, metrics_path=str(out / f"stage{s}" / "metrics.json"), device=args.device,
            amp=not args.no_amp, fsdp=args.fsdp, progress=not args.no_progress and info.is_main)
    data, eval_data = {}, {}
    if {1, 2} & set(stages):
        texts = load_text_jsonl(args.text_data)
        blocks = pack_blocks((tokenizer.encode(t) for t in texts), args.seq_len, tokenizer.eos_id)
        train, held = _split_eval(blocks, args.eval_size)
        for s in {1, 2} & set(stages):
            data[s], eval_data[s] = train, held
    if 3 in stages:
        chats = load_chat_jsonl(args.chat_data)
        data[3], eval_data[3] = _split_eval(chats, args.eval_size)
    from ..models import convert_qwen3
    from ..models.convert import config_from_qwen3
    from ..models.io import read_json
    hf_config = read_json(teacher_dir / "config.json")
    vocab = config_from_qwen3(hf_config, "attention").vocab_size
    if tokenizer.vocab_size > vocab:
        raise InputError(f"--tokenizer {args.tokenizer} has {tokenizer.vocab_size} tokens, more than the teacher's "
                         f"vocab_size {vocab}")
    torch.manual_seed(args.seed)       # identical fresh mixer weights on every rank and on every resume
    teacher = convert_qwen3(teacher_dir, "attention", dtype=DTYPES[args.teacher_dtype])
    student = convert_qwen3(teacher_dir, args.preset, dtype=torch.float32)
    if 1 in stages and all(t == "attention" for t in student.config.layer_types):
        raise InputError(f"stage 1 trains new mixers, but --preset {args.preset} keeps every layer attention")
    for s in stages:          # tokenise once, and fail here (before --out exists) on unusable data
        data[s] = prepare_data(s, data[s], args.seq_len, vocab, tokenizer)
        if eval_data[s] is not None:
            eval_data[s] = prepare_data(s, eval_data[s], args.seq_len, vocab, tokenizer)
    return _Plan(stages, configs, data, eval_data, tokenizer, teacher, student, out)


def _hf_tokenizer(teacher_dir: Path):
    from .hf_tokenizer import load_hf_tokenizer
    return load_hf_tokenizer(teacher_dir)


def _prepare_out(plan: _Plan, args, info: DistInfo) -> None:
    if info.is_main:
        plan.out.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            ckpts = plan.out / "checkpoints"
            for f in ckpts.glob("stage*.pt") if ckpts.is_dir() else ():
                f.unlink()
    barrier(info)


def _run(plan: _Plan, info: DistInfo) -> int:
    from .checkpoint import atomic_write_json
    all_metrics = {}
    with preemption_guard():
        for s in plan.stages:
            m = run_stage(s, plan.teacher, plan.student, plan.data[s], plan.configs[s], tokenizer=plan.tokenizer,
                          eval_data=plan.eval_data[s])
            all_metrics[f"stage{s}"] = m
            if info.is_main:
                atomic_write_json(plan.out / "metrics.json", all_metrics)
            if m["interrupted"]:
                return EXIT_PREEMPTED
            if info.is_main:
                plan.student.save_pretrained(plan.out / f"stage{s}")
                atomic_write_json(plan.out / f"stage{s}" / "metrics.json", m)
            barrier(info)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m fastattn.distill``; returns the exit status (see the module docstring).

    Example:
        >>> main(["--teacher", "/nonexistent", "--out", "/tmp/x", "--stages", "2", "--text-data", "t.jsonl"])
        2
    """
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    created_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        info, _ = setup_distributed(args.device)
    except (ValueError, RuntimeError) as e:
        print(f"fastattn.distill: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        try:
            plan = _plan(args, info)
        except (InputError, DataFormatError, ValueError, TypeError, FileNotFoundError, ImportError) as e:
            print(f"fastattn.distill: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        _prepare_out(plan, args, info)
        return _run(plan, info)
    finally:
        if created_group and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            teardown_distributed()
