"""Kernel timings against baselines, same run, same card.

    python bench/kernels.py --op eva [--quick] [--sweep] [--smoke] [--out DIR]
    python bench/kernels.py --op kda [--baseline fla|none] [--quick] [--out DIR]

``--op kda``: fastattn.chunk_kda against fla-core 0.6.0 (see bench/kda.py for the cases).

``--op eva``: fastattn.flash_eva (bf16, H = 16, Hkv = 8, D = 128) against FlexAttention over
cat(K, K_landmarks) with the EVA mask plus PyTorch pooling (the whole baseline under torch.compile),
forward and forward+backward, and against SDPA causal attention over the full sequence. Cases: W = 2048,
C = 16 at (B, T) = (8, 4096), (2, 16384), (1, 65536); W = 512, C = 8 at (1, 65536); local="sliding" at
(2, 16384). Outputs are checked against the baseline before any time is reported. Also: useful-pair
TFLOP/s (visible pairs only; forward 4 D flops a pair, forward+backward 3.5x that) and the decode-step
latency of EvaCache against SDPA over a full KV cache at 32K and 128K context.
``--sweep`` times a few tile choices of each stage first; ``--smoke`` runs every kernel once at a small
shape (for compute-sanitizer) and exits. Rows go to ``<out>/<op>.jsonl``; a table is printed last.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastattn  # noqa: E402
from _common import Results, bench_ms, device_line, rel_err, table  # noqa: E402
from kda import run_kda  # noqa: E402

H, HKV, D = 16, 8, 128
EVA_CASES = [dict(B=8, T=4096, W=2048, C=16, local="block"), dict(B=2, T=16384, W=2048, C=16, local="block"),
             dict(B=1, T=65536, W=2048, C=16, local="block"), dict(B=1, T=65536, W=512, C=8, local="block"),
             dict(B=2, T=16384, W=2048, C=16, local="sliding")]
DECODE_CTX = [32768, 131072]
MAX_REL_VS_FLEX = 2e-2  # both bf16, each a few 1e-3 from the float64 oracle


def case_name(c):
    return f"B{c['B']}-T{c['T']}-W{c['W']}-C{c['C']}-{c['local']}"


def eva_inputs(B, T, seed=0, grad=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=g, device="cuda", dtype=torch.bfloat16) for h in (H, HKV, HKV))
    mu, phi = (torch.randn(HKV, D, generator=g, device="cuda") * D ** -0.5 for _ in range(2))
    return [x.requires_grad_(grad) for x in (q, k, v, mu, phi)]


def useful_pairs(T, W, C, local):
    """Visible (query, key-or-landmark) pairs of one sequence and head."""
    t = torch.arange(T, dtype=torch.int64)
    lo = (t // W) * W if local == "block" else ((t - W + 1).clamp(min=0) // C) * C
    return int((t - lo + 1).sum() + (lo // C).sum())


def pool_torch(k, v, mu, phi, C, scale):
    """PyTorch landmark pooling on [B, Hkv, T, D] keys/values (fp32 softmax): [B, Hkv, T // C, D]."""
    B, Hk, T, Dh = k.shape
    n = T // C
    kc = k[:, :, :n * C].reshape(B, Hk, n, C, Dh).float()
    vc = v[:, :, :n * C].reshape(B, Hk, n, C, Dh).float()
    a = torch.softmax(torch.einsum("bhncd,hd->bhnc", kc, mu), dim=-1)
    z = scale * (torch.einsum("bhncd,hd->bhnc", kc, phi) - 0.5 * kc.square().sum(-1))
    b = torch.softmax(z, dim=-1)
    return (torch.einsum("bhnc,bhncd->bhnd", a, kc).to(k.dtype), torch.einsum("bhnc,bhncd->bhnd", b, vc).to(v.dtype))


def flex_baseline(B, T, W, C, local):
    """Compiled FlexAttention over cat(K, K_landmarks) with the EVA mask, PyTorch pooling included.
    Takes and returns the flash-attn layout [B, T, heads, D] (transposes are part of the baseline)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    # every case compiles afresh: past dynamo's recompile limit (8) flex_attention silently falls back to a
    # dense eager path (it ran out of memory at T = 16384 as the fifth case)
    torch._dynamo.reset()
    n = T // C
    scale = D ** -0.5

    def mask_mod(b, h, q_idx, kv_idx):
        if local == "block":
            lo = (q_idx // W) * W
        else:
            s = q_idx - W + 1
            lo = (torch.where(s > 0, s, 0) // C) * C
        local_vis = (kv_idx < T) & (kv_idx <= q_idx) & (kv_idx >= lo)
        remote_vis = (kv_idx >= T) & (kv_idx - T < lo // C)
        return local_vis | remote_vis

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T + n, device="cuda", _compile=True)

    def run(q, k, v, mu, phi):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        kl, vl = pool_torch(kt, vt, mu, phi, C, scale)
        o = flex_attention(qt, torch.cat([kt, kl], 2), torch.cat([vt, vl], 2), block_mask=block_mask,
                           scale=scale, enable_gqa=True)
        return o.transpose(1, 2)

    return torch.compile(run, dynamic=False)


def sdpa_causal(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def sdpa_decode_fn(q, k, v):
    """A no-argument step: one query over the whole KV cache through SDPA's fused kernels, with GQA if
    they take it, else with the heads expanded once beforehand (outside the timing)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    try:
        with sdpa_kernel(fused):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        gqa = True
    except RuntimeError:
        g = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), False

    def step():
        with sdpa_kernel(fused):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    return step


def time_modes(fn, inputs, do, modes):
    """{mode: timing} for fn(*inputs) -> o; fwdbwd takes the gradients of every input needing one."""
    out = {}
    if "fwd" in modes:
        with torch.no_grad():
            out["fwd"] = bench_ms(lambda: fn(*inputs))
    if "fwdbwd" in modes:
        leaves = [x for x in inputs if x.requires_grad]
        out["fwdbwd"] = bench_ms(lambda: torch.autograd.grad(fn(*inputs), leaves, do))
    return out


def run_eva_case(c, res, modes, sdpa=True):
    B, T, W, C, local = c["B"], c["T"], c["W"], c["C"], c["local"]
    name = case_name(c)
    q, k, v, mu, phi = eva_inputs(B, T)
    do = torch.randn_like(q)
    ours = lambda q, k, v, mu, phi: fastattn.flash_eva(q, k, v, window_size=W, chunk_size=C, mu=mu, phi=phi,  # noqa
                                                       local=local)
    t0 = time.time()
    flex = flex_baseline(B, T, W, C, local)
    o_ref, o = flex(q, k, v, mu, phi), ours(q, k, v, mu, phi)
    err = rel_err(o, o_ref)
    g = torch.autograd.grad(ours(q, k, v, mu, phi), (q, k, v, mu, phi), do)
    g_ref = torch.autograd.grad(flex(q, k, v, mu, phi), (q, k, v, mu, phi), do)
    gerr = max(rel_err(a, b) for a, b in zip(g, g_ref))
    print(f"[{name}] compiled in {time.time() - t0:.1f}s; rel err vs flex: o {err:.2e}, grads max {gerr:.2e}",
          flush=True)
    ok = err < MAX_REL_VS_FLEX and gerr < 2 * MAX_REL_VS_FLEX
    if not ok:
        res.add(case=name, provider="fastattn", mode="check", rel_err=err, grad_rel_err=gerr, ok=False)
        print(f"[{name}] MISMATCH against FlexAttention: not timed", flush=True)
        return
    pairs = useful_pairs(T, W, C, local) * B * H
    flops = {"fwd": 4 * D * pairs, "fwdbwd": 3.5 * 4 * D * pairs}
    times = {"fastattn": time_modes(ours, (q, k, v, mu, phi), do, modes),
             "flex": time_modes(flex, (q, k, v, mu, phi), do, modes)}
    del flex
    if sdpa:
        qs, ks, vs = (x.detach().transpose(1, 2).contiguous() for x in (q, k, v))
        ks, vs = ks.repeat_interleave(H // HKV, 1), vs.repeat_interleave(H // HKV, 1)
        qs, ks, vs = (x.requires_grad_() for x in (qs, ks, vs))
        times["sdpa_causal"] = time_modes(sdpa_causal, (qs, ks, vs), do, modes)
    for mode in modes:
        base = times["flex"][mode]["ms"]
        for prov, per_mode in times.items():
            tm = per_mode[mode]
            tflops = flops[mode] / tm["ms"] * 1e-9 if prov != "sdpa_causal" else None
            res.add(case=name, provider=prov, mode=mode, **tm, speedup_vs_flex=base / tm["ms"], useful_tflops=tflops,
                    rel_err=err, grad_rel_err=gerr, ok=True)
    torch.cuda.empty_cache()


def run_decode(res, contexts, batches=(1, 8), W=2048, C=16):
    """Per-step latency of EvaCache.decode against SDPA over a full KV cache (one new query)."""
    for ctx in contexts:
        for B in batches:
            q, k, v, mu, phi = eva_inputs(B, ctx, grad=False)
            cache = fastattn.EvaCache(window_size=W, chunk_size=C)
            with torch.no_grad():
                cache.prefill(q, k, v, mu=mu, phi=phi)
            q1, k1, v1 = q[:, -1:].clone(), k[:, -1:].clone(), v[:, -1:].clone()
            t_eva = bench_ms(lambda c=cache: c.decode(q1, k1, v1, mu=mu, phi=phi), warmup=10, rep=50)
            rows_eva = cache.memory_rows()
            kf, vf = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            qd = q1.transpose(1, 2)
            del q
            with torch.no_grad():
                t_sdpa = bench_ms(sdpa_decode_fn(qd, kf, vf), warmup=10, rep=50)
            name = f"decode-B{B}-ctx{ctx // 1024}K"
            res.add(case=name, provider="fastattn", mode="decode", **t_eva, speedup_vs_sdpa=t_sdpa["ms"] / t_eva["ms"],
                    cache_rows=rows_eva)
            res.add(case=name, provider="sdpa_full_kv", mode="decode", **t_sdpa, cache_rows=ctx)
            del cache, k, v, kf, vf
            torch.cuda.empty_cache()


SWEEP = {"fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 32, 4, 3)],
         "dq": [(128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 2)],
         "dkv": [(32, 64, 4, 3), (64, 128, 8, 3), (64, 64, 8, 2)],
         "lm": [(32, 64, 4, 3), (64, 64, 4, 3)]}


def run_sweep(res, c):
    """Time tile choices of one stage at a time (the others at their defaults) on case c."""
    from fastattn.eva import launch
    B, T, W, C = c["B"], c["T"], c["W"], c["C"]
    q, k, v, mu, phi = eva_inputs(B, T)
    do = torch.randn_like(q)
    f = lambda: fastattn.flash_eva(q, k, v, window_size=W, chunk_size=C, mu=mu, phi=phi)  # noqa: E731
    for stage, options in SWEEP.items():
        default = launch.TILES[stage][128]
        for tile in options:
            launch.TILES[stage][128] = tile
            try:
                if stage == "fwd":
                    with torch.no_grad():
                        tm = bench_ms(f)
                else:
                    tm = bench_ms(lambda: torch.autograd.grad(f(), (q, k, v, mu, phi), do))
                res.add(case=case_name(c), provider="fastattn", mode=f"sweep-{stage}", tile=str(tile), **tm)
                print(f"sweep {stage} {tile}: {tm['ms']:.3f} ms", flush=True)
            except Exception as e:  # noqa: BLE001 - a tile that does not fit is reported, not fatal
                print(f"sweep {stage} {tile}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
        launch.TILES[stage][128] = default


def run_smoke():
    """Every EVA kernel once at a small shape (run it under compute-sanitizer)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for local, cu in (("block", None), ("sliding", [0, 100, 101, 300])):
        q = torch.randn(1, 300, 4, 72, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        k, v = (torch.randn(1, 300, 2, 72, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                for _ in range(2))
        cus = None if cu is None else torch.tensor(cu, device="cuda")
        o = fastattn.flash_eva(q, k, v, window_size=64, chunk_size=8, local=local, cu_seqlens=cus)
        torch.autograd.grad(o.float().sum(), (q, k, v))
        cache = fastattn.EvaCache(window_size=64, chunk_size=8, local=local)
        with torch.no_grad():
            cache.prefill(q[:, :250], k[:, :250], v[:, :250])
            for t in range(250, 270):
                cache.decode(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
    torch.cuda.synchronize()
    print("smoke: ok")


def run_eva(args):
    res = Results(args.out, "eva")
    print(device_line(), flush=True)
    if args.smoke:
        run_smoke()
        return
    cases = EVA_CASES[:2] if args.quick else EVA_CASES
    if args.case:
        cases = [c for c in cases if any(s in case_name(c) for s in args.case.split(","))]
    if args.sweep:
        run_sweep(res, EVA_CASES[1])
    for c in cases:
        run_eva_case(c, res, ("fwd", "fwdbwd"))
    if not args.no_decode:
        run_decode(res, DECODE_CTX[:1] if args.quick else DECODE_CTX)
    rows = [r for r in res.rows if r["mode"] in ("fwd", "fwdbwd")]
    print("\n## FlashEVA kernels (ms, median; speedup = FlexAttention time / this time)")
    print(table(rows, ["case", "mode", "provider", "ms", "speedup_vs_flex", "useful_tflops"]))
    for mode in ("fwd", "fwdbwd"):
        s = [r["speedup_vs_flex"] for r in rows if r["provider"] == "fastattn" and r["mode"] == mode]
        if s:
            print(f"geomean speedup vs flex, {mode}: {math.exp(sum(map(math.log, s)) / len(s)):.2f}x "
                  f"(min {min(s):.2f}x)")
    dec = [r for r in res.rows if r["mode"] == "decode"]
    print("\n## Decode step (ms, median)")
    print(table(dec, ["case", "provider", "ms", "speedup_vs_sdpa", "cache_rows"]))


OPS = {"eva": run_eva, "kda": run_kda}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--op", required=True, choices=sorted(OPS))
    p.add_argument("--quick", action="store_true", help="eva: the first two cases and 32K decode; kda: B8-T4096")
    p.add_argument("--baseline", default="fla", choices=["fla", "none"], help="kda: compare against fla-core")
    p.add_argument("--sweep", action="store_true", help="time tile choices first")
    p.add_argument("--smoke", action="store_true", help="run every kernel once at a small shape and exit")
    p.add_argument("--no-decode", action="store_true", help="eva: skip the decode-step timings")
    p.add_argument("--case", default="", help="only cases whose name contains one of these (comma-separated); kda: "
                   "B8-T4096, B2-T16384, B1-T65536, varlen-6, varlen-8x1024, first-call (the fresh-process compile "
                   "time, else measured on full runs only)")
    p.add_argument("--autotune-cache", default="", metavar="DIR",
                   help="kda: keep and reuse Triton autotune results (fla's) in DIR, e.g. carried between device calls")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA device")
    OPS[args.op](args)


if __name__ == "__main__":
    main()
