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


def eager_inference(*tensors) -> bool:
    """True when the registered ``torch.library`` op of a kernel can be skipped and its launcher called
    directly: no gradient can reach any of ``tensors`` (None entries ignored), no tracer (``torch.compile``,
    ``torch.export``) is active, and every tensor is a plain tensor (not a FakeTensor or other subclass).
    The op's dispatch (schema, autograd and alias checks in Python) is host time, and a Hybrid-KDA prefill of 8K
    tokens is already about as long on the host (~24-35 ms on the H200 host) as on the GPU (~38 ms)."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or (grad and t.requires_grad):
            return False
    return True
