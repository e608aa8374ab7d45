"""The non-tensor options of one KDA call, carried as one frozen dataclass through autograd."""
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class KDAOptions:
    """Options shared by ``chunk_kda`` and ``fused_recurrent_kda`` (already validated).

    scale: multiplier of q.  use_qk_l2norm / use_gate / use_beta_sigmoid: the in-kernel options.
    lower_bound: None for the softplus gate, else lb in [-5, 0) for lb * sigmoid(...).
    output_final_state: return S_T.  chunk_size: chunk length of the chunked algorithm.
    """
    scale: float
    use_qk_l2norm: bool = False
    use_gate: bool = False
    use_beta_sigmoid: bool = False
    lower_bound: Optional[float] = None
    output_final_state: bool = False
    chunk_size: int = 64

    @property
    def has_lower_bound(self) -> bool:
        return self.lower_bound is not None
