"""`phi3-jax finetune` end to end: data formats, export to transformers, exact resume, bad input.

The model is a tiny random transformers checkpoint with a tiny SentencePiece Phi-3 tokenizer in
the same folder (vocabulary: 512 pieces + the 11 Phi-3 added tokens).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal

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
from phi3_jax.train.checkpoint import CHECKSUMS, Checkpointer, ResumeError, abstract_like
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


# --- data that must never be lost ----------------------------------------------------------------


@pytest.mark.parametrize("flags,needle", [
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),  # exited 0 with a NaN model
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--lr", "1e39"], "--lr must be a finite number > 0"),  # infinite in float32
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lora-rank", "-4"], "--lora-rank must be an integer >= 0, got -4"),  # was full FT
    (["--seq-len", "0"], "--seq-len must be an integer >= 1"),
    (["--seq-len", "-8"], "--seq-len must be an integer >= 1"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--batch-size", "4", "--grad-accum", "3"], "must be a multiple of --grad-accum"),
    (["--warmup-steps", "-1"], "--warmup-steps must be an integer >= 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--clip-norm", "-1"], "--clip-norm must be a finite number >= 0"),
    (["--lora-rank", "4", "--lora-alpha=-inf"], "--lora-alpha must be a finite number > 0"),
    (["--save-every", "-1"], "--save-every must be an integer >= 0"),
])
def test_bad_numeric_flags_are_refused_up_front(tmp_path, capsys, flags, needle):
    # The model folder does not even exist: nothing is loaded before the flags are checked.
    code = main(["finetune", "--model", str(tmp_path / "nowhere"), "--data", "x.jsonl",
                 "--out", str(tmp_path / "out"), *flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_out_overlapping_model_is_refused(model_dir, data_file, tmp_path, capsys):
    (tmp_path / "alias").symlink_to(model_dir.parent)
    before = sorted(p.name for p in model_dir.iterdir())
    for out in (model_dir, tmp_path / "alias" / model_dir.name, model_dir / "ft",
                model_dir.parent):
        code = main(["finetune", "--model", str(model_dir), "--data", str(data_file), "--out",
                     str(out), "--steps", "1"])
        err = capsys.readouterr().err
        assert code == 2 and "--out" in err and "overlaps --model" in err, err
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_update_that_would_make_the_weights_non_finite_stops_the_run(model_dir, data_file,
                                                                     tmp_path, capsys):
    # 3e38 is finite in float32, but 3e38 * (Adam's ~1 + weight decay) is not: the loss and
    # gradient of step 1 are finite, its update is not. This used to exit 0 with a NaN model.
    out = tmp_path / "out"
    code = main(["finetune", "--model", str(model_dir), "--data", str(data_file), "--out",
                 str(out), "--steps", "2", "--lr", "3e38", "--weight-decay", "1",
                 "--warmup-steps", "0", "--batch-size", "4", "--seq-len", "32",
                 "--save-every", "1"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert ("step 1: the update (learning rate 3e+38) makes the parameters or optimizer state "
            "non-finite; stopped without applying it (no checkpoint was written before it") in err
    assert Checkpointer(out).latest_step() is None and not (out / "config.json").exists()


@pytest.fixture(scope="module")
def three_steps(model_dir, data_file, tmp_path_factory):
    """A finished run that saved every step (the last two checkpoints are kept)."""
    out = tmp_path_factory.mktemp("run") / "out"
    result = finetune(model_dir, data_file, out, small(steps=3, save_every=1), progress=False)
    return out, result


def restore(out, reference):
    """The newest intact checkpoint, through the same Checkpointer.restore a resume calls."""
    reference_out, result = reference
    abstract = abstract_like(jax.eval_shape(lambda s: s, result.state), None)
    meta = json.loads((reference_out / "checkpoints" / "3" / "meta" / "metadata").read_text())
    checkpointer = Checkpointer(out)
    try:
        return checkpointer.restore(abstract, meta["fingerprint"])
    finally:
        checkpointer.close()


def state_chunk(step_dir):
    return max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def damage(case: str, step_dir) -> str:
    """Damages one training checkpoint; returns what the report must say."""
    if case == "state_chunk":  # the case: an Adam moment came back as -5.7e5
        chunk = state_chunk(step_dir)
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x01
        chunk.write_bytes(bytes(data))
        return "does not match its sha256"
    if case == "meta":  # the data position, say, changed by one bit
        path = step_dir / "meta" / "metadata"
        text = path.read_text()
        at = text.index('"data_position": ') + len('"data_position": ')
        path.write_text(text[:at] + chr(ord(text[at]) ^ 1) + text[at + 1:])
        return "meta/metadata does not match its sha256"
    if case == "truncated":
        chunk = state_chunk(step_dir)
        chunk.write_bytes(chunk.read_bytes()[:50])
        return "(truncated)"
    if case == "checksums_missing":
        (step_dir / CHECKSUMS).unlink()
        return f"{CHECKSUMS} is missing"
    if case == "legacy_truncated":  # no checksums (older phi3-jax) and a truncated file
        make_legacy(step_dir)
        chunk = state_chunk(step_dir)
        chunk.write_bytes(chunk.read_bytes()[:50])
        return "cannot be read (a file is damaged or truncated): OUT_OF_RANGE"
    raise AssertionError(case)


def make_legacy(step_dir):
    (step_dir / CHECKSUMS).unlink()
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    del meta["checksums"]
    (step_dir / "meta" / "metadata").write_text(json.dumps(meta))


# Orbax leaves the reads of the other arrays of a truncated checkpoint unawaited.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("case", ["state_chunk", "meta", "truncated", "checksums_missing",
                                  "legacy_truncated"])
def test_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(three_steps, tmp_path,
                                                                       caplog, case):
    out = shutil.copytree(three_steps[0], tmp_path / "out")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "3"]
    needle = damage(case, out / "checkpoints" / "3")
    with caplog.at_level(logging.WARNING):
        state, position = restore(out, three_steps)
    assert int(state.step) == 2
    meta = json.loads((out / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert position == meta["data_position"]
    assert f"checkpoint {out / 'checkpoints' / '3'}" in caplog.text and needle in caplog.text
    assert f"moved it to {out / 'checkpoints-corrupt' / '3'}" in caplog.text
    assert "resuming from step 2, the newest intact checkpoint" in caplog.text
    assert (out / "checkpoints-corrupt" / "3").is_dir()  # kept for inspection, out of the way
    assert Checkpointer(out).latest_step() == 2


def test_checkpoint_without_checksums_restores_with_a_note(three_steps, tmp_path, caplog):
    out = shutil.copytree(three_steps[0], tmp_path / "out")
    make_legacy(out / "checkpoints" / "3")
    with caplog.at_level(logging.WARNING):
        state, _ = restore(out, three_steps)
    assert "has no checksums (written by an older phi3-jax): restoring it unverified" in caplog.text
    for x, y in zip(jax.tree.leaves(jax.device_get(state)),
                    jax.tree.leaves(jax.device_get(three_steps[1].state)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_non_finite_or_all_corrupt_checkpoints(three_steps, tmp_path, caplog):
    out = shutil.copytree(three_steps[0], tmp_path / "out")
    # A NaN state saved past the guard (by hand) is not restored, checksums or not.
    state = jax.device_get(three_steps[1].state)
    state = dataclasses.replace(state, step=np.int32(4),
                                params=jax.tree.map(lambda x: x * np.nan, state.params))
    checkpointer = Checkpointer(out, writer=True)
    meta = json.loads((out / "checkpoints" / "3" / "meta" / "metadata").read_text())
    checkpointer.save(state, meta["data_position"], meta["fingerprint"])
    checkpointer.close()
    with caplog.at_level(logging.WARNING):
        assert int(restore(out, three_steps)[0].step) == 3
    assert "checkpoints/4 holds NaN or infinite values" in caplog.text
    # 2 went when 4 was saved (two are kept), and 4 was set aside: 3 is the last one.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["3"]
    damage("state_chunk", out / "checkpoints" / "3")
    with pytest.raises(ResumeError, match=r"no intact checkpoint in .*run again to start"):
        restore(out, three_steps)


def test_one_writer_per_output_and_its_leftovers_are_cleaned(three_steps, tmp_path):
    out = shutil.copytree(three_steps[0], tmp_path / "out")
    leftover = out / "checkpoints" / "4.orbax-checkpoint-tmp-1234"  # a save cut by SIGKILL
    (leftover / "state").mkdir(parents=True)
    first = Checkpointer(out, writer=True)
    try:
        with pytest.raises(ResumeError, match="another run is writing to"):
            Checkpointer(out, writer=True)
        first.wait()
        assert not leftover.exists() and first.latest_step() == 3
    finally:
        first.close()
    Checkpointer(out, writer=True).close()  # free again


def test_sigterm_then_resume_past_a_corrupt_checkpoint_is_bit_exact(
        model_dir, data_file, three_steps, tmp_path, capsys, caplog):
    out = tmp_path / "out"

    def terminate(step, metrics):
        if step == 2:  # its checkpoint is being written in the background
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as err:
        finetune(model_dir, data_file, out, small(steps=3, save_every=1), progress=False,
                 callback=terminate)
    assert err.value.code == 143
    # The save in flight was completed, checksummed and committed; nothing half-written.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2"]
    assert (out / "checkpoints" / "2" / CHECKSUMS).is_file()
    assert not (out / "config.json").exists()
    damage("state_chunk", out / "checkpoints" / "2")
    code = main(["finetune", "--model", str(model_dir), "--data", str(data_file), "--out",
                 str(out), "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-3",
                 "--warmup-steps", "1", "--save-every", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "checkpoints/2 is corrupt" in caplog.text and "does not match its sha256" in caplog.text
    assert "resuming from step 1, the newest intact checkpoint" in caplog.text
    # Steps 2 and 3 redone from step 1: the same model as the run that was never interrupted.
    reference = three_steps[0]
    for name in ("model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
