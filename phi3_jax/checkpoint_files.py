"""Which files a checkpoint folder may make us read: its own, never one outside it.

A checkpoint names files: the shards in model.safetensors.index.json's weight_map, and by fixed
names config.json, generation_config.json, the tokenizer and chat-template files, an Orbax
checkpoint's params/ tree. A folder from a stranger must not make the loader read a file
elsewhere (a shard named `../../.ssh/id_rsa` or `/etc/passwd`, or a config.json that is a
symlink out of the folder): what is read ends up in the model, in an error message, or copied
into a converted checkpoint. The rule:

1. A name is a relative path of "/"-separated parts, none of them empty, "." or "..", with no
   backslash or NUL: before any link is followed, it names a place inside the folder.
2. The file it names, every symlink resolved, lies inside the folder (the folder's own real
   path: a folder reached through a symlink is fine), or
3. the folder is a Hugging Face Hub cache snapshot (<cache>/models--<org>--<name>/snapshots/
   <revision>/), whose files are symlinks into the repository's blob store (config.json ->
   ../../blobs/<hash>); then the named path may be a symlink the snapshot holds whose target is
   a file directly in that same repository's blobs/ folder, named by its hash (40 or 64 hex
   digits, as the Hub client names blobs).

Anything else fails with CheckpointPathError naming the entry and where it leads.
"""

from __future__ import annotations

import os
import re

_BLOB_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


class CheckpointPathError(ValueError):
    """A checkpoint names a file outside its folder, or a name that is not a plain path."""


def checkpoint_file(folder: str | os.PathLike, name: object, *, what: str) -> str:
    """The path of the file `name` names in checkpoint `folder` (joined, not resolved, so that
    messages show the user's path), if the rule above allows it; `what` says what named it (e.g.
    "weight_map entry 'lm_head.weight'"). A missing file is not an error here."""
    folder = os.fspath(folder)
    if (not isinstance(name, str) or not name or "\\" in name or "\0" in name
            or name.startswith("/") or os.path.isabs(name)
            or any(part in ("", ".", "..") for part in name.split("/"))):
        raise CheckpointPathError(
            f"{what} names {name!r}, which is not a plain relative path inside the checkpoint "
            f"folder {folder}")
    path = os.path.join(folder, name)
    _check_resolves_inside(folder, path, what=f"{what} ({name!r})")
    return path


def check_tree(folder: str | os.PathLike, name: str, *, what: str) -> None:
    """Checks the entry `name` of `folder` and, when it is a folder, everything below it (the
    files a library such as TensorStore opens on its own), against the rule above."""
    top = checkpoint_file(folder, name, what=what)
    for directory, dirs, files in os.walk(top):  # does not descend into symlinked folders
        for entry in (*dirs, *files):
            path = os.path.join(directory, entry)
            _check_resolves_inside(folder, path, what=f"{what} ({os.path.relpath(path, folder)!r})")


def _check_resolves_inside(folder: str, path: str, *, what: str) -> None:
    root = os.path.realpath(folder)
    target = os.path.realpath(path)
    if _is_within(target, root) or _is_hub_blob(root, path, target):
        return
    raise CheckpointPathError(
        f"{what} resolves to {target}, outside the checkpoint folder {root}; a checkpoint may "
        f"only reference its own files")


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _is_hub_blob(root: str, path: str, target: str) -> bool:
    """Rule 3: `path` is a symlink in a Hub snapshot `root` to a blob of the same repository."""
    snapshots = os.path.dirname(root)
    repo = os.path.dirname(snapshots)
    if (os.path.basename(snapshots) != "snapshots"
            or not os.path.basename(repo).startswith("models--")
            or not os.path.islink(path)):
        return False
    blobs = os.path.realpath(os.path.join(repo, "blobs"))
    return (os.path.dirname(target) == blobs and _BLOB_NAME.fullmatch(os.path.basename(target))
            is not None and os.path.isfile(target))
