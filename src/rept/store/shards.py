"""One shard file, written and read the same way for every kind of index.

A shard is a safetensors file `shard-NNNNN.safetensors`: an int64 tensor `row` (each row's index in
the source dataset), the per-row float tensors of whatever the index stores (RepT's `h`, `g`,
`g_next`; a baseline's gradients or projections, with an int64 `position`), and in its metadata the
rows' labels and text hashes, the shard's number and a sha256 of its own content. It is written
under a temporary name and renamed, so a killed write never leaves half a shard; it is read once
from disk, checked against the manifest's checksum when the manifest lists it and against its own
digest when it does not yet (a build in progress). Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from rept.errors import ReptError
from rept.store.safefile import read_header, sha256_bytes, sha256_file, write_atomic

# What to do about a missing file; a damaged one is deleted first ("delete it and ...").
REBUILD = "rerun `rept index` with the same settings to rebuild it"


class IndexStoreError(ReptError):
    """A user-facing problem with an index folder (one line)."""


def shard_path(folder, k: int) -> Path:
    return Path(folder) / f"shard-{k:05d}.safetensors"


def content_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over a shard's tensors (name, dtype, shape, bytes) and metadata: stored in the shard
    itself, so a shard is checked on its own before the manifest records its file's checksum."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for key in sorted(k for k in metadata if k != "content_sha256"):
        digest.update(f"{key}={metadata[key]};".encode())
    return digest.hexdigest()


def write_shard(folder, k: int, tensors: dict[str, torch.Tensor], labels: list, hashes: list[str],
                metadata: dict[str, str] | None = None) -> None:
    """Write shard k of `folder`: `tensors` (with `row`, rows in the order given) and, in its
    metadata, the rows' labels and text hashes, the shard number, `metadata` and its own digest."""
    meta = {"labels": json.dumps(labels), "text_hash": json.dumps(hashes), "shard": str(k), **(metadata or {})}
    meta["content_sha256"] = content_digest(tensors, meta)
    write_atomic(shard_path(folder, k), lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_checked(path: Path, recorded: dict | None, rebuild: str = REBUILD) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file read once from disk; with `recorded` (the
    manifest's {"sha256", "bytes"} for it), the file must have that size and hash. Raises
    IndexStoreError in one line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IndexStoreError(f"{path} is missing: {rebuild}") from None
    if recorded is not None and len(data) != recorded["bytes"]:
        raise IndexStoreError(f"{path} is corrupt or truncated ({len(data)} bytes, the manifest says "
                              f"{recorded['bytes']}): delete it and {rebuild}")
    if recorded is not None and sha256_bytes(data) != recorded["sha256"]:
        raise IndexStoreError(f"{path} does not match the checksum in the manifest (the file was changed or damaged) "
                              f"- delete it and {rebuild}")
    try:
        _, meta = read_header(data, path)
        tensors = load_safetensors_bytes(data)
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise IndexStoreError(f"{path} is corrupt or truncated ({type(exc).__name__}): "
                              f"delete it and {rebuild}") from None
    return tensors, meta


def read_shard(folder, k: int, recorded: dict | None, verify: bool = True,
               rebuild: str = REBUILD) -> tuple[dict, dict, list, list[str]]:
    """(tensors, metadata, labels, text hashes) of shard k. With `verify`, its bytes must match
    `recorded` (the manifest's entry for it) or, when the manifest does not list it yet, its own digest."""
    path = shard_path(folder, k)
    tensors, meta = read_checked(path, recorded if verify else None, rebuild)
    labels = _labels(path, meta, rebuild)
    try:
        hashes = json.loads(meta.get("text_hash", "null"))
    except json.JSONDecodeError:
        raise IndexStoreError(f"{path} lacks its row metadata: delete it and {rebuild}") from None
    if verify and recorded is None and meta.get("content_sha256") != content_digest(tensors, meta):
        raise IndexStoreError(f"{path} does not match its own checksum (damaged): delete it and {rebuild}")
    if "row" not in tensors or len(labels) != tensors["row"].shape[0]:
        raise IndexStoreError(f"{path} is inconsistent (no row tensor, or row and label counts differ): "
                              f"delete it and {rebuild}")
    return tensors, meta, labels, hashes


def _labels(path: Path, meta: dict, rebuild: str) -> list:
    try:
        return json.loads(meta["labels"])
    except (KeyError, json.JSONDecodeError):
        raise IndexStoreError(f"{path} lacks its row metadata: delete it and {rebuild}") from None


def read_ids(folder, k: int, names=("row",), rebuild: str = REBUILD) -> tuple[dict, dict, list]:
    """A shard's id tensors (`names`), metadata and labels without reading its per-row float
    tensors: for a shard already checked in this open (or when no check is asked for)."""
    path = shard_path(folder, k)
    try:
        with safe_open(str(path), framework="pt") as f:
            ids, meta = {n: f.get_tensor(n) for n in names if n in f.keys()}, f.metadata() or {}
    except FileNotFoundError:
        raise IndexStoreError(f"{path} is missing: {rebuild}") from None
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise IndexStoreError(f"{path} is corrupt or truncated ({type(exc).__name__}): "
                              f"delete it and {rebuild}") from None
    return ids, meta, _labels(path, meta, rebuild)


def file_checksums(folder, names) -> dict:
    """{name: {"sha256", "bytes"}} of files in `folder`: what a manifest records to verify them by."""
    return {name: {"sha256": sha256_file(Path(folder) / name), "bytes": (Path(folder) / name).stat().st_size}
            for name in sorted(names)}
