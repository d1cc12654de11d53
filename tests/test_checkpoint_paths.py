"""A checkpoint cannot make phi3-jax read a file outside its folder (phi3_jax.checkpoint_files).

Each attack is built so that it would succeed without the rule: the file outside holds exactly
the tensors (or config) the loader wants. A faithful Hugging Face Hub cache (blobs named by their
hashes, snapshot files as relative symlinks into ../../blobs) must keep loading.
"""

import hashlib
import json
import os
import pathlib
import re
import shutil

import numpy as np
import pytest
from conftest import cli_error

import phi3_jax
from phi3_jax.checkpoint_files import CheckpointPathError, checkpoint_file
from phi3_jax.checksums import json_digest
from phi3_jax.config import Phi3Config
from phi3_jax.demo import save_random_checkpoint
from phi3_jax.embedded import MODEL_DIR
from phi3_jax.hf_weights import INDEX_FILE, write_hf_tensors
from phi3_jax.safetensors_io import SafetensorsFile
from phi3_jax.tokenizer import Tokenizer, copy_tokenizer_files

SMALL = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                   eos_token_id=(2,))
IDS = [[3, 17, 42, 5]]


@pytest.fixture
def checkpoint(tmp_path) -> pathlib.Path:
    return pathlib.Path(save_random_checkpoint(tmp_path / "models" / "ckpt", SMALL, seed=0))


def index_to(checkpoint: pathlib.Path, file: str) -> None:
    """Replaces the weights with an index whose every entry names `file`."""
    names = SafetensorsFile(checkpoint / "model.safetensors").keys()
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / INDEX_FILE).write_text(json.dumps({"weight_map": {n: file for n in names}}))


def outside_copy(checkpoint: pathlib.Path, where: pathlib.Path) -> pathlib.Path:
    """A copy of the checkpoint's weights outside it: what an attack would make us load."""
    where.mkdir(parents=True, exist_ok=True)
    return pathlib.Path(shutil.copy(checkpoint / "model.safetensors", where / "x.safetensors"))


# ---- weight_map entries ----

@pytest.mark.parametrize("entry", ["../../outside/x.safetensors", "ABSOLUTE"])
def test_index_entry_outside_the_folder_is_refused(checkpoint, tmp_path, capsys, entry):
    outside = outside_copy(checkpoint, tmp_path / "outside")
    entry = str(outside) if entry == "ABSOLUTE" else entry
    assert (checkpoint / entry).resolve() == outside  # the attack reaches a loadable file
    index_to(checkpoint, entry)
    with pytest.raises(CheckpointPathError, match=re.escape(
            f"{checkpoint / INDEX_FILE}: weight_map entry 'model.embed_tokens.weight' names "
            f"'{entry}', which is not a plain relative path inside the checkpoint folder "
            f"{checkpoint}")):
        phi3_jax.load(checkpoint)
    err = cli_error(capsys, "generate", "--model", str(checkpoint), "--prompt", "hi")
    assert f"weight_map entry 'model.embed_tokens.weight' names '{entry}'" in err


@pytest.mark.parametrize("entry", ["./model.safetensors", "a//b.safetensors", "a\\b.safetensors",
                                   "", "shard/../model.safetensors"])
def test_index_entry_that_is_not_a_plain_path_is_refused(checkpoint, entry):
    index_to(checkpoint, entry)
    with pytest.raises(CheckpointPathError, match="not a plain relative path"):
        phi3_jax.load(checkpoint)


def test_index_entry_that_is_not_a_string_is_refused(checkpoint):
    index_to(checkpoint, "model.safetensors")
    index = json.loads((checkpoint / INDEX_FILE).read_text())
    index["weight_map"]["model.norm.weight"] = ["model.safetensors"]
    (checkpoint / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"weight_map entry 'model.norm.weight' must be a file "
                                         r"name, got an array"):
        phi3_jax.load(checkpoint)


def test_symlinked_shard_pointing_outside_is_refused(checkpoint, tmp_path, capsys):
    outside = outside_copy(checkpoint, tmp_path / "outside")
    index_to(checkpoint, "model-00001-of-00001.safetensors")
    (checkpoint / "model-00001-of-00001.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointPathError, match=re.escape(
            "weight_map entry 'model.embed_tokens.weight' ('model-00001-of-00001.safetensors') "
            f"resolves to {outside}, outside the checkpoint folder {checkpoint}")):
        phi3_jax.load(checkpoint)
    cli_error(capsys, "convert", str(checkpoint), str(tmp_path / "out"), "--quiet")
    assert not (tmp_path / "out").exists()


def test_symlinked_folder_inside_pointing_outside_is_refused(checkpoint, tmp_path):
    outside = outside_copy(checkpoint, tmp_path / "outside")
    (checkpoint / "shards").symlink_to(outside.parent)
    index_to(checkpoint, "shards/x.safetensors")
    with pytest.raises(CheckpointPathError, match=re.escape(f"resolves to {outside}, outside")):
        phi3_jax.load(checkpoint)


def test_symlinked_single_file_and_config_pointing_outside_are_refused(checkpoint, tmp_path):
    outside = outside_copy(checkpoint, tmp_path / "outside")
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointPathError, match=r"the safetensors file \('model.safetensors'\)"):
        phi3_jax.load(checkpoint)
    config = pathlib.Path(shutil.copy(checkpoint / "config.json", tmp_path / "config.json"))
    (checkpoint / "config.json").unlink()
    (checkpoint / "config.json").symlink_to(config)
    with pytest.raises(CheckpointPathError, match=re.escape(
            f"config.json ('config.json') resolves to {config}, outside")):
        phi3_jax.load(checkpoint)


def test_links_that_stay_inside_and_a_symlinked_folder_are_fine(checkpoint, tmp_path):
    reference = np.asarray(phi3_jax.load(checkpoint).logits(IDS))
    (checkpoint / "weights").mkdir()
    (checkpoint / "model.safetensors").rename(checkpoint / "weights" / "w.safetensors")
    (checkpoint / "model.safetensors").symlink_to("weights/w.safetensors")
    (tmp_path / "link").symlink_to(checkpoint)  # the user's own path may go through links
    np.testing.assert_array_equal(phi3_jax.load(tmp_path / "link").logits(IDS), reference)


# ---- tokenizer files ----

def test_symlinked_tokenizer_file_pointing_outside_is_refused(tmp_path):
    model = pathlib.Path(shutil.copytree(MODEL_DIR, tmp_path / "model"))
    secret = tmp_path / "secret.model"
    shutil.move(model / "tokenizer.model", secret)
    (model / "tokenizer.model").symlink_to(secret)
    with pytest.raises(CheckpointPathError, match=re.escape(
            f"tokenizer.model ('tokenizer.model') resolves to {secret}, outside")):
        Tokenizer.from_dir(model)
    with pytest.raises(CheckpointPathError):  # convert and export copy these files
        copy_tokenizer_files(model, tmp_path / "copy")
    assert not (tmp_path / "copy" / "tokenizer.model").exists()


# ---- the Hugging Face Hub cache ----

def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_snapshot(source: pathlib.Path, cache: pathlib.Path, repo: str = "models--org--tiny",
                 revision: str = "5b2c0ad4e1f6a1b7c2d3e4f5a6b7c8d9e0f1a2b3") -> pathlib.Path:
    """Lays `source` out as huggingface_hub does: each file stored once in blobs/, named by its
    sha256 (LFS files) or git blob sha1 (the small ones), and linked from snapshots/<revision>/
    by a relative symlink."""
    root = cache / repo
    snapshot = root / "snapshots" / revision
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    for file in sorted(source.rglob("*")):
        if not file.is_file():
            continue
        data = file.read_bytes()
        lfs = file.suffix in (".safetensors", ".model")
        blob = root / "blobs" / (hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data))
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_hub_cache_snapshot_loads(tmp_path):
    source = pathlib.Path(save_random_checkpoint(tmp_path / "plain", SMALL, seed=1))
    reference = np.asarray(phi3_jax.load(source).logits(IDS))
    snapshot = hub_snapshot(source, tmp_path / "hub")
    assert os.readlink(snapshot / "config.json").startswith("../../blobs/")
    np.testing.assert_array_equal(phi3_jax.load(snapshot).logits(IDS), reference)


def test_hub_cache_sharded_snapshot_with_tokenizer_loads(tmp_path):
    source = pathlib.Path(shutil.copytree(MODEL_DIR, tmp_path / "plain"))
    st = SafetensorsFile(source / "model.safetensors")
    tensors = [(n, np.array(st[n])) for n in st]
    (source / "model.safetensors").unlink()
    write_hf_tensors(source, tensors, max_shard_size="300KB")
    assert (source / INDEX_FILE).exists()
    reference = phi3_jax.load(source)
    snapshot = hub_snapshot(source, tmp_path / "hub")
    model = phi3_jax.load(snapshot)
    np.testing.assert_array_equal(model.logits(IDS), reference.logits(IDS))
    assert model.tokenizer.encode("1+1=") == reference.tokenizer.encode("1+1=")
    assert model.generation_config == reference.generation_config


@pytest.mark.parametrize("attack", ["other repo's blob", "file of the repo outside blobs",
                                    "blob not named by a hash", "not a models-- repo",
                                    "entry naming the blob"])
def test_hub_cache_links_must_stay_in_the_repo_blobs(tmp_path, attack):
    source = pathlib.Path(save_random_checkpoint(tmp_path / "plain", SMALL, seed=1))
    repo = "datasets--org--tiny" if attack == "not a models-- repo" else "models--org--tiny"
    snapshot = hub_snapshot(source, tmp_path / "hub", repo=repo)
    link = snapshot / "model.safetensors"
    blob = link.resolve()
    if attack == "other repo's blob":
        other = hub_snapshot(source, tmp_path / "hub", repo="models--evil--x")
        target = (other / "model.safetensors").resolve()
    elif attack == "file of the repo outside blobs":
        target = pathlib.Path(shutil.copy(blob, snapshot.parent.parent / "stolen"))
    elif attack == "blob not named by a hash":
        target = pathlib.Path(shutil.copy(blob, blob.parent / "notahash"))
    elif attack == "entry naming the blob":  # the name itself must stay inside
        index_to(snapshot, os.path.relpath(blob, snapshot))
        with pytest.raises(CheckpointPathError, match="not a plain relative path"):
            phi3_jax.load(snapshot)
        return
    else:  # every link of the snapshot, config.json first, leads outside a models-- repo
        with pytest.raises(CheckpointPathError, match=re.escape(
                f"config.json ('config.json') resolves to {blob.parent}")):
            phi3_jax.load(snapshot)
        return
    link.unlink()
    link.symlink_to(os.path.relpath(target, snapshot))
    with pytest.raises(CheckpointPathError, match=re.escape(f"resolves to {target}, outside")):
        phi3_jax.load(snapshot)


# ---- Orbax checkpoints ----

@pytest.fixture(scope="module")
def orbax_checkpoint(tmp_path_factory):
    from convert import convert

    root = tmp_path_factory.mktemp("orbax")
    hf = save_random_checkpoint(root / "hf", SMALL, seed=2)
    convert(hf, root / "orbax", progress=False)
    return root / "orbax"


def test_orbax_params_symlinked_outside_are_refused(orbax_checkpoint, tmp_path, capsys):
    ckpt = pathlib.Path(shutil.copytree(orbax_checkpoint, tmp_path / "ckpt", symlinks=True))
    phi3_jax.load(ckpt)  # intact: loads
    victim = next(p for p in sorted((ckpt / "params").rglob("*")) if p.is_file())
    stolen = pathlib.Path(shutil.move(victim, tmp_path / "elsewhere"))
    victim.symlink_to(stolen)
    with pytest.raises(CheckpointPathError, match=re.escape(f"resolves to {stolen}, outside")):
        phi3_jax.load(ckpt)
    err = cli_error(capsys, "export", str(ckpt), str(tmp_path / "hf"), "--quiet")
    assert f"resolves to {stolen}" in err


def test_orbax_metadata_params_outside_is_refused(orbax_checkpoint, tmp_path, capsys):
    ckpt = pathlib.Path(shutil.copytree(orbax_checkpoint, tmp_path / "ckpt", symlinks=True))
    shutil.copytree(ckpt / "params", tmp_path / "params")
    meta = json.loads((ckpt / "phi3_jax.json").read_text())
    meta = {k: v for k, v in meta.items() if k != "record_sha256"} | {"params": "../params"}
    # The attacker re-seals the record: its digest is a checksum, not a signature.
    meta["record_sha256"] = json_digest(meta)
    (ckpt / "phi3_jax.json").write_text(json.dumps(meta))
    err = cli_error(capsys, "export", str(ckpt), str(tmp_path / "hf"), "--quiet")
    assert "names '../params', which is not a plain relative path" in err


# ---- the rule itself ----

@pytest.mark.parametrize("name", ["config.json", "sub/dir/x.safetensors", "a..b", ".hidden"])
def test_plain_names_are_allowed(tmp_path, name):
    assert checkpoint_file(tmp_path, name, what="x") == os.path.join(tmp_path, name)


@pytest.mark.parametrize("name", ["..", "../x", "a/../../x", "/etc/passwd", "a/./b", "a/", "",
                                  "a\\..\\b", "nul\0byte", 3, None])
def test_names_that_leave_or_are_not_plain_are_refused(tmp_path, name):
    with pytest.raises(CheckpointPathError, match=r"^entry 7 names .* not a plain relative path"):
        checkpoint_file(tmp_path, name, what="entry 7")
