"""Building an index: signatures of every training row, shard by shard, resumable.

Shard k always covers the same range of dataset rows, so a rerun (or another rank under
torchrun) knows exactly which shards are missing and never duplicates or drops a row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rept.progress import progress_bar

from rept.store import distributed
from rept.data.examples import tokenize_rows
from rept.store.identity import ModelIdentity, differences, flat
from rept.store.index import (LOCK_FILE, MANIFEST, IndexStoreError, load_shard, new_manifest, read_manifest, save_shard,
                              shard_about, shard_is_valid, signature_identity, text_hash, write_manifest)
from rept.store.shards import file_checksums, shard_path
from rept.model.loading import LoadedModel, model_reference, resolve_layer
from rept.signatures.extract import extract

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class IndexSettings:
    layer: int | str = "auto"      # hidden_states index, or "auto" for the phase-transition layer
    mode: str = "balanced"         # default search mode recorded in the manifest
    batch_size: int = 16
    max_tokens: int | None = None  # optional token budget per batch
    max_length: int = 512
    store_dtype: str = "float32"
    shard_size: int = 1024
    probe_rows: int = 64
    extra: dict = field(default_factory=dict)


def build_index(loaded: LoadedModel, dataset, out: str | os.PathLike, settings: IndexSettings,
                progress: bool = True, log=print) -> dict:
    """Write (or finish) the index of `dataset` at `out`; returns the final manifest."""
    held: list = []  # the folder's lock, once rank 0 holds it; dropped however the build ends
    try:
        return _build_index(loaded, dataset, Path(out), settings, progress, log, held)
    finally:
        for handle in held:
            handle.close()


def _build_index(loaded, dataset, out: Path, settings: IndexSettings, progress: bool, log, held: list) -> dict:
    rank, world = distributed.rank_and_world()
    model = loaded.model

    # Everything up to the manifest runs on every rank (the checks are read-only), so bad input fails on
    # all ranks alike; only rank 0 writes. step() shares any rank's error: no rank waits for one that failed.
    with distributed.step("checking the index folder and writing the manifest"):
        layer = settings.layer
        layer_curve = None
        if layer == "auto":
            from rept.signatures.layers import phase_transition_layer

            choice = phase_transition_layer(loaded, dataset.rows[: settings.probe_rows],
                                            max_length=settings.max_length)
            layer, layer_curve = choice.layer, choice.as_dict()
            if rank == 0:
                log(f"layer: auto -> {layer} ({choice.reason})")
        layer = resolve_layer(model, int(layer))

        manifest = new_manifest(
            model={"id": model_reference(loaded.model_id),
                   "architecture": type(model).__name__, "num_layers": loaded.num_layers,
                   "hidden_size": model.config.hidden_size},
            adapter=str(Path(loaded.adapter).resolve()) if loaded.adapter else None,
            **flat(ModelIdentity.of(loaded)), layer=layer, layer_curve=layer_curve, mode=settings.mode, dtype=settings.store_dtype,
            compute_dtype=str(next(model.parameters()).dtype).replace("torch.", ""), max_length=settings.max_length,
            dataset={"source": dataset.source, "columns": dataset.columns, "n_total": dataset.n_total},
            dataset_fingerprint=dataset.fingerprint, shard_size=settings.shard_size,
            stores_g_next=settings.mode == "lookahead",
            n_shards=max(1, -(-dataset.n_total // settings.shard_size)),
            settings={"batch_size": settings.batch_size, "max_tokens": settings.max_tokens,
                      "probe_rows": settings.probe_rows, **settings.extra},
        )

        check_out_folder(out)
        old = None
        if (out / "manifest.json").exists():
            old = read_manifest(out)
            diffs = differences(signature_identity(old), signature_identity(manifest))
            if diffs:
                raise IndexStoreError(f"{out} holds an index built with other settings: " + "; ".join(diffs)
                                      + " (use another --out, or the same settings to resume)")
            manifest["created"] = old.get("created", manifest["created"])
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            held.append(hold_lock(out))
            write_manifest(out, manifest)

    # A rank that fails here says so at once, then waits for the others to finish their shards (kept on disk).
    with distributed.step("writing shards", log=log):
        by_shard: dict[int, list] = {}
        for r in dataset.rows:
            by_shard.setdefault(r.index // settings.shard_size, []).append(r)
        empty = set(dataset.skipped_empty)
        # A shard is kept only when it is whole, belongs with this manifest and, in an index finished
        # before, still matches the checksum recorded then; anything else is written again.
        against = {**manifest, "files": (old or {}).get("files")}
        mine = [k for k in range(manifest["n_shards"]) if k % world == rank]
        bad = [k for k in mine if shard_path(out, k).exists() and not shard_is_valid(out, k, against)]
        if bad:
            log(f"{len(bad)} shard(s) damaged or not matching the manifest, written again: "
                + ", ".join(shard_path(out, k).name for k in bad[:5]) + (" ..." if len(bad) > 5 else ""))
        todo = [k for k in mine if not shard_path(out, k).exists() or k in bad]
        total_rows = sum(len(by_shard.get(k, [])) for k in todo)
        bar = progress_bar(total=total_rows, desc=f"index (rank {rank})" if world > 1 else "index", unit="row",
                           disable=not progress, dynamic_ncols=True)
        store_dtype = STORE_DTYPES[settings.store_dtype]
        try:
            _write_shards(todo, by_shard, empty, out, loaded, layer, settings, store_dtype, bar, manifest)
        finally:
            bar.close()

    with distributed.step("checking the shards and finishing the manifest"):
        if rank == 0:
            stored, truncated = 0, []
            for k in range(manifest["n_shards"]):
                if not shard_path(out, k).exists():
                    raise IndexStoreError(f"shard {k} was not written; rerun the same command to finish the index")
                shard = load_shard(out, k, manifest)
                stored += shard.row.shape[0]
                truncated += [i for i in shard.skipped if i not in empty]
            files = file_checksums(out, [shard_path(out, k).name for k in range(manifest["n_shards"])])
            manifest.update(complete=True, rows=stored, skipped_truncated=sorted(truncated),
                            skipped_empty=sorted(empty), files=files)
            write_manifest(out, manifest)
    return read_manifest(out)


def check_out_folder(out: Path) -> None:
    """`--out` must be new, empty, or an index: never a folder of the user's own files."""
    if out.exists() and not out.is_dir():
        raise IndexStoreError(f"--out {out} is a file, not a folder")
    if out.is_dir() and not (out / MANIFEST).exists():
        own = [p.name for p in out.iterdir() if p.name != LOCK_FILE and not p.name.endswith(".tmp")]
        if own:
            raise IndexStoreError(f"--out {out} is not empty and holds no rept index ({len(own)} entries, e.g. "
                                  f"{own[0]}): give a new or empty folder")


def hold_lock(out: Path):
    """An exclusive lock on the index folder for as long as the returned file is open, so two
    builds on one --out refuse rather than interleave; the OS drops it if the process dies."""
    import fcntl

    handle = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise IndexStoreError(f"another `rept index` is writing {out} right now: wait for it to finish "
                              "(or give another --out)") from None
    return handle


def _write_shards(todo, by_shard, empty, out, loaded, layer, settings, store_dtype, bar, manifest) -> None:
    model, tok = loaded.model, loaded.tokenizer
    for k in todo:
        rows = by_shard.get(k, [])
        examples, cut = tokenize_rows(tok, rows, max_length=settings.max_length)
        rows_out, hs, gs, nexts = [], [], [], []
        for batch in extract(model, examples, layer, tok.pad_token_id, batch_size=settings.batch_size,
                             max_tokens=settings.max_tokens, progress=bar.update):
            rows_out += batch.rows
            hs.append(batch.h)
            gs.append(batch.g)
            nexts.append(batch.g_next)
        bar.update(len(cut))
        by_index = {r.index: r for r in rows}
        labels = [by_index[i].label for i in rows_out]
        hashes = [text_hash(by_index[i].prompt, by_index[i].response) for i in rows_out]
        lo = k * settings.shard_size
        skipped = sorted(cut) + sorted(i for i in empty if lo <= i < lo + settings.shard_size)
        h = torch.cat(hs) if hs else torch.zeros((0, model.config.hidden_size))
        g = torch.cat(gs) if gs else torch.zeros((0, model.config.hidden_size))
        g_next = None
        if settings.mode == "lookahead":
            g_next = torch.cat(nexts) if nexts else torch.zeros((0, model.config.hidden_size))
        save_shard(out, k, rows_out, h, g, labels, hashes, skipped, store_dtype, g_next, shard_about(manifest, k))
