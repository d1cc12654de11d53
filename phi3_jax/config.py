"""The model configuration: one frozen, hashable dataclass built from a checkpoint's config.json.

Hashable (tuples, not lists) so that it can be a static argument under `jax.jit`. Every field is
validated, type and range, in `__post_init__` (and the config.json keys that are not fields in
`_from_dict`), and each error names the config.json field at fault, because a wrong config
otherwise crashes far from its cause or shows up as silently wrong logits. Booleans are not
integers here; sizes and token ids must fit the int32 the device computes them in; token ids
(bos, eos, pad) must lie in [0, vocab_size).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from typing import Any

from phi3_jax import textio
from phi3_jax.checkpoint_files import checkpoint_file

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


# Sizes, positions and token ids are int32 on device.
MAX_INT = 2**31 - 1
# transformers' Phi3Config default, taken when config.json has no eos_token_id and the
# vocabulary holds that id.
_DEFAULT_EOS = 32000


class ConfigError(ValueError):
    """A config.json field is missing, unsupported or inconsistent."""


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON's true is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if not is_int(value) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"config field {name!r} must be {what}, got {value!r:.100}")
    if value > MAX_INT:
        raise ConfigError(f"config field {name!r} is {value}, more than phi3-jax supports "
                          f"({MAX_INT})")
    return value


def _positive_number(name: str, value: Any, at_most: float | None = None) -> float:
    if not is_number(value) or value <= 0 or (at_most is not None and value > at_most):
        what = f"a number in (0, {at_most}]" if at_most is not None else "a positive number"
        raise ConfigError(f"config field {name!r} must be {what}, got {value!r:.100}")
    return float(value)


def _token_id(name: str, value: Any, vocab_size: int) -> int:
    if not is_int(value) or not 0 <= value < vocab_size:
        raise ConfigError(f"config field {name!r} holds {value!r:.100}, which is not a token id "
                          f"(an integer in [0, vocab_size = {vocab_size}))")
    return value


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
    eos_token_id: tuple[int, ...] = ()  # from_hf: transformers' 32000 when config.json has none
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
            _positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config field 'hidden_size' ({self.hidden_size}) must be divisible by "
                f"'num_attention_heads' ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) must be "
                f"divisible by 'num_key_value_heads' ({self.num_key_value_heads})")
        # Frozen: normalised values (ints given for floats, lists for tuples) are set this way.
        normalise = functools.partial(object.__setattr__, self)
        normalise("partial_rotary_factor",
                  _positive_number("partial_rotary_factor", self.partial_rotary_factor, 1.0))
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ConfigError(f"config fields 'partial_rotary_factor' x head_dim give a rotary "
                              f"width of {self.rotary_dim}; it must be even and positive")
        normalise("rms_norm_eps", _positive_number("rms_norm_eps", self.rms_norm_eps))
        normalise("rope_theta", _positive_number("rope_theta", self.rope_theta))
        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window)
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"config field 'tie_word_embeddings' must be true or false, got "
                              f"{self.tie_word_embeddings!r:.100}")
        for name in ("bos_token_id", "pad_token_id"):
            if getattr(self, name) is not None:
                _token_id(name, getattr(self, name), self.vocab_size)
        if not isinstance(self.eos_token_id, tuple | list):
            raise ConfigError(f"config field 'eos_token_id' must be a token id or a list of "
                              f"them, got {self.eos_token_id!r:.100}")
        normalise("eos_token_id", tuple(_token_id("eos_token_id", i, self.vocab_size)
                                        for i in self.eos_token_id))
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
                for i, f in enumerate(factors):
                    if not is_number(f) or f <= 0:
                        raise ConfigError(f"config field 'rope_scaling.{name}' must hold "
                                          f"positive finite numbers; entry {i} is {f!r:.100}")
            _positive_int("original_max_position_embeddings",
                          rs.original_max_position_embeddings, minimum=2)
            _positive_number("rope_scaling.attention_factor", rs.attention_factor)

    # ---- construction ----
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> Phi3Config:
        """Builds the config from a Hugging Face config.json (a folder, the file, or its dict)."""
        if isinstance(path_or_dict, Mapping):
            raw = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = checkpoint_file(path, "config.json", what="config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path}")
            raw = textio.read_json_file(path, error=ConfigError)
        return cls._from_dict(raw)

    @classmethod
    def _from_dict(cls, raw: Mapping[str, Any]) -> Phi3Config:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config.json must hold a JSON object, got {textio.json_type(raw)}")
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            what = (f" ({_RELATIVES[model_type]})"
                    if isinstance(model_type, str) and model_type in _RELATIVES else "")
            raise ConfigError(
                f"config field 'model_type' is {model_type!r:.100}{what}, which phi3-jax does not "
                f"support; supported: {', '.join(SUPPORTED_MODEL_TYPES)} (Phi-3-mini/medium 4k and "
                f"128k, Phi-3.5-mini, Phi-4, Phi-4-mini, Phi-4-mini-reasoning)")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in raw:
                raise ConfigError(f"config.json lacks the required field {key!r}")
            _positive_int(key, raw[key])
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ConfigError(f"config field 'hidden_act' is {hidden_act!r:.100}; Phi-3 uses "
                              f"'silu'")
        head_dim = raw.get("head_dim")
        if head_dim is not None and (not is_int(head_dim) or head_dim
                                     != raw["hidden_size"] // raw["num_attention_heads"]):
            raise ConfigError(f"config field 'head_dim' ({head_dim!r:.100}) must equal "
                              f"hidden_size // num_attention_heads")
        for key in ("attention_bias", "mlp_bias", "lm_head_bias"):
            if raw.get(key) is True:
                raise ConfigError(f"config field {key!r} is true; Phi-3 checkpoints have no biases")
            if raw.get(key) not in (None, False):
                raise ConfigError(f"config field {key!r} must be true or false, got "
                                  f"{raw.get(key)!r:.100}")
        for key in ("rope_scaling", "rope_parameters"):
            if raw.get(key) is not None and not isinstance(raw.get(key), Mapping):
                raise ConfigError(f"config field {key!r} must be an object or null, got "
                                  f"{raw.get(key)!r:.100}")
        if raw.get("original_max_position_embeddings") is not None:
            _positive_int("original_max_position_embeddings",
                          raw["original_max_position_embeddings"], minimum=2)

        rope = raw.get("rope_scaling") or raw.get("rope_parameters")
        partial = raw.get("partial_rotary_factor")
        if isinstance(rope, Mapping) and partial is None:
            partial = rope.get("partial_rotary_factor")
        theta = raw.get("rope_theta")
        if theta is None and isinstance(rope, Mapping):
            theta = rope.get("rope_theta")
        max_pos = _positive_int("max_position_embeddings",
                                raw.get("max_position_embeddings", 4096))
        vocab_size = raw["vocab_size"]
        eos = raw.get("eos_token_id", _DEFAULT_EOS if vocab_size > _DEFAULT_EOS else None)
        eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        kv_heads = raw.get("num_key_value_heads")
        try:
            return cls(
                vocab_size=vocab_size,
                hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"],
                num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=raw["num_attention_heads"],
                num_key_value_heads=raw["num_attention_heads"] if kv_heads is None else kv_heads,
                max_position_embeddings=max_pos,
                rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
                rope_theta=theta if theta is not None else 10000.0,
                partial_rotary_factor=partial if partial is not None else 1.0,
                rope_scaling=_parse_rope_scaling(rope, raw, max_pos),
                sliding_window=raw.get("sliding_window"),
                tie_word_embeddings=(False if raw.get("tie_word_embeddings") is None
                                     else raw["tie_word_embeddings"]),
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
        raise ConfigError(f"config field 'rope_scaling.type' is {kind!r:.100}; supported: "
                          f"{', '.join(_LONGROPE_ALIASES)} (legacy names of LongRoPE) or 'default'")
    for name in ("short_factor", "long_factor"):
        factors = rope.get(name)
        if not isinstance(factors, list):
            raise ConfigError(f"config field 'rope_scaling.{name}' must be a list of numbers, "
                              f"got {factors!r:.100}")
        for i, f in enumerate(factors):
            if not is_number(f) or f <= 0:
                raise ConfigError(f"config field 'rope_scaling.{name}' must hold positive finite "
                                  f"numbers; entry {i} is {f!r:.100}")
    original = rope.get("original_max_position_embeddings",
                        raw.get("original_max_position_embeddings"))
    if original is None:
        raise ConfigError("config field 'original_max_position_embeddings' is required with "
                          "LongRoPE (top level or inside 'rope_scaling')")
    # LongRoPE divides by log(original): 1 (or 0) would divide by zero.
    original = _positive_int("original_max_position_embeddings", original, minimum=2)
    attention_factor = rope.get("attention_factor")
    if attention_factor is not None:
        attention_factor = _positive_number("rope_scaling.attention_factor", attention_factor)
    else:
        # transformers v5 takes the scale from `factor` when present, else max / original.
        factor = rope.get("factor")
        if factor is not None:
            factor = _positive_number("rope_scaling.factor", factor)
        if factor is not None and factor > 1.0:
            attention_factor = math.sqrt(1.0 + math.log(factor) / math.log(original))
        else:
            attention_factor = longrope_attention_factor(max_pos, original)
    return RopeScaling(
        short_factor=tuple(float(x) for x in rope["short_factor"]),
        long_factor=tuple(float(x) for x in rope["long_factor"]),
        original_max_position_embeddings=original,
        attention_factor=float(attention_factor),
    )


# The generation_config.json fields phi3-jax reads, with the values each may take: checked at
# load, so that a bad one is reported against the file, not deep inside generate.
def _optional_positive_int(value: Any) -> bool:
    return value is None or (is_int(value) and 1 <= value <= MAX_INT)


_GENERATION_FIELDS: dict[str, tuple[str, Any]] = {
    "do_sample": ("true, false or null", lambda v: v is None or isinstance(v, bool)),
    "max_new_tokens": ("a positive integer or null", _optional_positive_int),
    "max_length": ("a positive integer or null", _optional_positive_int),
    "temperature": ("a number >= 0 or null", lambda v: v is None or (is_number(v) and v >= 0)),
    "top_k": ("an integer >= 0 or null",
              lambda v: v is None or (is_int(v) and 0 <= v <= MAX_INT)),
    "top_p": ("a number in [0, 1] or null", lambda v: v is None or (is_number(v)
                                                                   and 0 <= v <= 1)),
    "min_p": ("a number in [0, 1] or null", lambda v: v is None or (is_number(v)
                                                                   and 0 <= v <= 1)),
    "repetition_penalty": ("a number > 0 or null",
                           lambda v: v is None or (is_number(v) and v > 0)),
}
_GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def read_generation_config(path: str | os.PathLike,
                           vocab_size: int | None = None) -> dict[str, Any]:
    """The checkpoint's generation_config.json (sampling defaults, eos ids), or {} without one.

    The fields phi3-jax uses are checked (types and ranges; token ids, when `vocab_size` is
    given, in [0, vocab_size)); a bad one raises ConfigError naming the file and the field."""
    file = checkpoint_file(path, "generation_config.json", what="generation_config.json")
    if not os.path.isfile(file):
        return {}
    raw = textio.read_json_file(file, error=ConfigError)
    for name, (what, ok) in _GENERATION_FIELDS.items():
        if name in raw and not ok(raw[name]):
            raise ConfigError(f"{file}: field {name!r} must be {what}, got {raw[name]!r:.100}")
    for name in _GENERATION_IDS:
        value = raw.get(name)
        if value is None:
            continue
        ids = value if name == "eos_token_id" and isinstance(value, list) else [value]
        for i in ids:
            if not is_int(i) or not 0 <= i < (vocab_size or MAX_INT + 1):
                bound = f"vocab_size = {vocab_size}" if vocab_size else MAX_INT + 1
                raise ConfigError(f"{file}: field {name!r} holds {i!r:.100}, which is not a "
                                  f"token id (an integer in [0, {bound}))")
    return raw
