"""GenDistill building blocks: jsonl data, tokenizer protocol, completion masks, distillation losses."""
from .data import (ByteTokenizer, DataFormatError, RenderedChat, Tokenizer, load_chat_jsonl, load_text_jsonl,
                   pack_blocks, pad_batch)
from .losses import KDLoss, alignment_loss, ce_loss, kd_ce_loss, kl_loss
from .masks import chat_example, completion_mask, next_token_targets

__all__ = ["ByteTokenizer", "DataFormatError", "RenderedChat", "Tokenizer", "load_chat_jsonl", "load_text_jsonl",
           "pack_blocks", "pad_batch", "KDLoss", "alignment_loss", "ce_loss", "kd_ce_loss", "kl_loss",
           "chat_example", "completion_mask", "next_token_targets"]
