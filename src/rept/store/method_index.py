"""A fitted attribution method's train-side state on disk: the method index.

The same layout as the signature index (rept.store.index): a folder with `manifest.json` and
`shard-NNNNN.safetensors` files, each shard holding an int64 tensor `row` (the row's index in the
source dataset), the method's per-row tensors (TracIn's gradients, LESS's projections, ...), and
the rows' labels and text hashes in its metadata. Two things differ: a shard also holds an int64
`position` (the row's column in the method's score matrix), because a method that streams its
state writes rows in the order it computes them; and the manifest names the method (`method`,
`method_settings`), so that `rept trace` and `rept eval` open the method and score queries with it.

The folder is written whole under a temporary name and renamed at the end: a killed write leaves
no half index, and an existing folder is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from rept import registry
from rept.store.build import STORE_DTYPES
from rept.data.datasets import rows_fingerprint
from rept.store.identity import MethodStoreIdentity, ModelIdentity, differences, flat, from_fields
from rept.store.index import StoredIndex, check_identity, new_manifest, read_manifest, text_hash, write_manifest
from rept.store.shards import IndexStoreError, file_checksums, read_ids, read_shard, shard_path, write_shard
from rept.methods.base import Method, ModelBundle
from rept.model.loading import model_reference
from rept.store.safefile import output_mode

KIND = "method"
# Methods that look at no model: their index is not tied to one.
TEXT_METHODS = registry.names(registry.TEXT)  # no model, no gradients
REBUILD = "build the index again"


def is_method_index(folder) -> bool:
    """Whether `folder` holds a method index (and not a RepT signature index)."""
    path = Path(folder) / "manifest.json"
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("kind") == KIND
    except json.JSONDecodeError:
        return False


def method_manifest(method: Method, bundle: ModelBundle, train_rows, dataset=None) -> dict:
    """The manifest fields that say what a method index holds and what it was computed with."""
    settings = method.settings(bundle)
    fields = dict(kind=KIND, method=method.name, method_settings=settings,
                  model={"id": model_reference(bundle.model)},
                  adapter=str(Path(bundle.adapter).resolve()) if bundle.adapter else None,
                  layer=settings.get("layer"), max_length=bundle.max_length,
                  rows=len(train_rows), rows_fingerprint=rows_fingerprint(train_rows))
    if method.name not in TEXT_METHODS:
        fields.update(flat(ModelIdentity.of(bundle.merged())))
    if dataset is not None:
        fields.update(dataset={"source": dataset.source, "columns": dataset.columns, "n_total": dataset.n_total},
                      dataset_fingerprint=dataset.fingerprint)
    return fields


def save_method(method: Method, bundle: ModelBundle, train_rows, out, dataset=None, shard_size: int = 1024,
                store_dtype: str = "float32", extra: dict | None = None) -> dict:
    """Write fitted `method`'s state for `train_rows` (the rows it was fitted on, in its score
    matrix's column order) to the new folder `out`; returns the manifest. `dataset` (rept.data.datasets.Dataset,
    optional) is where `rept trace` reads the rows' text from."""
    out = Path(out)
    if not method.storable:
        raise IndexStoreError(f"{method.name} keeps no state per row (it scores the rows against the queries): "
                              "there is no index to write")
    if out.exists():
        raise IndexStoreError(f"{out} exists: give a new folder for the {method.name} index")
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = new_manifest(**method_manifest(method, bundle, train_rows, dataset), dtype=store_dtype,
                            shard_size=shard_size, settings=extra or {})
    dtype = STORE_DTYPES[store_dtype]
    need = len(train_rows) * method.state_floats_per_row(bundle) * dtype.itemsize
    free = shutil.disk_usage(out.parent).free
    if need > 0.95 * free:  # refuse before writing rather than fill the disk halfway
        raise IndexStoreError(f"the {method.name} index of {len(train_rows)} rows needs {_size(need)}, and "
                              f"{out.parent} has {_size(free)} free: write it elsewhere, or use fewer rows"
                              + (" or --store-dtype float16" if store_dtype == "float32" else ""))
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    os.chmod(tmp, output_mode(folder=True))  # mkdtemp makes it private; the index is an ordinary folder
    try:
        labels = [r.label for r in train_rows]
        hashes = [text_hash(r.prompt, r.response) for r in train_rows]
        index = np.asarray([r.index for r in train_rows], dtype=np.int64)
        k, names, stored_bytes = 0, set(), 0
        for positions, tensors in _with_rows(method.state_chunks(bundle), len(train_rows)):
            for start in range(0, len(positions), shard_size):
                part = torch.as_tensor(positions[start:start + shard_size]).long()
                order = torch.argsort(part)
                part = part[order]
                stored = {n: t[start:start + shard_size][order].to(dtype).contiguous() for n, t in tensors.items()}
                stored.update(position=part, row=torch.as_tensor(index[part.numpy()]))
                write_shard(tmp, k, stored, [labels[i] for i in part.tolist()], [hashes[i] for i in part.tolist()],
                            {"method": method.name})
                names |= set(tensors)
                stored_bytes += sum(t.nbytes for n, t in stored.items() if n in tensors)
                k += 1
        method.save_files(tmp)
        written = sorted(f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file())
        files = file_checksums(tmp, written)
        manifest.update(n_shards=k, tensors=sorted(names), bytes_per_row=stored_bytes // max(1, len(train_rows)),
                        disk_bytes=sum(f["bytes"] for f in files.values()), files=files, complete=True)
        write_manifest(tmp, manifest)
        try:
            os.replace(tmp, out)
        except OSError:  # another build finished `out` first: keep its index, drop this one
            raise IndexStoreError(f"{out} was written by another process meanwhile: give a new folder") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def sha256_file_or_none(path: Path) -> str | None:
    from rept.store.safefile import sha256_file

    return sha256_file(path) if path.is_file() else None


def _size(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MB"


def _with_rows(chunks, n_rows: int):
    """The method's state chunks; for a method with no per-row state (BM25, random), one chunk of
    every row with no tensor, so that its shards still hold the row ids and labels."""
    empty = True
    for chunk in chunks:
        empty = False
        yield chunk
    if empty:
        yield torch.arange(n_rows), {}


class MethodIndex(StoredIndex):
    """A method index opened for reading."""

    KIND = KIND

    def __init__(self, folder, verify: bool = True):
        super().__init__(folder, verify)
        if verify:  # the method's own files (BM25's arrays) are read by a library: check them first
            for name, entry in self.manifest["files"].items():
                if not name.startswith("shard-") and sha256_file_or_none(self.folder / name) != entry["sha256"]:
                    raise IndexStoreError(f"{self.folder / name} is missing or does not match the checksum in the "
                                          "manifest: build the index again")

    def wrong_kind(self) -> str:
        return f"{self.folder} is a RepT signature index, not a method index"

    @property
    def method_name(self) -> str:
        return self.manifest["method"]

    @property
    def n_rows(self) -> int:
        return self.manifest["rows"]

    def _read(self, k: int, tensors: bool = True):
        path = shard_path(self.folder, k)
        entry = self.manifest["files"].get(path.name)
        if entry is None:
            raise IndexStoreError(f"{path.name} is not listed in {self.folder}'s manifest: {REBUILD}")
        stat = self.shard_stat(k)
        if not tensors and (not self.verify or self._verified.get(k) == stat):
            out, meta, labels = read_ids(self.folder, k, ("position", "row"), REBUILD)  # checked already in this open
        else:
            out, meta, labels, _ = read_shard(self.folder, k, entry, self.verify, REBUILD)
            if self.verify:
                self._verified[k] = stat
        if meta.get("shard") != str(k) or meta.get("method") != self.method_name:
            raise IndexStoreError(f"{path} does not belong with its manifest (shard {meta.get('shard')} of "
                                  f"{meta.get('method')}, expected shard {k} of {self.method_name})")
        if not tensors:
            out = {n: t for n, t in out.items() if n in ("position", "row")}
        if "position" not in out or "row" not in out or len(labels) != out["position"].shape[0]:
            raise IndexStoreError(f"{path} is inconsistent (no position or row tensor, or counts differ): "
                                  "build the index again")
        return out, labels

    def chunks(self):
        """(positions [c], {name: float32 tensor [c, ...]}) shard by shard: only one shard in memory."""
        for k in range(self.n_shards):
            tensors, _ = self._read(k)
            positions, _ = tensors.pop("position"), tensors.pop("row")
            yield positions, {n: t.float() for n, t in tensors.items()}

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every per-row tensor, rows in score-matrix column order."""
        out = {}
        for positions, tensors in self.chunks():
            for n, t in tensors.items():
                if n not in out:
                    out[n] = torch.empty((self.n_rows, *t.shape[1:]), dtype=torch.float32)
                out[n][positions] = t
        return out

    def rows_and_labels(self) -> tuple[np.ndarray, list]:
        """Each score-matrix column's dataset row index and label (no per-row tensor is loaded)."""
        rows = np.full(self.n_rows, -1, dtype=np.int64)
        labels = [None] * self.n_rows
        for k in range(self.n_shards):
            tensors, shard_labels = self._read(k, tensors=False)
            positions = tensors["position"].numpy()
            rows[positions] = tensors["row"].numpy()
            for p, label in zip(positions.tolist(), shard_labels):
                labels[p] = label
        if self.n_shards and (rows < 0).any():
            raise IndexStoreError(f"{self.folder}: {int((rows < 0).sum())} rows are in no shard; build the index again")
        return rows, labels

    def check(self) -> list[str]:
        """Every check there is, for `rept verify`: each shard read and hashed, the rows counted."""
        problems, stored = [], 0
        for k in range(self.n_shards):
            try:
                stored += self._read(k, tensors=True)[0]["row"].shape[0]
            except IndexStoreError as exc:
                problems.append(str(exc))
        if not problems and stored != self.n_rows:
            problems.append(f"{self.folder}: the shards hold {stored} rows, the manifest says {self.n_rows}")
        return problems

    def bundle(self, model: str | None = None, adapter: str | None = None, device: str | None = None,
               batch_size: int = 16, progress: bool = False) -> ModelBundle:
        m = self.manifest
        layer = m.get("layer")
        return ModelBundle(model or m["model"]["id"], adapter or m.get("adapter"), layer="auto" if layer is None
                           else layer, max_length=m["max_length"], batch_size=batch_size, device=device,
                           seed=m["method_settings"].get("seed", 0), progress=progress)

    def check_model(self, bundle: ModelBundle) -> None:
        """Raise when the bundle's model differs from the one the index was computed with."""
        if self.method_name not in TEXT_METHODS:
            check_identity(self.folder, self.manifest, ModelIdentity.of(bundle.merged()),
                           {"model": bundle.model, "adapter": bundle.adapter})

    def open_method(self, bundle: ModelBundle) -> Method:
        """The fitted method, ready to score queries with `bundle` (checked against the index)."""
        from rept.methods import get_method

        self.check_model(bundle)
        method = get_method(self.method_name, seed=self.manifest["method_settings"].get("seed", 0))
        method.restore(self, bundle)
        return method


def check_existing(out, method: Method, bundle: ModelBundle, train_rows, dataset=None) -> bool:
    """True when `out` already holds this method's complete index for these rows and this model
    (nothing to do); False when `out` does not exist. Anything else there is an error that names
    what differs, and nothing is overwritten."""
    out = Path(out)
    if not out.exists():
        return False
    if not is_method_index(out):
        raise IndexStoreError(f"{out} exists and is not a method index: give a new folder")
    have = read_manifest(out)
    want = method_manifest(method, bundle, train_rows, dataset)
    diffs = differences(from_fields(MethodStoreIdentity, have), from_fields(MethodStoreIdentity, want))
    if diffs:
        raise IndexStoreError(f"{out} holds an index built with other settings: " + "; ".join(diffs)
                              + " (use another --out)")
    return bool(have.get("complete"))


def build_method_index(name: str, bundle: ModelBundle, dataset, out, shard_size: int = 1024,
                       store_dtype: str = "float32", seed: int = 0, log=print) -> dict:
    """Fit method `name` on every row of `dataset` (rept.data.datasets.Dataset) that keeps a response token
    within the bundle's max_length, and write its index to `out`; returns the manifest. When `out`
    already holds the same index, nothing is done."""
    from rept.data.examples import tokenize_rows
    from rept.methods import get_method

    method = get_method(name, seed=seed)
    method.check(bundle)  # a LoRA-only method on a full model fails here, before any work
    rows, cut = dataset.rows, []
    if name not in TEXT_METHODS:  # rows with no response token within max_length have no gradient
        _, cut = tokenize_rows(bundle.merged().tokenizer, rows, max_length=bundle.max_length)
        rows = [r for r in rows if r.index not in set(cut)]
    if check_existing(out, method, bundle, rows, dataset):
        log(f"{out} already holds this {name} index: nothing to do")
        return read_manifest(Path(out))
    method.fit(bundle, rows)
    manifest = save_method(method, bundle, rows, out, dataset=dataset, shard_size=shard_size, store_dtype=store_dtype,
                           extra={"batch_size": bundle.batch_size, "skipped_empty": dataset.skipped_empty,
                                  "skipped_truncated": sorted(cut)})
    log(f"{name}: stored {manifest['rows']} rows -> {out} ({_size(manifest['disk_bytes'])}; skipped: "
        f"{len(dataset.skipped_empty)} empty, {len(cut)} cut off by max_length {bundle.max_length})")
    return manifest
