"""lm-evaluation-harness itself, run on local tasks the test writes (task YAML + JSONL, no
downloads), through phi3-jax's backend and through lm-eval's own `hf` backend.

- On a random checkpoint (the embedded model's config and tokenizer, random fp32 weights), both
  backends give the same per-request loglikelihoods (max |diff| <= 1e-4, summed logprobs of a
  few tokens) and greedy flags, the same generations, and so the same accuracies.
- On the embedded model, the generate_until task's accuracy equals the accuracy of the answers
  `phi3-jax demo` prints for the same problems.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest

# CI installs the eval extra and sets PHI3_JAX_REQUIRE_LM_EVAL: there, a missing lm-eval fails.
if os.environ.get("PHI3_JAX_REQUIRE_LM_EVAL"):
    import lm_eval
else:
    lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from phi3_jax.embedded import MODEL_DIR, task  # noqa: E402

TOL = 1e-4
PROBLEMS = task.held_out_problems(8, seed=3)

UTILS = '''
from phi3_jax.embedded.task import parse_answer


def process_results(doc, results):
    return {"acc": float(parse_answer(results[0]) == doc["x"])}
'''


def write_tasks(folder: pathlib.Path) -> pathlib.Path:
    """linear_mc (multiple choice over "x = 0" .. "x = 9") and linear_gen (generate_until,
    scored by the embedded task's own parse_answer) on the held-out problems."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question": p.prompt, "x": p.x, "answer": p.answer,
             "choices": [f"x = {i}" for i in range(10)]} for p in PROBLEMS]
    data = folder / "problems.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
              "test_split: test\n")
    (folder / "linear_mc.yaml").write_text(
        "task: linear_mc\n" + common + "output_type: multiple_choice\n"
        "doc_to_text: \"{{question}} Answer:\"\ndoc_to_choice: choices\ndoc_to_target: x\n"
        "metric_list:\n  - metric: acc\n")
    (folder / "linear_gen.yaml").write_text(
        "task: linear_gen\n" + common + "output_type: generate_until\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"<|end|>\"]\n  max_gen_toks: 16\n  do_sample: false\n"
        "process_results: !function utils.process_results\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "utils.py").write_text(UTILS)
    return folder


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def evaluate(model: str, model_args: str, tasks_dir, names, batch_size=16, **kwargs) -> dict:
    """lm_eval.simple_evaluate on local tasks, with every sample logged. phi3-jax's default
    batch of 16 sends the 8 problems to one engine shaped as the demo's (8 rows, 16 new
    tokens), so they share compiled programs."""
    from lm_eval.tasks import TaskManager

    import phi3_jax.lm_eval_backend  # noqa: F401  (registers "phi3-jax")

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(names),
                                   task_manager=TaskManager(include_path=str(tasks_dir)),
                                   batch_size=batch_size, device="cpu", log_samples=True,
                                   **kwargs)


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    """(folder, tokenizer folder): the embedded model's folder with random fp32 weights made by
    transformers, and its tokenizer as the Hub ships Phi-3's (tokenizer.json), loaded as a
    PreTrainedTokenizerFast. transformers v5's AutoTokenizer on tokenizer.model re-normalizes
    Llama-style tokenizers and gives other ids than the checkpoint's ("Solve" -> 2 ids, not 1;
    tests/test_tokenizer.py), which would compare tokenizers, not backends."""
    from tokenizer_fixtures import write_hub_tokenizer_json

    root = tmp_path_factory.mktemp("random")
    path, tok = root / "ckpt", root / "tokenizer"
    shutil.copytree(MODEL_DIR, path)
    config = transformers.Phi3Config.from_pretrained(path)
    config.initializer_range = 0.2  # logits of O(1): differences cannot hide (conftest.TINY)
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config).eval().float()
    os.remove(path / "model.safetensors")
    model.save_pretrained(path)
    tok.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(path / name, tok / name)
    write_hub_tokenizer_json(tok)
    os.remove(tok / "tokenizer.model")
    config = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(
        json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path, tok


def _loglikelihoods(samples) -> np.ndarray:
    return np.array([[float(r[0][0]) for r in s["resps"]] for s in samples])


def _greedy(samples) -> list:
    return [[bool(r[0][1]) for r in s["resps"]] for s in samples]


def test_phi3_jax_backend_matches_lm_evals_hf_backend(random_checkpoint, tasks):
    path, tok = random_checkpoint
    names = ("linear_mc", "linear_gen")
    ours = evaluate("phi3-jax", f"pretrained={path},dtype=float32", tasks, names)
    # In the same process, after phi3-jax registered itself: lm-eval's built-ins still resolve.
    # add_bos_token=False is the checkpoint's (tokenizer_config.json); PreTrainedTokenizerFast
    # would follow tokenizer.json's template, which adds one.
    ref = evaluate("hf", f"pretrained={path},tokenizer={tok},dtype=float32,add_bos_token=False",
                   tasks, names, batch_size=1)
    mc_ours, mc_ref = ours["samples"]["linear_mc"], ref["samples"]["linear_mc"]
    assert [s["doc_id"] for s in mc_ours] == [s["doc_id"] for s in mc_ref]
    ll_ours, ll_ref = _loglikelihoods(mc_ours), _loglikelihoods(mc_ref)
    assert ll_ours.shape == (len(PROBLEMS), 10)
    assert np.max(np.abs(ll_ours - ll_ref)) <= TOL
    assert _greedy(mc_ours) == _greedy(mc_ref)
    assert np.ptp(ll_ref) > 1.0  # random weights, but far from uniform: the test can fail
    gen_ours = [s["resps"][0][0] for s in ours["samples"]["linear_gen"]]
    gen_ref = [s["resps"][0][0] for s in ref["samples"]["linear_gen"]]
    assert gen_ours == gen_ref and any(gen_ref)
    for name in names:
        assert ours["results"][name]["acc,none"] == ref["results"][name]["acc,none"]


def test_embedded_generate_until_accuracy_equals_the_demo(tasks, capsys):
    """lm_eval with the chat template on the embedded model scores what `phi3-jax demo`
    answers for the same questions."""
    from phi3_jax.cli import main

    argv = ["demo"]
    for p in PROBLEMS:
        argv += ["--problem", p.prompt]
    assert main(argv) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "  ->  " in x]
    answers = [task.parse_answer(x.split("  ->  ", 1)[1]) for x in lines]
    demo_accuracy = np.mean([a == p.x for a, p in zip(answers, PROBLEMS, strict=True)])
    out = evaluate("phi3-jax", "", tasks, ["linear_gen"], apply_chat_template=True)
    assert out["results"]["linear_gen"]["acc,none"] == pytest.approx(demo_accuracy)
    assert demo_accuracy >= 0.5  # the embedded model solves most of them


def test_lm_eval_command_finds_phi3_jax(tasks, tmp_path):
    """`lm_eval --model phi3-jax` in a fresh process, as installed: site-packages' .pth files
    run at start-up, here the repository's phi3_jax_lm_eval.pth through site.addsitedir (what
    site.py does for site-packages). JAX is not imported until the model is asked for."""
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    probe = ("import site, sys; site.addsitedir(sys.argv[1]); import lm_eval.api.registry as r;"
             " print(r.get_model('hf').__name__, 'jax' in sys.modules,"
             " r.get_model('phi3-jax').__name__)")
    out = subprocess.run([sys.executable, "-c", probe, str(root)], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.stdout.split() == ["HFLM", "False", "Phi3JaxLM"], out.stderr[-2000:]
    run = ("import site, sys; site.addsitedir(sys.argv.pop(1)); sys.argv[0] = 'lm_eval';"
           " from lm_eval.__main__ import cli_evaluate; sys.exit(cli_evaluate())")
    out = subprocess.run(
        [sys.executable, "-c", run, str(root), "--model", "phi3-jax", "--model_args",
         "dtype=float32", "--tasks", "linear_mc", "--include_path", str(tasks), "--limit", "3",
         "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "linear_mc" in out.stdout and "acc" in out.stdout
