"""bench/_common.source_hash: names the sources that ran, whatever the checkout's git metadata says."""
import os
from pathlib import Path

from conftest import load_bench_module

ROOT = Path(__file__).resolve().parents[1]


def _common():
    return load_bench_module("_common")


def test_source_hash_follows_python_sources_only(tmp_path):
    c = _common()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    first = c.source_hash(str(tmp_path))
    assert len(first) == 10 and int(first, 16) >= 0
    assert c.source_hash(str(tmp_path)) == first
    (tmp_path / "notes.txt").write_text("ignored")
    assert c.source_hash(str(tmp_path)) == first
    (tmp_path / "pkg" / "a.py").write_text("x = 3\n")
    changed = c.source_hash(str(tmp_path))
    assert changed != first
    (tmp_path / "pkg" / "a.py").rename(tmp_path / "pkg" / "c.py")    # same bytes, another path
    assert c.source_hash(str(tmp_path)) != changed


def test_source_hash_of_the_package():
    c = _common()
    assert c.source_hash() == c.source_hash(str(ROOT / "fastattn"))


def test_autotune_cache_setting(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    kda = load_bench_module("kda")
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "0")      # restored after the test
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "elsewhere"))
    cache = tmp_path / "tune"
    assert kda.use_autotune_cache(str(cache)) == 0 and cache.is_dir()
    assert os.environ["TRITON_CACHE_AUTOTUNING"] == "1" and os.environ["TRITON_CACHE_DIR"] == str(cache)
    (cache / "ab12").mkdir()
    (cache / "ab12" / "chunk_kda_fwd_kernel.autotune.json").write_text("{}")
    (cache / "ab12" / "chunk_kda_fwd_kernel.cubin").write_bytes(b"\0")
    assert kda.use_autotune_cache(str(cache)) == 1
