"""One request's generation settings: a frozen, validated dataclass shared by the Python API,
the CLI and the server.

Fields left None take the checkpoint's defaults (`resolve`): sampling settings come from its
generation_config.json when that sets `do_sample`, as in transformers' `generate`; otherwise
decoding is greedy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

ROPE_POLICIES = ("per_sequence", "always_long")
MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's API allows
DEFAULT_MAX_NEW_TOKENS = 256
SEED_RANGE = (-(2**63), 2**64)  # int64 or uint64, as OpenAI-style clients send them


class SettingsError(ValueError):
    """A generation setting of the wrong type or out of range; the message names it."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How to continue one prompt.

    max_new_tokens: at most this many new tokens; clamped to what the context has room for.
    temperature: 0 = greedy; > 0 samples. top_k (0 = off), top_p (1 = off), min_p (0 = off) and
    repetition_penalty (1 = off) follow transformers' processors and their order; with
    temperature 0 only the penalty applies, as there.
    seed: the request's random stream; None draws a fresh one. The same seed gives the same
    samples whatever else runs beside the request.
    stop: strings that end the output (the text is cut before them). stop_token_ids: ids that
    end it besides the checkpoint's eos ids; ignore_eos drops the eos ids (not these).
    logprobs: None, or how many alternatives (0..20) to return with each new token's logprob.
    prompt_logprobs: None, or the same for every prompt token after the first (echo, scoring).
    rope_policy: "per_sequence" (transformers' LongRoPE choice, re-prefilling a sequence that
    grows past original_max_position_embeddings) or "always_long" (vLLM's, no re-prefill).
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    rope_policy: str = "per_sequence"

    def __post_init__(self) -> None:
        set_ = _setter(self)
        if isinstance(self.stop, str):
            set_("stop", (self.stop,))
        elif self.stop is None:
            set_("stop", ())
        elif isinstance(self.stop, Sequence):
            set_("stop", tuple(self.stop))
        else:
            raise SettingsError(f"stop must be a string or a list of strings, got "
                                f"{type(self.stop).__name__}")
        if self.stop_token_ids is None:
            set_("stop_token_ids", ())
        elif isinstance(self.stop_token_ids, Sequence) and not isinstance(self.stop_token_ids,
                                                                           str):
            set_("stop_token_ids", tuple(self.stop_token_ids))
        else:
            raise SettingsError("stop_token_ids must be a list of token ids")
        self._validate()

    def _validate(self) -> None:
        n = self.max_new_tokens
        if n is not None and (not _is_int(n) or n < 1):
            raise SettingsError(f"max_new_tokens must be a positive integer, got {n!r}")
        t = self.temperature
        if t is not None and (not _is_real(t) or not math.isfinite(t) or t < 0):
            raise SettingsError(f"temperature must be a finite number >= 0 (0 = greedy), "
                                f"got {t!r}")
        k = self.top_k
        if k is not None and (not _is_int(k) or k < 0):
            raise SettingsError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        for name in ("top_p", "min_p"):
            p = getattr(self, name)
            if p is not None and (not _is_real(p) or not 0.0 <= p <= 1.0):
                raise SettingsError(f"{name} must be a number in [0, 1], got {p!r}")
        r = self.repetition_penalty
        if r is not None and (not _is_real(r) or not math.isfinite(r) or r <= 0):
            raise SettingsError(f"repetition_penalty must be a finite number > 0 (1 = off), "
                                f"got {r!r}")
        s = self.seed
        if s is not None and (not _is_int(s) or not SEED_RANGE[0] <= s < SEED_RANGE[1]):
            raise SettingsError(f"seed must be an integer in [-2**63, 2**64), got {s!r}")
        if any(not isinstance(x, str) or not x for x in self.stop):
            raise SettingsError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if any(not _is_int(x) or x < 0 for x in self.stop_token_ids):
            raise SettingsError(f"stop_token_ids must be non-negative integers, got "
                                f"{self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise SettingsError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise SettingsError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] (the "
                                    f"number of alternatives per token), got {v!r}")
        if self.rope_policy not in ROPE_POLICIES:
            raise SettingsError(f"rope_policy must be one of {ROPE_POLICIES}, got "
                                f"{self.rope_policy!r}")

    @classmethod
    def from_kwargs(cls, settings: GenerationSettings | None = None,
                    **kwargs: Any) -> GenerationSettings:
        """`settings` with the given fields replaced; unknown names are refused by name."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise SettingsError(f"unknown generation settings {unknown}; the settings are "
                                f"{sorted(fields)}")
        base = settings if settings is not None else cls()
        return dataclasses.replace(base, **kwargs) if kwargs else base

    def resolve(self, generation_config: Mapping[str, Any]) -> GenerationSettings:
        """These settings with the checkpoint's defaults filled in: every sampling field a
        number, max_new_tokens set; greedy rows get the warpers' off values (only the
        repetition penalty applies to greedy decoding, as in transformers)."""
        gen = generation_config
        sampling = bool(gen.get("do_sample"))
        temperature = self.temperature
        if temperature is None:
            temperature = float(gen.get("temperature") or 1.0) if sampling else 0.0
        top_k, top_p, min_p = self.top_k, self.top_p, self.min_p
        if temperature > 0 and sampling:
            top_k = _default(top_k, gen.get("top_k"))
            top_p = _default(top_p, gen.get("top_p"))
            min_p = _default(min_p, gen.get("min_p"))
        penalty = _default(self.repetition_penalty, gen.get("repetition_penalty"))
        max_new = self.max_new_tokens
        if max_new is None:
            max_new = gen.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
        resolved = dataclasses.replace(
            self, max_new_tokens=int(max_new), temperature=float(temperature),
            top_k=int(top_k or 0) if temperature > 0 else 0,
            top_p=float(1.0 if top_p is None else top_p) if temperature > 0 else 1.0,
            min_p=float(min_p or 0.0) if temperature > 0 else 0.0,
            repetition_penalty=float(1.0 if penalty is None else penalty))
        return resolved


def _default(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


def _setter(obj: Any):
    """A setter for a frozen dataclass's own __post_init__ normalisation."""
    def set_(name: str, value: Any) -> None:
        object.__setattr__(obj, name, value)
    return set_
