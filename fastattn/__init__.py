"""fastattn: Triton kernels for chunked Kimi Delta Attention and FlashEVA."""
from .kda import chunk_kda, fused_recurrent_kda

__version__ = "0.1.0"

__all__ = ["chunk_kda", "fused_recurrent_kda", "__version__"]
