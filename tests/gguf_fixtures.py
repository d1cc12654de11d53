"""Folders and files for the GGUF tests: tiny Phi-3 / Phi-4 style checkpoints with real tokenizers,
GGUF files rewritten to be broken, and a fake Ollama store in Ollama's layout.

The Phi-3 folders carry what a Hub folder does: tokenizer.model (SentencePiece trained on the fly),
tokenizer_config.json with Phi-3's added tokens, and a tokenizer.json in the Hub's format, built
here as the original Llama conversion built it (Prepend + Replace normalizer, BPE with byte
fallback whose merges are ranked by piece score), independently of phi3_jax.gguf.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np
from conftest import FAMILY, longrope, make_hf_checkpoint
from tokenizer_fixtures import (
    PHI3_ADDED_TOKENS,
    SP_VOCAB_SIZE,
    corpus,
    make_phi3_dir,
)

# The embedding has padding rows past the tokenizer, as Phi-3's 32064 rows for 32011 tokens.
PHI3_VOCAB = 544
ENDOFTEXT = SP_VOCAB_SIZE  # <|endoftext|>, the first added token
END = SP_VOCAB_SIZE + [t for t, _ in PHI3_ADDED_TOKENS].index("<|end|>")

# Leading, repeated and trailing spaces, newlines, tabs, digits, emoji, accents, special tokens.
TEXTS = [
    "Hello world",
    " Hello",
    "  Hello",
    " ",
    "a  b   c    d",
    "trailing space ",
    "line one\nline two\n\n  indented",
    "\ttab\tseparated",
    "Digits 12345 and 3.14159, 2024-06-01",
    "emoji 🦙🚀 ok 😁",
    "café naïve résumé",
    "<|user|>\nHow are you?<|end|>\n<|assistant|>\nFine, thanks.<|end|>\n",
    "<|system|>Be brief.<|end|><|user|> hi  there <|end|><|assistant|>",
    "x<|endoftext|> y",
]

# Shapes of the family: (config overrides, description).
SHAPES = {
    "mha": dict(FAMILY["mha"], sliding_window=2047),  # mini-4k's window (longer than tests)
    "gqa": dict(FAMILY["gqa"]),
    # 128k-style LongRoPE scaled down by 16: original 256, max 8192 (128k / 4k = 32x); prompts
    # over 256 tokens take the long factors. (llama.cpp rounds its context up to a multiple of
    # 256 and picks the factors by that context, so 256 is the least original length with
    # which it runs the short factors.)
    "longrope": dict(FAMILY["gqa"], max_position_embeddings=8192, **longrope(8, 256)),
    "phi4mini": dict(FAMILY["phi4mini"]),
}


def hub_tokenizer_json(folder: pathlib.Path) -> None:
    """Writes folder/tokenizer.json in the Hub's Llama format for folder/tokenizer.model."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = pb.ModelProto()
    proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    pieces = [(p.piece, p.score) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    merges = []
    for piece, score in pieces:
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges = [(a, b) for a, b, _ in sorted(merges, key=lambda m: m[2], reverse=True)]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True,
                                     byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                 normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "),
                                           decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    added = sorted(config["added_tokens_decoder"].items(), key=lambda kv: int(kv[0]))
    tokenizer.add_tokens([AddedToken(e["content"], rstrip=e["rstrip"], lstrip=e["lstrip"],
                                     normalized=False, special=e["special"]) for _, e in added])
    tokenizer.save(str(folder / "tokenizer.json"))


def make_phi3_model(path: pathlib.Path, shape: str = "mha", seed: int = 0) -> pathlib.Path:
    """A random Phi-3 checkpoint with a Phi-3 tokenizer (tokenizer.model + Hub tokenizer.json)."""
    make_hf_checkpoint(path, seed=seed, vocab_size=PHI3_VOCAB, bos_token_id=1,
                       eos_token_id=ENDOFTEXT, pad_token_id=ENDOFTEXT, **SHAPES[shape])
    make_phi3_dir(path)
    hub_tokenizer_json(path)
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [ENDOFTEXT, END]}))
    return path


def make_bpe_tokenizer(path: pathlib.Path, regex: str | None,
                       special: tuple[str, ...]) -> pathlib.Path:
    """A byte-level BPE tokenizer.json (Phi-4 style): `regex` split + ByteLevel, or GPT-2's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None)
    tokenizer.pre_tokenizer = byte_level if regex is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated"), byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=480, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([*corpus(), "emoji 🦙🚀 😁 digits 1234567890"], trainer=trainer)
    tokenizer.add_special_tokens(list(special))
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def make_phi4_model(path: pathlib.Path, regex: str | None, special: tuple[str, ...],
                    chat_template: str, seed: int = 0, **overrides) -> pathlib.Path:
    """A random checkpoint with a Phi-4 style BPE tokenizer and chat template."""
    make_bpe_tokenizer(path, regex, special)
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    eos = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == "<|endoftext|>")
    n = max(t["id"] for t in tokenizer["added_tokens"]) + 1
    make_hf_checkpoint(path, seed=seed, vocab_size=n + 8, bos_token_id=eos, eos_token_id=eos,
                       pad_token_id=eos, **overrides)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": False, "add_eos_token": False,
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "chat_template": chat_template}))
    return path


# ---- broken GGUF files ----
def rewrite_gguf(src: pathlib.Path, dst: pathlib.Path, *, arch: str | None = None,
                 drop_prefix: str | None = None) -> pathlib.Path:
    """Copies a GGUF file field by field and tensor by tensor with the gguf package, optionally
    naming another architecture or dropping the keys that start with `drop_prefix`."""
    import gguf

    reader = gguf.GGUFReader(src)
    old_arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch or old_arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or (
                drop_prefix and key.startswith(drop_prefix)):
            continue
        value = field.contents()
        vtype = field.types[0]
        new_key = key.replace(f"{old_arch}.", f"{arch}.", 1) if arch else key
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(new_key, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(new_key, value, vtype)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def set_tensor_type(path: pathlib.Path, name: str, type_id: int) -> None:
    """Overwrites the type id in `name`'s tensor info, in place."""
    import gguf

    reader = gguf.GGUFReader(path, "r+")
    tensor = next(t for t in reader.tensors if t.name == name)
    tensor.field.parts[4][0] = type_id
    reader.data.flush()
    del reader


# ---- a fake Ollama store ----
def ollama_store(root: pathlib.Path, models: dict[str, pathlib.Path]) -> pathlib.Path:
    """A store in Ollama's layout (manifests/registry.ollama.ai/library/NAME/TAG + sha256 blobs)
    holding each GGUF file under its 'name:tag'."""
    for name, gguf_file in models.items():
        model, _, tag = name.partition(":")
        data = gguf_file.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        blobs = root / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        (blobs / f"sha256-{digest}").write_bytes(data)
        config = b'{"model_format":"gguf","model_family":"phi3"}'
        config_digest = hashlib.sha256(config).hexdigest()
        (blobs / f"sha256-{config_digest}").write_bytes(config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "digest": f"sha256:{config_digest}", "size": len(config)},
            "layers": [{"mediaType": "application/vnd.ollama.image.model",
                        "digest": f"sha256:{digest}", "size": len(data)}],
        }
        folder = root / "manifests" / "registry.ollama.ai" / "library" / model
        folder.mkdir(parents=True, exist_ok=True)
        (folder / (tag or "latest")).write_text(json.dumps(manifest))
    return root


def leftovers(folder: pathlib.Path) -> list[str]:
    """Entries of `folder` that a failed run could have left (temporary or partial outputs)."""
    return sorted(os.listdir(folder)) if folder.exists() else []
