"""The two ways a checkpoint's text becomes ids: its `tokenizer.json`, or `tokenizer.model` alone.

`tokenizer.json` is run by the `tokenizers` library as it is: it is what the checkpoint's own Hub
tokenizer runs. Phi-3's (Llama-2's SentencePiece converted by transformers' original LlamaConverter)
is a `Prepend("▁")` + `Replace(" ", "▁")` normalizer, a BPE with byte fallback whose merges rank by
SentencePiece score, and a decoder that undoes it (Replace "▁" -> " ", ByteFallback, Fuse, Strip one
leading space). Phi-4's is a byte-level BPE.

A folder with only `tokenizer.model` gets what that tokenizer.json would do, built from
SentencePiece itself:

- Added tokens (`<|user|>`, `<|end|>`, `<s>`, ...) are cut out of the raw text first, leftmost and
  longest match first. One with `rstrip` swallows the whitespace after it (so `<|user|>\\n` is one
  id), one with `lstrip` the whitespace before it; whitespace is Rust's `char::is_whitespace`, as in
  `tokenizers`.
- Each piece of text between them is encoded by SentencePiece on its own, with the model's own
  normalizer: for Llama-2's, the dummy prefix "▁" is added to every piece, even one that starts with
  a space (" Hello" -> "▁▁Hello" -> ["▁", "▁Hello"]) or follows an added token
  ("<|user|>\\nHi" -> ["<|user|>", "▁Hi"]), as the Prepend normalizer does.
- The control pieces (`<s>`, `</s>`) and `<unk>` are added tokens too, as the conversion made them.
- Decoding joins the pieces (added tokens included, unless skipped), turns "▁" into spaces, decodes
  byte-fallback runs as UTF-8 (a run that is not valid UTF-8 becomes one U+FFFD per byte) and drops
  one leading space of the whole text when the model adds a dummy prefix.

transformers v5 rebuilds Llama tokenizers from `tokenizer.model` instead (even beside a
tokenizer.json): it prepends "▁" only at the start of the input and only when the input does not
start with a space, and orders its merges by id, so " Hello" loses its space. Those are not the ids
Phi-3 was trained on; tests/test_tokenizer.py pins the difference.
"""

import dataclasses
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

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
    """A token matched verbatim in the raw text before the subword model runs.

    `single_word` and `normalized` are not used by Phi checkpoints (all their added tokens are
    `normalized: false`) and are ignored: every added token is matched on the raw text."""

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


class Backend(Protocol):
    added_tokens: dict[int, AddedToken]
    vocab_size: int
    # Byte-fallback pieces (<0x00>..<0xFF>): a run of them decodes as one UTF-8 string, or as one
    # U+FFFD per byte if the whole run is not valid UTF-8. Empty for byte-level BPE (Phi-4).
    byte_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


class TokenizersBackend:
    """A `tokenizer.json`, run by the `tokenizers` library exactly as the Hub tokenizer runs it."""

    def __init__(self, tokenizer_file: Path) -> None:
        try:
            import tokenizers
        except ImportError as e:  # a core dependency; only a broken install gets here
            raise ImportError(
                f"{tokenizer_file} needs the `tokenizers` package: pip install tokenizers"
            ) from e
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the library raises a bare Exception with serde's message
            raise ValueError(f"{tokenizer_file} is not a valid tokenizer.json: {e}") from e
        self.added_tokens = {
            i: AddedToken(t.content, i, special=t.special, lstrip=t.lstrip, rstrip=t.rstrip)
            for i, t in self._tok.get_added_tokens_decoder().items()
        }
        self.vocab_size = max(
            [self._tok.get_vocab_size(with_added_tokens=False), *(i + 1 for i in self.added_tokens)]
        )
        decoder = self._tok.decoder
        steps = json.loads(decoder.__getstate__()) if decoder is not None else {}
        if _has_step(steps, "ByteFallback"):
            vocab = self._tok.get_vocab(with_added_tokens=False)
            self.byte_ids = frozenset(i for t, i in vocab.items() if _BYTE_PIECE.fullmatch(t))
        else:
            self.byte_ids = frozenset()

    def encode(self, text: str) -> list[int]:
        # No post-processor: the BOS is the caller's choice (tokenizer_config's add_bos_token), as
        # transformers rebuilds the post-processor from it.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class SentencePieceBackend:
    """A `tokenizer.model` with the added tokens of the folder's configs; see the module docstring.

    `add_prefix_space=False` (tokenizer_config.json's `add_prefix_space: false`) turns the model's
    dummy prefix off, as the conversion then leaves out the Prepend normalizer."""

    def __init__(
        self, model_file: Path, added_tokens: dict[int, AddedToken], *, add_prefix_space: bool
    ) -> None:
        try:
            import sentencepiece as spm
            from google.protobuf.message import DecodeError
            from sentencepiece import sentencepiece_model_pb2
        except ImportError as e:
            raise ImportError(
                f"{model_file} needs the `sentencepiece` and `protobuf` packages: "
                "pip install sentencepiece protobuf"
            ) from e
        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(model_file.read_bytes())
        except DecodeError as e:
            raise ValueError(f"{model_file} is not a SentencePiece model: {e}") from e
        if not proto.pieces:
            raise ValueError(f"{model_file} is not a SentencePiece model: it has no pieces")
        if not add_prefix_space:
            proto.normalizer_spec.add_dummy_prefix = False
        self._dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self._num_pieces = self._sp.get_piece_size()
        self.byte_ids = frozenset(i for i in range(self._num_pieces) if self._sp.is_byte(i))

        control = {
            i: AddedToken(self._sp.id_to_piece(i), i)
            for i in range(self._num_pieces)
            if self._sp.is_control(i) or self._sp.is_unknown(i)
        }
        self.added_tokens = {**control, **added_tokens}
        self.vocab_size = max([self._num_pieces, *(i + 1 for i in self.added_tokens)])
        self._by_content = {t.content: t for t in self.added_tokens.values()}
        self._split = AddedTokenSplitter(self.added_tokens.values())

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split(text):
            if isinstance(piece, AddedToken):
                ids.append(piece.id)
            else:
                ids += self._sp.encode(piece)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        pieces = []
        for i in ids:
            if (token := self.added_tokens.get(i)) is not None:
                if not (skip_special_tokens and token.special):
                    pieces.append(token.content)
            elif 0 <= i < self._num_pieces:
                pieces.append(self._sp.id_to_piece(i))
            # Ids the vocabulary does not know (e.g. the padding rows 32011..32063 of Phi-3's
            # embedding) decode to nothing, as in `tokenizers`.
        text = join_pieces(pieces)
        return text[1:] if self._dummy_prefix and text.startswith(" ") else text

    def token_to_id(self, token: str) -> int | None:
        if (added := self._by_content.get(token)) is not None:
            return added.id
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None


class AddedTokenSplitter:
    """Splits raw text into added tokens and the text between them, as `tokenizers`' added
    vocabulary does (leftmost-longest match, then lstrip/rstrip whitespace absorption); empty
    stretches of text are left out."""

    def __init__(self, tokens: Iterable[AddedToken]) -> None:
        self._by_content = {t.content: t for t in tokens}
        # Longest first, so that the regex's leftmost-first alternation is leftmost-longest.
        alternatives = sorted(self._by_content, key=len, reverse=True)
        self._re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def __call__(self, text: str) -> Iterator[str | AddedToken]:
        pos = 0
        while self._re is not None and (match := self._re.search(text, pos)):
            token = self._by_content[match.group()]
            start, end = match.span()
            if token.lstrip:
                start = pos + len(text[pos:start].rstrip(_WHITESPACE))
            if token.rstrip:
                end = _LEADING_WHITESPACE.match(text, end).end()
            if start > pos:
                yield text[pos:start]
            yield token
            pos = end
        if pos < len(text):
            yield text[pos:]


def _has_step(spec: dict, kind: str) -> bool:
    """Whether a serialized decoder (or a Sequence of them) has a step of type `kind`."""
    return spec.get("type") == kind or any(_has_step(d, kind) for d in spec.get("decoders", []))


def join_pieces(pieces: Iterable[str]) -> str:
    """The Llama decoder chain before its Strip: Replace("▁", " "), ByteFallback, Fuse."""
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
