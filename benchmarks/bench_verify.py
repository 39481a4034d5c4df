"""What verifying an index costs: seconds to read every shard of a large index with and without
the checksum checks (docs/performance.md, "Verifying an index").

A synthetic index (random signatures, the layout `rept index` writes) of --rows rows at --hidden
dims, so that no model is needed:

    python benchmarks/bench_verify.py --rows 200000 --hidden 576 --work runs/verify
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from rept.store.index import (SignatureIndex, file_checksums, new_manifest, save_shard, shard_about, shard_path,
                              write_manifest)


def make_index(folder: Path, rows: int, hidden: int, shard_size: int) -> None:
    folder.mkdir(parents=True)
    n_shards = -(-rows // shard_size)
    manifest = new_manifest(model={"id": "synthetic", "architecture": "none", "num_layers": 30,
                                   "hidden_size": hidden},
                            adapter=None, model_config_hash="0", model_weights_hash="0", adapter_hash=None,
                            tokenizer_hash="0", template="plain", layer=15, mode="balanced", dtype="float32",
                            max_length=512, dataset={"source": "synthetic", "columns": {}, "n_total": rows},
                            dataset_fingerprint="0", shard_size=shard_size, stores_g_next=False, n_shards=n_shards)
    gen = torch.Generator().manual_seed(0)
    for k in range(n_shards):
        ids = list(range(k * shard_size, min(rows, (k + 1) * shard_size)))
        h, g = torch.randn(len(ids), hidden, generator=gen), torch.randn(len(ids), hidden, generator=gen)
        save_shard(folder, k, ids, h, g, ["clean"] * len(ids), ["0" * 16] * len(ids), [], torch.float32,
                   about=shard_about(manifest, k))
    manifest.update(complete=True, rows=rows, skipped_empty=[], skipped_truncated=[],
                    files=file_checksums(folder, [shard_path(folder, k).name for k in range(n_shards)]))
    write_manifest(folder, manifest)


def read_everything(folder: Path, verify: bool) -> float:
    start = time.perf_counter()
    index = SignatureIndex(folder, verify=verify)
    n = sum(s.row.shape[0] for s in index.shards())
    index.labels()
    assert n == index.manifest["rows"]
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--work", default="runs/verify")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    folder = Path(args.work) / "index"
    if folder.exists():
        shutil.rmtree(folder)
    t = time.perf_counter()
    make_index(folder, args.rows, args.hidden, args.shard_size)
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"wrote {args.rows} rows x {args.hidden} dims ({size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s")
    result = {"rows": args.rows, "hidden": args.hidden, "bytes": size}
    for verify in (False, True, False, True)[: 2 * max(1, args.repeat)]:
        key = "verified_s" if verify else "unverified_s"
        result.setdefault(key, []).append(round(read_everything(folder, verify), 2))
    t = time.perf_counter()
    problems = SignatureIndex(folder).check()
    result["rept_verify_s"] = round(time.perf_counter() - t, 2)
    assert not problems, problems
    print(json.dumps(result))


if __name__ == "__main__":
    main()
