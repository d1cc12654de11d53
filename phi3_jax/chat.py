"""Chat formatting: the checkpoint's own Jinja `chat_template`, or a built-in Phi format.

Templates render in a sandboxed Jinja environment set up like transformers' (`trim_blocks`,
`lstrip_blocks`, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML), with the
variables transformers passes: `messages`, `add_generation_prompt`, `tools`, `documents` and the
special token strings (`bos_token`, `eos_token`, `unk_token`, `pad_token`). Chat templates come
from the Hub and are untrusted code, hence the sandbox.

Checkpoints without a template get the format their vocabulary implies (see `builtin_format`); the
built-in templates are the ones the Phi checkpoints ship:

- Phi-3 / 3.5: `<|user|>\\n{content}<|end|>\\n` per message, then `<|assistant|>\\n` as the
  generation prompt, or `eos_token` without one.
- Phi-4-mini: `<|user|>{content}<|end|>`, then `<|assistant|>` or `eos_token`.
- Phi-4: `<|im_start|>user<|im_sep|>{content}<|im_end|>`, then `<|im_start|>assistant<|im_sep|>`.
"""

import dataclasses
import functools
import json
from collections.abc import Container, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

KNOWN_ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """A chat template and the message roles it renders."""

    name: str
    template: str
    roles: tuple[str, ...] = KNOWN_ROLES


# Phi-3-mini-4k-instruct's tokenizer_config.json template.
PHI3 = ChatFormat(
    "phi3",
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
    roles=("system", "user", "assistant"),
)

# Phi-4-mini-instruct's; a system message may carry the tool list as a JSON string in "tools".
PHI4_MINI = ChatFormat(
    "phi4-mini",
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message "
    "and message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] "
    "+ '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + "
    "message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}",
)

# Phi-4's (14B); it appends nothing when there is no generation prompt.
PHI4 = ChatFormat(
    "phi4",
    "{% for message in messages %}{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}",
    roles=("system", "user", "assistant"),
)


def checkpoint_format(template: str) -> ChatFormat:
    """Wraps a checkpoint's own template; it decides which roles mean something."""
    return ChatFormat("checkpoint", template)


def builtin_format(vocabulary: Container[str]) -> ChatFormat | None:
    """The built-in format for a vocabulary (its added tokens suffice), or None if none fits.

    Phi-4-mini and Phi-3 share <|user|>/<|assistant|>/<|end|>; only Phi-4-mini has <|tool|>."""
    if "<|im_start|>" in vocabulary and "<|im_sep|>" in vocabulary:
        return PHI4
    if "<|user|>" in vocabulary and "<|tool|>" in vocabulary:
        return PHI4_MINI
    if "<|user|>" in vocabulary:
        return PHI3
    return None


def read_chat_template(directory: Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """The checkpoint's default chat template: chat_template.jinja overrides tokenizer_config.json
    (as in transformers); chat_template.json, a processor file, is the last resort."""
    if (jinja_file := directory / "chat_template.jinja").is_file():
        return jinja_file.read_text(encoding="utf-8")
    template: Any = tokenizer_config.get("chat_template")
    if template is None and (json_file := directory / "chat_template.json").is_file():
        template = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


def validate_messages(
    messages: Sequence[Mapping[str, Any]], roles: Sequence[str] = KNOWN_ROLES
) -> list[dict[str, Any]]:
    """Checks every message has a known `role` and a string `content`; returns plain-dict copies
    without None values (as transformers drops them, so templates can test `'key' in message`)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(
                f"messages[{i}] must be a dict with 'role' and 'content', "
                f"got {type(message).__name__}"
            )
        message = {k: v for k, v in message.items() if v is not None}
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"messages[{i}] has no {key!r}: {message!r}")
        if message["role"] not in roles:
            raise ValueError(
                f"messages[{i}] has unknown role {message['role']!r}; "
                f"this chat format knows {', '.join(roles)}"
            )
        if not isinstance(message["content"], str):
            kind = type(message["content"]).__name__
            raise TypeError(f"messages[{i}]['content'] must be a string, got {kind}")
        checked.append(message)
    return checked


def render(
    chat_format: ChatFormat,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
) -> str:
    """Renders validated `messages` with the format's template; `special_tokens` maps names like
    `eos_token` to their strings."""
    template = _compile(chat_format.template)  # first: it explains a missing jinja2
    import jinja2

    try:
        return template.render(
            **special_tokens,
            messages=validate_messages(messages, chat_format.roles),
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"the {chat_format.name} chat template rejected the messages: {e}") from e


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("chat formatting needs jinja2: pip install jinja2") from e

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
