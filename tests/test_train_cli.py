"""`phi3-jax finetune` end to end: data formats, export to transformers, exact resume, bad input.

The model is a tiny random transformers checkpoint with a tiny SentencePiece Phi-3 tokenizer in
the same folder (vocabulary: 512 pieces + the 11 Phi-3 added tokens).
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_model, make_hf_checkpoint
from tokenizer_fixtures import make_phi3_dir

import phi3_jax
from phi3_jax.cli import main
from phi3_jax.tokenizer import Tokenizer
from phi3_jax.train import DataError, FinetuneConfig, TrainingDiverged, finetune
from phi3_jax.train.checkpoint import Checkpointer
from phi3_jax.train.data import encode_record, load_dataset
from phi3_jax.train.loss import IGNORE
from phi3_jax.train.step import build_model_spec

VOCAB = 528


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    make_hf_checkpoint(path, seed=3, vocab_size=VOCAB, eos_token_id=512, pad_token_id=512)
    make_phi3_dir(path)
    return path


def chat(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                         {"role": "assistant", "content": f"{a + b}"}]}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    records = [chat(a, b) for a in range(4) for b in range(3)]
    records += [{"text": "the quick brown fox"}, {"input_ids": [5, 6, 7, 8, 9],
                                                   "loss_mask": [0, 0, 1, 1, 1]}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return path


def small(**kw) -> FinetuneConfig:
    base = dict(steps=4, batch_size=4, seq_len=32, learning_rate=1e-3, warmup_steps=1)
    return FinetuneConfig(**{**base, **kw})


def test_chat_targets_are_the_assistant_turns(model_dir):
    tok = Tokenizer.from_dir(model_dir)
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Solve 2x + 3 = 7."},
        {"role": "assistant", "content": "x = 2"},
        {"role": "user", "content": "And 3x = 9?"},
        {"role": "assistant", "content": "x = 3"},
    ]}
    example = encode_record(record, tok, VOCAB)
    assert example.input_ids.tolist() == tok.encode_chat(record["messages"],
                                                         add_generation_prompt=False)
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(int(token))
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    # Each assistant turn's text and <|end|>; the last also the eos the template closes with.
    assert [tok.decode(s) for s in spans] == ["x = 2<|end|>", "x = 3<|end|><|endoftext|>"]


def test_lora_finetune_exports_a_folder_transformers_loads(model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    config = small(lora_rank=4, lora_alpha=8.0, mesh="data=2,model=4")
    result = finetune(model_dir, data_file, out, config, progress=False)
    assert list(result.losses) == [1, 2, 3, 4]

    # Our model with the adapters beside the frozen base (what training ran)...
    spec, _, _ = build_model_spec(phi3_jax.load(out).config, jnp.float32, lora=config.lora)
    ids = np.random.RandomState(0).randint(0, VOCAB, (2, 20))
    pos = np.broadcast_to(np.arange(20), (2, 20))
    adapted = spec.module(jax.device_get(result.state.params), jax.device_get(result.frozen))
    ours = np.asarray(jax.jit(lambda i, p: adapted(i, p)[0])(ids, pos))
    base_logits = np.asarray(phi3_jax.load(model_dir).logits(ids))
    assert np.abs(ours - base_logits).max() > 1e-3  # training changed the model
    # ...equals the exported folder (LoRA merged) in phi3_jax and in transformers.
    np.testing.assert_allclose(np.asarray(phi3_jax.load(out).logits(ids)), ours,
                               rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        theirs = hf_model(out)(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file()


def test_resume_after_interruption_is_bit_exact(model_dir, data_file, tmp_path):
    config = small(steps=6, save_every=3, learning_rate=3e-3)
    straight = finetune(model_dir, data_file, tmp_path / "a", config, progress=False)

    def crash(step, metrics):
        if step == 4:  # after step 4, before its checkpoint would be written at step 6
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(model_dir, data_file, tmp_path / "b", config, progress=False, callback=crash)
    assert Checkpointer(tmp_path / "b").latest_step() == 3
    resumed = finetune(model_dir, data_file, tmp_path / "b", config, progress=False)
    assert resumed.start_step == 3
    assert resumed.losses == {k: v for k, v in straight.losses.items() if k > 3}
    for x, y in zip(jax.tree.leaves(jax.device_get(resumed.state)),
                    jax.tree.leaves(jax.device_get(straight.state)), strict=True):
        np.testing.assert_array_equal(x, y)
    # Another run's settings are refused rather than silently mixed in.
    with pytest.raises(ValueError, match="learning_rate"):
        finetune(model_dir, data_file, tmp_path / "b", small(steps=6, save_every=3,
                                                             learning_rate=1e-3),
                 progress=False)


def test_cli_full_finetune_writes_a_loadable_model(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["finetune", "--model", str(model_dir), "--data", str(data_file), "--out",
                 str(out), "--steps", "2", "--batch-size", "4", "--grad-accum", "2",
                 "--seq-len", "32", "--remat", "--save-every", "1"])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    model = phi3_jax.load(out)
    assert model.tokenizer is not None and model.config.vocab_size == VOCAB
    assert Checkpointer(out).latest_step() == 2


def write(tmp_path, text: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    return path


def test_bad_data_is_reported_with_its_line(model_dir, tmp_path):
    tok = Tokenizer.from_dir(model_dir)
    cases = {
        '{"text": "fine"}\n\n{"text": "oops",}\n': r"bad.jsonl line 3: not valid JSON",
        '{"text": "fine"}\n[1, 2]\n': r"line 2: expected a JSON object",
        '{"prompt": "x"}\n': r"line 1: a record needs 'messages', 'text' or 'input_ids'",
        '{"input_ids": [1, 2, 999]}\n': r"line 1: token ids \[999\] are outside",
        '{"input_ids": [1, 2], "labels": [1]}\n': r"line 1: 'labels' has 1 entries",
        '{"messages": [{"role": "assistant", "content": "hi"}]}\n': r"line 1: messages\[0\]",
        "\n \n": r"has no records",
    }
    for text, message in cases.items():
        with pytest.raises(DataError, match=message):
            load_dataset(write(tmp_path, text), tok, VOCAB, seq_len=16)
    with pytest.raises(DataError, match="no record has a target token"):
        load_dataset(write(tmp_path, '{"input_ids": [1, 2], "loss_mask": [1, 0]}\n'), tok,
                     VOCAB, seq_len=16)


def test_overlong_sequences_truncate_with_a_warning_or_fail(model_dir, data_file, tmp_path,
                                                            caplog, capsys):
    long = write(tmp_path, json.dumps({"input_ids": list(range(3, 43))}) + "\n"
                 + json.dumps({"input_ids": [3, 4, 5]}) + "\n")
    tok = Tokenizer.from_dir(model_dir)
    dataset = load_dataset(long, tok, VOCAB, seq_len=16)
    assert dataset.truncated == 1 and dataset.longest == 40
    assert dataset.examples[0].input_ids.tolist() == list(range(3, 19))
    with pytest.raises(DataError, match="line 1: 40 tokens, longer than --seq-len 16"):
        load_dataset(long, tok, VOCAB, seq_len=16, overflow="error")
    with caplog.at_level(logging.WARNING):
        finetune(model_dir, long, tmp_path / "t", small(steps=1, seq_len=16, batch_size=2),
                 progress=False)
    assert "1 of 2 examples were longer than --seq-len 16 and were truncated" in caplog.text
    code = main(["finetune", "--model", str(model_dir), "--data", str(long), "--out",
                 str(tmp_path / "e"), "--seq-len", "16", "--overflow", "error"])
    assert code == 2
    assert "bad.jsonl line 1: 40 tokens" in capsys.readouterr().err


def test_divergence_stops_and_keeps_the_last_good_checkpoint(model_dir, data_file, tmp_path,
                                                             capsys):
    out = tmp_path / "out"
    # Adam's first update is ~lr * sign(g): 1e30 makes the weights ~1e30, the next loss inf/NaN.
    config = small(steps=5, learning_rate=1e30, warmup_steps=0, save_every=1)
    with pytest.raises(TrainingDiverged, match=r"step 2: loss .* is not finite") as err:
        finetune(model_dir, data_file, out, config, progress=False)
    assert "last good checkpoint is step 1" in str(err.value)
    assert Checkpointer(out).latest_step() == 1
    assert not (out / "config.json").exists()  # no export of a diverged model
    code = main(["finetune", "--model", str(model_dir), "--data", str(data_file), "--out",
                 str(tmp_path / "cli"), "--steps", "5", "--lr", "1e30", "--warmup-steps", "0",
                 "--batch-size", "4", "--seq-len", "32"])
    assert code == 1
    assert "is not finite" in capsys.readouterr().err
