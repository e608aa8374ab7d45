"""Reading and writing checkpoints: a directory with config.json and safetensors files."""
import json
import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from .config import HybridConfig

PathLike = Union[str, os.PathLike]
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # the `models` extra
        raise ImportError("reading and writing checkpoints needs the safetensors package: "
                          "pip install safetensors (or fastattn[models])") from e
    return st


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a checkpoint directory holds config.json + safetensors)")
    with open(path) as f:
        return json.load(f)


def read_safetensors_dir(path: PathLike) -> Dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors``, of the shards named by ``model.safetensors.index.json``, or of
    every ``*.safetensors`` file in directory ``path``."""
    st = _safetensors()
    path = Path(path)
    if (path / INDEX_NAME).is_file():
        files = sorted(set(read_json(path / INDEX_NAME)["weight_map"].values()))
    elif (path / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path} (expected {WEIGHTS_NAME} or {INDEX_NAME})")
    state: Dict[str, torch.Tensor] = {}
    for name in files:
        state.update(st.load_file(str(path / name)))
    return state


def save_pretrained(model, path: PathLike) -> None:
    """Write ``config.json`` (``HybridConfig.to_dict``) and ``model.safetensors`` into directory ``path``."""
    st = _safetensors()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w") as f:
        f.write(model.config.to_json())
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    st.save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})


def load_pretrained(path: PathLike, *, dtype: Optional[torch.dtype] = None,
                    device: Union[str, torch.device, None] = None):
    """Build a :class:`~fastattn.models.HybridLM` from a directory written by :func:`save_pretrained`.

    ``dtype`` defaults to the stored dtype of the embedding; ``device`` to the CPU.
    """
    from .model import HybridLM
    path = Path(path)
    config = HybridConfig.from_dict(read_json(path / "config.json"))
    state = read_safetensors_dir(path)
    model = HybridLM(config)
    load_state(model, state, what=str(path))
    if dtype is None:
        dtype = state["embed_tokens.weight"].dtype
    return model.to(device=device, dtype=dtype)


def load_state(model, state: Dict[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with a ValueError naming missing/unexpected/bad keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad:
        details = [f"missing keys {missing[:8]}" if missing else "", f"unexpected keys {unexpected[:8]}"
                   if unexpected else "", "shape mismatches " + ", ".join(
                       f"{k}: expected {tuple(own[k].shape)}, got {tuple(state[k].shape)}" for k in bad[:8])
                   if bad else ""]
        raise ValueError(f"weights in {what} do not match the config: " + "; ".join(d for d in details if d))
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(v.dtype))
