"""Fused Triton kernels (forward, inference) of the thin models: KDA input conv + head split, (gated) RMSNorm."""
from .api import causal_conv_heads, gated_rms_norm, rms_norm

__all__ = ["causal_conv_heads", "gated_rms_norm", "rms_norm"]
