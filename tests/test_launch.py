"""fastattn._launch: the cached direct relaunch of compiled Triton kernels.

CPU lane: the argument classes (what the cache keys on) and the argument order handed to a compiled kernel.
Interpreter lane: launch() takes the ordinary path and computes the kernel's result.
GPU lane: the direct relaunch against torch for every argument class (alignment, special ints, dtypes), and a
hit after the first call of each class; compile_ahead compiles all of a chunk_kda call's kernels before it runs.
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


class _RecordingKernel:
    """Stands in for a @triton.jit kernel: records warmup requests, fails if launched."""

    def __init__(self):
        self.requests = []

    def warmup(self, *args, grid, **kwargs):
        from triton.runtime._async_compile import active_mode
        self.requests.append((args, grid, kwargs, active_mode.get() is not None))

    def __getitem__(self, grid):
        raise AssertionError("launched inside compile_ahead")


@pytest.mark.skipif(not fl._has_async_compile(), reason="Triton without AsyncCompileMode")
def test_compile_ahead_turns_launches_into_async_compile_requests():
    kernel = _RecordingKernel()
    with fl.compile_ahead(workers=1):
        fl.launch(kernel, (3, 2), 1, 2.0, BLOCK=16, num_warps=2)
    assert kernel.requests == [((1, 2.0), (3, 2), dict(BLOCK=16, num_warps=2), True)]
    with pytest.raises(AssertionError, match="launched"):   # outside: an ordinary launch again
        fl.launch(kernel, (1,), 1)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (GPU lane)")
def test_first_kda_call_compiles_every_kernel_ahead(monkeypatch):
    """A configuration no other test uses: every kernel compile of its forward + backward happens in the
    compile-ahead pass (async mode), none in the real calls; a second call (no pass, cache hits) agrees."""
    if not fl.compile_ahead_available():
        pytest.skip("compile-ahead not available")
    from triton.runtime import _async_compile
    from triton.runtime.jit import JITFunction
    import fastattn
    compiles = []
    orig = JITFunction._do_compile

    def spy(self, *args, **kwargs):
        compiles.append((self.fn.__name__, _async_compile.active_mode.get() is not None))
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "_do_compile", spy)
    torch.manual_seed(0)
    B, T, H, HV, K, V = 1, 83, 1, 3, 40, 24
    q, k = (torch.randn(B, T, H, K, device="cuda") for _ in range(2))
    v = torch.randn(B, T, HV, V, device="cuda")
    g = -torch.rand(B, T, HV, K, device="cuda")
    beta = torch.rand(B, T, HV, device="cuda")
    leaves = [t.requires_grad_() for t in (q, k, v, g, beta)]

    def fwd_bwd():
        o, ht = fastattn.chunk_kda(*leaves, use_qk_l2norm_in_kernel=True, output_final_state=True, chunk_size=32)
        grads = torch.autograd.grad((o, ht), leaves, (torch.ones_like(o), torch.ones_like(ht)))
        return [o, ht, *grads]

    first = fwd_bwd()
    if not compiles:
        pytest.skip("this configuration's kernels were compiled earlier in this process")
    assert all(ahead for _, ahead in compiles), compiles
    monkeypatch.setattr(fl, "_AHEAD_OK", False)
    again = fwd_bwd()
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
