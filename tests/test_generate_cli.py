"""`phi3-jax generate` and `phi3-jax chat`, run in-process on a tiny model with a tokenizer."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from conftest import make_hf_checkpoint
from tokenizer_fixtures import SP_VOCAB_SIZE, make_phi3_dir

import phi3_jax
from phi3_jax.cli import main

NEW = ["--max-new-tokens", "12"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model"
    make_phi3_dir(path)
    make_hf_checkpoint(path, seed=5, vocab_size=SP_VOCAB_SIZE + 16)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return phi3_jax.load(model_dir)


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prompt_plain_chat_and_stream(capsys, model_dir, model):
    code, out, _ = _run(capsys, "generate", "--model", str(model_dir), "--prompt", "hello world",
                        *NEW)
    [expected] = model.generate("hello world", max_new_tokens=12)
    assert code == 0 and out == expected.text + "\n"
    # Streaming prints the text piece by piece as the stream API yields it.
    code, streamed, _ = _run(capsys, "generate", "--model", str(model_dir), "--prompt",
                             "hello world", "--stream", *NEW)
    pieces = []
    model.generate("hello world", max_new_tokens=12, stream=pieces.append)
    assert code == 0 and streamed == "".join(c.text for c in pieces) + "\n"
    # --chat / --system: the prompt goes through the chat template.
    code, chat, _ = _run(capsys, "generate", "--model", str(model_dir), "--prompt",
                         "hello world", "--system", "be brief", *NEW)
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello world"}]
    [expected] = model.generate([messages], max_new_tokens=12)
    assert code == 0 and chat == expected.text + "\n"


def test_generate_sampling_flags_and_stop(capsys, model_dir, model):
    argv = ["generate", "--model", str(model_dir), "--prompt", "the quick", *NEW,
            "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--min-p", "0.01",
            "--repetition-penalty", "1.1", "--seed", "7"]
    code, out, _ = _run(capsys, *argv)
    [expected] = model.generate("the quick", max_new_tokens=12, temperature=0.9, top_k=40,
                                top_p=0.95, min_p=0.01, repetition_penalty=1.1, seed=7)
    assert code == 0 and out == expected.text + "\n"
    stop = expected.text[len(expected.text) // 2:][:2]
    code, cut, _ = _run(capsys, *argv, "--stop", stop)
    assert code == 0 and cut == expected.text[:expected.text.find(stop)] + "\n"


def test_chat_keeps_history_and_resets(capsys, monkeypatch, model_dir):
    calls, replies, streamed = [], [], []
    real = phi3_jax.api.Phi3.generate

    def spy(model, prompts, settings, stream, **kwargs):
        calls.append([dict(m) for m in prompts[0]])
        deltas = []

        def tee(chunk):
            deltas.append(chunk.text)
            stream(chunk)

        replies.extend(real(model, prompts, settings, stream=tee, **kwargs))
        streamed.append("".join(deltas))
        return replies[-1:]

    monkeypatch.setattr(phi3_jax.api.Phi3, "generate", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nhow are you\n/reset\nbye\n/exit\nno\n"))
    code, out, _ = _run(capsys, "chat", "--model", str(model_dir), "--system", "sys", *NEW)
    assert code == 0 and len(calls) == 3  # the line after /exit is never read
    first, second, third = calls
    assert [m["content"] for m in first] == ["sys", "hello"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[:2] == first and second[3]["content"] == "how are you"
    assert [m["content"] for m in third] == ["sys", "bye"]  # history cleared
    assert second[2]["content"] == replies[0].text
    assert out == "".join(s + "\n" for s in streamed)  # streamed, one reply per turn
    # EOF ends the session too.
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert _run(capsys, "chat", "--model", str(model_dir), *NEW)[0] == 0


def test_batch_jsonl(capsys, tmp_path, model_dir, model):
    records = [{"prompt": "hello world", "id": 1},
               {"messages": [{"role": "user", "content": "the quick brown fox"}], "id": 2},
               {"prompt": "a", "id": 3}]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    dst = tmp_path / "out.jsonl"
    code, _, err = _run(capsys, "generate", "--model", str(model_dir), "--input", str(src),
                        "--output", str(dst), "--max-slots", "2", *NEW)
    assert code == 0 and "3/3" in err  # the progress bar
    lines = [json.loads(line) for line in dst.read_text().splitlines()]
    expected = model.generate(["hello world", records[1]["messages"], "a"], max_new_tokens=12)
    assert [{k: v for k, v in r.items() if k != "completion"} for r in lines] == records
    assert [r["completion"] for r in lines] == [e.text for e in expected]


@pytest.mark.parametrize("content, line, match", [
    ('{"prompt": "ok"}\n{"prompt": "ok"\n', 2, "not valid JSON"),
    ('{"prompt": "ok"}\n\n[1, 2]\n', 3, "expected a JSON object, got an array"),
    ('{"prompt": 5}\n', 1, "must be a string"),
    ('{"messages": [{"role": "user"}]}\n', 1, "content"),
])
def test_malformed_jsonl_names_the_line(capsys, tmp_path, model_dir, content, line, match):
    src = tmp_path / "bad.jsonl"
    src.write_text(content)
    dst = tmp_path / "out.jsonl"
    code, _, err = _run(capsys, "generate", "--model", str(model_dir), "--input", str(src),
                        "--output", str(dst))
    assert code == 2 and f"line {line}" in err and match in err
    assert not dst.exists()


def test_bad_input_exits_non_zero(capsys, tmp_path, model_dir):
    code, _, err = _run(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert code == 2 and "no model folder" in err
    bare = make_hf_checkpoint(tmp_path / "bare")  # weights, no tokenizer
    code, _, err = _run(capsys, "generate", "--model", str(bare), "--prompt", "x")
    assert code == 2 and "no tokenizer" in err
    code, _, err = _run(capsys, "generate", "--model", str(model_dir), "--prompt", "hello " * 600)
    assert code == 2 and "max_position_embeddings" in err
    code, _, err = _run(capsys, "generate", "--model", str(model_dir), "--prompt", "x",
                        "--temperature", "nan")
    assert code == 2 and "temperature must be a finite number" in err
    code, _, err = _run(capsys, "generate", "--model", str(model_dir), "--prompt", "x",
                        "--top-p", "1.5")
    assert code == 2 and "top_p" in err


def test_orbax_checkpoint(capsys, tmp_path, model_dir, model):
    convert = pytest.importorskip("convert")
    orbax_dir = tmp_path / "orbax"
    convert.convert(str(model_dir), str(orbax_dir))
    code, out, _ = _run(capsys, "generate", "--model", str(orbax_dir), "--prompt", "hello world",
                        *NEW)
    [expected] = model.generate("hello world", max_new_tokens=12)
    assert code == 0 and out == expected.text + "\n"


def test_persistent_compilation_cache(tmp_path, model_dir):
    """In a fresh process (the cache directory is process-global JAX config)."""
    cache = tmp_path / "jax-cache"
    cmd = [sys.executable, "-m", "phi3_jax.cli", "generate", "--model", str(model_dir), "--prompt",
           "hi", "--max-new-tokens", "2", "--compilation-cache", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr
    assert any(cache.iterdir()), "nothing was written to the compilation cache"
