"""KDA cases of ``bench/kernels.py --op kda``: fastattn.chunk_kda against fla-core's chunk_kda.

Cases (bf16, H = HV = 16, K = V = 128): (B, T) = (8, 4096), (2, 16384), (1, 65536), varlen
[1300, 547, 2048, 963, 271, 3063] and 8 x 1024; mode A (pre-computed log-decay, unit-norm q/k, beta given)
and mode B (l2norm, softplus gate with A_log/dt_bias and beta sigmoid in the kernel). Every shape is
warmed up first; outputs are checked against fla (and fla's absence is said) before any time is
reported; times are do_bench medians in ms; peak memory of forward+backward in GiB; the first call of a
new shape is timed in a fresh process with an empty Triton cache. Rows go to ``<out>/kda.jsonl``, a
plot to ``<out>/kda.png`` when matplotlib is installed; a table is printed last.
"""
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastattn  # noqa: E402
from _common import Results, device_line, rel_err, table  # noqa: E402

SHAPES = [("B8-T4096", [4096] * 8, False), ("B2-T16384", [16384] * 2, False), ("B1-T65536", [65536], False),
          ("varlen-6", [1300, 547, 2048, 963, 271, 3063], True), ("varlen-8x1024", [1024] * 8, True)]
H, K = 16, 128
MAX_REL_VS_FLA = 2e-2  # both bf16: each is ~2-5e-3 from the float64 oracle


def use_autotune_cache(path):
    """Keep Triton's autotune results (fla's chosen configs with their timings) under `path` and reuse them: a
    later process, or a later device call that carries the folder, skips fla's autotune (~2.5 min per shape on an
    H200). The configs were still picked by timing on the card model they run on, so fla's times stay its tuned
    ones. Must run before fla is imported (its autotuners read the setting when they are built). Returns the
    number of cached results found."""
    os.makedirs(path, exist_ok=True)
    os.environ["TRITON_CACHE_AUTOTUNING"] = "1"
    os.environ["TRITON_CACHE_DIR"] = os.path.abspath(path)
    return sum(f.endswith(".autotune.json") for _, _, files in os.walk(path) for f in files)


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
    code = ("import time,torch,sys;sys.path[:0]=['.','bench'];import kda as b;import fastattn;"
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


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return
    labels = [f"{r['shape']}\n{r['mode']}" for r in rows if "speedup_fwd" in r]
    if not labels:
        return
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 4))
    ax.bar([i - 0.2 for i in x], [r["speedup_fwd"] for r in rows if "speedup_fwd" in r], 0.4, label="fwd")
    ax.bar([i + 0.2 for i in x], [r["speedup_fwdbwd"] for r in rows if "speedup_fwd" in r], 0.4, label="fwd+bwd")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("speed-up over fla-core (x)")
    ax.set_title(device_line(), fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def run_kda(args):
    """Entry of ``bench/kernels.py --op kda``."""
    res = Results(args.out, "kda")
    print(device_line(), flush=True)
    if args.autotune_cache:
        print(f"autotune cache {args.autotune_cache}: {use_autotune_cache(args.autotune_cache)} results found")
    fla = load_fla() if args.baseline == "fla" else None
    wanted = [c for c in args.case.split(",") if c]
    shapes = SHAPES[:1] if args.quick else SHAPES
    if wanted:
        shapes = [s for s in shapes if any(w in s[0] for w in wanted)]
    for name, lens, varlen in shapes:
        for mode in ("A", "B"):
            inputs, kw = make_inputs(lens, varlen, mode)
            do = torch.randn_like(inputs[2])
            row = dict(shape=name, mode=mode)
            o = fastattn.chunk_kda(*inputs, **kw)[0]
            ok = bool(torch.isfinite(o).all())
            if fla is not None:
                try:
                    row["rel_vs_fla"] = rel_err(o, fla(*inputs, **kw)[0])
                    ok = ok and row["rel_vs_fla"] <= MAX_REL_VS_FLA
                    row["fla_fwd"], row["fla_fwdbwd"], row["fla_peak_gib"] = time_case(fla, inputs, kw, do)
                except TypeError as e:
                    row["fla_error"] = str(e)[:120]
            if ok:
                row["fwd"], row["fwdbwd"], row["peak_gib"] = time_case(fastattn.chunk_kda, inputs, kw, do)
                if "fla_fwd" in row:
                    row["speedup_fwd"] = row["fla_fwd"] / row["fwd"]
                    row["speedup_fwdbwd"] = row["fla_fwdbwd"] / row["fwdbwd"]
            else:
                row["error"] = "output check failed: no time reported"
            print(res.add(**row), flush=True)
            del inputs, kw, do, o
            torch.cuda.empty_cache()
    if not args.quick and (not wanted or "first-call" in wanted):
        first, err = first_call_seconds()
        res.add(shape="B8-T4096", mode="B", first_call_fwd_s=first and first[0], first_call_fwdbwd_s=first and first[1],
                error=err)
    cols = ["shape", "mode", "fwd", "fla_fwd", "speedup_fwd", "fwdbwd", "fla_fwdbwd", "speedup_fwdbwd",
            "peak_gib", "fla_peak_gib", "rel_vs_fla"]
    rows = [r for r in res.rows if "first_call_fwd_s" not in r]
    print("\n## KDA chunk (ms, median; speedup = fla-core time / fastattn time)")
    print(table(rows, cols))
    for key in ("speedup_fwd", "speedup_fwdbwd"):
        s = [r[key] for r in rows if key in r]
        if s:
            print(f"geomean {key}: {math.exp(sum(map(math.log, s)) / len(s)):.2f}x (min {min(s):.2f}x)")
    for r in res.rows:
        if "first_call_fwd_s" in r:
            print(f"first call in a fresh process (mode B, B8-T4096): fwd {r['first_call_fwd_s']} s, "
                  f"fwd+bwd {r['first_call_fwdbwd_s']} s {r.get('error') or ''}")
    if args.out:
        plot(rows, os.path.join(args.out, "kda.png"))
