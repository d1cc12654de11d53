"""Outside text with bad bytes or deep nesting gives one line naming the file, line and byte.

Covers phi3_jax.textio and its users: config.json, JSONL prompts (`generate --input`), training
data, `--prompt` and the lines typed into `chat`.
"""

import io
import json
import pathlib
import shutil
import sys

import pytest
from conftest import cli_error

from phi3_jax import jsonl, textio
from phi3_jax.cli import main
from phi3_jax.config import ConfigError, Phi3Config
from phi3_jax.embedded import MODEL_DIR
from phi3_jax.engine import Completion
from phi3_jax.train.data import DataError, read_jsonl

# ---- the readers ----

def test_decode_utf8_names_line_column_and_offset():
    data = b'{"a": 1,\n "b": "caf\xe9"}\n'
    with pytest.raises(ValueError) as e:
        textio.decode_utf8(data, "x.json")
    assert str(e.value) == ("x.json line 2, column 11: not valid UTF-8 (byte 0xe9 at offset 19)")
    assert data[19] == 0xE9 and data.split(b"\n")[1][10] == 0xE9


@pytest.mark.parametrize("text,message", [
    ("caf\udce9 au lait", "--prompt is not valid UTF-8 (byte 0xe9 at offset 3)"),
    ("é\udcff", "--prompt is not valid UTF-8 (byte 0xff at offset 2)"),  # é is two bytes
    ("a\ud800b", "--prompt holds a lone surrogate U+D800 at offset 1, which is not text"),
])
def test_check_utf8_names_the_byte(text, message):
    with pytest.raises(ValueError) as e:
        textio.check_utf8(text, "--prompt")
    assert str(e.value) == message
    assert textio.check_utf8("café ☕ 🍌", "--prompt") == "café ☕ 🍌"


def test_json_depth_bound_is_exact_and_never_a_recursion_error():
    ok = "[" * 127 + "]" * 127
    assert textio.parse_json(ok, "x") == json.loads(ok)
    for depth in (128, 5000, 10**6):  # the first is parsed then measured, the last overflows
        with pytest.raises(ValueError, match=r"^x: JSON nested more than 127 levels deep$"):
            textio.parse_json('{"a": ' + "[" * depth + "]" * depth + "}", "x")
    # brackets inside strings do not count
    assert textio.parse_json(json.dumps({"s": "[" * 1000}), "x") == {"s": "[" * 1000}
    assert textio.json_depth('{"a": [[1], {"b": "]]]"}], "c": {}}') == 3


@pytest.mark.parametrize("text,message", [
    ('{"a": 1', "x: not valid JSON (Expecting ',' delimiter at line 1 column 8)"),
    ("1" * 5000, "x: not valid JSON (Exceeds the limit (4300 digits)"),
])
def test_parse_json_errors_name_the_source(text, message):
    with pytest.raises(ValueError) as e:
        textio.parse_json(text, "x")
    assert str(e.value).startswith(message)


def test_line_reader_reports_a_bad_line_and_reads_on():
    stream = io.TextIOWrapper(io.BytesIO(b"hello\n\xff\xfe\n" + "naïve\n".encode()))
    reader = textio.LineReader(stream, "stdin")
    assert reader.readline() == "hello\n"
    with pytest.raises(ValueError) as e:
        reader.readline()
    assert str(e.value) == "stdin line 2, column 1: not valid UTF-8 (byte 0xff at offset 6)"
    assert reader.readline() == "naïve\n"
    assert reader.readline() == ""
    # a text stream with no bytes below it: surrogate escapes are what is left to check
    reader = textio.LineReader(io.StringIO("ok\nbad\udcff\n"), "stdin")
    assert reader.readline() == "ok\n"
    with pytest.raises(ValueError, match=r"stdin line 2 is not valid UTF-8 \(byte 0xff"):
        reader.readline()


# ---- JSONL: generate --input and training data ----

BAD_JSONL = b'{"prompt": "1+1="}\n{"prompt": "caf\xe9"}\n'  # line 2 in Latin-1


@pytest.mark.parametrize("read", [jsonl.read_jsonl, read_jsonl], ids=["jsonl", "training"])
def test_jsonl_bad_bytes_name_file_line_and_offset(tmp_path, read):
    path = tmp_path / "data.jsonl"
    path.write_bytes(BAD_JSONL)
    with pytest.raises(ValueError) as e:
        list(read(path))
    assert str(e.value) == (f"{path} line 2, column 16: not valid UTF-8 (byte 0xe9 at offset 34)")
    assert BAD_JSONL[34] == 0xE9
    assert read is jsonl.read_jsonl or isinstance(e.value, DataError)


def test_jsonl_deep_nesting_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
    with pytest.raises(DataError, match=rf"^{path} line 2: JSON nested more than 127 levels"):
        list(read_jsonl(path))


def test_jsonl_crlf_and_bom_are_fine(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n{"text": "\xc3\xa9"}\r\n')
    assert list(jsonl.read_jsonl(path)) == [(1, {"text": "a"}), (3, {"text": "é"})]


def test_generate_input_with_bad_bytes(tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(BAD_JSONL)
    err = cli_error(capsys, "generate", "--input", str(path))
    assert f"{path} line 2, column 16: not valid UTF-8 (byte 0xe9 at offset 34)" in err


def test_finetune_data_with_bad_bytes(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "1+1=2"}\n{"text": "\xff"}\n')
    err = cli_error(capsys, "finetune", "--model", MODEL_DIR, "--data", str(path), "--out",
                    str(tmp_path / "out"), "--steps", "1", "--batch-size", "1", "--seq-len", "8")
    assert f"{path} line 2, column 11: not valid UTF-8 (byte 0xff at offset 28)" in err
    assert not (tmp_path / "out").exists()


# ---- the command line and stdin ----

@pytest.mark.parametrize("argv,culprit", [
    (["generate", "--prompt", "1+1=\udcff"], "--prompt is not valid UTF-8 (byte 0xff at offset 4)"),
    (["generate", "--prompt", "x", "--chat", "--system", "\udce9t\udce9"],
     "--system is not valid UTF-8 (byte 0xe9 at offset 0)"),
    (["generate", "--prompt", "x", "--stop", "ok", "--stop", "\udc80"],
     "--stop is not valid UTF-8 (byte 0x80 at offset 0)"),
    (["chat", "--system", "\udcc3"], "--system is not valid UTF-8 (byte 0xc3 at offset 0)"),
])
def test_text_arguments_that_are_not_utf8(capsys, argv, culprit):
    assert culprit in cli_error(capsys, *argv)


def test_chat_reports_a_bad_line_and_goes_on(capsys, monkeypatch):
    """The model is real; generation is a stand-in that records what reached it (the reading of
    lines is under test, and nothing compiles)."""
    import phi3_jax.api

    asked = []

    def generate(model, prompts, settings=None, **kwargs):
        [messages] = prompts
        asked.append(messages[-1]["content"])
        return [Completion([], f"answer {len(asked)}", "stop")]

    monkeypatch.setattr(phi3_jax.api.Phi3, "generate", generate)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(
        b"1+1=\n\xff\xfe 2+2=\n3+3=\n/exit\n")))
    code = main(["chat"])
    out, err = capsys.readouterr()
    assert code == 0
    assert ("error: stdin line 2, column 1: not valid UTF-8 (byte 0xff at offset 5); line "
            "skipped") in err
    assert asked == ["1+1=", "3+3="]
    assert out == "\n\n"  # the stand-in streams nothing; a newline ends each answer


# ---- config.json ----

@pytest.fixture
def model_copy(tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(MODEL_DIR, tmp_path / "model"))


def test_config_json_with_bad_bytes(model_copy, capsys):
    config = model_copy / "config.json"
    data = config.read_bytes().replace(b'"phi3"', b'"phi\xb3"')
    config.write_bytes(data)
    offset = data.index(b"\xb3")
    line = data[:offset].count(b"\n") + 1
    column = offset - data.rfind(b"\n", 0, offset)
    message = (f"{config} line {line}, column {column}: not valid UTF-8 (byte 0xb3 at offset "
               f"{offset})")
    with pytest.raises(ConfigError) as e:
        Phi3Config.from_hf(model_copy)
    assert str(e.value) == message
    assert message in cli_error(capsys, "generate", "--model", str(model_copy), "--prompt", "x")


def test_config_json_deeply_nested(model_copy, capsys):
    config = model_copy / "config.json"
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, "extra": 0})[:-1].replace(
        '"extra": 0', '"extra": ' + "[" * 100_000 + "]" * 100_000) + "}")
    assert (f"{config}: JSON nested more than 127 levels deep"
            in cli_error(capsys, "generate", "--model", str(model_copy), "--prompt", "x"))
