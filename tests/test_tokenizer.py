"""Tokenizer parity with transformers on tiny SentencePiece (Phi-3) and BPE (Phi-4) folders."""

import random
import sys

import pytest
from tokenizer_fixtures import (
    PHI3_ADDED_TOKENS,
    PHI3_CHAT_TEMPLATE,
    SP_VOCAB_SIZE,
    make_bpe_dir,
    make_phi3_dir,
)

from phi3_jax.tokenizer import TOKENIZER_FILES, Tokenizer, copy_tokenizer_files

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    " ",
    "",
    "line one\nline two\n\n  indented\tand tabbed\r\n",
    "\nstarts with a newline",
    "naïve café résumé, 日本語 and emoji 🙂🎉 (byte fallback)",
    "literal \u2581 mark",
    "<|user|>\nHello<|end|>\n<|assistant|>\n",
    "<|system|>  \n\n  You are terse.<|end|>\n<|user|>\u3000\u00a0x<|end|>\n",
    "text<|end|>text",
    "  <|user|>x",
    "spaces before <|end|>   and after",
    "<|endoftext|> eos is not rstrip",
    "x </s>  y <s> z <unk>",
    "<|user|><|assistant|><|end|>",
    "<<|user|>> and <|unknown|>",
    "<|end|>\x1cnot whitespace for tokenizers",
    (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHow do I combine bananas and dragonfruits?"
        "<|end|>\n<|assistant|>\nCertainly! Smoothies:\n  1. bananas\n  2. dragonfruits<|end|>\n"
        "<|user|>\nAnd salads? 🙂<|end|>\n<|assistant|>\n"
    ),
]

STREAM_TEXTS = [t for t in TEXTS if t] + ["ab" * 50 + " 🙂" * 5 + " café\n" * 3]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return make_bpe_dir(tmp_path_factory.mktemp("phi4"))


@pytest.fixture(scope="module")
def bpe(bpe_dir):
    return Tokenizer.from_dir(bpe_dir)


# --- Phi-3 (SentencePiece) ---------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_phi3_encode_matches_transformers(phi3, hf_phi3, text):
    # Default call on both sides: this also checks that neither adds a BOS (add_bos_token false).
    assert phi3.encode(text) == hf_phi3(text)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [False, True])
def test_phi3_decode_matches_transformers(phi3, hf_phi3, text, skip):
    ids = hf_phi3(text)["input_ids"]
    assert phi3.decode(ids, skip_special_tokens=skip) == hf_phi3.decode(
        ids, skip_special_tokens=skip
    )


def test_phi3_decode_random_ids_matches_transformers(phi3, hf_phi3):
    # Random ids include stray byte-fallback pieces that are not valid UTF-8.
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(phi3.vocab_size) for _ in range(rng.randrange(1, 12))]
        for skip in (False, True):
            assert phi3.decode(ids, skip_special_tokens=skip) == hf_phi3.decode(
                ids, skip_special_tokens=skip
            ), ids


def test_phi3_special_tokens(phi3, hf_phi3):
    ids = {token: SP_VOCAB_SIZE + i for i, (token, _) in enumerate(PHI3_ADDED_TOKENS)}
    assert {t: phi3.token_id(t) for t in ids} == ids
    assert phi3.vocab_size == len(hf_phi3) == SP_VOCAB_SIZE + len(PHI3_ADDED_TOKENS)
    eos = ids["<|endoftext|>"]
    assert (phi3.bos_id, phi3.eos_id, phi3.pad_id, phi3.unk_id) == (1, eos, eos, 0)
    assert phi3.special_tokens == {"<unk>", "<s>", *ids}  # </s> is not special in Phi-3
    assert phi3.encode("<|user|>\n") == [ids["<|user|>"]]
    assert phi3.token_id("\u2581") == hf_phi3.convert_tokens_to_ids("\u2581")
    with pytest.raises(KeyError, match="not in the vocabulary"):
        phi3.token_id("<|nope|>")


def test_phi3_out_of_vocabulary_ids_decode_to_nothing(phi3):
    # Phi-3's embedding has 32064 rows for 32011 tokens; the model may still sample the others.
    assert phi3.decode([phi3.vocab_size, *phi3.encode("hi"), phi3.vocab_size + 50]) == "hi"


@pytest.mark.parametrize("legacy", [False, True])
def test_phi3_legacy_and_lstrip_match_transformers(tmp_path, legacy):
    transformers = pytest.importorskip("transformers")
    path = make_phi3_dir(tmp_path, legacy=legacy, lstrip_tokens=("<|placeholder1|>",))
    ours, ref = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    lstrip_texts = ["x  <|placeholder1|>  y", " \n<|placeholder1|>x", "<|end|> <|placeholder1|>"]
    for text in TEXTS + lstrip_texts:
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids), text


def test_phi3_legacy_prefixes_text_after_special_tokens(tmp_path):
    old = Tokenizer.from_dir(make_phi3_dir(tmp_path / "legacy", legacy=True))
    new = Tokenizer.from_dir(make_phi3_dir(tmp_path / "new", legacy=False))
    user = old.token_id("<|user|>")
    assert old.encode("<|user|>\nHello") == [user, *old.encode("Hello")]
    assert new.encode("<|user|>\nHello") == [user, *new.encode("Hello")[1:]]  # no "▁"
    assert old.decode(old.encode("<|user|>\nHello")) == "<|user|> Hello"
    assert new.decode(new.encode("<|user|>\nHello")) == "<|user|>Hello"


def test_phi3_add_bos(tmp_path, phi3):
    with_bos = Tokenizer.from_dir(make_phi3_dir(tmp_path, add_bos_token=True))
    assert with_bos.encode("Hello") == [1, *phi3.encode("Hello")]
    assert with_bos.encode("Hello", add_bos=False) == phi3.encode("Hello")
    assert phi3.encode("Hello", add_bos=True) == [1, *phi3.encode("Hello")]
    transformers = pytest.importorskip("transformers")
    assert (
        with_bos.encode("Hello")
        == transformers.AutoTokenizer.from_pretrained(tmp_path)("Hello")["input_ids"]
    )


@pytest.mark.parametrize("skip", [False, True])
def test_phi3_stream_decoder_joins_to_decode(phi3, skip):
    for text in STREAM_TEXTS:
        ids = phi3.encode(text)
        stream = phi3.stream_decoder(skip_special_tokens=skip)
        deltas = [stream.put(i) for i in ids]
        deltas.append(stream.flush())
        assert "".join(deltas) == phi3.decode(ids, skip_special_tokens=skip), text
        assert not any("\ufffd" in d for d in deltas), "incomplete UTF-8 leaked into a delta"


def test_stream_decoder_emits_as_soon_as_text_is_complete(phi3):
    words = phi3.encode("bananas and dragonfruits")
    stream = phi3.stream_decoder()
    text = "".join(stream.put(i) for i in words)
    assert text == "bananas and dragonfruits"  # nothing was held back for flush
    emoji = phi3.encode(" 🙂")  # "▁" then four byte-fallback pieces
    assert [stream.put(i) for i in emoji] == [" ", "", "", "", "🙂"]
    assert stream.flush() == ""


def test_stream_decoder_flushes_incomplete_bytes(phi3):
    stream = phi3.stream_decoder()
    partial = phi3.encode("🙂")[:-1]
    assert "".join(stream.put(i) for i in partial) == ""
    assert stream.flush() == phi3.decode(partial)


# --- Phi-4 (tokenizer.json) --------------------------------------------------------------------


@pytest.mark.parametrize("text", [*TEXTS, "<|im_start|>user<|im_sep|>Hi!<|im_end|>"])
def test_bpe_matches_transformers(bpe, bpe_dir, text):
    transformers = pytest.importorskip("transformers")
    for ref in (
        transformers.PreTrainedTokenizerFast(tokenizer_file=str(bpe_dir / "tokenizer.json")),
        transformers.AutoTokenizer.from_pretrained(bpe_dir),
    ):
        ids = ref(text, add_special_tokens=False)["input_ids"]
        assert bpe.encode(text) == ids
        for skip in (False, True):
            assert bpe.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            )


def test_bpe_special_tokens(bpe):
    assert bpe.encode("<|im_start|>user<|im_sep|>")[0] == bpe.token_id("<|im_start|>")
    assert bpe.bos_id == bpe.eos_id == bpe.pad_id == bpe.token_id("<|endoftext|>")
    assert bpe.special_tokens == {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>"}
    assert bpe.vocab_size == bpe.token_id("<|im_sep|>") + 1


@pytest.mark.parametrize("skip", [False, True])
def test_bpe_stream_decoder_joins_to_decode(bpe, skip):
    for text in STREAM_TEXTS:
        ids = bpe.encode(text)
        stream = bpe.stream_decoder(skip_special_tokens=skip)
        deltas = [stream.put(i) for i in ids] + [stream.flush()]
        assert "".join(deltas) == bpe.decode(ids, skip_special_tokens=skip), text
        assert not any("\ufffd" in d for d in deltas)


def test_tokenizer_json_needs_tokenizers(bpe_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match="pip install tokenizers"):
        Tokenizer.from_dir(bpe_dir)


# --- files and errors --------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"neither tokenizer\.model .* nor tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither"):
        copy_tokenizer_files(tmp_path, tmp_path / "out")


def test_copy_tokenizer_files(phi3_dir, phi3, tmp_path):
    (phi3_dir / "chat_template.jinja").write_text(PHI3_CHAT_TEMPLATE)
    try:
        copied = copy_tokenizer_files(phi3_dir, tmp_path / "out")
    finally:
        (phi3_dir / "chat_template.jinja").unlink()
    assert sorted(p.name for p in copied) == [
        "chat_template.jinja",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert set(TOKENIZER_FILES) >= {p.name for p in copied}
    copy = Tokenizer.from_dir(tmp_path / "out")
    assert copy.encode(TEXTS[-1]) == phi3.encode(TEXTS[-1])
