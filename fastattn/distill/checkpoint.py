"""Training checkpoints (atomic, resumable), metrics files, and a Qwen3-format export of a teacher.

A stage checkpoint is one ``torch.save`` file ``{ckpt_dir}/stage{N}.pt`` holding the student's full
state dict, the optimizer and LR-scheduler states, the number of finished optimizer steps, the RNG
states, the training config (as a dict), the metrics so far and ``done`` (True once the stage finished;
a finished checkpoint drops the optimizer state). Files are written atomically: a temporary file in the
same directory is written, flushed, fsync'ed and then ``os.replace``'d over the target, so a crash
leaves either the old or the new checkpoint, never a torn one.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

PathLike = Union[str, os.PathLike]
CHECKPOINT_VERSION = 1

__all__ = ["atomic_write_bytes", "atomic_torch_save", "atomic_write_json", "checkpoint_path", "save_checkpoint",
           "load_checkpoint", "rng_state", "set_rng_state", "save_qwen3_teacher"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, ``os.replace``).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x.bin")
        >>> atomic_write_bytes(p, b"abc"); open(p, "rb").read()
        b'abc'
    """
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically.

    Example:
        >>> import tempfile, os, json
        >>> p = os.path.join(tempfile.mkdtemp(), "m.json")
        >>> atomic_write_json(p, {"a": 1}); json.load(open(p))
        {'a': 1}
    """
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def checkpoint_path(ckpt_dir: PathLike, stage: int) -> Path:
    """Path of the checkpoint of ``stage`` in ``ckpt_dir``: ``{ckpt_dir}/stage{stage}.pt``.

    Example:
        >>> checkpoint_path("ckpt", 2).as_posix()
        'ckpt/stage2.pt'
    """
    return Path(ckpt_dir) / f"stage{int(stage)}.pt"


def rng_state() -> Dict[str, Any]:
    """RNG states of Python's ``random``, torch's CPU generator and (when present) every CUDA device."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore states captured by :func:`rng_state` (CUDA states only when this process uses CUDA)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: PathLike, *, student_state: dict, optimizer_state: Optional[dict],
                    scheduler_state: Optional[dict], step: int, config: dict, metrics: dict, done: bool,
                    stage: int, sharded: bool = False) -> None:
    """Write one stage checkpoint atomically (see the module docstring for its contents).

    Args:
        path: target file (e.g. :func:`checkpoint_path`).
        student_state: full state dict of the student (tensors are saved on the CPU).
        optimizer_state: optimizer state dict, or None (finished stage).
        scheduler_state: LR-scheduler state dict, or None.
        step: optimizer steps finished.
        config: the training config as a plain dict.
        metrics: metrics collected so far (restored on resume).
        done: whether the stage has finished.
        stage: the stage number.
        sharded: whether ``optimizer_state`` is an FSDP full state dict (keys are parameter names).
    """
    blob = {"version": CHECKPOINT_VERSION, "stage": int(stage), "step": int(step), "done": bool(done),
            "student": {k: v.detach().cpu() for k, v in student_state.items()},
            "optimizer": optimizer_state, "scheduler": scheduler_state, "rng": rng_state(),
            "config": dict(config), "metrics": metrics, "optimizer_format": "fsdp-full" if sharded else "plain"}
    atomic_torch_save(blob, path)


def load_checkpoint(path: PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors on the CPU).

    Raises:
        ValueError: the file is not a stage checkpoint of this version.
    """
    blob = torch.load(str(path), map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or blob.get("version") != CHECKPOINT_VERSION or "student" not in blob:
        raise ValueError(f"checkpoint {path} must be a fastattn distillation checkpoint (version "
                         f"{CHECKPOINT_VERSION}), got {type(blob).__name__} with version "
                         f"{blob.get('version') if isinstance(blob, dict) else None!r}")
    return blob


def save_qwen3_teacher(model, path: PathLike) -> None:
    """Write an all-attention :class:`~fastattn.models.HybridLM` as a Hugging Face Qwen3 checkpoint.

    The directory gets ``config.json`` (``model_type: qwen3`` with the Qwen3 keys) and
    ``model.safetensors`` with Hugging Face parameter names (``model.layers.{i}.self_attn.q_proj.weight``
    ...; a tied model stores the embedding once), which :func:`fastattn.models.convert_qwen3` reads back.

    Args:
        model: a HybridLM whose every layer is ``attention``.
        path: output directory (created if needed; files with the same names are replaced).

    Example:
        >>> import tempfile
        >>> from fastattn.models import HybridConfig, HybridLM, convert_qwen3
        >>> cfg = HybridConfig.from_preset("attention", vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        ...                                head_dim=16)
        >>> d = tempfile.mkdtemp()
        >>> save_qwen3_teacher(HybridLM(cfg), d)
        >>> convert_qwen3(d, "hybrid-kda").config.layer_types
        ('attention', 'kda')
    """
    from ..models import HybridLM
    from ..models.io import _safetensors
    if not isinstance(model, HybridLM):
        raise TypeError(f"model must be a fastattn.models.HybridLM, got {type(model).__name__}")
    cfg = model.config
    if any(t != "attention" for t in cfg.layer_types):
        raise ValueError(f"model must have only attention layers to be saved as Qwen3, got layer_types "
                         f"{cfg.layer_types}")
    hf = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
          "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
          "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
          "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
          "max_position_embeddings": cfg.max_position_embeddings, "attention_bias": cfg.attention_bias,
          "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_word_embeddings, "use_sliding_window": False,
          "torch_dtype": str(model.dtype).replace("torch.", "")}
    for key in ("bos_token_id", "pad_token_id"):
        if getattr(cfg, key) is not None:
            hf[key] = getattr(cfg, key)
    if cfg.eos_token_id is not None:
        eos = list(cfg.eos_token_id)
        hf["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    state = {}
    for name, tensor in model.state_dict().items():
        hf_name = name.replace(".mixer.", ".self_attn.")
        state[hf_name if hf_name.startswith("lm_head.") else "model." + hf_name] = tensor.detach().cpu().contiguous()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    st = _safetensors()
    atomic_write_json(out / "config.json", hf)
    _atomic_write(out / "model.safetensors",
                  lambda f: f.write(st.save(state, metadata={"format": "pt"})))
