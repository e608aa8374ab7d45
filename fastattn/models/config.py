"""Model configuration: the Qwen3 block shape, which mixer each layer uses, and the presets.

Layer map rule (``hybrid_layer_map``): Hybrid-KDA keeps softmax attention at layers
``REFERENCE_ATTENTION_LAYERS = (0, 2, 6, 11, 13, 18, 21)`` of 28. For depth L it keeps
``n = max(1, round(7 * L / 28))`` attention layers. The j-th kept layer (j = 0..n-1) sits at
``round(p(j * 6 / (n - 1)) * (L - 1))``, where p is the piecewise-linear interpolation of the reference
positions' depth fractions ``layer / 27`` over their rank 0..6 (n = 1 keeps layer 0 only). A position that
is already taken moves to the next free layer. L = 28 gives the reference map exactly; layer 0 is always kept.
"""
import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

MIXERS = ("attention", "kda", "eva")
PRESETS = ("attention", "hybrid-kda", "eva", "hybrid-kda-eva")
REFERENCE_ATTENTION_LAYERS = (0, 2, 6, 11, 13, 18, 21)
REFERENCE_DEPTH = 28
CONV_ACTIVATIONS = ("identity", "silu")
EVA_LOCAL = ("block", "sliding")


def hybrid_layer_map(num_layers: int) -> Tuple[int, ...]:
    """Indices of the layers that keep softmax attention in a Hybrid-KDA model of ``num_layers`` layers.

    Follows the rule in this module's docstring; ``hybrid_layer_map(28) == (0, 2, 6, 11, 13, 18, 21)``.

    Example:
        >>> hybrid_layer_map(28), hybrid_layer_map(8), hybrid_layer_map(4)
        ((0, 2, 6, 11, 13, 18, 21), (0, 5), (0,))
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    ref = REFERENCE_ATTENTION_LAYERS
    n = max(1, round(len(ref) * num_layers / REFERENCE_DEPTH))
    n = min(n, num_layers)
    fractions = [layer / (REFERENCE_DEPTH - 1) for layer in ref]
    kept = []
    for j in range(n):
        rank = 0.0 if n == 1 else j * (len(ref) - 1) / (n - 1)
        lo = min(int(math.floor(rank)), len(ref) - 2)
        frac = fractions[lo] + (rank - lo) * (fractions[lo + 1] - fractions[lo])
        pos = int(round(frac * (num_layers - 1)))
        while pos in kept:
            pos += 1
        kept.append(pos)
    return tuple(sorted(kept))


def preset_layer_types(preset: str, num_layers: int) -> Tuple[str, ...]:
    """Per-layer mixer names of a preset (``attention``, ``hybrid-kda``, ``eva``, ``hybrid-kda-eva``)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if preset == "attention":
        return ("attention",) * num_layers
    if preset == "eva":
        return ("eva",) * num_layers
    kept = set(hybrid_layer_map(num_layers))
    keep_as = "attention" if preset == "hybrid-kda" else "eva"
    return tuple(keep_as if i in kept else "kda" for i in range(num_layers))


def _int_field(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"config.{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"config.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class HybridConfig:
    """Shape of a Qwen3-style decoder and the mixer of each layer.

    Defaults are Qwen3-0.6B's shape (28 layers, hidden 1024, 16/8 heads of 128, MLP 3072, vocab 151936,
    RoPE theta 1e6, tied embeddings) with every layer ``attention``. ``layer_types`` lists one of
    ``attention`` | ``kda`` | ``eva`` per layer (None means all attention).

    KDA options: ``kda_conv_size`` (short causal conv width), ``kda_conv_activation`` (``identity`` keeps
    the identity-initialised conv a no-op; ``silu`` as in Kimi Linear), ``kda_gate_rank`` (rank of the
    low-rank forget/output gates, default head_dim), ``kda_lower_bound`` (None: softplus gate; else the
    bounded gate in [-5, 0)), ``kda_chunk_size``. EVA options: ``eva_window_size``, ``eva_chunk_size``
    (window a multiple of chunk), ``eva_local`` (``block`` | ``sliding``).

    Example:
        >>> cfg = HybridConfig.from_preset("hybrid-kda")
        >>> cfg.layer_types.count("attention"), cfg.num_hidden_layers
        (7, 28)
    """
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    layer_types: Optional[Tuple[str, ...]] = None
    kda_conv_size: int = 4
    kda_conv_activation: str = "identity"
    kda_gate_rank: Optional[int] = None
    kda_lower_bound: Optional[float] = None
    kda_chunk_size: int = 64
    eva_window_size: int = 2048
    eva_chunk_size: int = 16
    eva_local: str = "block"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Tuple[int, ...]] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                     "kda_conv_size", "kda_chunk_size", "eva_window_size", "eva_chunk_size"):
            _int_field(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"config.num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config.head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.head_dim > 256:
            raise ValueError(f"config.head_dim must be <= 256 (KDA/EVA kernels), got {self.head_dim}")
        if not (self.rms_norm_eps > 0):
            raise ValueError(f"config.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0):
            raise ValueError(f"config.rope_theta must be > 0, got {self.rope_theta!r}")
        types = self.layer_types
        if types is None:
            types = ("attention",) * self.num_hidden_layers
        if isinstance(types, str) or not isinstance(types, Sequence):
            raise TypeError(f"config.layer_types must be a sequence of mixer names, got {types!r}")
        types = tuple(types)
        if len(types) != self.num_hidden_layers:
            raise ValueError(f"config.layer_types must have num_hidden_layers={self.num_hidden_layers} entries, "
                             f"got {len(types)}")
        for i, t in enumerate(types):
            if t not in MIXERS:
                raise ValueError(f"config.layer_types[{i}] must be one of {MIXERS}, got {t!r}")
        object.__setattr__(self, "layer_types", types)
        if self.kda_conv_activation not in CONV_ACTIVATIONS:
            raise ValueError(f"config.kda_conv_activation must be one of {CONV_ACTIVATIONS}, "
                             f"got {self.kda_conv_activation!r}")
        if self.kda_gate_rank is not None:
            _int_field("kda_gate_rank", self.kda_gate_rank)
        if self.kda_lower_bound is not None and not (-5.0 <= self.kda_lower_bound < 0.0):
            raise ValueError(f"config.kda_lower_bound must be None or in [-5, 0), got {self.kda_lower_bound!r}")
        if self.kda_chunk_size not in (16, 32, 64):
            raise ValueError(f"config.kda_chunk_size must be one of (16, 32, 64), got {self.kda_chunk_size}")
        if self.eva_window_size % self.eva_chunk_size:
            raise ValueError(f"config.eva_window_size ({self.eva_window_size}) must be a multiple of "
                             f"config.eva_chunk_size ({self.eva_chunk_size})")
        if self.eva_local not in EVA_LOCAL:
            raise ValueError(f"config.eva_local must be one of {EVA_LOCAL}, got {self.eva_local!r}")
        eos = self.eos_token_id
        if eos is not None:
            eos = (eos,) if isinstance(eos, int) else tuple(int(e) for e in eos)
            object.__setattr__(self, "eos_token_id", eos)
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < self.vocab_size):
                raise ValueError(f"config.{name} must be in [0, vocab_size={self.vocab_size}), got {value}")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def gate_rank(self) -> int:
        """Rank of the KDA low-rank gates (``kda_gate_rank`` or head_dim)."""
        return self.kda_gate_rank or self.head_dim

    def count(self, mixer: str) -> int:
        """Number of layers whose mixer is ``mixer``."""
        return self.layer_types.count(mixer)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "HybridConfig":
        """Config of a preset (``attention``, ``hybrid-kda``, ``eva``, ``hybrid-kda-eva``).

        ``overrides`` set any other field (shape, KDA/EVA options); the layer map is scaled to
        ``num_hidden_layers`` (see :func:`hybrid_layer_map`). Passing ``layer_types`` is an error.
        """
        if "layer_types" in overrides:
            raise ValueError("from_preset derives layer_types from the preset; pass layer_types to HybridConfig")
        depth = overrides.get("num_hidden_layers", cls.num_hidden_layers)
        _int_field("num_hidden_layers", depth)
        return cls(layer_types=preset_layer_types(preset, depth), **overrides)

    def with_preset(self, preset: str) -> "HybridConfig":
        """Same shape and options, with the layer map of ``preset``."""
        return dataclasses.replace(self, layer_types=preset_layer_types(preset, self.num_hidden_layers))

    def replace(self, **changes) -> "HybridConfig":
        """Copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain-JSON dict (``model_type: fastattn-hybrid``) that :meth:`from_dict` reads back."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["layer_types"] = list(self.layer_types)
        if self.eos_token_id is not None:
            d["eos_token_id"] = list(self.eos_token_id)
        d["model_type"] = "fastattn-hybrid"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HybridConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        d = dict(d)
        model_type = d.pop("model_type", "fastattn-hybrid")
        if model_type != "fastattn-hybrid":
            raise ValueError(f"config model_type must be 'fastattn-hybrid', got {model_type!r} "
                             "(use fastattn.models.convert_qwen3 for Qwen3 teachers)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; expected a subset of {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


__all__ = ["HybridConfig", "hybrid_layer_map", "preset_layer_types", "PRESETS", "MIXERS",
           "REFERENCE_ATTENTION_LAYERS"]
