"""Time to first token, cache size and decode speed of Qwen3-0.6B-shaped models with random weights.

    python bench/ttft.py --ctx 128k                      # every preset + baseline (+ fla hybrid), bf16, GPU
    python bench/ttft.py --ctx 8k,32k,128k --model hybrid-kda --batch 1
    python bench/ttft.py --ctx 256                       # without a GPU: small contexts run on the CPU

Shape: 28 layers, hidden 1024, 16/8 heads of 128, MLP 3072, vocab 151936, tied embeddings. TTFT is one
prefill of ``--batch`` prompts of ``--ctx`` tokens that keeps only the last position's logits and builds
the decode cache. The baseline is transformers' ``Qwen3ForCausalLM`` with SDPA when transformers is
installed, else the thin ``attention`` preset; a hybrid built from fla's ``KimiDeltaAttention`` layers (same
layer map as ``hybrid-kda``) is added when fla is importable. Decode tokens/s is measured at batch 1 and 16
(``--decode-batches``) after a prefill of ``--ctx`` tokens. Results: a table, ``--json`` and a PNG plot.
"""
import argparse
import gc
import inspect
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastattn.models import PRESETS, HybridConfig, HybridLM, cache_nbytes  # noqa: E402

QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
                  max_position_embeddings=1 << 18, tie_word_embeddings=True)
CPU_MAX_CTX = 4096
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def parse_ctx(text: str):
    """'8k,32k,128k' or '131072' -> [8192, 32768, 131072] (k = 1024)."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        low = part.lower()
        try:
            n = int(float(low[:-1]) * 1024) if low.endswith("k") else int(low)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--ctx entries must look like 8k, 32k, 128k or 131072, got {part!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"--ctx entries must be >= 1, got {part!r}")
        out.append(n)
    if not out:
        raise argparse.ArgumentTypeError("--ctx needs at least one context length")
    return out


def parse_ints(text: str):
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


class Progress:
    """One rewritten status line on stderr."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def show(self, what: str):
        elapsed = time.perf_counter() - self.t0
        sys.stderr.write(f"\r[{self.done}/{self.total}] {elapsed:7.1f}s  {what:<70}")
        sys.stderr.flush()

    def step(self):
        self.done += 1

    def close(self):
        sys.stderr.write("\n")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- model builders ----------------------------------------------------------------------------------
def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


def have_fla() -> bool:
    try:
        from fla.layers import KimiDeltaAttention  # noqa: F401
        return True
    except Exception:
        return False


class _DefaultDtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def build_thin(preset, shape, dtype, device):
    cfg = HybridConfig.from_preset(preset, **shape)
    with torch.device(device), _DefaultDtype(dtype):
        model = HybridLM(cfg)
    # explicit move as well: one GPU smoke-test run found an EVA model's tensor left on the CPU after building
    # under the device context (index_select with the index on cuda:0); a no-op when everything is there
    return model.to(device=device, dtype=dtype).eval()


class FlaKDAMixer(torch.nn.Module):
    """fla's KimiDeltaAttention layer in a thin-model slot (prefill only: it keeps no cache here)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, info, cache=None):
        return self.layer(x)[0]


def build_fla_hybrid(shape, dtype, device):
    from fla.layers import KimiDeltaAttention
    model = build_thin("hybrid-kda", shape, dtype, device)
    cfg = model.config
    wanted = dict(hidden_size=cfg.hidden_size, head_dim=cfg.head_dim, num_heads=cfg.num_attention_heads,
                  mode="chunk", use_short_conv=True, conv_size=cfg.kda_conv_size)
    accepted = inspect.signature(KimiDeltaAttention.__init__).parameters
    for i, layer in enumerate(model.layers):
        if layer.mixer_type == "kda":
            kwargs = {k: v for k, v in wanted.items() if k in accepted}
            if "layer_idx" in accepted:
                kwargs["layer_idx"] = i
            with torch.device(device):   # explicit move too: a GPU run found fla's weights left on the CPU
                fla_layer = KimiDeltaAttention(**kwargs).to(device=device, dtype=dtype)
            for name in ("A_log", "dt_bias"):               # fla keeps its gate parameters in fp32
                if hasattr(fla_layer, name):
                    getattr(fla_layer, name).data = getattr(fla_layer, name).data.float()
            layer.mixer = FlaKDAMixer(fla_layer)
    return model.eval()


def build_hf(shape, dtype, device):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    shape = dict(shape)
    theta = shape.pop("rope_theta")
    hc = Qwen3Config(**shape, rope_parameters={"rope_type": "default", "rope_theta": theta})
    hc._attn_implementation = "sdpa"
    with torch.device(device), _DefaultDtype(dtype):
        model = Qwen3ForCausalLM(hc)
    return model.to(device=device, dtype=dtype).eval()


# ---- runners: one interface for thin models and the transformers baseline -----------------------------
class ThinRunner:
    kind = "thin"

    def __init__(self, model, keeps_cache=True):
        self.model, self.keeps_cache = model, keeps_cache

    def prefill(self, ids, capacity):
        cache = self.model.new_cache(ids.shape[0], capacity=capacity)
        logits = self.model(ids, cache=cache, logits_to_keep=1)
        return logits, cache

    def step(self, tok, cache):
        return self.model(tok, cache=cache, logits_to_keep=1)

    @staticmethod
    def cache_bytes(cache):
        return cache.nbytes


class HFRunner:
    kind = "hf"

    def __init__(self, model):
        self.model, self.keeps_cache = model, True
        params = inspect.signature(type(model).forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"   # renamed in transformers 5.x

    def prefill(self, ids, capacity):
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None)
        return out.logits, cache if cache is not None else out.past_key_values

    def step(self, tok, cache):
        return self.model(input_ids=tok, use_cache=True, logits_to_keep=1, **{self.cache_arg: cache}).logits

    @staticmethod
    def cache_bytes(cache):
        total = 0
        for layer in getattr(cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total or None


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


@torch.no_grad()
def time_ttft(runner, ctx, batch, repeat, device, vocab, progress, label):
    ids = torch.randint(0, vocab, (batch, ctx), device=device)
    progress.show(f"{label} ctx={ctx} warm-up prefill")
    free(device)
    runner.prefill(ids, capacity=ctx)       # first call of this shape (GEMM / SDPA plans, allocator) is not timed
    times, peak, nbytes = [], None, None
    for r in range(repeat):
        progress.show(f"{label} ctx={ctx} prefill {r + 1}/{repeat}")
        free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        logits, cache = runner.prefill(ids, capacity=ctx)
        sync(device)
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        nbytes = runner.cache_bytes(cache) if runner.keeps_cache else None
        del logits, cache
    times.sort()
    return times[len(times) // 2], peak, nbytes, times


@torch.no_grad()
def time_decode(runner, ctx, batch, steps, device, vocab, progress, label):
    progress.show(f"{label} ctx={ctx} decode batch {batch}: prefill")
    free(device)
    ids = torch.randint(0, vocab, (batch, ctx), device=device)
    logits, cache = runner.prefill(ids, capacity=ctx + steps + 2)
    del ids
    tok = logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(2):                                     # warm-up steps (kernel compilation)
        tok = runner.step(tok, cache)[:, -1].argmax(-1, keepdim=True)
    progress.show(f"{label} ctx={ctx} decode batch {batch}: {steps} steps")
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = runner.step(tok, cache)[:, -1].argmax(-1, keepdim=True)
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def warm_up(runner, device, vocab, length):
    ids = torch.randint(0, vocab, (1, length), device=device)
    with torch.no_grad():
        _, cache = runner.prefill(ids, capacity=length + 2)
        if runner.keeps_cache:
            runner.step(ids[:, :1], cache)
    sync(device)


# ---- report ------------------------------------------------------------------------------------------
def fmt_bytes(n):
    return "-" if n is None else f"{n / 2**30:.2f}"


def report(rows, baseline):
    base = {r["ctx"]: r for r in rows if r["model"] == baseline}
    head = (f"{'model':<16}{'ctx':>8}{'TTFT s':>10}{'speedup':>9}{'peak GiB':>10}{'cache GiB':>11}"
            f"{'cache %':>9}" + "".join(f"{'tok/s b' + str(b):>13}{'x':>6}" for b in sorted(
                {b for r in rows for b in r["decode"]})))
    print(head)
    print("-" * len(head))
    batches = sorted({b for r in rows for b in r["decode"]})
    for r in rows:
        b0 = base.get(r["ctx"], {})
        ttft = r.get("ttft")
        speed = f"{b0['ttft'] / ttft:.2f}x" if ttft and b0.get("ttft") else "-"
        cache_pct = f"{100 * r['cache_bytes'] / b0['cache_bytes']:.1f}" if r.get("cache_bytes") and \
            b0.get("cache_bytes") else "-"
        line = (f"{r['model']:<16}{r['ctx']:>8}{(f'{ttft:.3f}' if ttft else r.get('error', '-')):>10}"
                f"{speed:>9}{fmt_bytes(r.get('peak_bytes')):>10}{fmt_bytes(r.get('cache_bytes')):>11}"
                f"{cache_pct:>9}")
        for b in batches:
            v = r["decode"].get(b)
            bv = b0.get("decode", {}).get(b) if b0 else None
            ratio = f"{v / bv:.2f}" if isinstance(v, float) and isinstance(bv, float) else "-"
            line += f"{(f'{v:.1f}' if isinstance(v, float) else str(v or '-')):>13}{ratio:>6}"
        print(line)


def plot(rows, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib is not installed: no plot written; pip install matplotlib for {path})")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((r["ctx"], r["ttft"]) for r in rows if r["model"] == name and r.get("ttft"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ctxs = sorted({r["ctx"] for r in rows})
    ax.set_xticks(ctxs, [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in ctxs])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("time to first token (s)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def write_json(path, device, baseline, rows):
    if path:
        with open(path, "w") as f:
            json.dump(dict(device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda"
                           else None, torch=torch.__version__, baseline=baseline, rows=rows), f, indent=2)


def parse_models(text: str):
    """'all', or a comma list of presets / 'baseline' / 'fla-hybrid'."""
    allowed = ("all", "baseline") + PRESETS + ("fla-hybrid",)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"--model: expected a comma list of {', '.join(allowed)}, got {text!r}")
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", type=parse_ctx, default=parse_ctx("8k,32k,128k"),
                   help="context lengths, comma-separated: 8k, 32k, 128k, 131072 ... (k = 1024)")
    p.add_argument("--model", default="all", type=parse_models,
                   help="comma list of presets, 'baseline', 'fla-hybrid', or all (default), e.g. baseline,hybrid-kda")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--batch", type=int, default=1, help="prompts per prefill (default 1)")
    p.add_argument("--repeat", type=int, default=None, help="timed prefills per point (median; default 3, CPU 1)")
    p.add_argument("--decode-batches", type=parse_ints, default=[1, 16], help="decode batch sizes (default 1,16)")
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps (default 32, CPU 4)")
    p.add_argument("--decode-max-tokens", type=int, default=1 << 19,
                   help="skip a decode point whose set-up prefill (batch x ctx) exceeds this many tokens "
                        "(default 524288: batch 16 at 32K, batch 1 up to 512K)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--layers", type=int, default=None,
                   help="override the depth (28) for quick smoke runs; results are then not Qwen3-0.6B's")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.add_argument("--plot", default=str(Path(__file__).with_name("ttft.png")), help="PNG plot path")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")

    if args.layers is not None and args.layers < 1:
        p.error(f"--layers must be >= 1, got {args.layers}")
    shape = dict(QWEN3_0_6B, num_hidden_layers=args.layers or QWEN3_0_6B["num_hidden_layers"])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        too_long = [c for c in args.ctx if c > CPU_MAX_CTX]
        print("No CUDA GPU found: running on the CPU, where the Qwen3-0.6B shape is slow. "
              "Use a small context there, e.g.  python bench/ttft.py --ctx 256")
        if too_long:
            print(f"--ctx {','.join(map(str, too_long))} is too long for the CPU (max {CPU_MAX_CTX}); "
                  "nothing was run.")
            return 2
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    repeat = args.repeat or (3 if device.type == "cuda" else 1)
    steps = args.decode_steps or (32 if device.type == "cuda" else 4)
    vocab = shape["vocab_size"]

    baseline = "transformers-sdpa" if have_transformers() else "attention"
    names = []
    for m in args.model:
        if m == "all":
            names += [baseline] + [p for p in PRESETS if p != baseline] + (["fla-hybrid"] if have_fla() else [])
        else:
            names.append(baseline if m == "baseline" else m)
    names = list(dict.fromkeys(names))
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, dtype {dtype}, "
          f"batch {args.batch}, layers {shape['num_hidden_layers']}, models {names}, baseline {baseline}")

    progress = Progress(len(names) * len(args.ctx))
    rows = []
    for name in names:
        runner = None
        try:
            progress.show(f"{name}: building")
            if name == "transformers-sdpa":
                runner = HFRunner(build_hf(shape, dtype, device))
            elif name == "fla-hybrid":
                runner = ThinRunner(build_fla_hybrid(shape, dtype, device), keeps_cache=False)
            else:
                runner = ThinRunner(build_thin(name, shape, dtype, device))
            progress.show(f"{name}: warm-up")
            warm_up(runner, device, vocab, min(1024, min(args.ctx)))
        except Exception as e:  # a model that cannot be built is reported, the others still run
            print(f"\n{name}: could not build or warm up: {type(e).__name__}: {e}\n"
                  f"{''.join(traceback.format_exception(e, limit=-4))}", file=sys.stderr)
            free(device)
            rows += [dict(model=name, ctx=c, error=type(e).__name__, decode={}) for c in args.ctx]
            progress.step()
            continue
        for ctx in args.ctx:
            row = dict(model=name, ctx=ctx, batch=args.batch, dtype=str(dtype), decode={})
            try:
                row["ttft"], row["peak_bytes"], row["cache_bytes"], row["ttft_all"] = time_ttft(
                    runner, ctx, args.batch, repeat, device, vocab, progress, name)
            except Exception as e:
                if not is_oom(e):
                    raise
                row["error"] = "OOM"
                free(device)
            if name != "fla-hybrid" and "error" not in row:
                cfg = HybridConfig.from_preset("attention" if name == "transformers-sdpa" else name, **shape)
                row["cache_formula_bytes"] = cache_nbytes(cfg, args.batch, ctx, dtype)["total"]
                for b in args.decode_batches:
                    if b * ctx > args.decode_max_tokens:
                        row["decode"][b] = "skip"
                        continue
                    try:
                        row["decode"][b] = time_decode(runner, ctx, b, steps, device, vocab, progress, name)
                    except Exception as e:
                        if not is_oom(e):
                            raise
                        row["decode"][b] = "OOM"
                        free(device)
            rows.append(row)
            write_json(args.json, device, baseline, rows)       # after every point: a cut-short run keeps its rows
            progress.step()
        del runner
        free(device)
    progress.close()
    report(rows, baseline)
    write_json(args.json, device, baseline, rows)
    plot(rows, args.plot, f"TTFT, Qwen3-0.6B shape, batch {args.batch}, {str(dtype).replace('torch.', '')}, "
         f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
