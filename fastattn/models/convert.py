"""Build a hybrid student from a Qwen3-style teacher in Hugging Face format.

The teacher is a directory (config.json + safetensors) or an object with ``.config`` and ``.state_dict()``
(a transformers model; no transformers class is imported here). Every shared tensor is copied
(embeddings, norms, MLPs, LM head), and each layer's q/k/v/o go into its new mixer; attention and EVA
layers also take q_norm/k_norm. KDA layers have no q/k norm (q and k are L2-normalised in the kernel),
so the teacher's q_norm/k_norm of those layers are the only teacher tensors left unused.
"""
import os
from pathlib import Path
from typing import Dict, Tuple, Union

import torch

from .config import PRESETS, HybridConfig
from .io import load_state, read_json, read_safetensors_dir

_SHAPE_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
               "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
               "num_key_value_heads": "num_key_value_heads", "rms_norm_eps": "rms_norm_eps",
               "max_position_embeddings": "max_position_embeddings", "attention_bias": "attention_bias",
               "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id"}


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ValueError(f"teacher rope type must be 'default' (plain RoPE), got {rope_type!r}")
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ValueError("teacher config has no rope_theta (top level or in rope_parameters)")
    return float(theta)


def config_from_qwen3(hf_config: dict, preset: str = "hybrid-kda", **overrides) -> HybridConfig:
    """:class:`HybridConfig` with the teacher's shape and the layer map of ``preset``.

    Args:
        hf_config: the teacher's config.json as a dict (``model_type`` must be ``qwen3``).
        preset: ``attention`` | ``hybrid-kda`` | ``eva`` | ``hybrid-kda-eva``.
        overrides: other HybridConfig fields (KDA/EVA options, or ``layer_types`` to pick layers by hand).
    """
    if not isinstance(hf_config, dict):
        raise TypeError(f"hf_config must be a dict, got {type(hf_config).__name__}")
    model_type = hf_config.get("model_type")
    if model_type != "qwen3":
        raise ValueError(f"teacher model_type must be 'qwen3', got {model_type!r}")
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"teacher hidden_act must be 'silu' (SwiGLU), got {act!r}")
    if hf_config.get("use_sliding_window"):
        raise ValueError("teacher use_sliding_window must be false (sliding-window Qwen3 layers are not supported)")
    fields = {ours: hf_config[theirs] for theirs, ours in _SHAPE_KEYS.items() if hf_config.get(theirs) is not None}
    if "num_key_value_heads" not in fields:
        fields["num_key_value_heads"] = fields.get("num_attention_heads")
    fields["head_dim"] = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    fields["rope_theta"] = _rope_theta(hf_config)
    fields["tie_word_embeddings"] = bool(hf_config.get("tie_word_embeddings", False))
    fields.update(overrides)
    if "layer_types" in fields:
        return HybridConfig(**fields)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    return HybridConfig.from_preset(preset, **fields)


def load_qwen3_teacher(source) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """``(config dict, state dict)`` of a teacher directory or of an object with ``.config``/``.state_dict()``."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_dir():
            raise FileNotFoundError(f"teacher path {path} is not a directory with config.json + safetensors")
        return read_json(path / "config.json"), read_safetensors_dir(path)
    if hasattr(source, "config") and hasattr(source, "state_dict"):
        cfg = source.config.to_dict() if hasattr(source.config, "to_dict") else dict(vars(source.config))
        return cfg, dict(source.state_dict())
    raise TypeError(f"teacher must be a checkpoint directory or a model with .config and .state_dict(), "
                    f"got {type(source).__name__}")


def student_state_from_teacher(config: HybridConfig, teacher: Dict[str, torch.Tensor]):
    """Map teacher tensor names to student names: ``(state, unused_teacher_keys)``."""
    prefix = "model."
    state: Dict[str, torch.Tensor] = {}
    used = set()

    def take(src: str, dst: str, required: bool = True):
        if src in teacher:
            state[dst] = teacher[src]
            used.add(src)
        elif required:
            raise ValueError(f"teacher checkpoint lacks tensor {src!r} needed for {dst!r}")

    take(prefix + "embed_tokens.weight", "embed_tokens.weight")
    take(prefix + "norm.weight", "norm.weight")
    if config.tie_word_embeddings:
        used.add("lm_head.weight")           # a tied checkpoint may store the shared matrix twice
    else:
        take("lm_head.weight", "lm_head.weight")
    for i, mixer in enumerate(config.layer_types):
        src, dst = f"{prefix}layers.{i}.", f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            take(src + norm + ".weight", dst + norm + ".weight")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            take(src + f"mlp.{proj}.weight", dst + f"mlp.{proj}.weight")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            take(src + f"self_attn.{proj}.weight", dst + f"mixer.{proj}.weight")
            take(src + f"self_attn.{proj}.bias", dst + f"mixer.{proj}.bias", required=config.attention_bias)
        if mixer != "kda":
            take(src + "self_attn.q_norm.weight", dst + "mixer.q_norm.weight")
            take(src + "self_attn.k_norm.weight", dst + "mixer.k_norm.weight")
        else:
            used.update({src + "self_attn.q_norm.weight", src + "self_attn.k_norm.weight"})
    unused = sorted(k for k in teacher if k not in used and not k.endswith("rotary_emb.inv_freq"))
    return state, unused


def convert_qwen3(teacher, preset: Union[str, HybridConfig] = "hybrid-kda", *,
                  dtype: torch.dtype = torch.float32, device: Union[str, torch.device, None] = None,
                  **overrides):
    """Build a :class:`~fastattn.models.HybridLM` student from a Qwen3-style teacher.

    Args:
        teacher: checkpoint directory (config.json + safetensors) or a transformers Qwen3 model object.
        preset: ``hybrid-kda`` (default) | ``attention`` | ``eva`` | ``hybrid-kda-eva``, or a full
            :class:`HybridConfig` whose shape must match the teacher's.
        dtype: parameter dtype of the student (default fp32: master weights for distillation).
        device: where the student lives (default CPU).
        overrides: HybridConfig fields (e.g. ``eva_window_size=1024``, ``layer_types=[...]``).

    Returns:
        the student; copied tensors equal the teacher's, new mixer parameters have their initial values.
        With ``preset="attention"`` it computes the teacher's logits.

    Example:
        >>> student = convert_qwen3("path/to/Qwen3-0.6B", "hybrid-kda")     # doctest: +SKIP
        >>> student.save_pretrained("hybrid-kda-0.6b")                     # doctest: +SKIP
    """
    from .model import HybridLM
    hf_config, teacher_state = load_qwen3_teacher(teacher)
    if isinstance(preset, HybridConfig):
        config = preset.replace(**overrides) if overrides else preset
        expected = config_from_qwen3(hf_config, "attention")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
                     "attention_bias"):
            if getattr(config, name) != getattr(expected, name):
                raise ValueError(f"config.{name} must match the teacher's {getattr(expected, name)!r}, "
                                 f"got {getattr(config, name)!r}")
    else:
        config = config_from_qwen3(hf_config, preset, **overrides)
    state, unused = student_state_from_teacher(config, teacher_state)
    if unused:
        raise ValueError(f"teacher tensors with no place in the student: {unused[:8]} "
                         f"({len(unused)} in all); is this a Qwen3 checkpoint?")
    model = HybridLM(config)
    own = model.state_dict()
    full = {k: state.get(k, v) for k, v in own.items()}
    load_state(model, full, what="the teacher checkpoint")
    return model.to(device=device, dtype=dtype)


__all__ = ["convert_qwen3", "config_from_qwen3", "load_qwen3_teacher", "student_state_from_teacher"]
