"""fastattn._backend.eager_inference: when a kernel may skip its torch.library op and launch directly."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastattn
from fastattn._backend import eager_inference
from reference.kda import kda_inputs


def test_plain_tensors_without_grad_skip_the_op():
    x, p = torch.randn(3), torch.nn.Parameter(torch.randn(3))
    assert eager_inference(x, None, x)
    with torch.no_grad():
        assert eager_inference(x, p)          # a parameter under no_grad: no gradient can flow


def test_gradient_or_tracer_keeps_the_op():
    x, p = torch.randn(3), torch.nn.Parameter(torch.randn(3))
    assert not eager_inference(x, p)          # grad enabled and a leaf that wants it
    with FakeTensorMode():
        fake = torch.empty(3)
    assert not eager_inference(fake)          # FakeTensor (torch.compile / export tracing)
    seen = []

    @torch.compile(backend="eager", fullgraph=True)
    def f(t):
        seen.append(eager_inference(t))
        return t + 1

    with torch.no_grad():
        f(x)
    assert seen == [False]                    # dynamo traced it: the registered op must be used


@pytest.mark.interpret
@pytest.mark.parametrize("op", ["chunk_kda", "fused_recurrent_kda"])
def test_kda_direct_launch_equals_registered_op(op, monkeypatch):
    """The no-grad path (direct launch) and the autograd path (registered op) give bitwise the same outputs."""
    monkeypatch.setenv("FASTATTN_BACKEND", "triton")
    kw = kda_inputs(1, 37, 2, 4, 16, 8, gate="softplus", initial_state=True, seqlens=[20, 17])
    fn = getattr(fastattn, op)
    with torch.no_grad():
        o_direct, s_direct = fn(**kw, output_final_state=True)
    kw["q"] = kw["q"].clone().requires_grad_(True)
    o_op, s_op = fn(**kw, output_final_state=True)
    assert torch.equal(o_direct, o_op.detach()) and torch.equal(s_direct, s_op.detach())


@pytest.mark.interpret
def test_eva_direct_launch_equals_registered_op(monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "triton")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 70, 4, 16, generator=gen)
    k, v = (torch.randn(1, 70, 2, 16, generator=gen) for _ in range(2))
    mu, phi = (0.3 * torch.randn(2, 16, generator=gen) for _ in range(2))
    kw = dict(window_size=32, chunk_size=8, mu=mu, phi=phi)
    with torch.no_grad():
        o_direct = fastattn.flash_eva(q, k, v, **kw)
        lm_direct = fastattn.eva_landmarks(k, v, chunk_size=8, mu=mu, phi=phi)
    o_op = fastattn.flash_eva(q.clone().requires_grad_(True), k, v, **kw)
    lm_op = fastattn.eva_landmarks(k.clone().requires_grad_(True), v, chunk_size=8, mu=mu, phi=phi)
    assert torch.equal(o_direct, o_op.detach())
    assert all(torch.equal(a, b.detach()) for a, b in zip(lm_direct, lm_op))
