"""Decoding cache for FlashEVA: the raw keys/values of the current local window plus every landmark.

Memory per layer is O(W + T / C): a window buffer of W + C slots and the landmark list (grown by
doubling). A prefill fills it from a prompt; each decode step appends one token, pools the chunk it
completes, and attends over [landmarks ; window] with the split Triton decode kernel (or PyTorch on CPU).
"""
from typing import Optional

import torch
import triton

from .._backend import select_backend
from .._checks import check_shape, check_tensor
from .._launch import launch
from .api import _check_kv, _check_options, _check_param, eva_landmarks, flash_eva
from ._common import LOG2E
from .launch import dot_precision, head_dim_block

MAX_SPLITS = 64
SPLIT_KEYS = 256  # target keys per split program


class EvaCache:
    """Per-layer decoding state of :func:`fastattn.flash_eva` (all sequences of the batch advance together).

    Args:
        window_size, chunk_size, local: as in :func:`fastattn.flash_eva` (fixed for the cache's life).

    Use :meth:`prefill` once with the prompt, then :meth:`decode` for each new token; the outputs
    equal those of one ``flash_eva`` call over the whole sequence. mu, phi and softmax_scale must be
    the same on every call.

    Example:
        >>> import torch, fastattn
        >>> q, k, v = torch.randn(1, 40, 4, 16), torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
        >>> cache = fastattn.EvaCache(window_size=16, chunk_size=4)
        >>> o = cache.prefill(q[:, :39], k[:, :39], v[:, :39])
        >>> o_last = cache.decode(q[:, 39:], k[:, 39:], v[:, 39:])
        >>> torch.allclose(o_last, fastattn.flash_eva(q, k, v, window_size=16, chunk_size=4)[:, 39:], atol=1e-5)
        True
    """

    def __init__(self, window_size: int = 2048, chunk_size: int = 16, local: str = "block"):
        _check_options(1, window_size, chunk_size, 1.0, local)
        self.window_size, self.chunk_size, self.local = window_size, chunk_size, local
        self.reset()

    def reset(self) -> None:
        """Forget everything (the next call must be :meth:`prefill`)."""
        self.seq_len = 0
        self.win_start = 0
        self.n_lm = 0
        self.k_win = self.v_win = self.k_lm = self.v_lm = None

    # -- bounds ---------------------------------------------------------------------------------
    def _lo(self, t: int) -> int:
        W, C = self.window_size, self.chunk_size
        return C * (max(t - W + 1, 0) // C) if self.local == "sliding" else (t // W) * W

    def memory_rows(self) -> int:
        """Rows held per (batch, kv head): window slots + landmark capacity."""
        return 0 if self.k_win is None else self.k_win.shape[1] + self.k_lm.shape[1]

    # -- public steps ---------------------------------------------------------------------------
    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mu: Optional[torch.Tensor] = None,
                phi: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None) -> torch.Tensor:
        """Run ``flash_eva`` over a prompt (q ``[B, T, H, D]``, k, v ``[B, T, Hkv, D]``), keep its window
        and landmarks, and return o ``[B, T, H, D]``."""
        if self.seq_len != 0:
            raise ValueError(f"prefill needs an empty cache (call reset()), but it holds {self.seq_len} tokens")
        o = flash_eva(q, k, v, window_size=self.window_size, chunk_size=self.chunk_size, mu=mu, phi=phi,
                      softmax_scale=softmax_scale, local=self.local)
        B, T, HKV, D = k.shape
        with torch.no_grad():
            k_lm, v_lm = eva_landmarks(k, v, chunk_size=self.chunk_size, mu=mu, phi=phi, softmax_scale=softmax_scale)
            self._allocate(k, max(16, 2 * k_lm.shape[1]))
            self.k_lm[:, :k_lm.shape[1]] = k_lm
            self.v_lm[:, :v_lm.shape[1]] = v_lm
            self.n_lm = k_lm.shape[1]
            lo = self._lo(T)
            self.k_win[:, :T - lo] = k[:, lo:]
            self.v_win[:, :T - lo] = v[:, lo:]
        self.win_start, self.seq_len = lo, T
        return o

    @torch.no_grad()
    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mu: Optional[torch.Tensor] = None,
               phi: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None) -> torch.Tensor:
        """Append new tokens (q ``[B, n, H, D]``, k, v ``[B, n, Hkv, D]``, processed one at a time) and
        return their outputs ``[B, n, H, D]``. Not differentiable."""
        if self.k_win is None:
            raise ValueError("decode needs a prefilled cache: call prefill() with the prompt first")
        check_tensor("q", q, ndim=4, device=self.k_win.device)
        _check_kv(k, v, self.k_win.device)
        B, n, H, D = q.shape
        HKV = self.k_win.shape[2]
        check_shape("k", k, (B, n, HKV, D), "[B, n, Hkv, D] matching the cache")
        if B != self.k_win.shape[0] or D != self.k_win.shape[3] or H % HKV != 0:
            raise ValueError(f"q must have shape [B={self.k_win.shape[0]}, n, H (multiple of {HKV}), "
                             f"D={self.k_win.shape[3]}], got {tuple(q.shape)}")
        if q.dtype != self.k_win.dtype or k.dtype != self.k_win.dtype:
            raise TypeError(f"q, k, v must have the cache's dtype {self.k_win.dtype}, got {q.dtype}, {k.dtype}")
        scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
        mu = _check_param("mu", mu, HKV, D, q.device)
        phi = _check_param("phi", phi, HKV, D, q.device)
        outs = [self._step(q[:, i], k[:, i:i + 1], v[:, i:i + 1], mu, phi, scale) for i in range(n)]
        return outs[0].unsqueeze(1) if n == 1 else torch.stack(outs, dim=1)

    # -- internals ------------------------------------------------------------------------------
    def _allocate(self, k: torch.Tensor, lm_cap: int) -> None:
        B, _, HKV, D = k.shape
        self.k_win = torch.zeros(B, self.window_size + self.chunk_size, HKV, D, device=k.device, dtype=k.dtype)
        self.v_win = torch.zeros_like(self.k_win)
        self.k_lm = torch.zeros(B, lm_cap, HKV, D, device=k.device, dtype=k.dtype)
        self.v_lm = torch.zeros_like(self.k_lm)

    def _grow_landmarks(self) -> None:
        self.k_lm = torch.cat([self.k_lm, torch.zeros_like(self.k_lm)], dim=1)
        self.v_lm = torch.cat([self.v_lm, torch.zeros_like(self.v_lm)], dim=1)

    def _step(self, q, k, v, mu, phi, scale):
        """One token at position t = seq_len: q [B, H, D], k, v [B, 1, Hkv, D] -> o [B, H, D]."""
        t, C = self.seq_len, self.chunk_size
        lo = self._lo(t)
        if lo > self.win_start:  # drop keys that left the window (they are already landmarks)
            shift, keep = lo - self.win_start, t - lo
            self.k_win[:, :keep] = self.k_win[:, shift:shift + keep].clone()
            self.v_win[:, :keep] = self.v_win[:, shift:shift + keep].clone()
            self.win_start = lo
        self.k_win[:, t - lo] = k[:, 0]
        self.v_win[:, t - lo] = v[:, 0]
        if (t + 1) % C == 0:  # token t completes chunk t // C
            a = t + 1 - C - lo
            k_lm, v_lm = eva_landmarks(self.k_win[:, a:a + C], self.v_win[:, a:a + C], chunk_size=C, mu=mu, phi=phi,
                                       softmax_scale=scale)
            if self.n_lm == self.k_lm.shape[1]:
                self._grow_landmarks()
            self.k_lm[:, self.n_lm] = k_lm[:, 0]
            self.v_lm[:, self.n_lm] = v_lm[:, 0]
            self.n_lm += 1
        n_rem, n_loc = lo // C, t - lo + 1
        self.seq_len = t + 1
        if select_backend(q) == "torch":
            from .torch_impl import decode_attend_torch
            return decode_attend_torch(q, self.k_win[:, :n_loc], self.v_win[:, :n_loc], self.k_lm[:, :n_rem],
                                       self.v_lm[:, :n_rem], scale)
        return _decode_triton(q.contiguous(), self.k_win, self.v_win, self.k_lm, self.v_lm, n_rem, n_loc, scale)


def _decode_triton(q, k_win, v_win, k_lm, v_lm, n_rem: int, n_loc: int, scale: float) -> torch.Tensor:
    """Split decode attention of q [B, H, D] over landmarks [0, n_rem) and window slots [0, n_loc)."""
    from .decode import eva_decode_kernel
    from .decode_combine import eva_decode_combine_kernel
    B, H, D = q.shape
    HKV = k_win.shape[2]
    total = n_rem + n_loc
    n_split = max(1, min(MAX_SPLITS, triton.cdiv(total, SPLIT_KEYS)))
    split = triton.cdiv(total, n_split)
    part_o = torch.empty(B, H, MAX_SPLITS, D, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(B, H, MAX_SPLITS, device=q.device, dtype=torch.float32)
    BD = head_dim_block(D)
    launch(eva_decode_kernel, (n_split, HKV, B),
        q, k_lm, v_lm, k_win, v_win, part_o, part_lse, scale * LOG2E, n_rem, n_loc, split,
        k_lm.shape[1], k_win.shape[1], H=H, HKV=HKV, D=D, BG=max(16, triton.next_power_of_2(H // HKV)),
        BN=64 if BD <= 128 else 32, BD=BD, NS=MAX_SPLITS, PREC=dot_precision(q.dtype), num_warps=4)
    o = torch.empty_like(q)
    launch(eva_decode_combine_kernel, (B * H,), part_o, part_lse, o, n_split, D=D, BD=BD, NS=MAX_SPLITS, num_warps=4)
    return o
