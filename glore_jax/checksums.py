"""Checksum manifests for directories written once and read later: checkpoint steps and saved models.

Orbax writes a step atomically (a temp dir renamed at the end), which
protects against a kill mid-save but not against what happens to the bytes
afterwards: a disk that zeroes a block, a copy cut short, a file truncated
by a full volume. Orbax then restores the zeros silently, or fails on every
restart. A manifest records each file's size and sha256 when the directory
is complete; `verify` recomputes them and names the first file that differs.
"""

from __future__ import annotations

import hashlib
import os

from glore_jax.files import read_json_file, write_json

MANIFEST = "glore_checksums.json"
# Orbax rewrites a step's top-level metadata (timestamps) when it publishes
# the step, after our manifest is written; it holds no array data.
_UNCHECKED = {MANIFEST, "_CHECKPOINT_METADATA"}


def _files(directory: str) -> list[str]:
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel not in _UNCHECKED:
                out.append(rel)
    return sorted(out)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: str) -> None:
    """Records the size and sha256 of every file under `directory` (atomically, in the directory)."""
    files = {rel: {"size": os.path.getsize(os.path.join(directory, rel)),
                   "sha256": _sha256(os.path.join(directory, rel))} for rel in _files(directory)}
    write_json(os.path.join(directory, MANIFEST), {"files": files}, indent=1, sort_keys=True)


def has_manifest(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, MANIFEST))


def verify(directory: str) -> str | None:
    """None when every file in the manifest is intact, else why not (naming the file)."""
    try:
        manifest = read_json_file(os.path.join(directory, MANIFEST))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable checksum manifest ({type(e).__name__}: {e})"
    for rel, expected in sorted(manifest.items()):
        path = os.path.join(directory, rel)
        if not os.path.exists(path):
            return f"{rel} is missing"
        size = os.path.getsize(path)
        if size != expected["size"]:
            return f"{rel} is {size} bytes, expected {expected['size']} (truncated or overwritten)"
        if _sha256(path) != expected["sha256"]:
            return f"{rel} fails its sha256 check (its bytes changed after saving)"
    return None
