"""Chat formatting: the checkpoint's own Jinja `chat_template`, or a built-in Phi format.

Templates render in a sandboxed Jinja environment set up like transformers' (`trim_blocks`,
`lstrip_blocks`, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML), with the
variables transformers passes: `messages`, `add_generation_prompt`, `tools`, `documents` and the
special token strings (`bos_token`, `eos_token`, `unk_token`, `pad_token`). Chat templates come
from the Hub and are untrusted code, hence the sandbox.

The sandbox keeps a template from reaching Python's internals, not from exhausting the machine
(`range(10**9)`, `'a' * 10**12`, a string doubled in a loop, `10**10**10`): transformers leaves
that open. Here every render is bounded (`render`): no string, list or output longer than
MAX_SIZE, no operation or call whose result would exceed it (repetition, powers, padding and
format widths are checked before they run), no more than MAX_STEPS executed lines (counted by a
thread-local trace function, in template code and the filters it calls), and recursion, memory
and overflow errors become template errors. Any failure of a template is a ValueError naming the
file the template came from. Templates that stay in bounds render exactly as before.

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
import re
import string
import sys
from collections.abc import Container, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from phi3_jax import textio
from phi3_jax.checkpoint_files import checkpoint_file

KNOWN_ROLES = ("system", "user", "assistant", "tool")

# Render bounds. A Phi chat of a few turns takes a few hundred steps and its prompt is a few
# kilobytes; a 128k-token context is about half a megabyte of text.
MAX_SIZE = 1 << 24  # characters (or items) in any string or list a template builds, output too
MAX_STEPS = 2_000_000  # executed lines, ~1 s of rendering
MAX_INT_BITS = 1 << 16  # integers a template computes with (Python prints 4300 digits at most)


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """A chat template, the message roles it renders, and where it came from (a file, or None
    for the built-in formats), for error messages."""

    name: str
    template: str
    roles: tuple[str, ...] = KNOWN_ROLES
    source: str | None = None

    def describe(self) -> str:
        if self.source is None:
            return f"the built-in {self.name} chat template"
        return f"the chat template of {self.source}"


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


def checkpoint_format(template: str, source: str | None = None) -> ChatFormat:
    """Wraps a checkpoint's own template (read from `source`); it decides which roles mean
    something."""
    return ChatFormat("checkpoint", template, source=source)


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


def read_chat_format(directory: Path, tokenizer_config: Mapping[str, Any]) -> ChatFormat | None:
    """The checkpoint's default chat template, or None: chat_template.jinja overrides
    tokenizer_config.json (as in transformers); chat_template.json, a processor file, is the last
    resort. A malformed one raises ValueError naming its file."""
    directory = Path(directory)
    jinja_file = checkpoint_file(directory, "chat_template.jinja", what="chat_template.jinja")
    if Path(jinja_file).is_file():
        return checkpoint_format(textio.decode_utf8(Path(jinja_file).read_bytes(), jinja_file),
                                 jinja_file)
    source = str(directory / "tokenizer_config.json")
    template: Any = tokenizer_config.get("chat_template")
    json_file = checkpoint_file(directory, "chat_template.json", what="chat_template.json")
    if template is None and Path(json_file).is_file():
        source = json_file
        template = textio.read_json_file(json_file).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        if not all(isinstance(t, Mapping) and isinstance(t.get("name"), str)
                   and isinstance(t.get("template"), str) for t in template):
            raise ValueError(f"{source}: 'chat_template' must be a string or a list of "
                             f"{{\"name\": ..., \"template\": ...}} objects")
        template = {t["name"]: t["template"] for t in template}.get("default")
    if template is None:
        return None
    if not isinstance(template, str):
        raise ValueError(f"{source}: 'chat_template' must be a string, got "
                         f"{textio.json_type(template)}")
    return checkpoint_format(template, source) if template else None


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
    `eos_token` to their strings. Any failure of the template, bounds included (see the module
    docstring), raises ValueError naming where the template came from."""
    import jinja2

    messages = validate_messages(messages, chat_format.roles)
    try:
        template = _compile(chat_format.template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{chat_format.describe()} is not a valid template: {e.message} (template "
                         f"line {e.lineno})") from None
    budget = _StepBudget(MAX_STEPS)
    previous = sys.gettrace()
    sys.settrace(budget)
    try:
        parts, size = [], 0
        for part in template.generate(**special_tokens, messages=messages,
                                      add_generation_prompt=add_generation_prompt,
                                      tools=None, documents=None):
            size += len(part)
            if size > MAX_SIZE:
                raise TemplateBoundsError(f"its output passed {MAX_SIZE:,} characters")
            parts.append(part)
        return "".join(parts)
    except jinja2.TemplateError as e:  # raise_exception, sandbox violations
        raise ValueError(f"{chat_format.describe()} rejected the messages: {e}") from None
    except TemplateBoundsError as e:
        raise ValueError(f"{chat_format.describe()} was stopped: {e}") from None
    except (OverflowError, MemoryError) as e:
        raise ValueError(f"{chat_format.describe()} was stopped: it asked for too much "
                         f"({type(e).__name__}: {e})") from None
    except RecursionError:
        raise ValueError(f"{chat_format.describe()} was stopped: it recursed too deeply") from None
    except Exception as e:  # the template's own bug (1 / 0, a bad comparison, ...)
        raise ValueError(f"{chat_format.describe()} failed: {type(e).__name__}: {e}") from None
    finally:
        sys.settrace(previous)


class TemplateBoundsError(Exception):
    """A chat template went past one of the render bounds."""


class _StepBudget:
    """A trace function that counts executed lines and stops the render past `steps`."""

    def __init__(self, steps: int):
        self.left = steps

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        return self._line  # every new frame is traced line by line

    def _line(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            self.left -= 1
            if self.left < 0:
                raise TemplateBoundsError(f"it ran more than {MAX_STEPS:,} steps")
        return self._line


def _sized(value: Any) -> Any:
    """`value`, if it is within MAX_SIZE (strings, lists, tuples, dicts, sets)."""
    if isinstance(value, str | list | tuple | dict | set | frozenset | bytes) and \
            len(value) > MAX_SIZE:
        kind = "string" if isinstance(value, str) else type(value).__name__
        raise TemplateBoundsError(f"it built a {kind} of length {len(value):,} (the bound is "
                                  f"{MAX_SIZE:,})")
    return value


def _at_most(size: int, what: str) -> None:
    if size > MAX_SIZE:
        raise TemplateBoundsError(f"{what} would build {size:,} items (the bound is "
                                  f"{MAX_SIZE:,})")


def _int_argument(value: Any, what: str) -> None:
    if isinstance(value, int) and value > MAX_SIZE:
        raise TemplateBoundsError(f"{what} of {value:,} is past the bound of {MAX_SIZE:,}")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Pre-checks the operators whose result can dwarf their operands in one step."""
    if operator == "+" and isinstance(left, str | list | tuple) and \
            isinstance(right, str | list | tuple):
        _at_most(len(left) + len(right), "a concatenation")
    elif operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(n, int):
                _at_most(len(seq) * n, "a repetition")
        if isinstance(left, int) and isinstance(right, int):
            _int_bits(left.bit_length() + right.bit_length())
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        _int_bits(right * abs(left).bit_length())
    elif operator == "%" and isinstance(left, str):
        _check_percent_format(left, right)


def _int_bits(bits: int) -> None:
    # Big-integer arithmetic is one uninterruptible step that grows with the bits squared.
    if bits > MAX_INT_BITS:
        raise TemplateBoundsError(f"an integer of about {bits:,} bits would be built (the bound "
                                  f"is {MAX_INT_BITS:,})")


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent_format(fmt: str, args: Any) -> None:
    """`fmt % args`: no width or precision past MAX_SIZE, in the string or taken from args."""
    stars = False
    for width, precision in _PERCENT_SPEC.findall(fmt):
        for number in (width, precision):
            if number == "*":
                stars = True
            elif number:
                _int_argument(int(number), "a format width")
    if stars:
        for value in args if isinstance(args, tuple) else (args,):
            _int_argument(value, "a format width")


def _check_str_format(fmt: str, args: Sequence, kwargs: Mapping) -> None:
    """`fmt.format(*args, **kwargs)`: the same, for format specs (nested fields included)."""
    nested = False
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if spec:
            nested = nested or "{" in spec
            for number in re.findall(r"\d+", spec):
                _int_argument(int(number), "a format width")
    if nested:
        values = [*args, *kwargs.values()]
        if len(values) == 1 and isinstance(values[0], Mapping):  # format_map
            values = list(values[0].values())
        for value in values:
            _int_argument(value, "a format width")


def _check_str_method(obj: str, name: str, args: Sequence, kwargs: Mapping) -> None:
    """Pre-checks the str methods whose result can dwarf the string and their arguments."""
    values = [*args, *kwargs.values()]
    if name in ("center", "ljust", "rjust", "zfill"):
        for value in values[:1]:
            _int_argument(value, f"str.{name} width")
    elif name == "expandtabs" and values and isinstance(values[0], int):
        _at_most(len(obj) * max(values[0], 1), "str.expandtabs")
    elif name == "replace" and len(values) >= 2 and all(isinstance(v, str) for v in values[:2]):
        old, new = values[:2]
        count = obj.count(old) if old else len(obj) + 1
        _at_most(len(obj) + count * max(len(new) - len(old), 0), "str.replace")
    elif name == "join" and values and isinstance(values[0], list | tuple):
        parts = values[0]
        _at_most(sum(len(p) for p in parts if isinstance(p, str))
                 + len(obj) * max(len(parts) - 1, 0), "str.join")
    elif name == "translate" and values and isinstance(values[0], Mapping):
        longest = max((len(v) for v in values[0].values() if isinstance(v, str)), default=1)
        _at_most(len(obj) * longest, "str.translate")


def _bounded_filter(name: str, function: Any) -> Any:
    """Wraps a Jinja filter with the pre-checks of the ones that pad or repeat, and a size check
    of its result (its `jinja_pass_arg` marker is kept by functools.wraps)."""

    passes_context = getattr(function, "jinja_pass_arg", None) is not None  # @pass_context...

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        values = args[1:] if passes_context else args
        value, extra = (values[0] if values else None), [*values[1:], *kwargs.values()]
        if name in ("center", "indent", "wordwrap", "truncate", "batch", "slice", "tojson"):
            for number in extra:
                _int_argument(number, f"the {name} filter's argument")
        if name == "indent" and isinstance(value, str) and extra and isinstance(extra[0], int):
            _at_most((value.count("\n") + 1) * extra[0] + len(value), "the indent filter")
        if name == "format" and isinstance(value, str):
            _check_percent_format(value, tuple(extra))
        if name == "replace" and isinstance(value, str):
            _check_str_method(value, "replace", extra, {})
        if name == "join" and isinstance(value, list | tuple) and extra and \
                isinstance(extra[0], str):
            _check_str_method(extra[0], "join", [value], {})
        return _sized(function(*args, **kwargs))

    return bounded


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    try:
        import jinja2
        import jinja2.ext
        from jinja2.compiler import CodeGenerator
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("chat formatting needs jinja2: pip install jinja2") from e

    class BoundedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node: Any, frame: Any) -> None:  # `a ~ b`
            self.write("environment.bounded(")
            super().visit_Concat(node, frame)
            self.write(")")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        # Intercepted operators go through call_binop (and are never folded at compile time).
        intercepted_binops = frozenset({"+", "*", "**", "%"})
        code_generator_class = BoundedCodeGenerator

        @staticmethod
        def bounded(value: Any) -> Any:
            return _sized(value)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_binop(operator, left, right)
            return _sized(super().call_binop(context, operator, left, right))

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(getattr(__obj, "__self__", None), str):
                _check_str_method(__obj.__self__, __obj.__name__, args, kwargs)
            return _sized(super().call(__context, __obj, *args, **kwargs))

        def wrap_str_format(self, value: Any) -> Any:
            wrapper = super().wrap_str_format(value)
            if wrapper is None:
                return None

            def bounded(*args: Any, **kwargs: Any) -> str:
                _check_str_format(value.__self__, args, kwargs)
                return _sized(wrapper(*args, **kwargs))

            return bounded

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

    env = BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
