"""fastattn._launch: the cached direct relaunch of compiled Triton kernels.

CPU lane: the argument classes (what the cache keys on) and the argument order handed to a compiled kernel.
Interpreter lane: launch() takes the ordinary path and computes the kernel's result.
GPU lane: the direct relaunch against torch for every argument class (alignment, special ints, dtypes), and a
hit after the first call of each class.
"""
import os

import pytest
import torch
import triton
import triton.language as tl

import fastattn._launch as fl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available() and not INTERPRET


@triton.jit(do_not_specialize=["n"])
def axpb_kernel(x, y, a, b, n, BLOCK: tl.constexpr, SQUARE: tl.constexpr = False):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    v = tl.load(x + o, mask=m, other=0.).to(tl.float32) * a + b
    if SQUARE:
        v = v * v
    tl.store(y + o, v.to(y.dtype.element_ty), mask=m)


def run(x, a=2.0, b=1, square=None, block=64):
    y = torch.full_like(x, float("nan"))
    kw = {} if square is None else dict(SQUARE=square)
    fl.launch(axpb_kernel, (triton.cdiv(x.numel(), block),), x, y, a, b, x.numel(), BLOCK=block, num_warps=2, **kw)
    want = x.float() * a + b
    if square:
        want = want * want
    torch.testing.assert_close(y, want.to(x.dtype), atol=0, rtol=0)


def test_arg_class_separates_what_triton_specializes_on():
    x = torch.zeros(64)
    classes = [fl._arg_class(v) for v in (x, x[1:], x.half(), 1, 16, 17, 1 << 31, 1 << 63, 2.0, None, True, False)]
    assert len(set(classes)) == len(classes)
    assert fl._arg_class(x[4:]) == fl._arg_class(x)          # 16-byte aligned again
    assert fl._arg_class(16) == fl._arg_class(32) and fl._arg_class(3) == fl._arg_class(5)
    assert fl._arg_class(2.0) == fl._arg_class(3.5)


def test_ordered_arguments_follow_the_signature(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cache = fl._KernelCache(axpb_kernel)
    assert cache.n_runtime == 5
    x, y = torch.zeros(4), torch.zeros(4)
    assert cache.ordered((x, y, 2.0, 1, 4), dict(BLOCK=8, num_warps=2)) == [x, y, 2.0, 1, 4, 8, False]
    assert cache.ordered((x, y, 2.0, 1, 4), dict(SQUARE=True, BLOCK=8)) == [x, y, 2.0, 1, 4, 8, True]
    key = cache.key((x, y, 2.0, 1, 4), dict(BLOCK=8))
    assert key != cache.key((x, y, 2.0, 1, 4), dict(BLOCK=16)) and key != cache.key((x, y, 2.0, 2, 4), dict(BLOCK=8))
    assert cache.key((x, y, 2.0, 1, 4), dict(BLOCK=8, SQUARE=True)) != cache.key((x, y, 2.0, 1, 4), dict(BLOCK=8,
                                                                                                       SQUARE=1))


def test_fast_path_is_off_without_a_gpu_triton(monkeypatch):
    monkeypatch.setenv("FASTATTN_FAST_LAUNCH", "0")
    assert not fl.fast_launch_enabled()
    if INTERPRET:
        monkeypatch.delenv("FASTATTN_FAST_LAUNCH")
        assert not fl.fast_launch_enabled()


@pytest.mark.interpret
@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")
def test_launch_interpreter_path():
    run(torch.randn(100))
    run(torch.randn(37), a=-1.0, b=3, square=True, block=16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (GPU lane)")
def test_direct_relaunch_matches_torch_for_every_argument_class():
    if not fl.fast_launch_enabled():
        pytest.skip(f"direct relaunch not enabled for triton {triton.__version__} (tested: {fl.TESTED_TRITON})")
    fl._CACHES.pop(id(axpb_kernel), None)
    base = torch.randn(4096 + 3, device="cuda")
    cases = [dict(x=base[:1000]), dict(x=base[1:1001]), dict(x=base[:1000], b=16), dict(x=base[:1000], b=17),
             dict(x=base[:1024].half()), dict(x=base[:1000], square=True), dict(x=base[:1000], block=128),
             dict(x=base[1:1001], a=-0.5)]
    for case in cases + cases:      # second round: every class is a cache hit
        run(**case)
    cache = fl._CACHES[id(axpb_kernel)]
    assert len(cache.compiled) == 7   # 8 cases, the last of the second one's class (only a differs)
