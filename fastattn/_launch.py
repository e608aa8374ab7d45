"""Low-overhead launches of Triton kernels.

``kernel[grid](*args, **kw)`` re-binds every argument, rebuilds the specialization list and its string key, and
checks the kernel's globals on each call: ~40-60 us of host time for a kernel with 20-30 arguments on the H200
host (triton 3.6), about three times the launch itself. A short prefill is launch-bound (a Hybrid-KDA prefill of
8K tokens needs about as long on the host as on the GPU), so :func:`launch` keeps, per kernel, the compiled
kernel of each *argument class* and relaunches it directly. The class is a superset of what Triton specializes
on (tensor dtype and 16-byte alignment, ints equal to 1, divisible by 16 or beyond int32, None, constexpr and
option values, current device), so a kernel compiled for one class is valid for every call of that class. A
miss goes through ``kernel[grid]`` (compiling if needed) and stores what it returns.

The direct path is used only with a Triton whose relaunch interface was verified on a GPU (see
``TESTED_TRITON``); elsewhere, under the interpreter, or with ``FASTATTN_FAST_LAUNCH=0`` every call takes the
ordinary path.

:func:`compile_ahead` turns :func:`launch` into a compile request: inside it, an op's launcher code runs without
launching anything and every kernel it would launch compiles in a thread pool (Triton's AsyncCompileMode), so the
first call of a new shape pays for its slowest kernel's compile instead of the sum of them all.
"""
import contextlib
import contextvars
import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Tuple

import torch
import triton
import triton.language as tl

from ._backend import interpreting

# (major, minor) releases whose CompiledKernel relaunch (``compiled[grid](*all_args)``, the arguments in signature
# order with constexprs and defaults, as JITFunction.run passes them) was checked against kernel[grid] on a GPU
TESTED_TRITON = ((3, 6),)


def _version() -> Tuple[int, int]:
    try:
        major, minor = triton.__version__.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


def fast_launch_enabled() -> bool:
    """True when :func:`launch` relaunches compiled kernels directly (see the module docstring)."""
    if os.environ.get("FASTATTN_FAST_LAUNCH", "1") == "0" or interpreting():
        return False
    return _version() in TESTED_TRITON and hasattr(triton.compiler.CompiledKernel, "__getitem__")


_INT32, _INT64 = 1 << 31, 1 << 63


def _arg_class(x: Any):
    """What Triton may specialize a non-constexpr argument on (a superset of it): i32 / i64 / u64 by range."""
    if isinstance(x, torch.Tensor):
        return x.dtype, x.data_ptr() & 15 == 0
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return type(x), x
    if isinstance(x, int):
        return "i", x == 1, x & 15 == 0, -_INT32 <= x < _INT32, x >= _INT64
    if isinstance(x, float):
        return "f"
    return type(x), x


class _KernelCache:
    """Per kernel: the argument order of its signature and the compiled kernel of each argument class."""

    def __init__(self, kernel):
        self.kernel = kernel
        params = inspect.signature(kernel.fn).parameters
        self.names = list(params)
        self.defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
        # parameters from this index on are constexprs (launch() passes them by keyword)
        flags = [kp.is_constexpr for kp in kernel.params] if hasattr(kernel, "params") else \
            [p.annotation is tl.constexpr for p in params.values()]
        self.n_runtime = next((i for i, c in enumerate(flags) if c), len(flags))
        self.compiled: Dict[tuple, Any] = {}

    def key(self, args, kwargs) -> tuple:
        """Device, runtime-argument classes, then constexprs and options by value and type (True == 1 == 1.0
        in Python, but Triton compiles them apart)."""
        return (torch.cuda.current_device(), tuple(map(_arg_class, args)), tuple(kwargs.items()),
                tuple(map(type, kwargs.values())))

    def ordered(self, args, kwargs) -> list:
        """Every signature argument in order, as JITFunction.run hands them to the compiled kernel."""
        n = len(args)
        return [*args, *(kwargs[k] if k in kwargs else self.defaults[k] for k in self.names[n:])]


_CACHES: Dict[int, _KernelCache] = {}


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` with a cached direct relaunch when :func:`fast_launch_enabled`.

    Args:
        kernel: a ``@triton.jit`` function.
        grid: a tuple of 1-3 ints (a callable grid is not supported here).
        args, kwargs: the kernel's arguments; runtime arguments by position, constexprs and launch options
            (num_warps, ...) by keyword (they enter the key by value and type). A constexpr passed by position
            takes the ordinary path.
    """
    if _AHEAD.get():
        kernel.warmup(*args, grid=grid, **kwargs)      # a compile request (see compile_ahead), nothing runs
        return
    if not _ENABLED or torch.compiler.is_compiling():   # a tracer captures kernel[grid] itself
        kernel[grid](*args, **kwargs)
        return
    cache = _CACHES.get(id(kernel))
    if cache is None or cache.kernel is not kernel:
        cache = _CACHES[id(kernel)] = _KernelCache(kernel)
    if len(args) > cache.n_runtime:      # a constexpr passed by position: not keyed here
        kernel[grid](*args, **kwargs)
        return
    key = cache.key(args, kwargs)
    compiled = cache.compiled.get(key)
    if compiled is None:
        compiled = kernel[grid](*args, **kwargs)
        cache.compiled[key] = compiled.result() if hasattr(compiled, "result") else compiled
        return
    compiled[tuple(grid) + (1,) * (3 - len(grid))](*cache.ordered(args, kwargs))


_ENABLED = fast_launch_enabled()


_AHEAD = contextvars.ContextVar("fastattn_compile_ahead", default=False)


def _has_async_compile() -> bool:
    try:
        from triton.runtime._async_compile import AsyncCompileMode  # noqa: F401
    except ImportError:
        return False
    return True


_AHEAD_OK = os.environ.get("FASTATTN_COMPILE_AHEAD", "1") != "0" and not interpreting() and _has_async_compile()


def compile_ahead_available() -> bool:
    """True when :func:`compile_ahead` can compile in parallel: a Triton with AsyncCompileMode (3.4 on), not the
    interpreter, ``FASTATTN_COMPILE_AHEAD`` not 0 (read at import), and no tracer running."""
    return _AHEAD_OK and not torch.compiler.is_compiling()


@contextlib.contextmanager
def compile_ahead(workers: int = 0):
    """Inside: :func:`launch` compiles the kernel it is given (``kernel.warmup``) in a pool of `workers` threads
    (0: min(8, CPUs)) instead of launching it; on exit, waits for every compile and files the kernels in Triton's
    cache, where the real launches find them. Tensors the launcher code allocates inside are left unwritten.

    Example (GPU; the op's launcher runs twice, once to compile, once to compute)::

        with compile_ahead():
            chunk_kda_fwd(q, k, v, g, beta, None, None, None, None, opts)
        o, ht, _ = chunk_kda_fwd(q, k, v, g, beta, None, None, None, None, opts)
    """
    from triton.runtime._async_compile import AsyncCompileMode
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool):
        token = _AHEAD.set(True)
        try:
            yield
        finally:
            _AHEAD.reset(token)
