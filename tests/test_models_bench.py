"""bench/ttft.py: argument parsing, the no-GPU refusal of long contexts, and a tiny end-to-end run."""
import argparse
import json

import pytest
from conftest import load_bench_module


@pytest.fixture(scope="module")
def ttft():
    return load_bench_module("ttft")


def test_parse_ctx(ttft):
    assert ttft.parse_ctx("8k,32k,128k") == [8192, 32768, 131072]
    assert ttft.parse_ctx("131072") == [131072]
    assert ttft.parse_ctx("0.5k, 100") == [512, 100]
    for bad in ("abc", "-4", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            ttft.parse_ctx(bad)


def test_cpu_refuses_long_context(ttft, capsys):
    assert ttft.main(["--ctx", "128k", "--device", "cpu"]) == 2
    out = capsys.readouterr().out
    assert "No CUDA GPU" in out and "--ctx 256" in out and "nothing was run" in out


def test_tiny_cpu_run(ttft, tmp_path, capsys, monkeypatch):
    small = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32)                  # the real shape is minutes on 2 cores
    for key, value in small.items():
        monkeypatch.setitem(ttft.QWEN3_0_6B, key, value)
    rc = ttft.main(["--ctx", "40", "--layers", "4", "--device", "cpu", "--model", "all", "--decode-batches", "1,2",
                    "--decode-steps", "1", "--decode-max-tokens", "40", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "t.png")])
    assert rc == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    names = {r["model"] for r in rows}
    assert {"attention", "hybrid-kda", "eva", "hybrid-kda-eva"} <= names
    for r in rows:
        assert r["ttft"] > 0 and set(r["decode"]) == {"1", "2"}, r
        assert isinstance(r["decode"]["1"], float) and r["decode"]["2"] == "skip", r   # 2 x 40 tokens > 40
        if r["model"] != "fla-hybrid":
            assert r["cache_bytes"] == r["cache_formula_bytes"], r
    assert "TTFT s" in capsys.readouterr().out
