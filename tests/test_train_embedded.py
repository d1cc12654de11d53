"""The committed embedded model: it solves held-out linear equations, and transformers agrees.

The checkpoint (phi3_jax/embedded/model) was trained by phi3_jax/embedded/make_embedded.py with
the finetune code; the held-out (a, b, x) triples were never in its training data.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch

import phi3_jax
from phi3_jax.embedded import MODEL_DIR, task

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(MODEL_DIR, "config.json")),
                                reason="the embedded model has not been built")


@pytest.fixture(scope="module")
def model():
    return phi3_jax.load(MODEL_DIR)


@pytest.fixture(scope="module")
def answers(model):
    """Greedy answers of phi3-jax to all 90 held-out problems (one generate call)."""
    problems = task.held_out_problems(seed=0)
    outs = model.generate([p.messages(with_answer=False) for p in problems], max_new_tokens=8)
    return problems, outs


def test_the_checkpoint_is_small_and_phi3_shaped():
    files = os.listdir(MODEL_DIR)
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
            "generation_config.json"} <= set(files)
    size = sum(os.path.getsize(os.path.join(MODEL_DIR, f)) for f in files)
    assert size < 10 * 2**20
    config = json.loads(pathlib.Path(MODEL_DIR, "config.json").read_text())
    assert config["model_type"] == "phi3" and config["architectures"] == ["Phi3ForCausalLM"]
    tok = json.loads(pathlib.Path(MODEL_DIR, "tokenizer_config.json").read_text())
    assert "<|assistant|>" in tok["chat_template"]


def test_held_out_exact_match_is_at_least_95_percent(answers):
    problems, outs = answers
    correct = [o.text == p.answer for p, o in zip(problems, outs, strict=True)]
    wrong = [(p.prompt, o.text) for p, o, ok in zip(problems, outs, correct, strict=True)
             if not ok]
    assert np.mean(correct) >= 0.95, wrong
    assert all(o.finish_reason == "stop" for o in outs)  # each answer ends with <|end|>


def test_transformers_gives_the_same_answers(model, answers, tmp_path):
    """Greedy generation in transformers (fp32) from the same folder: same token ids. The prompt
    ids and the answer's text are checked against the Hub-format tokenizer.json of the folder's
    tokenizer.model, run by `tokenizers` (transformers v5's own tokenizer gives other ids for a
    Phi-3 folder, see test_tokenizer.py)."""
    import tokenizers
    import transformers
    from tokenizer_fixtures import write_hub_tokenizer_json

    problems, outs = answers
    hf = transformers.Phi3ForCausalLM.from_pretrained(MODEL_DIR, torch_dtype=torch.float32)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(MODEL_DIR, name), tmp_path / name)
    hub = tokenizers.Tokenizer.from_file(str(write_hub_tokenizer_json(tmp_path)))
    eos = model.generation_config["eos_token_id"]
    for problem, out in list(zip(problems, outs, strict=True))[:24]:
        chat = problem.messages(with_answer=False)
        ids = model.tokenizer.encode_chat(chat)
        text = model.tokenizer.apply_chat_template(chat)
        assert hub.encode(text, add_special_tokens=False).ids == ids
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos[0])
        theirs = gen[0, len(ids):].tolist()
        assert theirs == out.token_ids, problem.prompt
        assert hub.decode(theirs, skip_special_tokens=True) == out.text
        # The answer's ids are what the tokenizer makes of its text after <|assistant|>: the
        # model was trained on the checkpoint tokenizer's ids ("▁x ▁= ▁ 3", not "x ▁= ▁ 3").
        assert hub.encode(out.text, add_special_tokens=False).ids == out.token_ids[:-1]
