"""fastattn.distill losses against hand-computed values and float64 oracles; stability at extreme logits."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from fastattn.distill import KDLoss, alignment_loss, ce_loss, kd_ce_loss, kl_loss


def _kl_oracle(s, t, tau):
    """Per-position tau^2 * KL(softmax(t/tau) || softmax(s/tau)) in float64, from explicit probabilities."""
    ps = torch.softmax(s.double() / tau, -1)
    pt = torch.softmax(t.double() / tau, -1)
    return tau ** 2 * (pt * (pt.log() - ps.log())).sum(-1)


def _rel(x, ref):
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-30))


@given(shape=st.sampled_from([(3, 5), (2, 4, 7), (1, 1, 2)]), tau=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
       seed=st.integers(0, 2 ** 16))
def test_kl_of_identical_distributions_is_zero(shape, tau, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 5
    assert float(kl_loss(x, x.clone(), temperature=tau)) == pytest.approx(0.0, abs=1e-6)
    # Softmax is shift-invariant: a per-position offset changes nothing.
    assert float(kl_loss(x + 3.0, x, temperature=tau)) == pytest.approx(0.0, abs=1e-5)


def test_kl_known_two_token_case():
    # teacher p = (1/4, 3/4), student uniform: KL = 1/4 ln(1/2) + 3/4 ln(3/2).
    teacher = torch.tensor([[0.0, math.log(3.0)]])
    student = torch.zeros(1, 2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert float(kl_loss(student, teacher)) == pytest.approx(expected, rel=1e-6)
    # Forward direction: KL(student-as-teacher) is a different number (uniform || (1/4, 3/4)).
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(kl_loss(teacher, student)) == pytest.approx(reverse, rel=1e-6)
    assert expected != pytest.approx(reverse)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 3.0])
def test_kl_temperature_scaling(tau):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, 11, generator=g), torch.randn(4, 6, 11, generator=g)
    ref = _kl_oracle(s, t, tau).mean()
    assert _rel(kl_loss(s, t, temperature=tau), ref) <= 1e-5
    # Scaling the logits by tau and using temperature tau = tau^2 times the tau=1 loss.
    assert float(kl_loss(s * tau, t * tau, temperature=tau)) == pytest.approx(tau ** 2 * float(kl_loss(s, t)), rel=1e-5)


def test_kl_gradient_matches_closed_form():
    # d/ds [tau^2 KL(p_t || softmax(s/tau))] = tau (p_s - p_t), per position, divided by the position count.
    tau = 2.0
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 9, generator=g, requires_grad=True)
    t = torch.randn(3, 9, generator=g, requires_grad=True)
    kl_loss(s, t, temperature=tau).backward()
    expected = tau * (torch.softmax(s.detach().double() / tau, -1) - torch.softmax(t.detach().double() / tau, -1)) / 3
    assert _rel(s.grad, expected) <= 1e-5
    assert t.grad is None  # the teacher is detached


def test_masked_mean_over_positions():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    per_pos = _kl_oracle(s, t, 1.0)
    assert _rel(kl_loss(s, t, mask), per_pos[mask].mean()) <= 1e-5
    # Masked-out positions do not matter, even when they are garbage.
    s2 = s.clone()
    s2[~mask] = 1e4
    assert float(kl_loss(s2, t, mask)) == pytest.approx(float(kl_loss(s, t, mask)), rel=1e-6)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    nll = -torch.log_softmax(s.double(), -1).gather(-1, targets[..., None])[..., 0]
    assert _rel(ce_loss(s, targets, mask), nll[mask].mean()) <= 1e-5


def test_empty_mask_gives_zero_with_finite_grad():
    s = torch.randn(2, 3, 5, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = kd_ce_loss(s, torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.int64), mask, ce_weight=0.5)
    assert float(out.total.detach()) == 0.0
    out.total.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_logits_stay_finite(dtype):
    big = 6e4 if dtype == torch.float16 else 1e30
    s = torch.tensor([[big, -big, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=dtype, requires_grad=True)
    t = torch.tensor([[-big, big, float("-inf"), 0.0], [big, float("-inf"), float("-inf"), -big]], dtype=dtype)
    targets = torch.tensor([1, 0])
    for tau in (0.5, 1.0, 4.0):
        out = kd_ce_loss(s, t, targets, temperature=tau, ce_weight=0.3)
        assert out.total.dtype == torch.float32
        assert torch.isfinite(out.total) and torch.isfinite(out.kl) and torch.isfinite(out.ce)
        s.grad = None
        out.total.backward()
        assert torch.isfinite(s.grad).all()
    # A teacher with -inf logits on some tokens: those tokens (p_T = 0) contribute nothing.
    t2 = torch.tensor([[0.0, float("-inf"), 0.0]])
    s2 = torch.tensor([[0.0, 5.0, 0.0]])
    p_s = torch.softmax(s2.double(), -1)[0]
    expected = 0.5 * math.log(0.5 / float(p_s[0])) * 2
    assert float(kl_loss(s2, t2)) == pytest.approx(expected, rel=1e-6)


def test_ce_known_values():
    assert float(ce_loss(torch.zeros(3, 8), torch.tensor([0, 3, 7]))) == pytest.approx(math.log(8), rel=1e-6)
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    expected = -(2.0 - math.log(math.exp(2.0) + 1.0 + math.exp(-1.0)))
    assert float(ce_loss(logits, torch.tensor([0]))) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("ce_weight", [0.0, 0.25, 1.0])
def test_kd_ce_mix(ce_weight):
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    targets = torch.randint(0, 6, (2, 4), generator=g)
    mask = torch.rand(2, 4, generator=g) > 0.3
    out = kd_ce_loss(s, t, targets, mask, temperature=2.0, ce_weight=ce_weight)
    assert isinstance(out, KDLoss)
    kl, ce = kl_loss(s, t, mask, 2.0), ce_loss(s, targets, mask)  # CE ignores the temperature
    assert torch.allclose(out.kl, kl) and torch.allclose(out.ce, ce)
    assert float(out.total) == pytest.approx((1 - ce_weight) * float(kl) + ce_weight * float(ce), rel=1e-6)


def test_alignment_loss_hand_values():
    s = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[3.0, 3.0], [1.0, -1.0]]])
    t = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 1.0], [1.0, 1.0]]])
    # per-position mean_d (s-t)^2: [[2, 2], [2, 2]]; teacher mean square per position: [[.5, 2], [5, 1]]
    assert float(alignment_loss(s, t)) == pytest.approx(2.0)
    assert float(alignment_loss(s, t, normalize=True)) == pytest.approx(2.0 / 2.125)
    mask = torch.tensor([[True, False], [False, True]])
    assert float(alignment_loss(s, t, mask, normalize=True)) == pytest.approx(2.0 / 0.75)
    assert float(alignment_loss(torch.zeros(2, 3), torch.full((2, 3), 4.0), normalize=True)) == pytest.approx(1.0)
    sb = s.to(torch.bfloat16).requires_grad_()
    out = alignment_loss(sb, t.to(torch.bfloat16))
    assert out.dtype == torch.float32
    out.backward()
    assert torch.isfinite(sb.grad.float()).all()
    # Zero teacher with normalize: finite (eps floor), not NaN.
    assert torch.isfinite(alignment_loss(torch.ones(2, 2), torch.zeros(2, 2), normalize=True))


@pytest.mark.parametrize("call, exc, needle", [
    (lambda: kl_loss(torch.zeros(2, 3), torch.zeros(2, 4)), ValueError, "teacher_logits must have shape (2, 3)"),
    (lambda: kl_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0), ValueError, "temperature must be"),
    (lambda: kl_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2)), TypeError, "mask must have dtype"),
    (lambda: kl_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, dtype=torch.bool)), ValueError,
     "mask must have shape (2,)"),
    (lambda: kl_loss([1.0], torch.zeros(1)), TypeError, "student_logits must be a torch.Tensor"),
    (lambda: ce_loss(torch.zeros(2, 3), torch.tensor([0, 3])), ValueError, "targets must lie in [0, 3)"),
    (lambda: ce_loss(torch.zeros(2, 3), torch.tensor([0])), ValueError, "targets must have shape (2,)"),
    (lambda: ce_loss(torch.zeros(2, 3), torch.zeros(2)), TypeError, "targets must have dtype"),
    (lambda: kd_ce_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), ce_weight=1.5), ValueError,
     "ce_weight must be a number in [0, 1]"),
    (lambda: alignment_loss(torch.zeros(2, 3), torch.zeros(3, 2)), ValueError, "teacher must have shape (2, 3)"),
    (lambda: alignment_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, dtype=torch.bool)), ValueError,
     "mask must have shape (2,)"),
])
def test_bad_inputs_name_the_argument(call, exc, needle):
    with pytest.raises(exc) as info:
        call()
    assert needle in str(info.value)
