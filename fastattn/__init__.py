"""fastattn: Triton kernels for chunked Kimi Delta Attention and FlashEVA."""
from .kda import chunk_kda, fused_recurrent_kda
from .eva import EvaCache, eva_landmarks, flash_eva
from .models import HybridConfig, HybridLM, convert_qwen3

__version__ = "0.1.0"

__all__ = ["chunk_kda", "fused_recurrent_kda", "flash_eva", "eva_landmarks", "EvaCache",
           "HybridConfig", "HybridLM", "convert_qwen3", "__version__"]
