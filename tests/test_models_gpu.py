"""GPU lane of the model tests: bf16 on CUDA (Triton KDA/EVA kernels), at sizes where chunks and windows matter."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fastattn.models import PRESETS, cache_nbytes, convert_qwen3
from test_models_utils import make_model, rel

pytestmark = pytest.mark.gpu

GPU_SHAPE = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, eva_window_size=64,
                 eva_chunk_size=16, kda_chunk_size=64)


@pytest.mark.parametrize("preset", PRESETS)
def test_decode_equals_prefill_bf16(preset):
    """bf16 prefill + decode vs one bf16 forward, both against the fp32 model on the same GPU."""
    ids = torch.randint(0, 1000, (2, 300), device="cuda")
    ref = make_model(preset, device="cuda", **GPU_SHAPE)
    model = make_model(preset, dtype=torch.bfloat16, device="cuda", **GPU_SHAPE)
    with torch.no_grad():
        gold = ref(ids).float()
        full = model(ids).float()
        cache = model.new_cache(2)
        parts = [model(ids[:, :250], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(250, 300)]
    dec = torch.cat(parts, 1).float()
    assert torch.isfinite(dec).all()
    assert rel(dec, full) < 3e-2
    assert rel(dec[:, 250:], gold[:, 250:]) <= 2 * rel(full[:, 250:], gold[:, 250:]) + 2e-3
    assert cache.nbytes_by_mixer() == cache_nbytes(model.config, 2, 300, torch.bfloat16)


@pytest.mark.parametrize("preset", ["attention", "hybrid-kda"])
def test_padded_generation_bf16(preset):
    model = make_model(preset, dtype=torch.bfloat16, device="cuda", **GPU_SHAPE)
    prompts = [list(range(1, 200)), list(range(7, 40))]
    with torch.no_grad():
        cache = model.new_cache(2)
        ids = torch.zeros(2, 199, dtype=torch.long, device="cuda")
        ids[0] = torch.tensor(prompts[0])
        ids[1, 199 - 33:] = torch.tensor(prompts[1])
        mask = (ids != 0).long()
        mask[0] = 1
        out = model(ids, cache=cache, attention_mask=mask)
        single = model(torch.tensor([prompts[1]], device="cuda"))
    assert rel(out[1, -33:].float(), single[0].float()) < 2e-2
    gen = model.generate(prompts, max_new_tokens=16)
    assert gen.shape == (2, 16)


def test_conversion_matches_transformers_bf16(tmp_path):
    transformers = pytest.importorskip("transformers")
    hc = transformers.Qwen3Config(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=1e6,
                                  tie_word_embeddings=True)
    hc._attn_implementation = "sdpa"
    teacher = transformers.Qwen3ForCausalLM(hc).to("cuda", torch.bfloat16).eval()
    teacher.save_pretrained(tmp_path)
    student = convert_qwen3(tmp_path, "attention", dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, 1000, (2, 257), device="cuda")
    with torch.no_grad():
        assert rel(student(ids).float(), teacher(ids).logits.float()) < 1e-2
    hybrid = convert_qwen3(tmp_path, "hybrid-kda-eva", dtype=torch.bfloat16, device="cuda",
                           eva_window_size=64, eva_chunk_size=16)
    assert torch.isfinite(hybrid.generate(ids[:, :100], max_new_tokens=8).float()).all()


def test_ttft_bench_smoke(tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "ttft.py"
    spec = importlib.util.spec_from_file_location("ttft_bench", path)
    ttft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ttft)
    rc = ttft.main(["--ctx", "2k", "--model", "all", "--decode-batches", "1,16", "--decode-steps", "4", "--repeat", "1",
                    "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "t.png")])
    assert rc == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    for r in rows:
        assert r.get("ttft", 0) > 0, r
