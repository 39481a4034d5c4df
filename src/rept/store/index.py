"""The signature index on disk.

A folder with `manifest.json` and `shard-NNNNN.safetensors` files. Shard k holds the rows of
the source dataset whose index lies in [k * shard_size, (k + 1) * shard_size): float tensors
`h` and `g` (rows x hidden), an int64 tensor `row`, in an index built for the `lookahead` mode
(manifest `stores_g_next`) a third float tensor `g_next`, and in its metadata the label and text hash
of each row and the rows of its range that were skipped. Every file is written under a temporary
name and renamed, so a killed build leaves only whole shards; a rerun builds the missing ones.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rept import __version__
from rept.store.identity import ModelIdentity, SignatureStoreIdentity, differing_names, from_fields
from rept.store.safefile import write_atomic
from rept.store.shards import (REBUILD, IndexStoreError, file_checksums, read_checked, read_ids, read_shard,
                               shard_path, write_shard)

FORMAT_VERSION = 2  # 2: every file's sha256 in the manifest, layer/dims/row range in each shard
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"  # held by a running `rept index` (rept.store.build), so two builds never interleave
__all__ = ["IndexStoreError", "SignatureIndex", "file_checksums", "load_shard", "open_store", "read_checked",
           "read_manifest", "save_shard", "shard_path", "text_hash", "write_manifest"]


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
    """Write `data` to `path` under a temporary name, then rename; the file gets the umask's mode."""
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def read_manifest(folder: Path) -> dict:
    """The manifest of an index folder, every field checked (rept.store.manifest): one line on a problem."""
    from rept.store.manifest import validate_manifest

    path = Path(folder) / MANIFEST
    if not path.exists():
        raise IndexStoreError(f"{folder} is not a rept index (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexStoreError(f"{path} is not valid JSON ({getattr(exc, 'msg', type(exc).__name__)})") from None
    if not isinstance(manifest, dict):
        raise IndexStoreError(f"{path} is not a manifest (a JSON object)")
    version = manifest.get("format_version")
    if version == 1:
        raise IndexStoreError(f"{folder} was written by an older rept (index format 1: no checksums); rebuild it "
                              "with the same `rept index` command into a new --out")
    if version != FORMAT_VERSION:
        raise IndexStoreError(f"{path}: index format {version!r} is not supported "
                              f"(this rept reads format {FORMAT_VERSION})")
    validate_manifest(manifest, path)
    return manifest


def signature_identity(manifest: dict) -> SignatureStoreIdentity:
    """What a signature index (or a build about to write one) is tied to, from its manifest."""
    return from_fields(SignatureStoreIdentity, manifest)


def check_identity(folder, manifest: dict, want: ModelIdentity, given: dict | None = None) -> None:
    """Raise when `want` (the model, adapter, tokenizer and template about to be used) differs from
    the one an index recorded: say what differs and, from `given` ({"model": path, "adapter": path
    or None}), which folders the index was built with and which were given."""
    differ = differing_names(from_fields(ModelIdentity, manifest), want)
    if not differ:
        return
    built = _folders(manifest.get("model", {}).get("id"), manifest.get("adapter"))
    message = f"index {folder} does not match this model: its {', '.join(differ)} differ" \
              f"{'s' if len(differ) == 1 else ''}; it was built with {built}"
    if given is not None:
        now = _folders(given.get('model'), given.get('adapter'))
        if now == built:  # the same paths: the files in them changed since the build
            message += ", the folders this run uses too: their files have changed since (retrained?)"
        else:
            message += f", and this run uses {now}"
    raise IndexStoreError(message + " (give the index's own --model/--adapter, or rebuild the index)")


def _folders(model, adapter) -> str:
    return f"model {model}" + (f" + adapter {adapter}" if adapter else " (no adapter)")


def new_manifest(**fields) -> dict:
    manifest = {"format_version": FORMAT_VERSION, "rept_version": __version__, "git_sha": git_sha(),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "complete": False}
    manifest.update(fields)
    return manifest


def save_shard(folder: Path, k: int, rows: list[int], h: torch.Tensor, g: torch.Tensor, labels: list,
               hashes: list[str], skipped: list[int], dtype: torch.dtype, g_next: torch.Tensor | None = None,
               about: dict | None = None) -> None:
    """Write shard k. `about` ({"layer", "hidden", "row_lo", "row_hi"}) goes into the shard's own
    metadata, checked against the manifest when the shard is read."""
    order = np.argsort(np.asarray(rows, dtype=np.int64), kind="stable")
    order_t = torch.as_tensor(order)
    stored = {"h": h, "g": g} if g_next is None else {"h": h, "g": g, "g_next": g_next}
    tensors = {name: x[order_t].to(dtype).contiguous() if len(rows) else torch.zeros((0, 0), dtype=dtype)
               for name, x in stored.items()}
    tensors["row"] = torch.as_tensor(np.asarray(rows, dtype=np.int64)[order])
    metadata = {"skipped": json.dumps(sorted(skipped)), **{key: json.dumps(value) for key, value in (about or {}).items()}}
    write_shard(folder, k, tensors, [labels[i] for i in order], [hashes[i] for i in order], metadata)


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


def load_shard(folder: Path, k: int, manifest: dict | None = None, verify: bool = True) -> Shard:
    """Shard k, checked against `manifest` (when given: shard number, layer, dims, row range) and,
    with `verify`, its bytes against the manifest's checksum and its tensors against its own digest."""
    path = shard_path(folder, k)
    recorded = ((manifest or {}).get("files") or {}).get(path.name)
    tensors, meta, labels, hashes = read_shard(folder, k, recorded, verify)
    try:
        skipped = json.loads(meta["skipped"])
    except (KeyError, json.JSONDecodeError):
        raise IndexStoreError(f"{path} lacks its row metadata: delete it and {REBUILD}") from None
    if any(name not in tensors for name in ("h", "g", "row")):
        raise IndexStoreError(f"{path} lacks a tensor (h, g or row): delete it and rerun `rept index`")
    n = tensors["row"].shape[0]
    if any(x.shape[0] != n for x in tensors.values()) or len(labels) != n:
        raise IndexStoreError(f"{path} is inconsistent (row counts differ): delete it and rerun `rept index`")
    if manifest is not None:
        _check_shard_against(path, k, tensors, meta, manifest)
    return Shard(k, tensors["h"], tensors["g"], tensors["row"], labels, hashes, skipped, tensors.get("g_next"))


def shard_about(manifest: dict, k: int) -> dict:
    """What shard k of an index with this manifest must say of itself."""
    size = manifest["shard_size"]
    return {"layer": manifest["layer"], "hidden": manifest["model"]["hidden_size"],
            "row_lo": k * size, "row_hi": min((k + 1) * size, manifest["dataset"]["n_total"])}


def _check_shard_against(path: Path, k: int, tensors: dict, meta: dict, manifest: dict) -> None:
    says = {key: json.loads(meta[key]) for key in ("layer", "hidden", "row_lo", "row_hi") if key in meta}
    want = shard_about(manifest, k)
    if meta.get("shard") != str(k) or says != want:
        wrong = [f"{key} {says.get(key)!r} (manifest: {want[key]!r})" for key in want if says.get(key) != want[key]]
        raise IndexStoreError(f"{path} does not belong with its manifest: "
                              + (", ".join(wrong) if wrong else f"it is shard {meta.get('shard')}, not {k}"))
    rows = tensors["row"]
    if rows.numel() and (int(rows.min()) < want["row_lo"] or int(rows.max()) >= want["row_hi"]):
        raise IndexStoreError(f"{path} holds rows outside its range [{want['row_lo']}, {want['row_hi']})")
    for name in ("h", "g", "g_next"):
        if name in tensors and rows.numel() and tensors[name].shape[1:] != (want["hidden"],):
            raise IndexStoreError(f"{path}: {name} has {tuple(tensors[name].shape[1:])} dims, the manifest says "
                                  f"{want['hidden']}")
    if bool(manifest.get("stores_g_next")) != ("g_next" in tensors):
        raise IndexStoreError(f"{path} {'lacks' if manifest.get('stores_g_next') else 'has'} g_next, against its manifest")


def shard_is_valid(folder: Path, k: int, manifest: dict | None = None) -> bool:
    """Whether shard k is whole and belongs with `manifest` (a build keeps it, or writes it again)."""
    try:
        load_shard(folder, k, manifest)
        return True
    except IndexStoreError:
        return False


class StoredIndex:
    """What every index opened for reading shares: its folder, its checked manifest, which shards'
    bytes were hashed in this open, and the dataset it was built from. A subclass names its kind
    (`KIND`, the manifest's "kind": None for RepT signatures) and says what a wrong kind or an
    unfinished index should tell the user."""

    KIND: str | None = None
    UNFINISHED = "build it again"

    def __init__(self, folder: str | os.PathLike, verify: bool = True):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if self.manifest.get("kind") != self.KIND:
            raise IndexStoreError(self.wrong_kind())
        if not self.manifest.get("complete"):
            raise IndexStoreError(f"{self.folder} is incomplete: {self.UNFINISHED}")
        self.verify = verify
        self._verified: dict[int, tuple[int, int]] = {}  # shard -> (size, mtime) when its bytes were checked
        self._dataset = None

    def wrong_kind(self) -> str:
        raise NotImplementedError

    @property
    def n_shards(self) -> int:
        return self.manifest["n_shards"]

    def shard_stat(self, k: int) -> tuple[int, int] | None:
        """Shard k's (size, mtime): a shard hashed once in this open is hashed again only if it changed."""
        try:
            st = shard_path(self.folder, k).stat()
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns

    def dataset(self):
        """The training rows the index was built from, checked against the stored fingerprint (the
        rows' text is read from there: an index stores none)."""
        if self._dataset is None:
            self._dataset = source_dataset(self.folder, self.manifest)
        return self._dataset


class SignatureIndex(StoredIndex):
    """A finished RepT signature index opened for reading. With `verify` (the default) every shard is
    checked against the manifest's sha256 when it is first read; verify=False skips that hashing (the
    shards' own layer, dims and row range are still checked)."""

    UNFINISHED = "rerun the same `rept index` command to finish it"

    def wrong_kind(self) -> str:
        return (f"{self.folder} holds {self.manifest.get('method')} state (`rept index --method`), not RepT "
                "signatures: this needs a signature index (`rept index` without --method)")

    @property
    def layer(self) -> int:
        return self.manifest["layer"]

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

    def shard(self, k: int) -> Shard:
        """Shard k; its bytes are hashed once per open (again only if the file changed since)."""
        stat = self.shard_stat(k)
        checked = self.verify and self._verified.get(k) != stat
        shard = load_shard(self.folder, k, self.manifest, verify=checked)
        if checked:
            self._verified[k] = stat
        return shard

    def shards(self):
        for k in range(self.n_shards):
            yield self.shard(k)

    def load_all(self) -> Shard:
        """Every stored row in one Shard (for modest sizes: eval and the tests)."""
        parts = list(self.shards())
        cat = lambda name: torch.cat([getattr(p, name) for p in parts if getattr(p, name).numel()])  # noqa: E731
        return Shard(-1, cat("h"), cat("g"), cat("row"), sum((p.labels for p in parts), []),
                     sum((p.text_hash for p in parts), []), sum((p.skipped for p in parts), []),
                     cat("g_next") if self.stores_g_next else None)

    def labels(self) -> dict[int, str | None]:
        """Row id -> label, from the shard headers alone where the shard was already checked."""
        out = {}
        for k in range(self.n_shards):
            if self.verify and self._verified.get(k) != self.shard_stat(k):
                shard = self.shard(k)  # not checked yet in this open: read it whole
                out.update(zip(shard.row.tolist(), shard.labels))
                continue
            ids, _, labels = read_ids(self.folder, k)
            out.update(zip(ids["row"].tolist(), labels))
        return out

    def check(self) -> list[str]:
        """Every check there is, for `rept verify`: each shard read and hashed, the rows counted, no
        file missing or unlisted. Returns the problems found (empty: the index is sound)."""
        problems, stored = [], 0
        listed = set(self.manifest.get("files") or {})
        for k in range(self.n_shards):
            try:
                stored += load_shard(self.folder, k, self.manifest).row.shape[0]
            except IndexStoreError as exc:
                problems.append(str(exc))
        expected = {shard_path(self.folder, k).name for k in range(self.n_shards)}
        if listed != expected:
            problems.append(f"{self.folder}: the manifest lists {len(listed)} shard files, n_shards says {len(expected)}")
        if not problems and stored != self.manifest["rows"]:
            problems.append(f"{self.folder}: the shards hold {stored} rows, the manifest says {self.manifest['rows']}")
        return problems

    def check_model(self, want: ModelIdentity, given: dict | None = None) -> None:
        """Raise when `want` (identity fields of the model about to be used) differs; `given`
        names the folders in use, for the message."""
        check_identity(self.folder, self.manifest, want, given)


def open_store(folder: str | os.PathLike, verify: bool = True):
    """The index in `folder` opened for reading, whichever kind it is: RepT signatures
    (SignatureIndex) or a baseline's state (rept.store.method_index.MethodIndex)."""
    from rept.store.method_index import MethodIndex, is_method_index

    return MethodIndex(folder, verify=verify) if is_method_index(folder) else SignatureIndex(folder, verify=verify)


def source_dataset(folder, manifest: dict):
    """The dataset an index (signature or method) recorded, checked against its fingerprint: where
    `rept trace` reads the rows' text from."""
    from rept.data.datasets import load_dataset

    info = manifest.get("dataset")
    if not info:
        raise IndexStoreError(f"index {folder} records no dataset; it is needed to show row text")
    if not os.path.exists(info["source"]):
        raise IndexStoreError(f"the index's dataset {info['source']} is gone; it is needed to show row text")
    cols = info["columns"]
    ds = load_dataset(info["source"], cols.get("prompt"), cols.get("response"), cols.get("label"))
    if ds.fingerprint != manifest["dataset_fingerprint"]:
        raise IndexStoreError(f"the dataset at {info['source']} changed since the index was built "
                              f"(fingerprint {ds.fingerprint[:12]}, the index's {manifest['dataset_fingerprint'][:12]})")
    return ds
