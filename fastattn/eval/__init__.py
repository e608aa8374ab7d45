"""Evaluation: synthetic chat tasks with exact answers, log-likelihood vs generation scoring, lm-eval adapter."""
from .extract import cut_turn, exact_match, extract_answer, normalize_text
from .lm_eval_adapter import (LMEvalOptions, chat_text, encode_text, lm_generate_until, lm_loglikelihood,
                              lm_loglikelihood_rolling, make_lm_eval_model, rolling_windows)
from .scoring import (EvalReport, continuation_logprobs, evaluate, format_report_table, generate_answers,
                      is_correct, loglik_choice, option_logprobs, reply_budget, stop_token_ids)
from .tasks import KINDS, LETTERS, REPLY_STYLES, Item, items_to_texts, make_tasks, write_jsonl

__all__ = ["Item", "KINDS", "LETTERS", "REPLY_STYLES", "make_tasks", "write_jsonl", "items_to_texts",
           "cut_turn", "exact_match", "extract_answer", "normalize_text",
           "EvalReport", "continuation_logprobs", "evaluate", "format_report_table", "generate_answers",
           "is_correct", "loglik_choice", "option_logprobs", "reply_budget", "stop_token_ids",
           "LMEvalOptions", "chat_text", "encode_text", "lm_generate_until", "lm_loglikelihood",
           "lm_loglikelihood_rolling", "make_lm_eval_model", "rolling_windows"]
