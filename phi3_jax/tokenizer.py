"""Tokenizers of Phi-3 (SentencePiece `tokenizer.model`) and Phi-4 (BPE `tokenizer.json`) models.

Encoding and decoding match transformers v5 (`AutoTokenizer`) on the same folder:

- Added tokens (`<|user|>`, `<|end|>`, ...) are cut out of the text before the subword model runs,
  longest match first. A token with `rstrip` swallows the whitespace after it (so `<|user|>\\n` is
  one id), one with `lstrip` the whitespace before it.
- SentencePiece text pieces follow LlamaTokenizer with `legacy: false`: only a piece that starts the
  whole input gets the "▁" dummy prefix, and only when it does not start with a space already, so
  nothing is inserted after a special token. `legacy: true` prefixes every piece.
- Decoding joins the pieces (added tokens included, unless skipped), turns "▁" into spaces, decodes
  byte-fallback runs as UTF-8 (a run that is not valid UTF-8 becomes one U+FFFD per byte) and drops
  one leading space from the result.
- No BOS unless `add_bos_token` is true in tokenizer_config.json (it is false for all Phi models).

`tokenizer.json` files are used as they are, through the optional `tokenizers` package.
"""

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from phi3_jax import chat

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

# Rust's `char::is_whitespace` (Unicode White_Space, all below U+3001), which is what `tokenizers`
# strips around added tokens: Python's str.isspace() minus the separators U+001C..U+001F.
_WHITESPACE = "".join(
    c for c in map(chr, range(0x3001)) if c.isspace() and c not in "\x1c\x1d\x1e\x1f"
)
_LEADING_WHITESPACE = re.compile(f"[{_WHITESPACE}]*")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPACE_MARK = "\u2581"  # SentencePiece's "▁"


@dataclasses.dataclass(frozen=True)
class AddedToken:
    """A token matched verbatim in text before the subword model runs (`single_word` is not used
    by Phi checkpoints and is ignored)."""

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


class _Backend(Protocol):
    added_tokens: dict[int, AddedToken]
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


class _SentencePieceBackend:
    def __init__(
        self,
        model_file: Path,
        added_tokens: dict[int, AddedToken],
        *,
        legacy: bool,
        add_prefix_space: bool,
    ) -> None:
        try:
            import sentencepiece as spm
            from sentencepiece import sentencepiece_model_pb2
        except ImportError as e:
            raise ImportError(
                f"{model_file} needs the `sentencepiece` and `protobuf` packages: "
                "pip install sentencepiece protobuf"
            ) from e
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model_file.read_bytes())
        # transformers' LlamaTokenizer applies no normalizer and decides the "▁" prefix itself, per
        # piece of text between added tokens; SentencePiece must not add one on its own.
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        proto.normalizer_spec.name = "identity"
        proto.normalizer_spec.precompiled_charsmap = b""
        self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self._num_pieces = self._sp.get_piece_size()
        self.added_tokens = added_tokens
        self.vocab_size = max([self._num_pieces, *(i + 1 for i in added_tokens)])
        self._by_content = {t.content: t for t in added_tokens.values()}
        # Longest first, so that the regex's leftmost-first alternation is leftmost-longest.
        alternatives = sorted(self._by_content, key=len, reverse=True)
        pattern = "|".join(map(re.escape, alternatives))
        self._added_re = re.compile(pattern) if alternatives else None
        # transformers' Metaspace `prepend_scheme`.
        self._prepend = ("always" if legacy else "first") if add_prefix_space else "never"

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        while self._added_re is not None and (match := self._added_re.search(text, pos)):
            token = self._by_content[match.group()]
            start, end = match.span()
            if token.lstrip:
                start = pos + len(text[pos:start].rstrip(_WHITESPACE))
            if token.rstrip:
                end = _LEADING_WHITESPACE.match(text, end).end()
            if start > pos:
                ids += self._encode_piece(text[pos:start], at_start=pos == 0)
            ids.append(token.id)
            pos = end
        if pos < len(text):
            ids += self._encode_piece(text[pos:], at_start=pos == 0)
        return ids

    def _encode_piece(self, text: str, *, at_start: bool) -> list[int]:
        prepend = self._prepend == "always" or (self._prepend == "first" and at_start)
        if prepend and not text.startswith((" ", _SPACE_MARK)):
            text = " " + text
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        pieces = []
        for i in ids:
            if (token := self.added_tokens.get(i)) is not None:
                if not (skip_special_tokens and token.special):
                    pieces.append(token.content)
            elif 0 <= i < self._num_pieces:
                # Control pieces (<s>, </s>) and <unk> count as special, as transformers makes them.
                special = self._sp.is_control(i) or self._sp.is_unknown(i)
                if not (skip_special_tokens and special):
                    pieces.append(self._sp.id_to_piece(i))
            # Ids the vocabulary does not know (e.g. the padding rows 32011..32063 of Phi-3's
            # embedding) decode to nothing, as in transformers.
        text = _join_pieces(pieces)
        return text[1:] if self._prepend != "never" and text.startswith(" ") else text

    def token_to_id(self, token: str) -> int | None:
        if (added := self._by_content.get(token)) is not None:
            return added.id
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None


def _join_pieces(pieces: Iterable[str]) -> str:
    """transformers' Llama decoder chain: Replace("▁", " "), ByteFallback, Fuse."""
    out: list[str] = []
    run = bytearray()

    def flush_bytes() -> None:
        try:
            out.append(run.decode("utf-8"))
        except UnicodeDecodeError:
            out.append("\ufffd" * len(run))
        run.clear()

    for piece in pieces:
        piece = piece.replace(_SPACE_MARK, " ")
        if _BYTE_PIECE.fullmatch(piece):
            run.append(int(piece[3:5], 16))
            continue
        if run:
            flush_bytes()
        out.append(piece)
    if run:
        flush_bytes()
    return "".join(out)


class _TokenizersBackend:
    def __init__(self, tokenizer_file: Path) -> None:
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(
                f"{tokenizer_file} needs the `tokenizers` package (Phi-4 family): "
                "pip install tokenizers (or phi3-jax[bpe])"
            ) from e
        self._tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        self.added_tokens = {
            i: AddedToken(t.content, i, special=t.special, lstrip=t.lstrip, rstrip=t.rstrip)
            for i, t in self._tok.get_added_tokens_decoder().items()
        }
        self.vocab_size = max(
            [self._tok.get_vocab_size(with_added_tokens=False), *(i + 1 for i in self.added_tokens)]
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class Tokenizer:
    """Text <-> token ids and chat formatting for one checkpoint; build it with `from_dir`."""

    def __init__(
        self,
        backend: _Backend,
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
        ids = {name: backend.token_to_id(tok) for name, tok in special_tokens.items()}
        self.bos_id: int | None = ids.get("bos_token")
        self.eos_id: int | None = ids.get("eos_token")
        self.pad_id: int | None = ids.get("pad_token")
        self.unk_id: int | None = ids.get("unk_token")

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads `tokenizer.model` (preferred) or `tokenizer.json` with the settings, added tokens
        and chat template found next to it."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist")
        config = _read_json(path / "tokenizer_config.json")
        token_map = _read_json(path / "special_tokens_map.json")
        if (path / "tokenizer.model").is_file():
            backend: _Backend = _SentencePieceBackend(
                path / "tokenizer.model",
                _read_added_tokens(path, config),
                legacy=bool(config.get("legacy", False)),
                add_prefix_space=config.get("add_prefix_space") is not False,
            )
            # LlamaTokenizer's defaults, for configs that leave them out.
            defaults = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        elif (path / "tokenizer.json").is_file():
            backend = _TokenizersBackend(path / "tokenizer.json")
            defaults = {}
        else:
            raise FileNotFoundError(
                f"{path} has neither tokenizer.model (Phi-3) nor tokenizer.json (Phi-4)"
            )
        special_tokens = dict(defaults)
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(name, token_map.get(name))
            if isinstance(value, Mapping):  # older configs store {"content": ..., "lstrip": ...}
                value = value.get("content")
            if value is not None:
                special_tokens[name] = value
        if template := chat.read_chat_template(path, config):
            chat_format = chat.checkpoint_format(template)
        else:
            chat_format = chat.builtin_format({t.content for t in backend.added_tokens.values()})
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
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """Renders a conversation as prompt text, as `transformers`' `apply_chat_template(...,
        tokenize=False)` does (whose `add_generation_prompt` defaults to False, though)."""
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
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Prompt ids of a conversation. Never adds a BOS of its own: the template writes one where
        the model wants it, as with `apply_chat_template(..., tokenize=True)`."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_bos=False)

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> "StreamDecoder":
        """A decoder for ids that arrive one at a time, e.g. during generation."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Turns ids arriving one at a time into text deltas that join up to `decode(ids)`.

    Decoding ids one by one would lose text: SentencePiece drops the leading space of the first
    piece it decodes, and a character split over several byte-fallback or byte-level tokens decodes
    to U+FFFD until it is complete. So each step decodes a short window of recent ids twice, with
    and without the newest ones, and emits only what the newest ones added; text ending in U+FFFD
    is held back until the character completes (or `flush` is called).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._read = 0  # ids[:_read] are already emitted; ids[0] starts the decoding window

    def put(self, token_id: int) -> str:
        """Adds one id; returns the text it completes (possibly empty)."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Returns whatever is still held back, e.g. an incomplete character at the end."""
        return self._emit(final=True)

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
        Path(shutil.copy2(src / name, dst / name))
        for name in TOKENIZER_FILES
        if (src / name).is_file()
    ]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _read_added_tokens(path: Path, config: Mapping[str, Any]) -> dict[int, AddedToken]:
    """Added tokens from added_tokens.json, tokenizer.json and tokenizer_config.json, later files
    overriding earlier ones (checkpoints usually carry the same tokens in all of them)."""
    tokens: dict[int, AddedToken] = {}
    # added_tokens.json maps content -> id with no flags; transformers adds those as plain tokens.
    for content, i in _read_json(path / "added_tokens.json").items():
        tokens[i] = AddedToken(content, i, special=False)
    entries = [(e["id"], e) for e in _read_json(path / "tokenizer.json").get("added_tokens", [])]
    entries += [(int(i), e) for i, e in config.get("added_tokens_decoder", {}).items()]
    for i, entry in entries:
        tokens[i] = AddedToken(
            entry["content"],
            i,
            special=entry.get("special", False),
            lstrip=entry.get("lstrip", False),
            rstrip=entry.get("rstrip", False),
        )
    return tokens
