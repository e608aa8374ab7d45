"""Quickstart: run fastattn.chunk_kda (the model-path flags on), check it and its gradients against the
float64 oracle, and decode a few tokens with fused_recurrent_kda carrying the state.

Runs on a CPU (PyTorch backend) or a GPU (Triton kernels): ``python examples/quickstart.py``.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastattn  # noqa: E402
from reference.kda import naive_recurrent_kda  # noqa: E402


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    B, T, H, HV, K, V = 1, 160, 2, 4, 64, 64
    torch.manual_seed(0)
    leaves = dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, HV, V),
                  g=torch.randn(B, T, HV, K), beta=torch.randn(B, T, HV), A_log=torch.randn(HV) * 0.5,
                  dt_bias=torch.randn(HV * K) * 0.5, initial_state=torch.randn(B, HV, K, V) * 0.1)
    x = {n: (t.to(dtype) if n in ("q", "k", "v", "beta") else t).to(dev).requires_grad_() for n, t in leaves.items()}
    flags = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                 output_final_state=True)
    args = [x[n] for n in ("q", "k", "v", "g", "beta")]
    extra = dict(A_log=x["A_log"], dt_bias=x["dt_bias"], initial_state=x["initial_state"])

    t0 = time.time()
    o, state = fastattn.chunk_kda(*args, **extra, **flags)
    ro, rstate = naive_recurrent_kda(*args, **extra, **flags)
    do, ds = torch.randn_like(o), torch.randn_like(state)
    grads = torch.autograd.grad((o * do).sum() + (state * ds).sum(), list(x.values()))
    rgrads = torch.autograd.grad((ro * do.double()).sum() + (rstate * ds.double()).sum(), list(x.values()))
    print(f"device={dev} dtype={dtype} B={B} T={T} H={H} HV={HV} K={K} V={V} ({time.time() - t0:.1f}s)")
    errors = {"o": rel(o, ro), "final_state": rel(state, rstate)}
    errors.update({"d" + n: rel(a, b) for n, a, b in zip(x, grads, rgrads)})
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    for name, err in errors.items():
        print(f"  {name:16s} rel error vs float64 oracle: {err:.2e}")
    worst = max(errors.values())

    with torch.no_grad():  # decode 4 more tokens from the prefill state
        step_state = state
        for _ in range(4):
            step = [torch.randn(B, 1, *a.shape[2:], device=dev).to(a.dtype) for a in args]
            _, step_state = fastattn.fused_recurrent_kda(*step, A_log=x["A_log"], dt_bias=x["dt_bias"],
                                                         initial_state=step_state, **flags)
    print(f"decoded 4 tokens; state norm {step_state.norm().item():.3f}")
    if not worst <= 2 * tol:
        raise SystemExit(f"FAILED: worst error {worst:.2e} > {2 * tol:.0e}")
    print(f"OK: worst error {worst:.2e}")


if __name__ == "__main__":
    main()
