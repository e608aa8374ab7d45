from .api import chunk_kda, fused_recurrent_kda
from .options import KDAOptions

__all__ = ["chunk_kda", "fused_recurrent_kda", "KDAOptions"]
