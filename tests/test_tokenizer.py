"""The tokenizer encodes as the checkpoint's own does: the `tokenizers` library on a Hub-format
tokenizer.json, and SentencePiece itself on tokenizer.model (Phi-3); transformers on Phi-4's BPE.

Phi-3 folders are tested both ways: with the Hub's tokenizer.json (built from the tiny
tokenizer.model as the original Llama conversion wrote it, tokenizer_fixtures.py) and with
tokenizer.model alone, which must give the same ids.
"""

import json
import random
import shutil
import sys

import pytest
import sentencepiece as spm
import tokenizers
from tokenizer_fixtures import (
    PHI3_ADDED_TOKENS,
    PHI3_CHAT_TEMPLATE,
    SP_VOCAB_SIZE,
    make_bpe_dir,
    make_phi3_dir,
)

from phi3_jax.tokenizer import TOKENIZER_FILES, Tokenizer, copy_tokenizer_files

ADDED = {token: SP_VOCAB_SIZE + i for i, (token, _) in enumerate(PHI3_ADDED_TOKENS)}

# Plain text: leading, repeated and trailing spaces, newlines, tabs, digits, emoji, accents.
PLAIN_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " Hello",
    "  Hello",
    "   Hello",
    " ",
    "  ",
    "",
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "Hello  world   with    runs",
    "line one\nline two\n\n  indented\tand tabbed\r\n",
    "\nstarts with a newline",
    "\n",
    " \n ",
    "\tHello\t\t",
    "x = 3",
    "12345 + 67 = 12412",
    "naïve café résumé, 日本語 and emoji 🙂🎉 (byte fallback)",
    " 🙂",
    "🙂 ",
    "\u3000\u00a0ideographic and no-break spaces",
]
# Added tokens inside text: what comes after them is normalized on its own ("▁" again).
SPECIAL_TEXTS = [
    "<|user|>\nHello<|end|>\n<|assistant|>\n",
    "<|user|>\n Hello",
    "<|user|>Hello",
    "<|system|>  \n\n  You are terse.<|end|>\n<|user|>\u3000\u00a0x<|end|>\n",
    "text<|end|>text",
    "  <|user|>x",
    "spaces before <|end|>   and after",
    "<|endoftext|> eos is not rstrip",
    "<|endoftext|>  two spaces",
    "<|endoftext|>\n",
    "x </s>  y <s> z <unk>",
    "<|user|><|assistant|><|end|>",
    "<<|user|>> and <|unknown|>",
    "<|end|>\x1cnot whitespace for tokenizers",
    "literal \u2581 mark<|end|>\u2581",
    (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHow do I combine bananas and dragonfruits?"
        "<|end|>\n<|assistant|>\nCertainly! Smoothies:\n  1. bananas\n  2. dragonfruits<|end|>\n"
        "<|user|>\nAnd salads? 🙂<|end|>\n<|assistant|>\n"
    ),
]
TEXTS = PLAIN_TEXTS + SPECIAL_TEXTS
STREAM_TEXTS = [t for t in TEXTS if t] + ["ab" * 50 + " 🙂" * 5 + " café\n" * 3]


@pytest.fixture(scope="module")
def hub(phi3_hub_dir):
    """The checkpoint's own tokenizer: `tokenizers` on its tokenizer.json."""
    return tokenizers.Tokenizer.from_file(str(phi3_hub_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def phi3_json(phi3_hub_dir):
    return Tokenizer.from_dir(phi3_hub_dir)


@pytest.fixture(scope="module", params=["tokenizer.model", "tokenizer.json"])
def ours(request, phi3, phi3_json):
    """phi3-jax on the Phi-3 folder without, then with, the Hub's tokenizer.json."""
    return phi3 if request.param == "tokenizer.model" else phi3_json


@pytest.fixture(scope="module")
def sp(phi3_dir):
    return spm.SentencePieceProcessor(model_file=str(phi3_dir / "tokenizer.model"))


def hub_ids(hub, text):
    return hub.encode(text, add_special_tokens=False).ids


def pieces(tok, *names):
    return [tok.token_id(name.replace(" ", "\u2581")) for name in names]


# --- the contract: the checkpoint's tokenizer.json, and SentencePiece --------------------------


def test_issue_examples(ours, hub):
    # The checkpoint's tokenizer: " Hello" -> [29871, 15043], "  Hello" -> [259, 15043] and
    # " " -> [259] with Llama-2's vocabulary; the same shapes with the tiny one.
    cases = {
        " Hello": pieces(ours, " ", " Hello"),
        "  Hello": pieces(ours, "  ", " Hello"),
        " ": pieces(ours, "  "),
        "Hello": pieces(ours, " Hello"),
    }
    for text, expected in cases.items():
        assert ours.encode(text) == hub_ids(hub, text) == expected, text
        assert ours.decode(expected) == text


@pytest.mark.parametrize("text", TEXTS)
def test_phi3_encode_matches_hub_tokenizer_json(ours, hub, text):
    # Default call on both sides: this also checks that no BOS is added (add_bos_token false).
    assert ours.encode(text) == hub_ids(hub, text)


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_phi3_encode_matches_sentencepiece(ours, sp, text):
    assert ours.encode(text) == sp.encode(text)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [False, True])
def test_phi3_decode_matches_hub_tokenizer_json(ours, hub, text, skip):
    ids = hub_ids(hub, text)
    assert ours.decode(ids, skip_special_tokens=skip) == hub.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_phi3_decode_inverts_encode(ours, text):
    assert ours.decode(ours.encode(text)) == text


def test_text_after_added_tokens_is_normalized_on_its_own(ours, hub):
    """The Hub tokenizer.json prepends "▁" to every stretch of text between added tokens; a token
    with rstrip (<|user|>, <|end|>, ...) first swallows the whitespace after it, one without
    (<|endoftext|>) leaves it to the text. Decoding does not take the "▁" back."""
    user, eot = ADDED["<|user|>"], ADDED["<|endoftext|>"]
    hello = pieces(ours, " Hello")
    cases = {
        "<|user|>\nHello": [user, *hello],
        "<|user|>\n  \n Hello": [user, *hello],
        "<|user|>Hello": [user, *hello],
        "<|endoftext|>Hello": [eot, *hello],
        "<|endoftext|> Hello": [eot, *pieces(ours, " ", " Hello")],
        "Hello<|endoftext|>Hello": [*hello, eot, *hello],
        "<|user|>": [user],  # an empty stretch gets nothing
        "<|user|>\n": [user],
    }
    for text, expected in cases.items():
        assert ours.encode(text) == hub_ids(hub, text) == expected, text
    assert ours.decode([user, *hello]) == "<|user|> Hello"
    assert ours.decode([user, *hello], skip_special_tokens=True) == "Hello"
    assert ours.decode([*hello, eot, *hello]) == "Hello<|endoftext|> Hello"


def test_random_strings_match_hub_and_sentencepiece(ours, hub, sp):
    # Each stretch between added tokens goes through SentencePiece's BPE (tokenizer.model) or the
    # converted merges (tokenizer.json): they must agree everywhere, not only on chosen strings.
    alphabet = [*"ab Hel lo\n\t 12🙂é\u3000", "  ", "the", "Hello", "<|user|>", "<|end|>",
                "<|endoftext|>", "<s>", "</s>", "\u2581", "\x1c"]
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 14)))
        ids = ours.encode(text)
        assert ids == hub_ids(hub, text), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hub.decode(
                ids, skip_special_tokens=skip
            ), text
        if not any(t in text for t in ("<|", "<s>", "</s>")):
            assert ids == sp.encode(text), text
            # "▁" in the input is indistinguishable from a space, in the Hub tokenizer too.
            assert ours.decode(ids) == text.replace("\u2581", " "), text


def test_phi3_decode_random_ids_matches_hub(ours, hub):
    # Random ids include stray byte-fallback pieces that are not valid UTF-8.
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 12))]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hub.decode(
                ids, skip_special_tokens=skip
            ), ids


def test_transformers_v5_differs_and_we_follow_the_checkpoint(phi3_dir, phi3_hub_dir, phi3, hub):
    """transformers v5's AutoTokenizer replaces the Llama normalizer by its own, even when the
    folder has the Hub's tokenizer.json: "▁" only at the very start, and only when the text does
    not begin with a space. From tokenizer.model alone it also ranks merges by id, so "▁▁" merges
    first ("▁▁Hello" -> ["▁▁", "H", "ello"]; ["▁▁", "Hello"] with Llama-2's vocabulary). Those
    are not the checkpoint's ids; PreTrainedTokenizerFast on the tokenizer.json alone gives them."""
    transformers = pytest.importorskip("transformers")
    user = ADDED["<|user|>"]
    expected = {  # what v5 gives; the checkpoint's ids are in the comments
        " Hello": pieces(phi3, " Hello"),  # ▁ + ▁Hello
        " ": pieces(phi3, " "),  # ▁▁
        "<|user|>\nHello": [user, *pieces(phi3, "H", "ello")],  # <|user|> + ▁Hello
    }
    v5_model = {**expected, "  Hello": pieces(phi3, "  ", "H", "ello")}  # ▁▁ + ▁Hello
    v5_json = {**expected, "  Hello": pieces(phi3, " ", " Hello")}
    for folder, cases in ((phi3_dir, v5_model), (phi3_hub_dir, v5_json)):
        v5 = transformers.AutoTokenizer.from_pretrained(folder)
        for text, ids in cases.items():
            assert v5(text, add_special_tokens=False)["input_ids"] == ids, (folder, text)
            assert phi3.encode(text) == hub_ids(hub, text) != ids
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(phi3_hub_dir / "tokenizer.json"))
    for text in TEXTS:
        assert fast(text, add_special_tokens=False)["input_ids"] == phi3.encode(text), text


def test_tokenizer_json_is_the_authority(phi3_hub_dir, tmp_path):
    # A tokenizer.json that disagrees with tokenizer.model (here: no dummy prefix) wins.
    path = tmp_path / "tok"
    shutil.copytree(phi3_hub_dir, path)
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    (path / "tokenizer.json").write_text(json.dumps(spec))
    tok = Tokenizer.from_dir(path)
    assert tok.encode("Hello") == tokenizers.Tokenizer.from_file(
        str(path / "tokenizer.json")
    ).encode("Hello", add_special_tokens=False).ids
    assert tok.encode("Hello") != Tokenizer.from_dir(phi3_hub_dir).encode("Hello")


def test_lstrip_tokens_match_hub(tmp_path):
    # No Phi-3 token has lstrip; the flag still works as in the Hub tokenizer.json.
    path = make_phi3_dir(tmp_path, lstrip_tokens=("<|placeholder1|>",), tokenizer_json=True)
    hub = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    with_json = Tokenizer.from_dir(path)
    (path / "tokenizer.json").unlink()
    without = Tokenizer.from_dir(path)
    texts = ["x  <|placeholder1|>  y", " \n<|placeholder1|>x", "<|end|> <|placeholder1|>",
             "a \u3000<|placeholder1|>"]
    for text in texts:
        assert with_json.encode(text) == without.encode(text) == hub_ids(hub, text), text
    placeholder = ADDED["<|placeholder1|>"]
    assert without.encode("a  <|placeholder1|>  the") == [
        *pieces(without, " a"), placeholder, *pieces(without, " the")
    ]


def test_phi3_special_tokens(ours):
    assert {t: ours.token_id(t) for t in ADDED} == ADDED
    assert ours.vocab_size == SP_VOCAB_SIZE + len(PHI3_ADDED_TOKENS)
    eos = ADDED["<|endoftext|>"]
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (1, eos, eos, 0)
    assert ours.special_tokens == {"<unk>", "<s>", *ADDED}  # </s> is not special in Phi-3
    assert ours.encode("<|user|>\n") == [ADDED["<|user|>"]]
    assert ours.encode("<s></s><unk>") == [1, 2, 0]
    assert ours.token_id("\u2581") == pieces(ours, " ")[0]
    with pytest.raises(KeyError, match="not in the vocabulary"):
        ours.token_id("<|nope|>")


def test_phi3_out_of_vocabulary_ids_decode_to_nothing(ours):
    # Phi-3's embedding has 32064 rows for 32011 tokens; the model may still sample the others.
    assert ours.decode([ours.vocab_size, *ours.encode("hi"), ours.vocab_size + 50]) == "hi"


@pytest.mark.parametrize("tokenizer_json", [False, True])
def test_phi3_add_bos(tmp_path, phi3, tokenizer_json):
    path = make_phi3_dir(tmp_path, add_bos_token=True, tokenizer_json=tokenizer_json)
    with_bos = Tokenizer.from_dir(path)
    assert with_bos.encode("Hello") == [1, *phi3.encode("Hello")]
    assert with_bos.encode("Hello", add_bos=False) == phi3.encode("Hello")
    assert phi3.encode("Hello", add_bos=True) == [1, *phi3.encode("Hello")]
    if tokenizer_json:  # the Hub file's own post-processor adds the same <s>
        hub = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        assert with_bos.encode(" Hello") == hub.encode(" Hello").ids


# --- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [False, True])
def test_phi3_stream_decoder_joins_to_decode(ours, skip):
    for text in STREAM_TEXTS:
        ids = ours.encode(text)
        stream = ours.stream_decoder(skip_special_tokens=skip)
        deltas = [stream.put(i) for i in ids]
        deltas.append(stream.flush())
        assert "".join(deltas) == ours.decode(ids, skip_special_tokens=skip), text
        assert not any("\ufffd" in d for d in deltas), "incomplete UTF-8 leaked into a delta"


def test_stream_decoder_keeps_spaces_after_skipped_tokens(ours):
    # Generation streams the reply after the prompt: "▁" pieces right after a skipped <|end|>
    # keep their space, as in the whole decode; only the very first one loses it.
    ids = ours.encode("Hi<|end|><|user|>\n  there<|endoftext|> x")
    stream = ours.stream_decoder(skip_special_tokens=True)
    text = "".join(stream.put(i) for i in ids) + stream.flush()
    assert text == ours.decode(ids, skip_special_tokens=True) == "Hi there  x"


def test_stream_decoder_emits_as_soon_as_text_is_safe(ours):
    words = ours.encode("bananas and dragonfruits")
    stream = ours.stream_decoder()
    text = "".join(stream.put(i) for i in words)
    assert text == "bananas and dragonfruits"  # nothing was held back for flush
    emoji = ours.encode("🙂")  # "▁" then four byte-fallback pieces
    assert [stream.put(i) for i in emoji] == [" ", "", "", "", ""]
    assert stream.put(ours.token_id("\u2581")) == "🙂 "  # the run of bytes has ended
    assert stream.flush() == ""


def test_stream_decoder_agrees_on_invalid_byte_runs(ours):
    # "\x0c" alone is valid UTF-8, but the run <0x0C> <0xE2> <0x82> is not: the whole decode
    # shows three U+FFFD, so the stream must not have shown "\x0c" first.
    byte = {b: ours.token_id(f"<0x{b:02X}>") for b in (0x0C, 0xE2, 0x82, 0xF0, 0x9F, 0x99)}
    the = ours.encode(" the")
    end = ADDED["<|end|>"]
    cases = [
        [*the, byte[0x0C], byte[0xE2], byte[0x82], *the],
        [*the, byte[0x0C], byte[0xE2], byte[0x82]],
        # A skipped special token vanishes before decoding: the bytes around it are one run.
        [byte[0xF0], byte[0x9F], end, byte[0x99], *ours.encode("🙂")[-1:], *the],
        [byte[0x0C], end, byte[0xE2], ours.vocab_size + 3, byte[0x82], end],
    ]
    for ids in cases:
        for skip in (False, True):
            stream = ours.stream_decoder(skip_special_tokens=skip)
            text = "".join(stream.put(i) for i in ids) + stream.flush()
            assert text == ours.decode(ids, skip_special_tokens=skip), (ids, skip)


@pytest.mark.parametrize("skip", [False, True])
def test_stream_decoder_joins_to_decode_on_random_ids(ours, bpe, skip):
    # Sampled ids: byte pieces, specials and unknown ids in any order.
    rng = random.Random(1)
    for tok in (ours, bpe):
        bytes_ = sorted(tok.byte_ids) or list(range(tok.vocab_size))
        for _ in range(200):
            ids = [
                rng.choice(bytes_) if rng.random() < 0.5 else rng.randrange(tok.vocab_size + 4)
                for _ in range(rng.randrange(1, 16))
            ]
            stream = tok.stream_decoder(skip_special_tokens=skip)
            deltas = [stream.put(i) for i in ids] + [stream.flush()]
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), ids


def test_stream_decoder_flushes_incomplete_bytes(ours):
    stream = ours.stream_decoder()
    partial = ours.encode("🙂")[:-1]
    assert "".join(stream.put(i) for i in partial) == ""
    assert stream.flush() == ours.decode(partial)


# --- Phi-4 (byte-level BPE tokenizer.json), through the same path --------------------------------


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return make_bpe_dir(tmp_path_factory.mktemp("phi4"))


@pytest.fixture(scope="module")
def bpe(bpe_dir):
    return Tokenizer.from_dir(bpe_dir)


@pytest.mark.parametrize("text", [*TEXTS, "<|im_start|>user<|im_sep|>Hi!<|im_end|>"])
def test_bpe_matches_tokenizers_and_transformers(bpe, bpe_dir, text):
    own = tokenizers.Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    assert bpe.encode(text) == own.encode(text, add_special_tokens=False).ids
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
    if "<|" not in text:
        assert bpe.decode(bpe.encode(text)) == text


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
    with pytest.raises(FileNotFoundError, match=r"neither tokenizer\.json nor tokenizer\.model"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither"):
        copy_tokenizer_files(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("tokenizer.json", "{not json", "tokenizer.json is not a valid tokenizer.json"),
        ("tokenizer.model", "\xff\xfe junk", "tokenizer.model is not a SentencePiece model"),
        ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json: expected a JSON object"),
        ("tokenizer_config.json", "{\"a\": ", "tokenizer_config.json: not valid JSON"),
        (
            "tokenizer_config.json",
            json.dumps({"added_tokens_decoder": {"7": {"id": 7}}}),
            "tokenizer_config.json added_tokens_decoder\\['7'\\]: expected an object",
        ),
        ("added_tokens.json", json.dumps({"<x>": "seven"}), "added_tokens.json"),
    ],
)
def test_malformed_files_are_named(phi3_hub_dir, tmp_path, name, content, match):
    path = tmp_path / "tok"
    shutil.copytree(phi3_hub_dir, path)
    if name != "tokenizer.json":
        (path / "tokenizer.json").unlink()  # the SentencePiece path reads the others
    (path / name).write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_dir(path)


def test_copy_tokenizer_files(phi3_hub_dir, phi3, tmp_path):
    (phi3_hub_dir / "chat_template.jinja").write_text(PHI3_CHAT_TEMPLATE)
    try:
        copied = copy_tokenizer_files(phi3_hub_dir, tmp_path / "out")
    finally:
        (phi3_hub_dir / "chat_template.jinja").unlink()
    assert sorted(p.name for p in copied) == [
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert set(TOKENIZER_FILES) >= {p.name for p in copied}
    copy = Tokenizer.from_dir(tmp_path / "out")
    assert copy.encode(TEXTS[-1]) == phi3.encode(TEXTS[-1])
