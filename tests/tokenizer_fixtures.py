"""Tiny tokenizer folders built on the fly, shaped like the Phi-3 and Phi-4 checkpoints' ones.

The SentencePiece model mirrors Llama-2's settings (BPE, byte fallback, identity normalisation, no
whitespace collapsing, <unk>/<s>/</s> at 0/1/2, whitespace-only pieces merged last) so that the code
paths match the real 32000-piece model; only the vocabulary is small. Special tokens follow right
after the learned pieces, in the Phi-3 order, because their real ids (32000+) would not be
contiguous with a tiny vocabulary.

`write_hub_tokenizer_json` converts such a folder into the tokenizer.json that the Hub's Phi-3
folders ship, as transformers' original LlamaConverter wrote it.
"""

import io
import json
from pathlib import Path

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2

SP_VOCAB_SIZE = 512

# Mini-4k's template (spec section 6), verbatim from its tokenizer_config.json.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# (content, rstrip) in Phi-3 id order, starting at the first id after the SentencePiece pieces.
PHI3_ADDED_TOKENS = (
    ("<|endoftext|>", False),
    ("<|assistant|>", True),
    ("<|placeholder1|>", True),
    ("<|placeholder2|>", True),
    ("<|placeholder3|>", True),
    ("<|placeholder4|>", True),
    ("<|system|>", True),
    ("<|end|>", True),
    ("<|placeholder5|>", True),
    ("<|placeholder6|>", True),
    ("<|user|>", True),
)

PHI4_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>")
PHI4_MINI_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|assistant|>",
    "<|end|>",
    "<|user|>",
    "<|system|>",
    "<|tool|>",
    "<|/tool|>",
)

_TEXT = (
    "the quick brown fox jumps over a lazy dog while bananas and dragonfruits are combined in "
    "various delicious ways such as smoothies salads or desserts can you tell me how to solve "
    "this equation step by step certainly here is an answer system user assistant hello world "
    "tokenizer model language python code function return value print list dictionary string"
)


def corpus() -> list[str]:
    """A deterministic English-ish corpus: punctuation, digits, indentation, runs of spaces, a few
    accents, and "Hello" often enough to be one piece (as in the issue's Llama examples)."""
    vocabulary = _TEXT.split()
    lines = []
    for i in range(400):
        words = [vocabulary[(i * 7 + j * 13) % len(vocabulary)] for j in range(5 + i % 9)]
        line = " ".join(words).capitalize() + ("." if i % 3 else "?")
        if i % 4 == 0:
            line = f"Hello {line}"
        if i % 5 == 0:
            line = f"    {line} {i * 37}"
        if i % 7 == 0:
            line = line.replace(" ", "  ", 2)
        if i % 11 == 0:
            line += " café naïve résumé"
        lines.append(line)
    return lines


def train_sentencepiece(path: Path, vocab_size: int = SP_VOCAB_SIZE) -> None:
    """Trains a Llama-2-style BPE SentencePiece model and writes it to `path`."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    # Llama-2's whitespace-only pieces ("▁▁" is 259, "▁▁▁▁" 268) score below every other piece, so
    # SentencePiece merges them last: " Hello" is "▁▁Hello" -> ["▁", "▁Hello"] = [29871, 15043] in
    # the checkpoint's own test vectors, where a trained "▁▁" would take the first two marks. Do
    # the same here, keeping their order.
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    lowest = min(p.score for p in proto.pieces)
    spaces = [p for p in proto.pieces if len(p.piece) > 1 and set(p.piece) == {"\u2581"}]
    for rank, piece in enumerate(spaces, 1):
        piece.score = lowest - rank
    path.write_bytes(proto.SerializeToString())


def _token_entry(
    content: str, *, rstrip: bool = False, lstrip: bool = False, special: bool = True
) -> dict:
    return {
        "content": content,
        "lstrip": lstrip,
        "normalized": False,
        "rstrip": rstrip,
        "single_word": False,
        "special": special,
    }


def make_phi3_dir(
    path: Path,
    *,
    add_bos_token: bool = False,
    chat_template: str | None = PHI3_CHAT_TEMPLATE,
    lstrip_tokens: tuple[str, ...] = (),
    tokenizer_json: bool = False,
) -> Path:
    """Writes tokenizer.model + tokenizer_config.json like Phi-3-mini-4k-instruct's into `path`,
    and with `tokenizer_json` the Hub's tokenizer.json too.

    `lstrip_tokens` also get lstrip=true, which no Phi-3 token has, to exercise that flag."""
    path.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(path / "tokenizer.model")
    decoder = {
        "0": _token_entry("<unk>"),
        "1": _token_entry("<s>"),
        "2": _token_entry("</s>", rstrip=True, special=False),
    }
    for offset, (content, rstrip) in enumerate(PHI3_ADDED_TOKENS):
        decoder[str(SP_VOCAB_SIZE + offset)] = _token_entry(
            content, rstrip=rstrip, lstrip=content in lstrip_tokens
        )
    config = {
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_json:
        write_hub_tokenizer_json(path)
    return path


def llama_merges(proto: sentencepiece_model_pb2.ModelProto) -> list[tuple[str, str]]:
    """BPE merges as transformers' SentencePieceExtractor.extract(vocab_scores) made them for the
    original LlamaConverter (v4.3x-4.4x): every split of a piece into two pieces, ranked by the
    merged piece's score, best first (<unk>, <s>, </s> count as 0.0); a piece's own splits by the
    ids of their left, then right, halves. transformers v5 ranks merges by id instead."""
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    scores = {p.piece: 0.0 if i < 3 else p.score for i, p in enumerate(proto.pieces)}
    merges = []
    for piece, score in scores.items():
        splits = [
            (piece[:k], piece[k:], score)
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        merges += sorted(splits, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: m[2], reverse=True)  # stable: ties keep the order above
    return [(left, right) for left, right, _ in merges]


def write_hub_tokenizer_json(path: Path) -> Path:
    """Writes `path`/tokenizer.json from its tokenizer.model and tokenizer_config.json as the Hub's
    Phi-3 (and Llama-2) tokenizer.json is: Prepend("▁") + Replace(" ", "▁") normalizer, no
    pre-tokenizer, BPE with byte fallback and score-ranked merges, the decoder Replace("▁", " "),
    ByteFallback, Fuse, Strip(1 leading space), and the added tokens with their flags."""
    from tokenizers import AddedToken, decoders, models, normalizers, processors

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((path / "tokenizer.model").read_bytes())
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    bpe = models.BPE(
        vocab, llama_merges(proto), unk_token="<unk>", fuse_unk=True, byte_fallback=True
    )
    tok = tokenizers.Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    # Llama's template, which transformers rebuilds from add_bos_token anyway.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    config = json.loads((path / "tokenizer_config.json").read_text())
    for i, entry in sorted(config["added_tokens_decoder"].items(), key=lambda e: int(e[0])):
        token = AddedToken(
            entry["content"],
            single_word=entry["single_word"],
            lstrip=entry["lstrip"],
            rstrip=entry["rstrip"],
            normalized=entry["normalized"],
            special=entry["special"],
        )
        if entry["special"]:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
        assert tok.token_to_id(entry["content"]) == int(i), entry
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def make_bpe_dir(
    path: Path,
    special_tokens: tuple[str, ...] = PHI4_SPECIAL_TOKENS,
    *,
    chat_template: str | None = None,
) -> Path:
    """Writes a byte-level BPE tokenizer.json (+ tokenizer_config.json) like Phi-4's into `path`."""
    decoders, pre_tokenizers = tokenizers.decoders, tokenizers.pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    tokenizer.add_special_tokens(list(special_tokens))
    tokenizer.save(str(path / "tokenizer.json"))
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": 16384,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<|endoftext|>",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path
