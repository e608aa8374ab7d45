"""Shared benchmark helpers: device line, timing, relative error, result rows and the printed table."""
import datetime
import json
import os
import subprocess
from typing import Callable, Dict, List, Optional

import torch


def device_line() -> str:
    """One line naming the card and the software versions."""
    import triton
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"{name} | torch {torch.__version__} | triton {triton.__version__} | cuda {torch.version.cuda}"


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - the commit is informative only
        return "unknown"


def source_hash(root: Optional[str] = None) -> str:
    """First 10 hex digits of the sha1 over fastattn's Python sources (path and bytes, sorted by path): names the
    code that ran even where the checkout's git metadata is stale or the tree is dirty (a copied working tree)."""
    import hashlib
    root = root or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fastattn")
    h = hashlib.sha1()
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(d, f)
                h.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()[:10]


def bench_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> Dict[str, float]:
    """do_bench median and 20/80 % quantiles in ms (fn is called once more first, untimed)."""
    import triton.testing
    fn()
    torch.cuda.synchronize()
    q50, q20, q80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"ms": q50, "ms_p20": q20, "ms_p80": q80}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref||_rms / ||ref||_rms in float64 (NaN propagates)."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


class Results:
    """Rows appended as JSON lines to ``<out>/<name>.jsonl`` as they come, so a run cut short keeps them."""

    def __init__(self, out: Optional[str], name: str):
        self.rows: List[dict] = []
        self.path = None
        if out:
            os.makedirs(out, exist_ok=True)
            self.path = os.path.join(out, f"{name}.jsonl")
        self.meta = {"device": device_line(), "commit": git_commit(), "source": source_hash(),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def add(self, **row) -> dict:
        row = {**row, **self.meta}
        self.rows.append(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row


def table(rows: List[dict], cols: List[str]) -> str:
    """A plain Markdown table of the given columns (floats with 3 significant digits)."""
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}"
        return "" if x is None else str(x)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
