"""Thin Qwen3-shaped hybrid models (attention | KDA | EVA mixers), caches, generation and conversion."""
from .cache import HybridCache, cache_nbytes
from .config import PRESETS, HybridConfig, hybrid_layer_map
from .convert import config_from_qwen3, convert_qwen3
from .generate import generate
from .model import HybridLM

__all__ = ["HybridConfig", "HybridLM", "HybridCache", "PRESETS", "cache_nbytes", "config_from_qwen3",
           "convert_qwen3", "generate", "hybrid_layer_map"]
