"""Helpers for the FlashEVA tests (no tests here): the error metric and the causality check."""
import torch


def rel(x, ref):
    """||x - ref||_rms / ||ref||_rms in float64; NaN never passes."""
    x, ref = x.double(), ref.double()
    assert not torch.isnan(x).any(), "NaN in result"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_prefix_unchanged(fn, q, k, v, p, **kw):
    """fn(q, k, v, **kw)[:, :p] is bit-identical when every q, k, v token from position p on changes."""
    with torch.no_grad():
        o1 = fn(q, k, v, **kw)
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, p:] = torch.randn_like(x[:, p:]) * 3
        o2 = fn(q2, k2, v2, **kw)
    assert torch.equal(o1[:, :p], o2[:, :p])
