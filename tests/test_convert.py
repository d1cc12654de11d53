"""HF <-> Orbax conversion: round trips per family shape, sharded restore, and bad input.

The references are independent of the converter: the original safetensors bytes (for the
bit-exact round trip), `phi3_jax.load` of the original folder (same logits), and transformers'
own `from_pretrained` of the exported folder (same logits as of the original).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILY, hf_model, make_hf_checkpoint
from flax import nnx

import phi3_jax
from phi3_jax import orbax_checkpoint as ock
from phi3_jax import sharding
from phi3_jax.cli import main
from phi3_jax.config import Phi3Config
from phi3_jax.hf_weights import INDEX_FILE, tensor_specs, write_hf_tensors
from phi3_jax.safetensors_io import SafetensorsFile

PROMPT = np.random.RandomState(0).randint(0, 128, (2, 37))


def raw_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a HF folder by name, as read straight from the safetensors files."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        st = SafetensorsFile(file)
        for name in st:
            assert name not in out, f"{name} appears twice"
            out[name] = np.array(st[name])
    return out


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(str(parent / f"*{name}*"))
                  + glob.glob(str(parent / f".{name}*")))


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def torch_logits(folder: Path) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(folder)(torch.tensor(PROMPT)).logits.numpy()


# mha: fp32, one file; gqa: bf16 stored, input sharded; phi4mini: tied + partial rotary, sharded.
CASES = {
    "mha": dict(dtype="float32"),
    "gqa": dict(dtype="bfloat16", max_shard_size="40KB"),
    "phi4mini": dict(dtype="float32", max_shard_size="60KB"),
}


@pytest.mark.parametrize("family", list(CASES))
def test_round_trip(family, tmp_path, capsys):
    hf = make_hf_checkpoint(tmp_path / "hf", seed=3, **CASES[family], **FAMILY[family])
    if family == "mha":
        from tokenizer_fixtures import make_phi3_dir
        make_phi3_dir(hf)
    sharded_input = (hf / INDEX_FILE).is_file()
    assert sharded_input == ("max_shard_size" in CASES[family])
    orbax_dir, out = tmp_path / "orbax", tmp_path / "exported"

    code, err = run_cli(["convert", str(hf), str(orbax_dir), "--quiet"], capsys)
    assert code == 0, err
    assert ock.is_orbax_checkpoint(orbax_dir) and not ock.is_orbax_checkpoint(hf)
    config = Phi3Config.from_hf(hf)
    meta = json.loads((orbax_dir / ock.MARKER).read_text())
    assert meta["dtype"] == CASES[family]["dtype"]
    assert meta["tensor_count"] == len(tensor_specs(config))
    assert meta["source"] == str(hf) and meta["phi3_jax_version"] == phi3_jax.__version__
    assert json.loads((orbax_dir / "config.json").read_text())["dtype"] == meta["dtype"]

    # Same parameters, bit for bit, hence the same logits, as loading the HF folder itself.
    dtype = CASES[family]["dtype"]
    ref, got = phi3_jax.load(hf, dtype=dtype), phi3_jax.load(orbax_dir, dtype=dtype)
    ref_flat, got_flat = dict(nnx.to_flat_state(ref.params)), dict(nnx.to_flat_state(got.params))
    assert ref_flat.keys() == got_flat.keys()
    for path, var in ref_flat.items():
        np.testing.assert_array_equal(np.asarray(got_flat[path].get_value()),
                                      np.asarray(var.get_value()), err_msg=str(path))
    np.testing.assert_array_equal(np.asarray(got.logits(PROMPT)), np.asarray(ref.logits(PROMPT)))
    assert got.generation_config == ref.generation_config
    if family == "mha":
        assert meta["tokenizer_files"] == ["tokenizer.model", "tokenizer_config.json"]
        assert got.tokenizer.encode("hello world") == ref.tokenizer.encode("hello world")

    code, err = run_cli(["export", str(orbax_dir), str(out), "--max-shard-size", "50KB",
                         "--quiet"], capsys)
    assert code == 0, err
    assert (out / INDEX_FILE).is_file()
    original, exported = raw_tensors(hf), raw_tensors(out)
    assert sorted(exported) == sorted(original)  # original names, nothing added or dropped
    if config.tie_word_embeddings:
        assert "lm_head.weight" not in exported
    for name, array in original.items():
        assert exported[name].dtype == array.dtype and exported[name].shape == array.shape
        assert exported[name].tobytes() == array.tobytes(), name
    index = json.loads((out / INDEX_FILE).read_text())
    assert sorted(index["weight_map"]) == sorted(original)
    for name in ("config.json", "generation_config.json",
                 *(["tokenizer.model", "tokenizer_config.json"] if family == "mha" else [])):
        assert (out / name).is_file(), name
    # transformers loads the export and computes what it computes on the original.
    np.testing.assert_array_equal(torch_logits(out), torch_logits(hf))


def test_convert_to_other_dtype(tmp_path, capsys):
    hf = make_hf_checkpoint(tmp_path / "hf", seed=1, dtype="float32", **FAMILY["gqa"])
    code, err = run_cli(["convert", str(hf), str(tmp_path / "o"), "--dtype", "bfloat16",
                         "--quiet"], capsys)
    assert code == 0, err
    # Rounds exactly as loading the HF folder in bf16 does (round to nearest even).
    ref = phi3_jax.load(hf, dtype="bfloat16")
    got = phi3_jax.load(tmp_path / "o", dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(got.logits(PROMPT)), np.asarray(ref.logits(PROMPT)))
    # A bf16 checkpoint restores into fp32 exactly (the cast happens as it is read).
    up = phi3_jax.load(tmp_path / "o", dtype="float32")
    embed = up.params["model"]["embed_tokens"]["weight"].get_value()
    assert embed.dtype == np.float32
    np.testing.assert_array_equal(
        np.asarray(embed),
        np.asarray(ref.params["model"]["embed_tokens"]["weight"].get_value()).astype(np.float32))
    exported = tmp_path / "e"
    assert main(["export", str(tmp_path / "o"), str(exported), "--quiet"]) == 0
    assert not (exported / INDEX_FILE).is_file()  # under 2GB: one file
    tensors = raw_tensors(exported)
    assert {a.dtype.name for a in tensors.values()} == {"bfloat16"}
    assert json.loads((exported / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_restore(tmp_path):
    # Head counts that a 4-way model axis divides, so attention and MLP weights really split.
    hf = make_hf_checkpoint(tmp_path / "hf", seed=2, num_attention_heads=8,
                            num_key_value_heads=4)
    assert main(["convert", str(hf), str(tmp_path / "o"), "--quiet"]) == 0
    mesh = sharding.make_mesh("data=2,model=4")
    model = phi3_jax.load(tmp_path / "o", mesh=mesh)
    _, abstract = phi3_jax.model.abstract_model(model.config, "float32")
    targets = dict(nnx.to_flat_state(sharding.param_shardings(abstract, mesh)))
    split = 0
    for path, var in nnx.to_flat_state(model.params):
        array = var.get_value()
        assert array.sharding == targets[path], path
        assert len(array.addressable_shards) == 8
        for shard in array.addressable_shards:
            assert shard.data.shape == targets[path].shard_shape(array.shape), path
        split += targets[path].shard_shape(array.shape) != array.shape
    assert split >= 1 + 4 * model.config.num_hidden_layers  # embed, head, qkv, o, gate_up, down
    unsharded = phi3_jax.load(tmp_path / "o")
    # Only the summation order of the split contractions differs: fp32 rounding, O(1) logits.
    np.testing.assert_allclose(np.asarray(model.logits(PROMPT)),
                               np.asarray(unsharded.logits(PROMPT)), rtol=1e-5, atol=1e-5)


def test_contiguous_copy_of_layout_views():
    # The tiled copy behind every transposed parameter, on views big enough to be tiled (the
    # tiny models above are not), with sizes that no tile divides.
    rng = np.random.default_rng(0)
    D, F, K, G, H = 300, 700, 5, 3, 24
    views = [
        rng.standard_normal((2 * F, D), np.float32).reshape(2, F, D).transpose(2, 0, 1),
        rng.standard_normal((D, F), np.float32).T,
        rng.standard_normal((K, G + 2, H, D), np.float32).transpose(3, 0, 1, 2),
        rng.standard_normal((D, 2 * F), np.float32).astype(jnp.bfloat16).T,
        rng.standard_normal((D, F), np.float32)[::2, ::3],  # not a transpose: numpy's copy
    ]
    for view in views:
        out = ock.contiguous(view)
        assert out.flags.c_contiguous and out.dtype == view.dtype
        np.testing.assert_array_equal(out, np.ascontiguousarray(view))
    same = np.zeros((4, 4))
    assert ock.contiguous(same) is same


# --- bad input: one clear line, exit code 2, nothing left behind --------------------------------


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("good") / "hf", seed=5,
                              max_shard_size="40KB")


def rewrite(hf: Path, dst: Path, edit) -> Path:
    """A copy of `hf` whose tensors are passed through edit(dict) and rewritten in one file."""
    shutil.copytree(hf, dst, ignore=shutil.ignore_patterns("*.safetensors", INDEX_FILE))
    tensors = raw_tensors(hf)
    edit(tensors)
    write_hf_tensors(dst, list(tensors.items()))
    return dst


def expect_failure(argv: list[str], capsys, needle: str) -> str:
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"phi3-jax {argv[0]}: error: "), err
    assert needle in lines[0], lines[0]
    out = Path(argv[2])
    assert leftovers(out.parent, out.name) == [], "partial output left behind"
    return lines[0]


def test_truncated_safetensors(good_hf, tmp_path, capsys):
    hf = shutil.copytree(good_hf, tmp_path / "hf")
    shard = sorted(hf.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    expect_failure(["convert", str(hf), str(tmp_path / "out")], capsys, "truncated")


def test_corrupt_safetensors_header(good_hf, tmp_path, capsys):
    hf = shutil.copytree(good_hf, tmp_path / "hf")
    shard = sorted(hf.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:24] = b"\xff" * 16
    shard.write_bytes(bytes(data))
    expect_failure(["convert", str(hf), str(tmp_path / "out")], capsys, "corrupt")


def test_missing_shard(good_hf, tmp_path, capsys):
    hf = shutil.copytree(good_hf, tmp_path / "hf")
    shard = sorted(hf.glob("*.safetensors"))[1]
    shard.unlink()
    msg = expect_failure(["convert", str(hf), str(tmp_path / "out")], capsys, shard.name)
    assert "missing" in msg


@pytest.mark.parametrize("case,needle", [
    ("missing", "'model.layers.1.mlp.down_proj.weight' is missing"),
    ("extra", "unexpected tensor 'model.layers.0.extra.weight'"),
    ("misshapen", "has shape [64, 95]"),
])
def test_bad_tensors(good_hf, tmp_path, capsys, case, needle):
    def edit(t):
        if case == "missing":
            del t["model.layers.1.mlp.down_proj.weight"]
        elif case == "extra":
            t["model.layers.0.extra.weight"] = np.zeros(4, np.float32)
        else:
            t["model.layers.0.mlp.down_proj.weight"] = np.zeros((64, 95), np.float32)
    hf = rewrite(good_hf, tmp_path / "hf", edit)
    expect_failure(["convert", str(hf), str(tmp_path / "out")], capsys, needle)


def test_unsupported_model_type(good_hf, tmp_path, capsys):
    hf = shutil.copytree(good_hf, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    expect_failure(["convert", str(hf), str(tmp_path / "out")], capsys, "'model_type'")


def test_existing_output_needs_force(good_hf, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    code, err = run_cli(["convert", str(good_hf), str(out), "--quiet"], capsys)
    assert code == 2 and "already exists; pass --force" in err
    assert (out / "keep.txt").read_text() == "old"
    # --force on a failing conversion keeps the old folder intact ...
    bad = shutil.copytree(good_hf, tmp_path / "bad")
    next(bad.glob("*.safetensors")).write_bytes(b"junk")
    code, err = run_cli(["convert", str(bad), str(out), "--force", "--quiet"], capsys)
    assert code == 2 and (out / "keep.txt").read_text() == "old", err
    # ... and replaces it only once the new checkpoint is complete.
    code, err = run_cli(["convert", str(good_hf), str(out), "--force", "--quiet"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and ock.is_orbax_checkpoint(out)
    assert leftovers(tmp_path, "out") == ["out"]
    # The same rules for export.
    exported = tmp_path / "exported"
    exported.mkdir()
    code, err = run_cli(["export", str(out), str(exported), "--quiet"], capsys)
    assert code == 2 and "already exists; pass --force" in err
    assert main(["export", str(out), str(exported), "--force", "--quiet"]) == 0
    assert (exported / "model.safetensors").is_file()


def test_unwritable_output(good_hf, tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses even root
        parent = Path("/sys")
    else:
        parent = tmp_path / "ro"
        parent.mkdir(mode=0o555)
    expect_failure(["convert", str(good_hf), str(parent / "phi3-jax-out")], capsys,
                   f"cannot write to {parent}")


def test_export_rejects_non_orbax_folder(good_hf, tmp_path, capsys):
    expect_failure(["export", str(good_hf), str(tmp_path / "out")], capsys,
                   "is not a phi3-jax Orbax checkpoint")


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory) -> Path:
    """~270 MB of fp32 noise (zstd gains nothing on it): a second or more to convert."""
    config = Phi3Config(vocab_size=32000, hidden_size=512, intermediate_size=2048,
                        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                        max_position_embeddings=4096)
    hf = tmp_path_factory.mktemp("big") / "hf"
    hf.mkdir()
    rng = np.random.default_rng(0)
    write_hf_tensors(hf, ((s.hf_name, np.frombuffer(rng.bytes(4 * int(np.prod(s.hf_shape))),
                                                    np.float32).reshape(s.hf_shape))
                          for s in tensor_specs(config)), "100MB")
    (hf / "config.json").write_text(json.dumps(config.to_hf()))
    return hf


# (signals, seconds between them, exit status, last line). Before: SIGTERM killed the process
# mid-write and a second SIGINT raised inside Orbax's event loop; both left .out.tmp-* behind.
SIGNALS = {
    "sigint": ((signal.SIGINT,), 0.0, 130, "interrupted"),
    "sigterm": ((signal.SIGTERM,), 0.0, 143, "terminated"),
    "two_sigints_50ms": ((signal.SIGINT, signal.SIGINT), 0.05, 130, "interrupted"),
}


@pytest.mark.parametrize("case", list(SIGNALS))
def test_signals_mid_write_leave_nothing(big_hf, tmp_path, case):
    signals, gap, status, last = SIGNALS[case]
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "phi3_jax.cli", "convert", str(big_hf),
                             str(out), "--quiet", "--allow-nonfinite"],  # random bits hold NaNs
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not glob.glob(str(tmp_path / ".out.tmp-*/out/params*")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)  # into the tensor writes
    assert proc.poll() is None, "finished before the signal: make the checkpoint bigger"
    for k, signum in enumerate(signals):
        if k:
            time.sleep(gap)
        proc.send_signal(signum)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == status, err
    assert err.strip().splitlines()[-1] == last and "Traceback" not in err, err
    assert leftovers(tmp_path, "out") == []


def test_sigkill_leftover_is_removed_by_the_next_run(good_hf, tmp_path, capsys, caplog):
    # What SIGKILL leaves: a temporary folder whose owner is gone (its lock file unlocked).
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = tmp_path / f".out.tmp-{proc.pid}-abcd1234"
    (stale / "out" / "params").mkdir(parents=True)
    (stale / ".owner").write_text(json.dumps({"pid": proc.pid, "host": "h"}))
    code, err = run_cli(["convert", str(good_hf), str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 0, err
    assert leftovers(tmp_path, "out") == ["out"]
    assert f"removing {stale}, left by process {proc.pid} that is gone" in caplog.text


# --- an output may not overlap its input, by any path -------------------------------------------


def test_output_overlapping_the_input_is_refused(good_hf, tmp_path, capsys):
    real = tmp_path / "real"
    hf = shutil.copytree(good_hf, real / "hf")
    (tmp_path / "alias").symlink_to(real)
    (tmp_path / "hf_link").symlink_to(hf)
    before = sorted(p.name for p in hf.iterdir())
    for out in (tmp_path / "alias" / "hf",  # the case: through a symlinked parent
                tmp_path / "hf_link",  # the folder's own symlink
                hf / "sub",  # inside the input
                tmp_path / "alias" / "hf" / "sub" / "deeper",
                real):  # containing it
        code, err = run_cli(["convert", str(hf), str(out), "--force", "--quiet"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "overlaps its input" in err, err
        assert sorted(p.name for p in hf.iterdir()) == before
    assert main(["convert", str(hf), str(tmp_path / "orbax"), "--quiet"]) == 0
    (tmp_path / "orbax_alias").symlink_to(tmp_path / "orbax")
    for out in (tmp_path / "orbax_alias", tmp_path / "orbax" / "hf"):
        code, err = run_cli(["export", str(tmp_path / "orbax"), str(out), "--force", "--quiet"],
                            capsys)
        assert code == 2 and "overlaps its input" in err, err
    assert ock.is_orbax_checkpoint(tmp_path / "orbax")
    phi3_jax.load(tmp_path / "orbax")  # intact: every checksum still matches


# --- checksums: a damaged checkpoint is refused by load, generate and export -------------------


@pytest.fixture(scope="module")
def good_orbax(good_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("orbax") / "orbax"
    assert main(["convert", str(good_hf), str(out), "--quiet"]) == 0
    return out


def largest_chunk(orbax: Path) -> Path:
    return max((orbax / "params").rglob("d/*"), key=lambda p: p.stat().st_size)


def flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_checksums_are_recorded_for_every_file(good_orbax):
    meta = json.loads((good_orbax / ock.MARKER).read_text())
    files = meta["checksums"]["files"]
    on_disk = sorted(str(p.relative_to(good_orbax)) for p in good_orbax.rglob("*")
                     if p.is_file() and p.name != ock.MARKER)
    assert sorted(files) == on_disk and "config.json" in files and "params/_METADATA" in files
    for rel, entry in files.items():  # the independent reference: hashlib on the whole file
        data = (good_orbax / rel).read_bytes()
        assert entry == {"bytes": len(data), "sha256": [hashlib.sha256(data).hexdigest()]}, rel


def test_checksums_of_files_longer_than_a_block(tmp_path, monkeypatch):
    from phi3_jax import checksums

    monkeypatch.setattr(checksums, "BLOCK_BYTES", 1000)  # 5 blocks of 1000, one of 1
    data = np.random.default_rng(0).bytes(5001)
    (tmp_path / "big.bin").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    record = checksums.record(tmp_path)
    assert record["files"]["big.bin"]["sha256"] == [
        hashlib.sha256(data[k:k + 1000]).hexdigest() for k in range(0, 5001, 1000)]
    assert record["files"]["empty"]["sha256"] == [hashlib.sha256(b"").hexdigest()]
    checksums.verify(tmp_path, record, "x")
    flip(tmp_path / "big.bin", 3500)  # in the fourth block
    with pytest.raises(checksums.ChecksumError, match=r"x is corrupt: big\.bin does not match"):
        checksums.verify(tmp_path, record, "x")
    (tmp_path / "big.bin").write_bytes(data + b"!")
    with pytest.raises(checksums.ChecksumError, match=r"big\.bin has 5002 bytes, 5001 were"):
        checksums.verify(tmp_path, record, "x")
    record["files"]["../outside"] = record["files"].pop("empty")  # a stranger's record
    with pytest.raises(checksums.ChecksumError, match=r"bad checksum entry '\.\./outside'"):
        checksums.verify(tmp_path, record, "x")


def corrupt(case: str, orbax: Path) -> str:
    """Damages a copy of the checkpoint; returns what the error must name."""
    if case == "array_chunk":  # the case: loaded silently before
        chunk = largest_chunk(orbax)
        flip(chunk)
        return f"{chunk.relative_to(orbax)} does not match its sha256"
    if case == "orbax_metadata":
        flip(orbax / "params" / "_METADATA", 10)
        return "params/_METADATA does not match its sha256"
    if case == "config":
        text = (orbax / "config.json").read_text()
        (orbax / "config.json").write_text(text.replace('"rms_norm_eps": 1e-05',
                                                        '"rms_norm_eps": 1e-04'))
        return "config.json does not match its sha256"
    if case == "record":  # a digest in phi3_jax.json itself
        meta = json.loads((orbax / ock.MARKER).read_text())
        digests = meta["checksums"]["files"]["params/_METADATA"]["sha256"]
        digests[0] = digests[0][:-1] + ("0" if digests[0][-1] != "0" else "1")
        (orbax / ock.MARKER).write_text(json.dumps(meta, indent=2))
        return f"{ock.MARKER} does not match its own digest"
    if case == "truncated_chunk":
        chunk = largest_chunk(orbax)
        chunk.write_bytes(chunk.read_bytes()[:100])
        return f"{chunk.relative_to(orbax)} has 100 bytes"
    if case == "truncated_record":
        record = orbax / ock.MARKER
        record.write_bytes(record.read_bytes()[:200])
        return f"{ock.MARKER} is corrupt"
    if case == "missing_chunk":
        chunk = largest_chunk(orbax)
        chunk.unlink()
        return f"{chunk.relative_to(orbax)} is missing"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["array_chunk", "orbax_metadata", "config", "record",
                                  "truncated_chunk", "truncated_record", "missing_chunk"])
def test_damaged_checkpoint_is_refused(good_orbax, tmp_path, capsys, case):
    orbax = shutil.copytree(good_orbax, tmp_path / "orbax")
    needle = corrupt(case, orbax)
    with pytest.raises(ock.OrbaxCheckpointError, match="corrupt") as err:
        phi3_jax.load(orbax)
    assert needle in str(err.value) and str(orbax) in str(err.value)
    for argv in (["generate", "--model", str(orbax), "--prompt", "hi"],
                 ["export", str(orbax), str(tmp_path / "exported"), "--quiet"]):
        code, err = run_cli(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert leftovers(tmp_path, "exported") == []


# Orbax leaves the reads of the other arrays of a truncated checkpoint unawaited.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_without_checksums_loads_with_a_note(good_orbax, tmp_path, caplog, capsys):
    # Written before checksums existed: format_version 1 without the two keys.
    orbax = shutil.copytree(good_orbax, tmp_path / "orbax")
    meta = json.loads((orbax / ock.MARKER).read_text())
    del meta["checksums"], meta["record_sha256"]
    (orbax / ock.MARKER).write_text(json.dumps(meta, indent=2))
    model = phi3_jax.load(orbax)
    assert "has no checksums (written by an older phi3-jax): loading it unverified" in caplog.text
    reference = phi3_jax.load(good_orbax)
    np.testing.assert_array_equal(np.asarray(model.logits(PROMPT)),
                                  np.asarray(reference.logits(PROMPT)))
    # Unverified, a truncated chunk still gets one line naming the checkpoint, not a dump of
    # TensorStore's spec.
    chunk = largest_chunk(orbax)
    chunk.write_bytes(chunk.read_bytes()[:100])
    code, err = run_cli(["generate", "--model", str(orbax), "--prompt", "hi"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "cannot read the checkpoint (a file is damaged or truncated)" in lines[0]
    assert str(orbax) in lines[0] and "'driver'" not in lines[0]


def test_sigterm_during_export_leaves_nothing(good_orbax, tmp_path, monkeypatch):
    from convert import export
    from convert.orbax_to_hf import _LayerReader

    real = _LayerReader.get

    def get(self, path):  # SIGTERM arrives while the first layer is being exported
        if path == ("model", "layers", 0, "mlp", "down_proj", "weight"):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, path)

    monkeypatch.setattr(_LayerReader, "get", get)
    with pytest.raises(SystemExit) as err:
        export(good_orbax, tmp_path / "exported", progress=False)
    assert err.value.code == 143
    assert leftovers(tmp_path, "exported") == []
