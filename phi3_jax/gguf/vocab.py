"""Tokenizers between GGUF metadata (`tokenizer.ggml.*`) and Hugging Face tokenizer files.

Import writes what a Hub folder of the same family ships, so phi3_jax.tokenizer (and
transformers, and llama.cpp's converter) read it as they read the original:

- Phi-3 / 3.5 (`tokenizer.ggml.model = "llama"`): the SentencePiece `tokenizer.model`, rebuilt as a
  ModelProto from the pieces, scores and token types, and the Hub's `tokenizer.json` for it (the
  Llama conversion: `Prepend("▁")` + `Replace(" ", "▁")` normalizer, BPE with byte fallback whose
  merges come from the piece scores, as transformers' SentencePieceExtractor derives them). Both
  tokenize as SentencePiece and llama.cpp do: every text segment between added tokens gets the
  "▁" dummy prefix.
- Phi-4 family (`"gpt2"`): a byte-level BPE `tokenizer.json` with the merges, and the
  pre-tokenizer regex that `tokenizer.ggml.pre` names (Phi-4: `dbrx`, cl100k's; Phi-4-mini:
  `gpt-4o`, o200k's).
- `tokenizer_config.json`: added tokens (GGUF token type CONTROL = special, USER_DEFINED = not),
  bos/eos/unk/pad, add_bos_token and the `tokenizer.chat_template`; `generation_config.json`
  with the stop ids llama.cpp stops on.

GGUF does not store an added token's rstrip flag. Phi-3's Hub tokenizer strips the whitespace
after every special token but <unk>, <s> and <|endoftext|> (and after </s>), which is the rule
llama.cpp itself applies to models named Phi-3; SentencePiece vocabularies get that rule.

Export is llama.cpp's converter (`Phi3MiniModel.set_vocab`, `gguf.SpecialVocab`) reproduced on
our folders, so a phi3-jax GGUF carries the same tokenizer keys as one made by llama.cpp.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from phi3_jax.gguf.reader import GGUFCheckpoint, GGUFError

# GGUF token types (llama.cpp's llama_token_type), which match SentencePiece's piece types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"
# Phi-3's Hub tokenizer_config: these keep the whitespace after them; other specials absorb it.
_NO_RSTRIP = ("<unk>", "<s>", "<|endoftext|>")
# Tokens that end a turn: llama.cpp stops on them (its end-of-generation set) besides eos.
_END_OF_TURN = ("<|end|>", "<|im_end|>", "<|endoftext|>")

# tokenizer.ggml.pre -> the pre-tokenizer split regex of the model's tokenizer.json.
CL100K = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
          r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
O200K = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
         r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
         r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
         r"[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_REGEX = {"dbrx": CL100K, "llama-bpe": CL100K, "llama3": CL100K, "smaug-bpe": CL100K,
             "gpt-4o": O200K, "gpt-2": None, "gpt2": None}
# The name llama.cpp knows each regex by (the first of PRE_REGEX's aliases).
PRE_NAME = {CL100K: "dbrx", O200K: "gpt-4o"}


# ---------------------------------------------------------------- GGUF -> files
def write_tokenizer_files(checkpoint: GGUFCheckpoint, out: str | os.PathLike, *,
                          sentencepiece_model: bool = True) -> list[str]:
    """Writes the checkpoint's tokenizer as Hub-style files into `out`; returns their names.

    `sentencepiece_model=False` leaves out tokenizer.model (tokenizer.json alone decides)."""
    out = Path(out)
    kind = checkpoint.meta("tokenizer.ggml.model")
    tokens = checkpoint.meta("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise GGUFError(f"{checkpoint.path} has no tokenizer (no tokenizer.ggml.model / "
                        f"tokenizer.ggml.tokens): convert it with llama.cpp's converter, which "
                        f"embeds one")
    types = checkpoint.meta("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{checkpoint.path}: tokenizer.ggml.token_type has {len(types)} entries "
                        f"for {len(tokens)} tokens")
    if len(tokens) > checkpoint.config.vocab_size:
        raise GGUFError(f"{checkpoint.path}: the tokenizer has {len(tokens)} tokens but the "
                        f"embedding only {checkpoint.config.vocab_size} rows")
    if kind == "llama":
        scores = checkpoint.meta("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise GGUFError(f"{checkpoint.path}: a SentencePiece tokenizer needs "
                            f"tokenizer.ggml.scores for each of its {len(tokens)} tokens")
        base, added = _split_sentencepiece(tokens, types)
        files = ["tokenizer.json"]
        if sentencepiece_model:
            _write_sentencepiece(checkpoint, out / "tokenizer.model", tokens[:base],
                                 scores[:base], types[:base])
            files.insert(0, "tokenizer.model")
        _write_llama_tokenizer_json(checkpoint, out / "tokenizer.json", tokens[:base],
                                    scores[:base], types[:base],
                                    _added_tokens(added, types, sentencepiece=True))
        klass = "LlamaTokenizer"
    elif kind == "gpt2":
        added = {i: t for i, (t, k) in enumerate(zip(tokens, types, strict=True))
                 if k in (CONTROL, USER_DEFINED)}
        _write_bpe_tokenizer_json(checkpoint, out / "tokenizer.json", tokens, types, added)
        files = ["tokenizer.json"]
        klass = "GPT2Tokenizer"
    else:
        raise GGUFError(f"{checkpoint.path}: tokenizer.ggml.model is {kind!r}; Phi models use "
                        f"'llama' (SentencePiece, Phi-3) or 'gpt2' (BPE, Phi-4)")
    _write_json(out / "tokenizer_config.json", _tokenizer_config(checkpoint, tokens, types, added,
                                                                 klass))
    _write_json(out / "generation_config.json", generation_config(checkpoint, tokens, types))
    return [*files, "tokenizer_config.json", "generation_config.json"]


def _split_sentencepiece(tokens: list[str], types: list[int]) -> tuple[int, dict[int, str]]:
    """(n, added): the first n tokens are the SentencePiece model's pieces (up to its last
    normal or byte piece); `added` maps the ids of the added tokens (control or user-defined,
    within the pieces or after them) to their text. Padding rows (UNUSED) after the pieces, as
    the converter writes `[PAD32011]`..., belong to neither."""
    base = max(i for i, t in enumerate(types) if t in (NORMAL, BYTE)) + 1
    added = {i: tokens[i] for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNKNOWN)}
    return base, added


def _write_sentencepiece(checkpoint: GGUFCheckpoint, path: Path, tokens: list[str],
                         scores: list[float], types: list[int]) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE  # Llama-2's, the Phi-3 tokenizer's base
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = BYTE in types
    for name, key, default in (("unk_id", "unknown", 0), ("bos_id", "bos", -1),
                               ("eos_id", "eos", -1), ("pad_id", "padding", -1)):
        value = checkpoint.meta(f"tokenizer.ggml.{key}_token_id")
        setattr(trainer, name, value if value is not None and value < len(tokens) else default)
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(checkpoint.meta("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = bool(
        checkpoint.meta("tokenizer.ggml.remove_extra_whitespaces", False))
    normalizer.escape_whitespaces = True
    for i, (token, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        piece = proto.pieces.add()
        piece.piece, piece.score = token, float(score)
        piece.type = kind if kind in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) \
            else NORMAL
        # The converter marks <unk> CONTROL when tokenizer_config lists it as special;
        # SentencePiece needs its unknown piece typed as one.
        if i == trainer.unk_id:
            piece.type = UNKNOWN
    path.write_bytes(proto.SerializeToString())


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[list[str]]:
    """transformers' SentencePieceExtractor: every split of a piece into two pieces is a merge,
    ranked by the score of the piece it makes (ties: by the ids of the two halves)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores, strict=True):
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: m[2], reverse=True)
    return [[a, b] for a, b, _ in merges]


def _added_entry(i: int, content: str, *, special: bool, rstrip: bool) -> dict[str, Any]:
    return {"id": i, "content": content, "single_word": False, "lstrip": False,
            "rstrip": rstrip, "normalized": False, "special": special}


def _added_tokens(added: dict[int, str], types: list[int], *,
                  sentencepiece: bool) -> list[dict]:
    entries = []
    for i, content in sorted(added.items()):
        special = types[i] != USER_DEFINED
        rstrip = sentencepiece and content not in _NO_RSTRIP and (special or content == "</s>")
        entries.append(_added_entry(i, content, special=special, rstrip=rstrip))
    return entries


def _write_llama_tokenizer_json(checkpoint: GGUFCheckpoint, path: Path, tokens: list[str],
                                scores: list[float], types: list[int],
                                added_tokens: list[dict]) -> None:
    """The Hub's tokenizer.json for the SentencePiece pieces `tokens`."""
    unk = checkpoint.meta("tokenizer.ggml.unknown_token_id", 0)
    prefix = bool(checkpoint.meta("tokenizer.ggml.add_space_prefix", True))
    normalizers = ([{"type": "Prepend", "prepend": SPACE}] if prefix else []) + [
        {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": None,
            "unk_token": tokens[unk] if unk is not None and unk < len(tokens) else None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
            "byte_fallback": BYTE in types, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": _merges_from_scores(tokens, scores),
        },
    }
    _write_json(path, spec)


def _write_bpe_tokenizer_json(checkpoint: GGUFCheckpoint, path: Path, tokens: list[str],
                              types: list[int], added: dict[int, str]) -> None:
    pre = checkpoint.meta("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_REGEX:
        raise GGUFError(f"{checkpoint.path}: BPE pre-tokenizer {pre!r} is not one phi3-jax "
                        f"knows ({', '.join(sorted(PRE_REGEX))}; Phi-4 uses dbrx, Phi-4-mini "
                        f"gpt-4o)")
    merges = checkpoint.meta("tokenizer.ggml.merges")
    if not merges:
        raise GGUFError(f"{checkpoint.path}: a BPE tokenizer needs tokenizer.ggml.merges")
    regex = PRE_REGEX[pre]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": regex is None}
    pre_tokenizer = byte_level if regex is None else {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        byte_level]}
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types, strict=True))
             if k in (NORMAL, BYTE)}
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(added, types, sentencepiece=False),
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
            "byte_fallback": False, "ignore_merges": False, "vocab": vocab,
            # "a b": byte-level tokens hold no spaces (a space byte is "Ġ").
            "merges": [m.split(" ", 1) for m in merges],
        },
    }
    _write_json(path, spec)


def _tokenizer_config(checkpoint: GGUFCheckpoint, tokens: list[str], types: list[int],
                      added: dict[int, str], klass: str) -> dict[str, Any]:
    sentencepiece = klass == "LlamaTokenizer"
    config: dict[str, Any] = {
        "tokenizer_class": klass,
        # llama.cpp's defaults when the file leaves them out: BOS for SentencePiece vocabularies.
        "add_bos_token": bool(checkpoint.meta("tokenizer.ggml.add_bos_token", sentencepiece)),
        "add_eos_token": bool(checkpoint.meta("tokenizer.ggml.add_eos_token", False)),
        "added_tokens_decoder": {str(e.pop("id")): e for e in
                                 _added_tokens(added, types, sentencepiece=sentencepiece)},
        "clean_up_tokenization_spaces": False,
        "model_max_length": checkpoint.config.max_position_embeddings,
    }
    if sentencepiece:
        # Every segment gets the "▁" prefix, as SentencePiece and llama.cpp give it.
        config["legacy"] = True
        config["add_prefix_space"] = bool(checkpoint.meta("tokenizer.ggml.add_space_prefix",
                                                          True))
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                      ("pad_token", "padding")):
        i = checkpoint.meta(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= i < len(tokens):
            config[name] = tokens[i]
    template = checkpoint.meta("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return config


def generation_config(checkpoint: GGUFCheckpoint, tokens: list[str],
                      types: list[int]) -> dict[str, Any]:
    """eos ids: the file's eos and eot tokens plus the turn-ending tokens of its vocabulary
    (<|end|>, <|im_end|>, <|endoftext|>), which llama.cpp also stops on."""
    eos = [checkpoint.meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    eos += [i for i, t in enumerate(tokens) if t in _END_OF_TURN and types[i] == CONTROL]
    ids = sorted({int(i) for i in eos if i is not None})
    out: dict[str, Any] = {"eos_token_id": ids}
    bos = checkpoint.meta("tokenizer.ggml.bos_token_id")
    if bos is not None:
        out["bos_token_id"] = int(bos)
    return out


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False), encoding="utf-8")
