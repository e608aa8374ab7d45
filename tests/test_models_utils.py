"""Helpers for the model tests (no tests here): tiny configs, randomised models, a hand-written HF Qwen3 checkpoint."""
import json
from pathlib import Path

import torch

from fastattn.models import HybridConfig, HybridLM

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=4096,
            eva_window_size=8, eva_chunk_size=2, kda_chunk_size=16)


def rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def make_model(preset="attention", dtype=torch.float32, device="cpu", seed=0, **over):
    """A tiny model whose every parameter is random (non-identity conv, non-zero gates, mu, phi)."""
    torch.manual_seed(seed)
    cfg = HybridConfig.from_preset(preset, **{**TINY, **over})
    model = HybridLM(cfg)
    model.reset_parameters(std=0.15)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("conv_weight", "g_b.weight", "mu", "phi")):
                p.normal_(0.0, 0.3)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.to(device=device, dtype=dtype).eval()


def write_hf_qwen3(model: HybridLM, path: Path, tie=None) -> None:
    """Write an all-attention HybridLM as a Hugging Face Qwen3 checkpoint (config.json + safetensors)."""
    from safetensors.torch import save_file
    cfg = model.config
    path.mkdir(parents=True, exist_ok=True)
    hf = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=cfg.vocab_size,
              hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
              num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act="silu",
              rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, rope_scaling=None,
              max_position_embeddings=cfg.max_position_embeddings, attention_bias=cfg.attention_bias,
              tie_word_embeddings=cfg.tie_word_embeddings, use_sliding_window=False)
    (path / "config.json").write_text(json.dumps(hf))
    state = {}
    for k, v in model.state_dict().items():
        name = k.replace("mixer.", "self_attn.")
        state[name if name.startswith("lm_head") else "model." + name] = v.contiguous()
    save_file(state, str(path / "model.safetensors"))
