"""GenDistill: jsonl data, tokenizer protocol, completion masks, distillation losses, the staged trainer
(``run_stage``/``distill``), checkpoints and the ``python -m fastattn.distill`` CLI."""
from .data import (ByteTokenizer, DataFormatError, RenderedChat, Tokenizer, load_chat_jsonl, load_text_jsonl,
                   pack_blocks, pad_batch)
from .losses import KDLoss, alignment_loss, ce_loss, kd_ce_loss, kl_loss
from .masks import chat_example, completion_mask, next_token_targets
from .checkpoint import load_checkpoint, save_qwen3_teacher
from .stages import batch_indices, new_mixer_layers, student_from_teacher
from .train import EXIT_PREEMPTED, TrainConfig, distill, evaluate_stage, run_stage

__all__ = ["ByteTokenizer", "DataFormatError", "RenderedChat", "Tokenizer", "load_chat_jsonl", "load_text_jsonl",
           "pack_blocks", "pad_batch", "KDLoss", "alignment_loss", "ce_loss", "kd_ce_loss", "kl_loss",
           "chat_example", "completion_mask", "next_token_targets", "TrainConfig", "run_stage", "evaluate_stage",
           "distill", "EXIT_PREEMPTED", "student_from_teacher", "new_mixer_layers", "batch_indices",
           "save_qwen3_teacher", "load_checkpoint"]
