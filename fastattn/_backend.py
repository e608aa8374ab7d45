"""Backend selection shared by every op.

CUDA tensors run the Triton kernels, CPU tensors the vectorised PyTorch path. ``FASTATTN_BACKEND``
(``auto`` | ``triton`` | ``torch``) forces one; ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``.
"""
import os

import torch

_CHOICES = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_backend(x: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op whose inputs live where ``x`` lives."""
    choice = os.environ.get("FASTATTN_BACKEND", "auto").strip().lower()
    if choice not in _CHOICES:
        raise ValueError(f"FASTATTN_BACKEND must be one of {_CHOICES}, got {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if x.is_cuda else "torch"
    if not x.is_cuda and not interpreting():
        raise ValueError(
            "FASTATTN_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 "
            f"(got TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}); move the tensors to CUDA "
            "or use FASTATTN_BACKEND=torch")
    return "triton"
