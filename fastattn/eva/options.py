"""The non-tensor options of one FlashEVA call, carried as one frozen dataclass through autograd."""
from dataclasses import dataclass


@dataclass(frozen=True)
class EvaOptions:
    """Options of ``flash_eva`` / ``eva_landmarks`` (already validated).

    window_size: W, local window length.  chunk_size: C, tokens per landmark (W % C == 0).
    scale: softmax scale s.  sliding: ``local="sliding"`` (else block windows).
    """
    window_size: int
    chunk_size: int
    scale: float
    sliding: bool = False
