"""Conversion from a Qwen3-style HF checkpoint: exactness (vs transformers when installed), copies, errors."""
import json

import pytest
import torch

from fastattn.models import HybridConfig, config_from_qwen3, convert_qwen3
from test_models_utils import TINY, make_model, rel, write_hf_qwen3

pytest.importorskip("safetensors")


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def teacher_dir(request, tmp_path_factory):
    teacher = make_model("attention", tie_word_embeddings=request.param)
    path = tmp_path_factory.mktemp("qwen3")
    write_hf_qwen3(teacher, path)
    return teacher, path


def test_attention_student_reproduces_teacher(teacher_dir):
    teacher, path = teacher_dir
    student = convert_qwen3(path, "attention")
    ids = torch.randint(0, TINY["vocab_size"], (2, 19))
    with torch.no_grad():
        assert torch.equal(student(ids), teacher(ids))


@pytest.mark.parametrize("preset", ["hybrid-kda", "hybrid-kda-eva", "eva"])
def test_hybrid_student_copies_teacher_tensors(teacher_dir, preset):
    teacher, path = teacher_dir
    student = convert_qwen3(path, preset, eva_window_size=8, eva_chunk_size=2)
    assert student.config.layer_types == HybridConfig.from_preset(preset, **TINY).layer_types
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name, value in t_state.items():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        if layer is not None and student.config.layer_types[layer] == "kda" and ("q_norm" in name or "k_norm" in name):
            assert name not in s_state
            continue
        assert torch.equal(s_state[name], value), name
    kda = [lay.mixer for lay in student.layers if lay.mixer_type == "kda"]
    if kda:
        assert torch.all(kda[0].g_b.weight == 0) and torch.all(kda[0].conv_weight[:, 0, -1] == 1)
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    with torch.no_grad():
        assert torch.isfinite(student(ids)).all()


def test_student_dtype_and_explicit_config(teacher_dir):
    teacher, path = teacher_dir
    cfg = HybridConfig(**{**TINY, "tie_word_embeddings": teacher.config.tie_word_embeddings},
                       layer_types=("attention", "kda", "kda", "attention"))
    student = convert_qwen3(path, cfg, dtype=torch.bfloat16)
    assert student.dtype == torch.bfloat16 and student.config.layer_types == cfg.layer_types
    with pytest.raises(ValueError, match="hidden_size must match"):
        convert_qwen3(path, cfg.replace(hidden_size=64))


def _edit_config(path, tmp_path, **changes):
    out = tmp_path / "edited"
    out.mkdir()
    hf = json.loads((path / "config.json").read_text())
    hf.update(changes)
    (out / "config.json").write_text(json.dumps(hf))
    (out / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    return out


@pytest.mark.parametrize("changes,match", [
    (dict(model_type="llama"), "model_type must be 'qwen3'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type must be 'default'"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(num_hidden_layers=5), "lacks tensor"),
    (dict(num_hidden_layers=3), "no place in the student"),
    (dict(intermediate_size=40), "do not match the config"),
])
def test_bad_teachers_rejected(teacher_dir, tmp_path, changes, match):
    _, path = teacher_dir
    with pytest.raises(ValueError, match=match):
        convert_qwen3(_edit_config(path, tmp_path, **changes), "hybrid-kda")


def test_bad_sources_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        convert_qwen3(tmp_path / "nope")
    with pytest.raises(TypeError, match="checkpoint directory"):
        convert_qwen3(42)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        convert_qwen3(tmp_path)
    with pytest.raises(ValueError, match="preset must be one of"):
        config_from_qwen3({"model_type": "qwen3", "hidden_size": 32, "num_attention_heads": 4,
                           "rope_theta": 1e4, "vocab_size": 97, "intermediate_size": 48,
                           "num_hidden_layers": 4}, "mamba")


# ---- against transformers' Qwen3 -------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_teacher(request, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hc = transformers.Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  rope_theta=10000.0, tie_word_embeddings=request.param, eos_token_id=5)
    hc._attn_implementation = "sdpa"
    model = transformers.Qwen3ForCausalLM(hc).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return model, path


def test_matches_transformers_qwen3_from_disk(hf_teacher):
    model, path = hf_teacher
    student = convert_qwen3(path, "attention")
    assert student.config.eos_token_id == (5,)
    ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        ref = model(ids).logits
        assert rel(student(ids), ref) < 1e-6
        cache = student.new_cache(2)
        parts = [student(ids[:, :15], cache=cache)] + [student(ids[:, t:t + 1], cache=cache) for t in range(15, 23)]
    assert rel(torch.cat(parts, 1), ref) < 1e-5


def test_matches_transformers_object_and_greedy_generation(hf_teacher):
    model, _ = hf_teacher
    student = convert_qwen3(model, "attention")
    ids = torch.randint(6, 97, (1, 9))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 9:]
    ours = student.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(ours, ref)
