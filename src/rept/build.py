"""Building an index: signatures of every training row, shard by shard, resumable.

Shard k always covers the same range of dataset rows, so a rerun (or another rank under
torchrun) knows exactly which shards are missing and never duplicates or drops a row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rept import distributed
from rept.examples import template_name, tokenize_rows
from rept.index import (IndexStoreError, describe_differences, load_shard, new_manifest, read_manifest,
                        save_shard, shard_is_valid, shard_path, text_hash, write_manifest)
from rept.models import LoadedModel, config_hash, model_reference, resolve_layer, tokenizer_hash, weights_hash
from rept.signatures import extract

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


def model_identity(loaded: LoadedModel) -> dict:
    """The fields that tie an index to a model, tokenizer and template."""
    adapter_hash = None
    if loaded.adapter:
        from rept.models import _digest

        files = sorted(p for p in Path(loaded.adapter).iterdir() if p.name.startswith("adapter_"))
        adapter_hash = _digest(*(p.read_bytes() for p in files))
    return {"model_config_hash": config_hash(loaded.model), "model_weights_hash": weights_hash(loaded.model),
            "adapter_hash": adapter_hash, "tokenizer_hash": tokenizer_hash(loaded.tokenizer),
            "template": template_name(loaded.tokenizer)}


def build_index(loaded: LoadedModel, dataset, out: str | os.PathLike, settings: IndexSettings,
                progress: bool = True, log=print) -> dict:
    """Write (or finish) the index of `dataset` at `out`; returns the final manifest."""
    out = Path(out)
    rank, world = distributed.rank_and_world()
    model = loaded.model

    # Everything up to the manifest runs on every rank (the checks are read-only), so bad input fails on
    # all ranks alike; only rank 0 writes. step() shares any rank's error: no rank waits for one that failed.
    with distributed.step("checking the index folder and writing the manifest"):
        layer = settings.layer
        layer_curve = None
        if layer == "auto":
            from rept.layers import phase_transition_layer

            choice = phase_transition_layer(loaded, dataset.rows[: settings.probe_rows],
                                            max_length=settings.max_length)
            layer, layer_curve = choice.layer, choice.as_dict()
            if rank == 0:
                log(f"layer: auto -> {layer} ({choice.reason})")
        layer = resolve_layer(model, int(layer))

        identity = model_identity(loaded)
        manifest = new_manifest(
            model={"id": model_reference(loaded.model_id),
                   "architecture": type(model).__name__, "num_layers": loaded.num_layers,
                   "hidden_size": model.config.hidden_size},
            adapter=str(Path(loaded.adapter).resolve()) if loaded.adapter else None,
            **identity, layer=layer, layer_curve=layer_curve, mode=settings.mode, dtype=settings.store_dtype,
            compute_dtype=str(next(model.parameters()).dtype).replace("torch.", ""), max_length=settings.max_length,
            dataset={"source": dataset.source, "columns": dataset.columns, "n_total": dataset.n_total},
            dataset_fingerprint=dataset.fingerprint, shard_size=settings.shard_size,
            stores_g_next=settings.mode == "lookahead",
            n_shards=max(1, -(-dataset.n_total // settings.shard_size)),
            settings={"batch_size": settings.batch_size, "max_tokens": settings.max_tokens,
                      "probe_rows": settings.probe_rows, **settings.extra},
        )

        if (out / "manifest.json").exists():
            old = read_manifest(out)
            diffs = describe_differences(old, manifest)
            if bool(old.get("stores_g_next")) != manifest["stores_g_next"]:  # shards with and without g_next
                diffs.append(f"stores_g_next: index has {bool(old.get('stores_g_next'))}, this run has "
                             f"{manifest['stores_g_next']} (mode lookahead stores it)")
            if diffs:
                raise IndexStoreError(f"{out} holds an index built with other settings: " + "; ".join(diffs)
                                      + " (use another --out, or the same settings to resume)")
            manifest["created"] = old.get("created", manifest["created"])
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            write_manifest(out, manifest)

    # A rank that fails here says so at once, then waits for the others to finish their shards (kept on disk).
    with distributed.step("writing shards", log=log):
        by_shard: dict[int, list] = {}
        for r in dataset.rows:
            by_shard.setdefault(r.index // settings.shard_size, []).append(r)
        empty = set(dataset.skipped_empty)
        todo = [k for k in range(manifest["n_shards"]) if k % world == rank and not shard_is_valid(out, k)]
        total_rows = sum(len(by_shard.get(k, [])) for k in todo)
        bar = tqdm(total=total_rows, desc=f"index (rank {rank})" if world > 1 else "index", unit="row",
                   disable=not progress, dynamic_ncols=True)
        store_dtype = STORE_DTYPES[settings.store_dtype]
        try:
            _write_shards(todo, by_shard, empty, out, loaded, layer, settings, store_dtype, bar)
        finally:
            bar.close()

    with distributed.step("checking the shards and finishing the manifest"):
        if rank == 0:
            stored, truncated = 0, []
            for k in range(manifest["n_shards"]):
                if not shard_path(out, k).exists():
                    raise IndexStoreError(f"shard {k} was not written; rerun the same command to finish the index")
                shard = load_shard(out, k)
                stored += shard.row.shape[0]
                truncated += [i for i in shard.skipped if i not in empty]
            manifest.update(complete=True, rows=stored, skipped_truncated=sorted(truncated),
                            skipped_empty=sorted(empty))
            write_manifest(out, manifest)
    return read_manifest(out)


def _write_shards(todo, by_shard, empty, out, loaded, layer, settings, store_dtype, bar) -> None:
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
        save_shard(out, k, rows_out, h, g, labels, hashes, skipped, store_dtype, g_next)
