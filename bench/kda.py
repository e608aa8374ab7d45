"""KDA kernel timings: fastattn.chunk_kda against fla-core's chunk_kda, same run, same card.

    python bench/kda.py [--quick] [--out bench/out]

Cases (bf16, H = HV = 16, K = V = 128): (B, T) = (8, 4096), (2, 16384), (1, 65536), varlen
[1300, 547, 2048, 963, 271, 3063] and 8 x 1024; mode A (pre-computed log-decay, unit-norm q/k, beta given)
and mode B (l2norm, softplus gate with A_log/dt_bias and beta sigmoid in the kernel). Every shape is
warmed up first; outputs are checked against fla (and fla's absence is said) before any time is
reported; times are do_bench medians in ms; peak memory of forward+backward in GiB. Writes JSON and CSV.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastattn  # noqa: E402

SHAPES = [("B8-T4096", [4096] * 8, False), ("B2-T16384", [16384] * 2, False), ("B1-T65536", [65536], False),
          ("varlen-6", [1300, 547, 2048, 963, 271, 3063], True), ("varlen-8x1024", [1024] * 8, True)]
H, K = 16, 128
MAX_REL_VS_FLA = 2e-2  # both bf16: each is ~2-5e-3 from the float64 oracle


def load_fla():
    os.environ.setdefault("FLA_FLASH_KDA", "0")  # never let fla dispatch to another backend
    try:
        from fla.ops.kda import chunk_kda
        return chunk_kda
    except Exception as e:  # noqa: BLE001 - report whatever stops the import
        print(f"fla-core is not installed or failed to import ({type(e).__name__}: {e}); timing fastattn alone")
        return None


def make_inputs(lens, varlen, mode, seed=0):
    torch.manual_seed(seed)
    B, T = (1, sum(lens)) if varlen else (len(lens), lens[0])
    dev = "cuda"
    q, k = torch.randn(B, T, H, K, device=dev), torch.randn(B, T, H, K, device=dev)
    v = torch.randn(B, T, H, K, device=dev)
    kw = {}
    if mode == "A":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g = F.logsigmoid(torch.randn(B, T, H, K, device=dev)) / 16
        beta = torch.rand(B, T, H, device=dev)
    else:
        g = torch.randn(B, T, H, K, device=dev)
        beta = torch.randn(B, T, H, device=dev)
        kw = dict(A_log=torch.log(torch.empty(H, device=dev).uniform_(1, 16)).requires_grad_(),
                  dt_bias=torch.zeros(H * K, device=dev).requires_grad_(), use_qk_l2norm_in_kernel=True,
                  use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)
    if varlen:
        kw["cu_seqlens"] = torch.tensor([0] + lens, device=dev).cumsum(0)
    leaves = [q.bfloat16(), k.bfloat16(), v.bfloat16(), g.float(), beta.bfloat16()]
    return [t.requires_grad_() for t in leaves], kw


def rel(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def time_case(fn, args, kw, do):
    from triton.testing import do_bench
    params = [t for t in list(args) + [kw.get("A_log"), kw.get("dt_bias")] if t is not None]

    def fwd():
        return fn(*args, **kw)[0]

    def fwdbwd():
        return torch.autograd.grad(fn(*args, **kw)[0], params, do)

    fwd(), fwdbwd()  # warm-up: compile and autotune before timing
    torch.cuda.synchronize()
    t_f = do_bench(fwd, warmup=25, rep=100, return_mode="median")
    t_fb = do_bench(fwdbwd, warmup=25, rep=100, return_mode="median")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwdbwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    return t_f, t_fb, peak


def first_call_seconds():
    """Compile time of a new shape in a fresh process with an empty Triton cache (mode B, fwd + bwd)."""
    code = ("import time,torch,sys;sys.path.insert(0,'.');import bench.kda as b;import fastattn;"
            "a,kw=b.make_inputs([4096]*8,False,'B');t=time.time();o=fastattn.chunk_kda(*a,**kw)[0];"
            "torch.cuda.synchronize();t1=time.time()-t;o.sum().backward();torch.cuda.synchronize();"
            "print(t1, time.time()-t)")
    env = dict(os.environ, TRITON_CACHE_DIR=f"/tmp/fastattn-cold-{os.getpid()}-{time.time()}")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if out.returncode != 0:
        return None, out.stderr[-500:]
    f, fb = map(float, out.stdout.split()[-2:])
    return (f, fb), None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only B8-T4096")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    p.add_argument("--no-first-call", action="store_true")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kda.py needs a CUDA GPU")
    import triton
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    fla = load_fla()
    rows = []
    for name, lens, varlen in SHAPES[:1] if a.quick else SHAPES:
        for mode in ("A", "B"):
            args, kw = make_inputs(lens, varlen, mode)
            do = torch.randn_like(args[2])
            row = dict(shape=name, mode=mode)
            o = fastattn.chunk_kda(*args, **kw)[0]
            ok = bool(torch.isfinite(o).all())
            if fla is not None:
                try:
                    o_ref = fla(*args, **kw)[0]
                    row["rel_vs_fla"] = rel(o, o_ref)
                    ok = ok and row["rel_vs_fla"] <= MAX_REL_VS_FLA
                    row["fla_fwd"], row["fla_fwdbwd"], row["fla_peak_gib"] = time_case(fla, args, kw, do)
                except TypeError as e:
                    row["fla_error"] = str(e)[:120]
            if ok:
                row["fwd"], row["fwdbwd"], row["peak_gib"] = time_case(fastattn.chunk_kda, args, kw, do)
                if "fla_fwd" in row:
                    row["speedup_fwd"] = row["fla_fwd"] / row["fwd"]
                    row["speedup_fwdbwd"] = row["fla_fwdbwd"] / row["fwdbwd"]
            else:
                row["error"] = "output check failed: no time reported"
            rows.append(row)
            print(json.dumps(row), flush=True)
            del args, kw, do, o
            torch.cuda.empty_cache()
    first = None if a.no_first_call else first_call_seconds()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "kda.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       rows=rows, first_call=first), f, indent=1)
    cols = ["shape", "mode", "fwd", "fla_fwd", "speedup_fwd", "fwdbwd", "fla_fwdbwd", "speedup_fwdbwd",
            "peak_gib", "fla_peak_gib", "rel_vs_fla"]
    with open(os.path.join(a.out, "kda.csv"), "w") as f:
        f.write(",".join(cols) + "\n")
        for r in rows:
            f.write(",".join(str(r.get(c, "")) for c in cols) + "\n")
    print("\n| shape | mode | fwd ms | fla fwd | x | fwd+bwd ms | fla | x | peak GiB | fla | rel vs fla |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v if v is not None else "-")  # noqa: E731
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    if first:
        print(f"first call (fresh process, empty Triton cache, mode B, B8-T4096): {first}")


if __name__ == "__main__":
    main()
