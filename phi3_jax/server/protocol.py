"""The request bodies of /v1/completions and /v1/chat/completions, validated, and turned into
the engine's GenerationSettings.

Types are strict (a JSON "5" is not a number), and every refusal names the field, as OpenAI's
API does in `error.param`. OpenAI parameters this server does not implement are refused by name
unless they hold their neutral value (what a client library sends by default); `top_k`, `min_p`,
`repetition_penalty`, `ignore_eos` and `stop_token_ids` are accepted as extra fields, as vLLM
does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from phi3_jax.engine import GenerationSettings
from phi3_jax.engine.settings import MAX_LOGPROBS
from phi3_jax.server.errors import APIError, invalid, unsupported

MAX_N = 128  # choices per request, as OpenAI allows
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# OpenAI parameters not implemented here, with the values that mean "not used".
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "suffix": (None, ""),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}
# Accepted and ignored: they do not change what is generated.
_IGNORED = {"user", "store", "metadata", "service_tier", "parallel_tool_calls"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints take."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    def check_common(self) -> None:
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of", " (only best_of == n)")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed with stream: true", "stream_options")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if any(not s for s in stops):
            raise invalid("stop strings must be non-empty", "stop")
        for name, value in (self.model_extra or {}).items():
            if name in _IGNORED:
                continue
            if name not in _NEUTRAL:
                raise APIError(400, f"unrecognized request argument: {name}", name,
                               "unknown_parameter")
            if value not in _NEUTRAL[name]:
                raise unsupported(name)

    def settings(self, max_new_tokens: int, **extra: Any) -> GenerationSettings:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return GenerationSettings(
            max_new_tokens=max_new_tokens, temperature=self.temperature,
            top_k=None if self.top_k in (None, -1) else self.top_k,  # vLLM's -1 = off
            top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            seed=self.seed, stop=stop, stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, **extra)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """POST /v1/completions. prompt: a string, token ids, or a list of either (a batch)."""

    prompt: Any
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or _is_ids(p):
            p = [p]
        if not isinstance(p, list) or not p or not all(isinstance(x, str) or _is_ids(x)
                                                       for x in p):
            raise invalid("prompt must be a string, a non-empty list of token ids, or a "
                          "non-empty list of those", "prompt")
        return p

    def check(self) -> None:
        self.check_common()
        if self.max_tokens == 0 and not self.echo:
            raise invalid("max_tokens must be at least 1 (0 only with echo, to score a "
                          "prompt)", "max_tokens")


class TextPart(BaseModel):
    # Other parts (images, audio) validate too, so that the refusal can name their type.
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def check(self) -> None:
        self.check_common()
        if self.max_tokens == 0:
            raise invalid("max_tokens must be at least 1", "max_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs needs logprobs: true", "top_logprobs")

    def chat(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them: text content only."""
        out = []
        for i, m in enumerate(self.messages):
            for name in m.model_extra or {}:
                if name != "tool_calls" or m.model_extra[name]:
                    raise unsupported(f"messages[{i}].{name}")
            content = m.content
            if isinstance(content, list):
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise unsupported(f"messages[{i}].content[{j}]",
                                          f" (type {part.type!r}; only text parts)")
                content = "".join(part.text for part in content)
            if content is None:
                raise invalid(f"messages[{i}] has no content", f"messages[{i}].content")
            message = {"role": m.role, "content": content}
            if m.name is not None:
                message["name"] = m.name
            out.append(message)
        return out

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# GenerationSettings fields whose API name differs.
_API_NAMES = {"max_new_tokens": "max_tokens", "prompt_logprobs": "logprobs"}


def setting_param(message: str) -> str | None:
    """The API field a SettingsError message (which starts with the setting's name) is
    about."""
    name = message.split(" ", 1)[0]
    return _API_NAMES.get(name, name) if name.isidentifier() else None


def _is_ids(x: Any) -> bool:
    return (isinstance(x, list) and len(x) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) for t in x))


def parse(body: bytes, model: type[BaseModel]) -> Any:
    """A request body as `model`, checked; APIError (400) naming the field otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid(f"the request body is not valid UTF-8 (byte {e.start})", None,
                      "invalid_encoding") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise invalid(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(data, Mapping):
        raise invalid("the request body must be a JSON object", None)
    try:
        request = model.model_validate(data)
    except ValidationError as e:
        raise _field_error(e) from None
    request.check()
    return request


def _field_error(e: ValidationError) -> APIError:
    first = e.errors()[0]
    loc = first["loc"]
    if len(loc) > 1 and isinstance(loc[-1], str) and loc[-1] in ("str", "int", "float", "bool",
                                                                  "list[str]", "list[int]"):
        loc = loc[:-1]  # a union's member name is not a field
    param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")
    if first["type"] == "missing":
        message = f"{param} is required"
    else:
        message = f"{param}: {first['msg']} (got {first.get('input')!r:.80})"
    return invalid(message, param or None)
