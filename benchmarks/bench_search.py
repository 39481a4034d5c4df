"""Search benchmark on a synthetic signature store: exact sharded search vs faiss (flat, IVF, IVF-PQ).

The store is N unit rows of dim D (balanced signatures of random h and g halves drawn from a mixture
of clusters, so IVF has structure to use and rows within a cluster tie closely, as near-duplicate
training rows do), written shard by shard as .npy files and read back memory-mapped. Times are
wall-clock on this machine; recall@k is against exact search for the same queries.

    python benchmarks/bench_search.py --rows 100000 --dim 512            # seconds

1M x 4096 (8 GB of fp16 shards under /tmp, ~4 GB of SQ8 IVF in memory; ~20 min on 2 loaded cores), as
measured in docs/performance.md: exact + IVF first, then IVF-PQ reusing the kept store (--dir):

    nice -n 19 python benchmarks/bench_search.py --queries 50 --repeat 1 --nlist 512 --nprobe 4,16,64 \
        --skip flat,ivfpq --dir /tmp/rept-bench-1m --json a.json
    nice -n 19 python benchmarks/bench_search.py --queries 50 --repeat 1 --nlist 512 --nprobe 16,64 --m 64 \
        --skip exact,flat,ivf --dir /tmp/rept-bench-1m --json b.json
    rm -rf /tmp/rept-bench-1m

rept's default nlist (4 sqrt(N) = 4000 at 1M) trains k-means on 160k rows x 4096 dims: too slow for 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from rept.query.search import STORAGE, FaissIndex, TopK, exact_topk, signature_matrix

GIB = 2 ** 30


def log(msg: str) -> None:
    """Progress with a timestamp, so a run cut short still shows how far each step got."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports kB


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Store:
    """Shard files sig-NNNNN.npy (float16/32 [n_i, D]) and rows-NNNNN.npy (int64), row id = position."""

    def __init__(self, folder: Path, args):
        self.folder, self.n, self.dim, self.shard_rows = folder, args.rows, args.dim, args.shard_rows
        self.n_shards = -(-self.n // self.shard_rows)
        rng = np.random.default_rng(args.seed)
        half = self.dim // 2
        self.centers = [unit(rng.standard_normal((args.clusters, half))).astype(np.float32) for _ in range(2)]
        self.noise = args.noise / np.sqrt(half)  # noise of norm `noise` per half against unit centers

    def sample(self, rng, n: int) -> np.ndarray:
        """n balanced signatures drawn from the mixture (float32)."""
        c = rng.integers(len(self.centers[0]), size=n)
        h, g = (ctr[c] + rng.standard_normal((n, ctr.shape[1]), dtype=np.float32) * self.noise
                for ctr in self.centers)
        return signature_matrix(h, g, "balanced")

    def path(self, i: int, what: str = "sig") -> Path:
        return self.folder / f"{what}-{i:05d}.npy"

    def write(self, dtype, seed: int) -> float:
        """Generate and write every shard, one in memory at a time; returns seconds in signature_matrix."""
        rng, sig_s = np.random.default_rng(seed + 1), 0.0
        for i in range(self.n_shards):
            lo, hi = i * self.shard_rows, min(self.n, (i + 1) * self.shard_rows)
            t = time.perf_counter()
            x = self.sample(rng, hi - lo)
            sig_s += time.perf_counter() - t
            out = np.lib.format.open_memmap(self.path(i), mode="w+", dtype=dtype, shape=x.shape)
            out[:] = x
            out.flush()
            del out, x
            np.save(self.path(i, "rows"), np.arange(lo, hi, dtype=np.int64))
            if (i + 1) % 8 == 0 or i + 1 == self.n_shards:
                log(f"store: {i + 1}/{self.n_shards} shards written")
        return sig_s

    def shards(self):
        """(memmapped matrix, rows) shard by shard; each map is dropped when the next is read."""
        for i in range(self.n_shards):
            yield np.load(self.path(i), mmap_mode="r"), np.load(self.path(i, "rows"))

    def rerank(self, queries: np.ndarray, cand: np.ndarray, k: int, chunk: int = 16) -> TopK:
        """Exact scores for each query's candidate rows (read from the memmaps), best k kept."""
        scores = np.full(cand.shape, -np.inf, np.float32)
        maps = [np.load(self.path(i), mmap_mode="r") for i in range(self.n_shards)]
        for a in range(0, len(queries), chunk):
            c = cand[a:a + chunk]
            uniq, inv = np.unique(np.where(c >= 0, c, 0), return_inverse=True)
            vecs = np.empty((len(uniq), self.dim), np.float32)
            for s in np.unique(uniq // self.shard_rows):
                sel = uniq // self.shard_rows == s
                vecs[sel] = maps[s][uniq[sel] - s * self.shard_rows]
            sc = vecs @ queries[a:a + chunk].T  # [unique candidates, queries in chunk]
            scores[a:a + chunk] = sc[inv.reshape(c.shape), np.arange(len(c))[:, None]]
        scores[cand < 0] = -np.inf
        order = np.lexsort((cand, -scores), axis=1)[:, :k]
        return TopK(np.take_along_axis(scores, order, 1), np.take_along_axis(cand, order, 1))


def timed(fn, repeat: int = 1):
    """(result, best seconds over `repeat` runs)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def recall(got: TopK, want: TopK) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(got.rows, want.rows)]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="stored rows N")
    p.add_argument("--dim", type=int, default=4096, help="signature dim D (= 2 x hidden)")
    p.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="dtype of the stored shards")
    p.add_argument("--shard-rows", type=int, default=16384)
    p.add_argument("--clusters", type=int, default=1000, help="mixture components of the synthetic rows")
    p.add_argument("--noise", type=float, default=1.0, help="noise norm per half (1: cos ~0.5 within a cluster)")
    p.add_argument("--queries", type=int, default=100, help="batch size of the batched search and recall set")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--repeat", type=int, default=2, help="timed runs per search (best kept)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: rept's, 4 sqrt(N))")
    p.add_argument("--nprobe", default="8,16,32,64", help="comma list of nprobe values to sweep")
    p.add_argument("--m", type=int, default=None, help="PQ subquantisers (default: rept's, D/16)")
    p.add_argument("--train-size", type=int, default=None, help="IVF training sample (default: rept's)")
    p.add_argument("--ivf-storage", choices=["auto", *STORAGE], default="auto",
                   help="vector storage in IVF; auto: the most precise that fits --mem-gib")
    p.add_argument("--rerank", type=int, default=1000, help="IVF-PQ candidates re-scored exactly (0: off)")
    p.add_argument("--mem-gib", type=float, default=6.0, help="largest in-memory faiss index to build")
    p.add_argument("--skip", default="", help="comma list of parts to skip: exact,flat,ivf,ivfpq")
    p.add_argument("--dir", help="store folder (kept, and reused when it holds the same store); default: temp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    skip, nprobes = set(filter(None, args.skip.split(","))), [int(x) for x in args.nprobe.split(",")]
    dtype = np.float16 if args.dtype == "fp16" else np.float32
    folder = Path(args.dir or tempfile.mkdtemp(prefix="rept-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    store = Store(folder, args)
    spec = {k: getattr(args, k) for k in ("rows", "dim", "dtype", "shard_rows", "clusters", "noise", "seed")}
    res = {"args": vars(args), "machine": {
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
        "cpu": platform.processor() or platform.machine(), "faiss": faiss.__version__, "torch": torch.__version__,
        "numpy": np.__version__, "loadavg_at_start": os.getloadavg()}, "results": []}
    table = res["results"]

    def report(method, **fields):
        fields = {"method": method, **fields, "peak_rss_gib": round(peak_rss_gib(), 2),
                  "load": round(os.getloadavg()[0], 1)}  # other work on the machine inflates every time
        table.append(fields)
        if args.json:  # rewritten after every result: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()),
              flush=True)

    # SIGTERM (a timeout, a kill) runs the finally below too, so a temporary store does not stay on disk.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        print(f"store: {args.rows} x {args.dim} {args.dtype} in {store.n_shards} shards of {args.shard_rows} "
              f"at {folder}", flush=True)
        marker = folder / "store.json"
        if marker.exists() and json.loads(marker.read_text()) == spec:
            report("store (reused)", bytes=args.rows * args.dim * np.dtype(dtype).itemsize)
        else:
            sig_s, build_s = timed(lambda: store.write(dtype, args.seed))
            marker.write_text(json.dumps(spec))
            report("store write", build_s=build_s, signature_s=sig_s,
                   bytes=args.rows * args.dim * np.dtype(dtype).itemsize)
        queries = store.sample(np.random.default_rng(args.seed + 2), args.queries)
        k = args.k

        # ground truth for recall, and the exact timings
        log(f"exact search of {args.queries} queries (ground truth)")
        truth, t_batch = timed(lambda: exact_topk(queries, store.shards(), k), args.repeat)
        if "exact" not in skip:
            _, t_one = timed(lambda: exact_topk(queries[:1], store.shards(), k), args.repeat)
            report("exact_topk (memmap shards)", build_s=0.0, q1_s=t_one, batch_s=t_batch, recall=1.0,
                   index_gib=0.0)

        if "flat" not in skip:
            need = args.rows * args.dim * 4 / GIB
            if need > args.mem_gib:
                report("faiss flat", skipped=f"needs {need:.1f} GiB > --mem-gib {args.mem_gib}")
            else:
                flat, t_build = timed(lambda: FaissIndex.build(store.shards(), "flat"))
                _, t_one = timed(lambda: flat.search(queries[:1], k), args.repeat)
                got, t_b = timed(lambda: flat.search(queries, k), args.repeat)
                report("faiss flat", build_s=t_build, q1_s=t_one, batch_s=t_b, recall=recall(got, truth),
                       index_gib=need)
                del flat

        def sweep(name, index, gib, t_build, rerank=0):
            for nprobe in nprobes:
                def run(q, nprobe=nprobe):
                    top = index.search(q, rerank or k, nprobe=nprobe)
                    return store.rerank(q, top.rows, k) if rerank else top
                _, t_one = timed(lambda: run(queries[:1]), args.repeat)
                got, t_b = timed(lambda: run(queries), args.repeat)
                report(name, nlist=index.index.nlist, nprobe=nprobe, build_s=t_build, q1_s=t_one, batch_s=t_b,
                       recall=recall(got, truth), index_gib=gib)

        if "ivf" not in skip:
            per_row = {"fp32": 4, "fp16": 2, "sq8": 1}
            storage = args.ivf_storage
            if storage == "auto":
                fits = [s for s in ("fp32", "fp16", "sq8") if args.rows * args.dim * per_row[s] / GIB <= args.mem_gib]
                storage = fits[0] if fits else "sq8"
            log(f"building faiss ivf ({storage})")
            ivf, t_build = timed(lambda: FaissIndex.build(store.shards, "ivf", nlist=args.nlist, seed=args.seed,
                                                          train_size=args.train_size, storage=storage))
            sweep(f"faiss ivf ({storage})", ivf, args.rows * args.dim * per_row[storage] / GIB, t_build)
            del ivf

        if "ivfpq" not in skip:
            log("building faiss ivfpq")
            pq, t_build = timed(lambda: FaissIndex.build(store.shards, "ivfpq", nlist=args.nlist, m=args.m,
                                                         seed=args.seed, train_size=args.train_size))
            gib = args.rows * pq.index.code_size / GIB
            label = f"faiss ivfpq (m={pq.index.pq.M})"
            sweep(label, pq, gib, t_build)
            if args.rerank:
                sweep(f"{label} + exact rerank of {args.rerank}", pq, gib, t_build, rerank=args.rerank)
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)

    cols = ["method", "nlist", "nprobe", "build_s", "q1_s", "batch_s", "recall", "index_gib", "peak_rss_gib", "load"]
    print(f"\nN={args.rows}, D={args.dim} ({args.dtype} shards), top-{args.k}, batch = {args.queries} queries, "
          f"{res['machine']['cpus']} CPUs, load average at start {res['machine']['loadavg_at_start'][0]:.1f}\n")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in table:
        if "q1_s" in r or "skipped" in r:
            cells = [r.get("skipped", "") if c == "build_s" and "skipped" in r else r.get(c, "") for c in cols]
            print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
