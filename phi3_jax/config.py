"""The model configuration: one frozen, hashable dataclass built from a checkpoint's config.json.

Hashable (tuples, not lists) so that it can be a static argument under `jax.jit`. Every field is
validated in `__post_init__`, and each error names the config.json field at fault, because a
wrong config otherwise shows up much later as silently wrong logits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

SUPPORTED_MODEL_TYPES = ("phi3",)

# Relatives with other architectures: named here so the error can say why they are refused.
_RELATIVES = {
    "phi3small": "Phi-3-small (GEGELU, LayerNorm, block-sparse attention)",
    "phimoe": "Phi-3.5-MoE (mixture of experts)",
    "phi3_v": "Phi-3-vision (image encoder)",
    "phi4mm": "Phi-4-multimodal (vision and speech encoders)",
    "phi": "Phi-1/Phi-2 (parallel attention, LayerNorm)",
}

# transformers (>= 4.43) maps the legacy LongRoPE names onto "longrope"; so do we.
_LONGROPE_ALIASES = ("longrope", "su", "yarn")


class ConfigError(ValueError):
    """A config.json field is missing, unsupported or inconsistent."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """LongRoPE parameters (spec section 2). Factor tuples have length rotary_dim // 2."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    # Multiplies both cos and sin in both regimes; depends on the config only, never on length.
    attention_factor: float


@dataclasses.dataclass(frozen=True)
class Phi3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (32000,)
    pad_token_id: int | None = None

    # ---- derived sizes (the einsum glossary's letters) ----
    @property
    def head_dim(self) -> int:  # H
        return self.hidden_size // self.num_attention_heads

    @property
    def group_size(self) -> int:  # G: query heads per KV head
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def original_max_position_embeddings(self) -> int:
        if self.rope_scaling is None:
            return self.max_position_embeddings
        return self.rope_scaling.original_max_position_embeddings

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, "
                                  f"got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config field 'hidden_size' ({self.hidden_size}) must be divisible by "
                f"'num_attention_heads' ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) must be "
                f"divisible by 'num_key_value_heads' ({self.num_key_value_heads})")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"config field 'partial_rotary_factor' must be in (0, 1], "
                              f"got {self.partial_rotary_factor}")
        if self.rotary_dim % 2:
            raise ConfigError(f"config fields 'partial_rotary_factor' x head_dim give an odd "
                              f"rotary width ({self.rotary_dim}); it must be even")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"config field 'rms_norm_eps' must be positive, "
                              f"got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ConfigError(f"config field 'rope_theta' must be positive, got {self.rope_theta}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"config field 'sliding_window' must be positive or null, "
                              f"got {self.sliding_window}")
        rs = self.rope_scaling
        if rs is not None:
            half = self.rotary_dim // 2
            for name in ("short_factor", "long_factor"):
                factors = getattr(rs, name)
                if len(factors) != half:
                    raise ConfigError(
                        f"config field 'rope_scaling.{name}' has {len(factors)} entries; it must "
                        f"have rotary_dim // 2 = {half} (head_dim {self.head_dim} x "
                        f"partial_rotary_factor {self.partial_rotary_factor} / 2)")
                if any(not math.isfinite(f) or f <= 0 for f in factors):
                    raise ConfigError(f"config field 'rope_scaling.{name}' must hold positive "
                                      f"finite numbers")
            if rs.original_max_position_embeddings <= 0:
                raise ConfigError("config field 'original_max_position_embeddings' must be "
                                  "positive")

    # ---- construction ----
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> Phi3Config:
        """Builds the config from a Hugging Face config.json (a folder, the file, or its dict)."""
        if isinstance(path_or_dict, Mapping):
            raw = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path}")
            with open(path) as f:
                try:
                    raw = json.load(f)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls._from_dict(raw)

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> Phi3Config:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            what = f" ({_RELATIVES[model_type]})" if model_type in _RELATIVES else ""
            raise ConfigError(
                f"config field 'model_type' is {model_type!r}{what}, which phi3-jax does not "
                f"support; supported: {', '.join(SUPPORTED_MODEL_TYPES)} (Phi-3-mini/medium 4k and "
                f"128k, Phi-3.5-mini, Phi-4, Phi-4-mini, Phi-4-mini-reasoning)")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in raw:
                raise ConfigError(f"config.json lacks the required field {key!r}")
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ConfigError(f"config field 'hidden_act' is {hidden_act!r}; Phi-3 uses 'silu'")
        if raw.get("head_dim") not in (None, raw["hidden_size"] // raw["num_attention_heads"]):
            raise ConfigError("config field 'head_dim' must equal "
                              "hidden_size // num_attention_heads")
        for key in ("attention_bias", "mlp_bias", "lm_head_bias"):
            if raw.get(key):
                raise ConfigError(f"config field {key!r} is true; Phi-3 checkpoints have no biases")

        rope = raw.get("rope_scaling") or raw.get("rope_parameters")
        partial = raw.get("partial_rotary_factor")
        if isinstance(rope, Mapping) and partial is None:
            partial = rope.get("partial_rotary_factor")
        partial = float(partial if partial is not None else 1.0)
        theta = raw.get("rope_theta")
        if theta is None and isinstance(rope, Mapping):
            theta = rope.get("rope_theta")
        max_pos = raw.get("max_position_embeddings", 4096)
        eos = raw.get("eos_token_id", 32000)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        try:
            return cls(
                vocab_size=raw["vocab_size"],
                hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"],
                num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=raw["num_attention_heads"],
                num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
                max_position_embeddings=max_pos,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta if theta is not None else 10000.0),
                partial_rotary_factor=partial,
                rope_scaling=_parse_rope_scaling(rope, raw, max_pos),
                sliding_window=raw.get("sliding_window"),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_id=eos,
                pad_token_id=raw.get("pad_token_id"),
            )
        except ConfigError as e:
            if raw.get("rope_scaling") or not raw.get("rope_parameters"):
                raise
            # Our field is called rope_scaling; name the key this config.json actually uses.
            raise ConfigError(str(e).replace("'rope_scaling", "'rope_parameters")) from e

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict transformers' Phi3Config reads (v4 layout, which v5 also reads)."""
        out: dict[str, Any] = {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (self.eos_token_id[0] if len(self.eos_token_id) == 1
                             else list(self.eos_token_id)),
            "pad_token_id": self.pad_token_id,
            "rope_scaling": None,
        }
        if self.rope_scaling is not None:
            out["rope_scaling"] = {
                "type": "longrope",
                "short_factor": list(self.rope_scaling.short_factor),
                "long_factor": list(self.rope_scaling.long_factor),
            }
        return out


def longrope_attention_factor(max_pos: int, original_max: int) -> float:
    """The LongRoPE magnitude factor: sqrt(1 + ln(s) / ln(original_max)), s = max / original."""
    scale = max_pos / original_max
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(scale) / math.log(original_max))


def _parse_rope_scaling(rope: Any, raw: Mapping[str, Any], max_pos: int) -> RopeScaling | None:
    if rope is None:
        return None
    if not isinstance(rope, Mapping):
        raise ConfigError(f"config field 'rope_scaling' must be an object or null, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type"))
    if kind == "default":
        return None
    if kind not in _LONGROPE_ALIASES:
        raise ConfigError(f"config field 'rope_scaling.type' is {kind!r}; supported: "
                          f"{', '.join(_LONGROPE_ALIASES)} (legacy names of LongRoPE) or 'default'")
    for name in ("short_factor", "long_factor"):
        if not isinstance(rope.get(name), (list, tuple)):
            raise ConfigError(f"config field 'rope_scaling.{name}' must be a list of numbers")
    original = rope.get("original_max_position_embeddings",
                        raw.get("original_max_position_embeddings"))
    if original is None:
        raise ConfigError("config field 'original_max_position_embeddings' is required with "
                          "LongRoPE (top level or inside 'rope_scaling')")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        # transformers v5 takes the scale from `factor` when present, else max / original.
        factor = rope.get("factor")
        if factor is not None and factor > 1.0:
            attention_factor = math.sqrt(1.0 + math.log(factor) / math.log(original))
        else:
            attention_factor = longrope_attention_factor(max_pos, original)
    return RopeScaling(
        short_factor=tuple(float(x) for x in rope["short_factor"]),
        long_factor=tuple(float(x) for x in rope["long_factor"]),
        original_max_position_embeddings=int(original),
        attention_factor=float(attention_factor),
    )
