"""Naive float64 oracles used by tests and benchmarks (not part of the fastattn package)."""
from .kda import kda_gate_ref, kda_inputs, l2norm_ref, naive_chunk_kda, naive_recurrent_kda

__all__ = ["kda_gate_ref", "kda_inputs", "l2norm_ref", "naive_chunk_kda", "naive_recurrent_kda"]
