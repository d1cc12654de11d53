"""Text <-> ids for one checkpoint, as the checkpoint's own tokenizer does it, plus chat formatting.

The contract: the folder's `tokenizer.json`, where there is one, is the authority and runs through
the `tokenizers` library (Phi-3/3.5 Hub folders ship one, Phi-4 folders ship nothing else). A folder
with only `tokenizer.model` gets SentencePiece's own rules, with added tokens handled as that
tokenizer.json would (see tokenizer_backends.py). No BOS is added unless tokenizer_config.json says
`add_bos_token: true` (it is false for all Phi models).
"""

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from phi3_jax import chat, textio
from phi3_jax.checkpoint_files import checkpoint_file
from phi3_jax.tokenizer_backends import (
    AddedToken,
    Backend,
    SentencePieceBackend,
    TokenizersBackend,
)

# What a checkpoint ships for its tokenizer and chat format (not the model's weights or config).
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


class Tokenizer:
    """Text <-> token ids and chat formatting for one checkpoint; build it with `from_dir`.

    `special_tokens`/`special_ids` are the added tokens that `skip_special_tokens` drops;
    `byte_ids` the byte-fallback pieces (<0x00>..<0xFF>), empty for byte-level BPE."""

    def __init__(
        self,
        backend: Backend,
        *,
        special_tokens: Mapping[str, str],
        add_bos: bool,
        chat_format: chat.ChatFormat | None,
    ) -> None:
        self._backend = backend
        self._template_tokens = dict(special_tokens)
        self.add_bos = add_bos
        self.chat_format = chat_format
        self.vocab_size: int = backend.vocab_size
        self.special_tokens: frozenset[str] = frozenset(
            t.content for t in backend.added_tokens.values() if t.special
        )
        self.special_ids: frozenset[int] = frozenset(
            i for i, t in backend.added_tokens.items() if t.special
        )
        self.byte_ids: frozenset[int] = backend.byte_ids
        ids = {name: backend.token_to_id(tok) for name, tok in special_tokens.items()}
        self.bos_id: int | None = ids.get("bos_token")
        self.eos_id: int | None = ids.get("eos_token")
        self.pad_id: int | None = ids.get("pad_token")
        self.unk_id: int | None = ids.get("unk_token")

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads the folder's tokenizer: `tokenizer.json` when it has one, else `tokenizer.model`,
        with the settings, added tokens and chat template found next to it."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist")
        for name in TOKENIZER_FILES:  # none may lead out of the folder (checkpoint_files' rule)
            checkpoint_file(path, name, what=name)
        config = _read_json(path / "tokenizer_config.json")
        token_map = _read_json(path / "special_tokens_map.json")
        if (path / "tokenizer.json").is_file():
            backend: Backend = TokenizersBackend(path / "tokenizer.json")
        elif (path / "tokenizer.model").is_file():
            # transformers' `legacy` switch is not read: the Hub tokenizer.json of Phi-3, which
            # says `legacy: false`, prepends "▁" after every added token all the same.
            backend = SentencePieceBackend(
                path / "tokenizer.model",
                _read_added_tokens(path, config),
                add_prefix_space=config.get("add_prefix_space") is not False,
            )
        else:
            raise FileNotFoundError(f"{path} has neither tokenizer.json nor tokenizer.model")
        special_tokens = {}
        if (path / "tokenizer.model").is_file():  # LlamaTokenizer's defaults, if left out
            special_tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(name, token_map.get(name))
            if isinstance(value, Mapping):  # older configs store {"content": ..., "lstrip": ...}
                value = value.get("content")
            if value is not None:
                special_tokens[name] = value
        chat_format = chat.read_chat_format(path, config) or chat.builtin_format(
            {t.content for t in backend.added_tokens.values()})
        return cls(
            backend,
            special_tokens=special_tokens,
            add_bos=bool(config.get("add_bos_token", False)),
            chat_format=chat_format,
        )

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; added tokens written in the text become their ids.

        `add_bos` defaults to the checkpoint's `add_bos_token` (false for Phi models)."""
        if not (self.add_bos if add_bos is None else add_bos):
            return self._backend.encode(text)
        if self.bos_id is None:
            raise ValueError("add_bos=True, but this tokenizer has no BOS token")
        return [self.bos_id, *self._backend.encode(text)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; ids outside the vocabulary decode to nothing."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_id(self, token: str) -> int:
        """Id of a single vocabulary entry, e.g. `token_id("<|end|>")`."""
        if (i := self._backend.token_to_id(token)) is None:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return i

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *,
        add_generation_prompt: bool | None = None,
    ) -> str:
        """Renders a conversation as prompt text, as `transformers`' `apply_chat_template(...,
        tokenize=False)` does. add_generation_prompt defaults to "the last turn is not the
        assistant's": a chat ending in a user turn is a prompt (the assistant header follows),
        one ending in an assistant turn is a finished conversation, rendered as transformers'
        default (False) renders it."""
        if add_generation_prompt is None:  # (malformed messages are refused by chat.render)
            last = messages[-1] if isinstance(messages, list) and messages else None
            add_generation_prompt = not (isinstance(last, Mapping)
                                         and last.get("role") == "assistant")
        if self.chat_format is None:
            raise ValueError(
                "this tokenizer has no chat_template and none of the Phi chat tokens "
                "(<|user|> or <|im_start|>), so it cannot format a chat"
            )
        return chat.render(
            self.chat_format,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self._template_tokens,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *,
        add_generation_prompt: bool | None = None,
    ) -> list[int]:
        """Prompt ids of a conversation (add_generation_prompt as in apply_chat_template). Never
        adds a BOS of its own: the template writes one where the model wants it, as with
        `apply_chat_template(..., tokenize=True)`."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_bos=False)

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> "StreamDecoder":
        """A decoder for ids that arrive one at a time, e.g. during generation."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Turns ids arriving one at a time into text deltas that join up to `decode(ids)`.

    Decoding ids one by one would lose text: the first piece decoded loses its leading space, and
    a character split over several byte-fallback or byte-level tokens decodes to U+FFFD until it
    is complete. So each step decodes a short window of recent ids twice, with and without the
    newest ones, and emits only what the newest ones added; text ending in U+FFFD is held back
    until the character completes (or `flush` is called). A run of byte-fallback pieces is held
    back until the run ends: the whole run decodes as one, and a later byte can still make it
    invalid UTF-8, which turns every byte of it, shown or not, into U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._read = 0  # ids[:_read] are already emitted; ids[0] starts the decoding window
        self._in_byte_run = False

    def put(self, token_id: int) -> str:
        """Adds one id; returns the text it completes (possibly empty)."""
        token_id = int(token_id)
        self._ids.append(token_id)
        if token_id in self._tokenizer.byte_ids:
            self._in_byte_run = True
        elif self._in_byte_run and not self._decodes_to_nothing(token_id):
            self._in_byte_run = False
        return "" if self._in_byte_run else self._emit(final=False)

    def flush(self) -> str:
        """Returns whatever is still held back, e.g. an incomplete character at the end."""
        return self._emit(final=True)

    def _decodes_to_nothing(self, token_id: int) -> bool:
        # Such ids vanish before the decoder runs, so the byte runs around them join up.
        tok = self._tokenizer
        return not 0 <= token_id < tok.vocab_size or (self._skip and token_id in tok.special_ids)

    def _emit(self, *, final: bool) -> str:
        decode = self._tokenizer.decode
        before = decode(self._ids[: self._read], skip_special_tokens=self._skip)
        after = decode(self._ids, skip_special_tokens=self._skip)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        # The window slides to the ids just emitted, which keeps it a few ids long.
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return after[len(before) :]


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike, *,
                         missing_ok: bool = False) -> list[Path]:
    """Copies those TOKENIZER_FILES that `src` has into `dst` (created if needed); returns them.

    A `src` with neither tokenizer.model nor tokenizer.json raises FileNotFoundError, or with
    `missing_ok` copies nothing (a checkpoint may ship without a tokenizer)."""
    src, dst = Path(src), Path(dst)
    if not (src / "tokenizer.model").is_file() and not (src / "tokenizer.json").is_file():
        if missing_ok:
            return []
        raise FileNotFoundError(f"{src} has neither tokenizer.model nor tokenizer.json")
    dst.mkdir(parents=True, exist_ok=True)
    return [
        Path(shutil.copy2(checkpoint_file(src, name, what=name), dst / name))
        for name in TOKENIZER_FILES
        if (src / name).is_file()
    ]


# The fields of the tokenizer JSON files that are read here, with the values each may take.
_BOOL_FIELDS = ("legacy", "add_prefix_space", "add_bos_token")
_TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: Path) -> dict[str, Any]:
    """A tokenizer JSON file's object ({} without the file), the fields read from it checked: a
    malformed file raises ValueError naming the file and the field."""
    if not path.is_file():
        return {}
    raw = textio.read_json_file(path)
    for name in _BOOL_FIELDS:
        if raw.get(name) is not None and not isinstance(raw[name], bool):
            raise ValueError(f"{path}: field {name!r} must be true or false, got "
                             f"{raw[name]!r:.100}")
    for name in _TOKEN_FIELDS:
        value = raw.get(name)
        content = value.get("content") if isinstance(value, Mapping) else value
        if content is not None and not isinstance(content, str):
            raise ValueError(f"{path}: field {name!r} must be a token string (or an object "
                             f"with its \"content\"), got {value!r:.100}")
    return raw


def _added_token(entry: Any, i: Any, where: str) -> AddedToken:
    if not isinstance(i, int) or isinstance(i, bool) or i < 0:
        raise ValueError(f"{where}: id {i!r:.100} is not a non-negative integer")
    if not isinstance(entry, Mapping) or not isinstance(entry.get("content"), str):
        raise ValueError(f"{where}: expected an object with a string \"content\", got "
                         f"{entry!r:.100}")
    flags = {name: entry.get(name, False) for name in ("special", "lstrip", "rstrip")}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {name!r} must be true or false, got {value!r:.100}")
    return AddedToken(entry["content"], i, **flags)


def _read_added_tokens(path: Path, config: Mapping[str, Any]) -> dict[int, AddedToken]:
    """Added tokens from added_tokens.json, tokenizer.json and tokenizer_config.json, later files
    overriding earlier ones (checkpoints usually carry the same tokens in all of them); a
    malformed entry raises ValueError naming its file and entry."""
    tokens: dict[int, AddedToken] = {}
    # added_tokens.json maps content -> id with no flags; transformers adds those as plain tokens.
    file = path / "added_tokens.json"
    for content, i in _read_json(file).items():
        tokens[i] = _added_token({"content": content}, i, f"{file} entry {content!r:.100}")
    file = path / "tokenizer.json"
    entries = _read_json(file).get("added_tokens", [])
    if not isinstance(entries, list):
        raise ValueError(f"{file}: 'added_tokens' must be a list, got {textio.json_type(entries)}")
    for n, entry in enumerate(entries):
        i = entry.get("id") if isinstance(entry, Mapping) else None
        tokens[i] = _added_token(entry, i, f"{file} added_tokens[{n}]")
    file = path / "tokenizer_config.json"
    decoder = config.get("added_tokens_decoder", {})
    if not isinstance(decoder, Mapping):
        raise ValueError(f"{file}: 'added_tokens_decoder' must be an object, got "
                         f"{textio.json_type(decoder)}")
    for key, entry in decoder.items():
        i = int(key) if key.isdecimal() else key
        tokens[i] = _added_token(entry, i, f"{file} added_tokens_decoder[{key!r:.100}]")
    return tokens
