"""The signature index on disk.

A folder with `manifest.json` and `shard-NNNNN.safetensors` files. Shard k holds the rows of
the source dataset whose index lies in [k * shard_size, (k + 1) * shard_size): float tensors
`h` and `g` (rows x hidden), an int64 tensor `row`, in an index built for the `lookahead` mode
(manifest `stores_g_next`) a third float tensor `g_next`, and in its metadata the label and text hash
of each row and the rows of its range that were skipped. Every file is written under a temporary
name and renamed, so a killed build leaves only whole shards; a rerun builds the missing ones.
"""

from __future__ import annotations

from rept.errors import ReptError

import datetime as _dt
import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rept import __version__

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Settings that make two indexes (or an index and a model) incompatible when they differ.
IDENTITY_KEYS = ("model_config_hash", "model_weights_hash", "adapter_hash", "tokenizer_hash", "template",
                 "layer", "max_length", "dataset_fingerprint", "dtype", "shard_size")


class IndexStoreError(ReptError):
    """A user-facing problem with an index folder (one line)."""


def text_hash(prompt: str, response: str) -> str:
    return hashlib.sha1(f"{prompt}\x00{response}".encode()).hexdigest()[:16]


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise IndexStoreError(f"{folder} is not a rept index (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IndexStoreError(f"{path} is not valid JSON ({exc.msg})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexStoreError(f"{path}: index format {manifest.get('format_version')} is not supported "
                              f"(this rept reads format {FORMAT_VERSION})")
    return manifest


def describe_differences(have: dict, want: dict, keys=IDENTITY_KEYS) -> list[str]:
    return [f"{k}: index has {have.get(k)!r}, this run has {want.get(k)!r}"
            for k in keys if k in want and have.get(k) != want.get(k)]


def check_identity(folder, manifest: dict, want: dict) -> None:
    """Raise, naming each field, when the identity fields in `want` (the model, adapter, tokenizer
    and template about to be used) differ from those an index recorded."""
    diffs = describe_differences(manifest, want)
    if diffs:
        raise IndexStoreError(f"index {folder} does not match: " + "; ".join(diffs))


def shard_path(folder: Path, k: int) -> Path:
    return Path(folder) / f"shard-{k:05d}.safetensors"


def new_manifest(**fields) -> dict:
    manifest = {"format_version": FORMAT_VERSION, "rept_version": __version__, "git_sha": git_sha(),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "complete": False}
    manifest.update(fields)
    return manifest


def save_shard(folder: Path, k: int, rows: list[int], h: torch.Tensor, g: torch.Tensor, labels: list,
               hashes: list[str], skipped: list[int], dtype: torch.dtype, g_next: torch.Tensor | None = None) -> None:
    order = np.argsort(np.asarray(rows, dtype=np.int64), kind="stable")
    order_t = torch.as_tensor(order)
    stored = {"h": h, "g": g} if g_next is None else {"h": h, "g": g, "g_next": g_next}
    tensors = {name: x[order_t].to(dtype).contiguous() if len(rows) else torch.zeros((0, 0), dtype=dtype)
               for name, x in stored.items()}
    tensors["row"] = torch.as_tensor(np.asarray(rows, dtype=np.int64)[order])
    metadata = {"labels": json.dumps([labels[i] for i in order]),
                "text_hash": json.dumps([hashes[i] for i in order]),
                "skipped": json.dumps(sorted(skipped))}
    path = shard_path(folder, k)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


@dataclass
class Shard:
    k: int
    h: torch.Tensor
    g: torch.Tensor
    row: torch.Tensor
    labels: list
    text_hash: list[str]
    skipped: list[int]
    g_next: torch.Tensor | None = None   # only in an index built for the lookahead mode


def load_shard(folder: Path, k: int) -> Shard:
    path = shard_path(folder, k)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in ("h", "g", "row", "g_next") if name in f.keys()}
        labels, hashes, skipped = (json.loads(meta[key]) for key in ("labels", "text_hash", "skipped"))
    except FileNotFoundError:
        raise IndexStoreError(f"{path} is missing: rerun `rept index` with the same settings to rebuild it") from None
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise IndexStoreError(f"{path} is corrupt or truncated ({type(exc).__name__}): delete it and rerun "
                              "`rept index` with the same settings to rebuild it") from None
    if any(name not in tensors for name in ("h", "g", "row")):
        raise IndexStoreError(f"{path} lacks a tensor (h, g or row): delete it and rerun `rept index`")
    n = tensors["row"].shape[0]
    if any(x.shape[0] != n for x in tensors.values()) or len(labels) != n:
        raise IndexStoreError(f"{path} is inconsistent (row counts differ): delete it and rerun `rept index`")
    return Shard(k, tensors["h"], tensors["g"], tensors["row"], labels, hashes, skipped, tensors.get("g_next"))


def shard_is_valid(folder: Path, k: int) -> bool:
    try:
        load_shard(folder, k)
        return True
    except IndexStoreError:
        return False


class SignatureIndex:
    """A finished index opened for reading."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if self.manifest.get("kind") == "method":  # rept.methods.store: a baseline's state, not signatures
            raise IndexStoreError(f"{self.folder} holds {self.manifest.get('method')} state (`rept index --method`), "
                                  "not RepT signatures: only `rept trace` and `rept eval` read it")
        if not self.manifest.get("complete"):
            raise IndexStoreError(f"{self.folder} is incomplete: rerun the same `rept index` command to finish it")
        self._dataset = None

    @property
    def layer(self) -> int:
        return self.manifest["layer"]

    @property
    def n_shards(self) -> int:
        return self.manifest["n_shards"]

    @property
    def stores_g_next(self) -> bool:
        return bool(self.manifest.get("stores_g_next"))

    def search_mode(self, mode: str | None = None) -> str:
        """The mode to score in: `mode`, or the index's default; raises when the index cannot be
        searched in it (lookahead needs the stored g_next)."""
        mode = mode or self.manifest["mode"]
        if mode == "lookahead" and not self.stores_g_next:
            built = self.manifest.get("mode")
            raise IndexStoreError(f"index {self.folder} stores no g_next (built in mode {built!r}); "
                                  "build it with `rept index --mode lookahead` to search in that mode")
        return mode

    def shards(self):
        for k in range(self.n_shards):
            yield load_shard(self.folder, k)

    def load_all(self) -> Shard:
        """Every stored row in one Shard (for modest sizes: eval and the tests)."""
        parts = list(self.shards())
        cat = lambda name: torch.cat([getattr(p, name) for p in parts if getattr(p, name).numel()])  # noqa: E731
        return Shard(-1, cat("h"), cat("g"), cat("row"), sum((p.labels for p in parts), []),
                     sum((p.text_hash for p in parts), []), sum((p.skipped for p in parts), []),
                     cat("g_next") if self.stores_g_next else None)

    def labels(self) -> dict[int, str | None]:
        """Row id -> label, read from the shard headers only (no tensor is loaded)."""
        out = {}
        for k in range(self.n_shards):
            try:
                with safe_open(str(shard_path(self.folder, k)), framework="pt") as f:
                    out.update(zip(f.get_slice("row")[:].tolist(), json.loads(f.metadata()["labels"])))
            except Exception:  # report corruption the same way as a full load
                load_shard(self.folder, k)
                raise
        return out

    def check_model(self, want: dict) -> None:
        """Raise when `want` (identity fields of the model about to be used) differs."""
        check_identity(self.folder, self.manifest, want)

    def dataset(self):
        """The training rows the index was built from, checked against the stored fingerprint."""
        if self._dataset is None:
            self._dataset = source_dataset(self.folder, self.manifest)
        return self._dataset


def source_dataset(folder, manifest: dict):
    """The dataset an index (signature or method) recorded, checked against its fingerprint: where
    `rept trace` reads the rows' text from."""
    from rept.data import load_dataset

    info = manifest.get("dataset")
    if not info:
        raise IndexStoreError(f"index {folder} records no dataset; it is needed to show row text")
    if not os.path.exists(info["source"]):
        raise IndexStoreError(f"the index's dataset {info['source']} is gone; it is needed to show row text")
    cols = info["columns"]
    ds = load_dataset(info["source"], cols.get("prompt"), cols.get("response"), cols.get("label"))
    if ds.fingerprint != manifest["dataset_fingerprint"]:
        raise IndexStoreError(f"the dataset at {info['source']} changed since the index was built")
    return ds
