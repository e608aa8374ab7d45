"""fastattn._backend.eager_inference: when a kernel may skip its torch.library op and launch directly."""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastattn._backend import eager_inference


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
