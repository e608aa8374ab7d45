"""Distillation losses, computed in fp32 with log_softmax (stable at extreme logits).

* :func:`alignment_loss` (stage 1): mean squared error between a student mixer's output and the teacher
  layer's, optionally divided by the teacher output's mean square (scale-free across layers).
* :func:`kl_loss` (stages 2-3): forward KL(p_teacher || p_student) of next-token distributions at
  temperature ``tau``, times ``tau**2``, masked mean over positions.
* :func:`ce_loss`: masked mean cross-entropy on targets; :func:`kd_ce_loss` mixes the two.

Masks are bool over positions (``logits.shape[:-1]``); a mask with no True entry gives a zero loss that
still carries a (zero) gradient. The teacher tensors are always detached.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .._checks import check_tensor


def _check_mask(mask: Optional[torch.Tensor], shape, what: str) -> None:
    if mask is None:
        return
    check_tensor("mask", mask, dtypes=(torch.bool,))
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have shape {tuple(shape)} ({what}), got {tuple(mask.shape)}")


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean()
    w = mask.to(values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1.0)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    return float(temperature)


def alignment_loss(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor] = None,
                   normalize: bool = False, eps: float = 1e-8) -> torch.Tensor:
    """Per-layer alignment loss: mean over positions of ``mean_d (s - t)^2``.

    Args:
        student: ``[..., d]`` student mixer output.
        teacher: ``[..., d]`` teacher mixer output (same shape; detached).
        mask: optional bool ``[...]`` over positions (e.g. non-pad tokens); masked mean over them.
        normalize: divide by the teacher's mean square over the same positions (``+ eps``), so the loss is
            a relative error (1.0 = as far as predicting zeros) comparable across layers.
        eps: floor for the normaliser.
    Returns:
        fp32 scalar.

    Example:
        >>> t = torch.ones(2, 3, 4)
        >>> float(alignment_loss(torch.zeros(2, 3, 4), t, normalize=True))
        1.0
    """
    check_tensor("student", student)
    check_tensor("teacher", teacher)
    if student.shape != teacher.shape:
        raise ValueError(f"teacher must have shape {tuple(student.shape)} (like student), got {tuple(teacher.shape)}")
    if student.dim() < 1:
        raise ValueError("student must have at least 1 dimension (features last), got a scalar")
    _check_mask(mask, student.shape[:-1], "student.shape[:-1]")
    s = student.float()
    t = teacher.detach().float()
    loss = _masked_mean((s - t).pow(2).mean(-1), mask)
    if normalize:
        loss = loss / (_masked_mean(t.pow(2).mean(-1), mask) + eps)
    return loss


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    check_tensor("student_logits", student_logits)
    check_tensor("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits must have shape {tuple(student_logits.shape)} (like student_logits), "
                         f"got {tuple(teacher_logits.shape)}")
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError(f"student_logits must be [..., V] with V >= 1, got shape {tuple(student_logits.shape)}")


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
            temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(teacher || student) of next-token distributions, ``tau**2``-scaled, masked mean.

    ``KL_t = sum_v p_T(v) (log p_T(v) - log p_S(v))`` with ``p = softmax(logits / tau)``; the result is
    ``tau**2 * sum_t m_t KL_t / max(1, sum_t m_t)``. Teacher entries with ``p_T = 0`` (e.g. ``-inf``
    logits) contribute 0.

    Args:
        student_logits: ``[..., V]`` student logits (gradients flow here).
        teacher_logits: ``[..., V]`` teacher logits (detached).
        mask: optional bool ``[...]`` over positions (e.g. the loss mask of ``next_token_targets``).
        temperature: ``tau > 0`` (default 1).
    Returns:
        fp32 scalar.

    Example:
        >>> x = torch.randn(2, 5, 7)
        >>> float(kl_loss(x, x))
        0.0
    """
    _check_logits(student_logits, teacher_logits)
    _check_mask(mask, student_logits.shape[:-1], "student_logits.shape[:-1]")
    tau = _check_temperature(temperature)
    log_s = torch.log_softmax(student_logits.float() / tau, dim=-1)
    log_t = torch.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
    p_t = log_t.exp()
    per_vocab = torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros_like(p_t))
    return _masked_mean(per_vocab.sum(-1), mask) * (tau * tau)


def ce_loss(logits: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Masked mean cross-entropy ``-log softmax(logits)[target]`` in fp32.

    Args:
        logits: ``[..., V]``.
        targets: int ``[...]`` in ``[0, V)`` (positions with mask False may hold any value in range).
        mask: optional bool ``[...]``.
    Returns:
        fp32 scalar.

    Example:
        >>> float(ce_loss(torch.zeros(1, 4), torch.tensor([2]))) == float(torch.log(torch.tensor(4.0)))
        True
    """
    check_tensor("logits", logits)
    check_tensor("targets", targets, dtypes=(torch.int64, torch.int32))
    if logits.dim() < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), "
                         f"got {tuple(targets.shape)}")
    _check_mask(mask, logits.shape[:-1], "logits.shape[:-1]")
    V = logits.shape[-1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= V):
        raise ValueError(f"targets must lie in [0, {V}), got range [{int(targets.min())}, {int(targets.max())}]")
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return _masked_mean(nll, mask)


class KDLoss(NamedTuple):
    """``total = (1 - ce_weight) * kl + ce_weight * ce``; ``kl`` and ``ce`` are kept for logging."""
    total: torch.Tensor
    kl: torch.Tensor
    ce: torch.Tensor


def kd_ce_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
               mask: Optional[torch.Tensor] = None, temperature: float = 1.0, ce_weight: float = 0.0) -> KDLoss:
    """Mix of distillation and cross-entropy: ``(1 - ce_weight) * kl_loss + ce_weight * ce_loss``.

    ``ce_weight = 0`` is pure KD (GenDistill's choice), ``1`` is plain SFT; the CE term ignores the
    temperature. Shapes as in :func:`kl_loss` and :func:`ce_loss`.

    Returns:
        :class:`KDLoss` ``(total, kl, ce)``, fp32 scalars.

    Example:
        >>> x = torch.randn(3, 5)
        >>> out = kd_ce_loss(x, x, torch.tensor([0, 1, 2]), ce_weight=0.5)
        >>> torch.allclose(out.total, 0.5 * out.ce)
        True
    """
    if isinstance(ce_weight, bool) or not isinstance(ce_weight, (int, float)) or not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must be a number in [0, 1], got {ce_weight!r}")
    kl = kl_loss(student_logits, teacher_logits, mask, temperature)
    ce = ce_loss(student_logits, targets, mask)
    return KDLoss(total=(1.0 - ce_weight) * kl + ce_weight * ce, kl=kl, ce=ce)
