"""Shared fixtures. Eight fake CPU devices are configured before JAX is imported anywhere, so
the sharding tests can build meshes in-process; single-device code just uses device 0."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import pathlib

import numpy as np
import pytest

# The tiny config every family-shape test starts from; tests override fields.
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
    rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    # Larger than Phi's 0.02 so that logits vary by O(1): tiny weights would make almost any
    # numerical bug invisible at a 1e-4 tolerance.
    initializer_range=0.2,
)

FAMILY = {
    "mha": {},
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64),
    "phi4mini": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96,
                     partial_rotary_factor=0.75, tie_word_embeddings=True),
}


def longrope(rotary_dim: int, original_max: int, seed: int = 0) -> dict:
    """A LongRoPE rope_scaling block with random, not-all-ones factor lists."""
    rs = np.random.RandomState(seed)
    half = rotary_dim // 2
    return {
        "rope_scaling": {"type": "longrope",
                         "short_factor": (1.0 + rs.rand(half)).round(4).tolist(),
                         "long_factor": (1.0 + 8.0 * rs.rand(half)).round(4).tolist()},
        "original_max_position_embeddings": original_max,
    }


def make_hf_checkpoint(path: pathlib.Path, seed: int = 0, dtype: str = "float32",
                       max_shard_size: str | None = None, **overrides) -> pathlib.Path:
    """Saves a random transformers Phi3ForCausalLM to `path` and returns the path."""
    import torch
    import transformers

    kwargs = {**TINY, **overrides}
    torch.manual_seed(seed)
    config = transformers.Phi3Config(**kwargs)
    model = transformers.Phi3ForCausalLM(config).eval().to(getattr(torch, dtype))
    path.mkdir(parents=True, exist_ok=True)
    save = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **save)
    return path


# ---- models shared by the generation and engine tests (session-wide: one checkpoint each, and
# their compiled programs are shared) ---------------------------------------------------------

ORIGINAL_MAX = 32  # tiny LongRoPE switch point, crossed during generation


@pytest.fixture(scope="session")
def longrope_model(tmp_path_factory):
    """GQA with LongRoPE (original_max 32): generations of 24 tokens cross it."""
    path = make_hf_checkpoint(tmp_path_factory.mktemp("lr") / "ckpt", seed=1, **FAMILY["gqa"],
                              **longrope(8, ORIGINAL_MAX), max_position_embeddings=128)
    return _load(path), hf_model(path)


@pytest.fixture(scope="session")
def window_model(tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp("sw") / "ckpt", seed=2, sliding_window=8)
    return _load(path), hf_model(path)


@pytest.fixture(scope="session")
def phi4mini_model(tmp_path_factory):
    cfg = FAMILY["phi4mini"]
    rotary = int(cfg["hidden_size"] // cfg["num_attention_heads"] * cfg["partial_rotary_factor"])
    path = make_hf_checkpoint(tmp_path_factory.mktemp("p4") / "ckpt", seed=3, **cfg,
                              **longrope(rotary, ORIGINAL_MAX, seed=3),
                              max_position_embeddings=128)
    return _load(path), hf_model(path)


@pytest.fixture(scope="session")
def text_model(tmp_path_factory):
    """A model with a Phi-3-style SentencePiece tokenizer in its folder."""
    path = tmp_path_factory.mktemp("tok") / "ckpt"
    from tokenizer_fixtures import SP_VOCAB_SIZE, make_phi3_dir

    make_phi3_dir(path)
    make_hf_checkpoint(path, seed=4, vocab_size=SP_VOCAB_SIZE + 16)
    model = _load(path)
    assert model.tokenizer is not None
    return model


def _load(path):
    import phi3_jax

    return phi3_jax.load(path)


@pytest.fixture
def force_blocked(monkeypatch):
    """force_blocked(block) -> calls: from then on, prefills of 2 * block tokens or more take
    blocked_causal_attention with `block`-token blocks (PREFILL_BLOCK patched), so short test
    prompts exercise it; `calls` gets the block size of each trace. jax's caches are cleared
    on the way in and out: the path is chosen at trace time."""
    import jax

    from phi3_jax import attention

    calls: list[int] = []

    def force(block: int) -> list[int]:
        real = attention.blocked_causal_attention
        monkeypatch.setattr(attention, "PREFILL_BLOCK", block)
        monkeypatch.setattr(attention, "blocked_causal_attention",
                            lambda *a: calls.append(a[-1]) or real(*a))
        jax.clear_caches()
        return calls

    yield force
    jax.clear_caches()


@pytest.fixture
def count_compiles():
    """Counts XLA compilations (every jitted program, not only ours) while active."""
    import jax

    events = []

    def listener(name, duration, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: hf_checkpoint(name="ckpt", seed=0, **config_overrides) -> folder path."""
    def make(name: str = "ckpt", **kwargs) -> pathlib.Path:
        return make_hf_checkpoint(tmp_path / name, **kwargs)
    return make


def hf_model(path: pathlib.Path):
    """Reloads the saved checkpoint in transformers (fp32, eager attention) as the reference."""
    import torch
    import transformers

    return transformers.Phi3ForCausalLM.from_pretrained(
        path, torch_dtype=torch.float32, attn_implementation="eager").eval()


def read_config(path: pathlib.Path) -> dict:
    return json.loads((path / "config.json").read_text())


def cli_error(capsys, *argv: str) -> str:
    """Runs `phi3-jax ARGV` in-process; asserts what bad input must give (exit status 2 and one
    line on stderr, no traceback) and returns that line."""
    from phi3_jax.cli import main

    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# A tiny Phi-3-style tokenizer folder (SentencePiece trained on the fly + the Phi-3 special tokens
# and chat template), shared by the tokenizer and chat tests.
@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    from tokenizer_fixtures import make_phi3_dir

    return make_phi3_dir(tmp_path_factory.mktemp("phi3"))


@pytest.fixture(scope="module")
def phi3_hub_dir(phi3_dir, tmp_path_factory):
    """phi3_dir plus the Hub's tokenizer.json for its tokenizer.model (the checkpoint's own)."""
    import shutil

    from tokenizer_fixtures import write_hub_tokenizer_json

    path = tmp_path_factory.mktemp("phi3-hub") / "tok"
    shutil.copytree(phi3_dir, path)
    write_hub_tokenizer_json(path)
    return path


@pytest.fixture(scope="module")
def phi3(phi3_dir):
    from phi3_jax.tokenizer import Tokenizer

    return Tokenizer.from_dir(phi3_dir)


@pytest.fixture(scope="module")
def hf_phi3(phi3_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(phi3_dir)
