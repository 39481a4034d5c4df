"""Nearest training rows for query signatures: exact blocked search and faiss indexes.

Rows are compared by cosine similarity of their signature vectors, built per shard from the stored
`h` and `g` by `signature_matrix`. `exact_topk` streams shards through one matrix product per
(query batch, shard) and keeps a running top-k, so memory is one shard plus queries x k.
`FaissIndex` trades exactness for speed on large stores (IVF) or memory (IVF-PQ).

Threads: BLAS/torch and faiss (OpenMP) each use all cores by default; set OMP_NUM_THREADS /
torch.set_num_threads / faiss.omp_set_num_threads to limit them. Nothing here changes them.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rept.registry import MODES  # the scoring modes, named in one place

KINDS = ("flat", "ivf", "ivfpq")
EPS = 1e-12  # norms below this count as zero: a zero vector stays zero instead of becoming NaN


def _to_f32(x, out: torch.Tensor | None = None) -> np.ndarray:
    """x (numpy, memmap, torch or list; any float dtype) as float32 numpy, converted into `out` if given.

    float32 numpy input is returned as is. Other dtypes go through torch: numpy's float16 cast is ~6x
    slower and would dominate search time, and a reused `out` buffer avoids page-faulting fresh memory.
    """
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        x = np.asarray(x)
    if isinstance(x, np.ndarray):
        if x.dtype == np.float32:
            return x
        with warnings.catch_warnings():  # read-only memmaps: torch warns, but we only read them
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(np.ascontiguousarray(x))
    x = x.detach()
    if out is None:
        return x.to("cpu", torch.float32).numpy()
    out = out[: x.numel()].view(x.shape)
    out.copy_(x)
    return out.numpy()


def _shard_converter() -> Callable:
    """Converts shard after shard to float32 numpy in one reused buffer (each result is valid until the next)."""
    buf = torch.empty(0)

    def convert(mat):
        nonlocal buf
        if isinstance(mat, np.ndarray) and mat.dtype == np.float32:
            return mat
        if buf.numel() < math.prod(mat.shape):
            buf = torch.empty(math.prod(mat.shape), dtype=torch.float32)
        return _to_f32(mat, out=buf)
    return convert


def unit_rows(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Rows of x scaled to norm `scale` (a new array; zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * (np.float32(scale) / np.maximum(norms, EPS))


def unit_tensor(x: torch.Tensor) -> torch.Tensor:
    """x with its last dimension scaled to unit norm (zero vectors stay zero): the torch twin of unit_rows."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def signature_matrix(h, g, mode: str, g_next=None) -> np.ndarray:
    """float32 [n, D] unit-norm signatures from hidden states h [n, dh] and gradients g [n, dg]
    (and, for `lookahead`, the gradients at the first response position g_next [n, dg])."""
    if mode not in MODES:
        raise ValueError(f"unknown search mode {mode!r} (choose from {', '.join(MODES)})")
    if mode == "repsim":
        return unit_rows(_to_f32(h))
    if mode == "repgrad":
        return unit_rows(_to_f32(g))
    h, g = _to_f32(h), _to_f32(g)
    if mode == "official":  # cosine of the raw concatenation: the larger half dominates
        return unit_rows(np.concatenate([h, g], axis=1))
    if mode == "lookahead":
        if g_next is None:
            raise ValueError("mode 'lookahead' needs the gradients at the first response position (g_next)")
        # three parts that count equally; 1/sqrt(3) brings the concatenation back to unit norm
        third = 3 ** -0.5
        return np.concatenate([unit_rows(h, third), unit_rows(g, third), unit_rows(_to_f32(g_next), third)], axis=1)
    # balanced: each half counts equally; 1/sqrt(2) brings the concatenation back to unit norm
    return np.concatenate([unit_rows(h, 2 ** -0.5), unit_rows(g, 2 ** -0.5)], axis=1)


def signatures_of(part, mode: str) -> np.ndarray:
    """signature_matrix of anything holding h, g and g_next: a SignatureBatch or an index Shard."""
    return signature_matrix(part.h, part.g, mode, part.g_next)


@dataclass
class TopK:
    scores: np.ndarray  # float32 [n_queries, k], descending per query
    rows: np.ndarray    # int64 [n_queries, k], row ids; ties broken by lower row id (-1: no result)


def sort_topk(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k of each query by (score descending, row ascending)."""
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def _shard_topk(scores: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the top-k of each row of scores [b, n] (unordered), ties to lower row id."""
    b, n = scores.shape
    if k >= n:
        return np.broadcast_to(np.arange(n), (b, n))
    idx = np.argpartition(scores, n - k, axis=1)[:, n - k:]  # O(n), no full sort
    kth = np.take_along_axis(scores, idx, 1).min(1)
    # argpartition picks arbitrarily among scores equal to the k-th (duplicate rows): redo those exactly
    for i in np.flatnonzero((scores >= kth[:, None]).sum(1) > k):
        cand = np.flatnonzero(scores[i] >= kth[i])
        idx[i] = cand[np.lexsort((rows[cand], -scores[i, cand]))[:k]]
    return idx


# Up to this many queries, a shard that is not float32 is scored block by block (see _blockwise_scores).
BLOCKWISE_MAX_QUERIES = 16


def _blockwise_scores(q: np.ndarray, mat) -> np.ndarray:
    """q [nq, D] float32 @ mat.T for a shard of another dtype, converting ~1 MB blocks of rows to
    float32 in a buffer that stays in the CPU cache. For a few queries the product is cheap and the
    cost is memory traffic: converting the whole shard first writes and re-reads it as float32,
    three times the bytes of reading it once (one query over 1M x 4096 float16 rows: 3.4 s -> 1.0 s,
    docs/performance.md). Exact float32 products, like the whole-shard path."""
    with warnings.catch_warnings():  # read-only memmaps: torch warns, but we only read them
        warnings.simplefilter("ignore", UserWarning)
        rows = mat if isinstance(mat, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(mat))
    n, dim = rows.shape
    per_block = max(16, (1 << 20) // (4 * dim))
    block = torch.empty((per_block, dim), dtype=torch.float32)
    q_t = torch.from_numpy(q).T  # [D, nq]
    out = torch.empty((n, len(q)), dtype=torch.float32)
    for start in range(0, n, per_block):
        part = rows[start:start + per_block]
        buf = block[: len(part)]
        buf.copy_(part)
        torch.mm(buf, q_t, out=out[start:start + len(part)])
    return np.ascontiguousarray(out.numpy().T)


def exact_topk(queries: np.ndarray, shards: Iterable[tuple[np.ndarray, np.ndarray]], k: int,
               query_batch: int = 1024) -> TopK:
    """Exact top-k inner products of unit query rows [q, D] against every shard (matrix [n_i, D], rows [n_i]).

    Shards are read once, in order, each converted to float32 into one reused buffer (for a few
    queries, block by block instead); k larger than the total row count returns all rows.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1 (got {k})")
    q = np.ascontiguousarray(np.atleast_2d(_to_f32(queries)))
    nq = len(q)
    top_s, top_r = np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64)
    convert = _shard_converter()
    for mat, rows in shards:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            continue
        if mat.shape != (len(rows), q.shape[1]):
            raise ValueError(f"shard matrix has shape {tuple(mat.shape)}, expected ({len(rows)}, {q.shape[1]})")
        blockwise = nq <= BLOCKWISE_MAX_QUERIES and not (isinstance(mat, np.ndarray) and mat.dtype == np.float32)
        mat = mat if blockwise else convert(mat)
        width = min(k, top_s.shape[1] + len(rows))
        new_s, new_r = np.empty((nq, width), np.float32), np.empty((nq, width), np.int64)
        for start in range(0, nq, query_batch):
            sl = slice(start, start + query_batch)
            # the one matrix product for this (query batch, shard)
            s = _blockwise_scores(q[sl], mat) if blockwise else q[sl] @ mat.T
            idx = _shard_topk(s, rows, k)
            new_s[sl], new_r[sl] = sort_topk(np.concatenate([top_s[sl], np.take_along_axis(s, idx, 1)], 1),
                                              np.concatenate([top_r[sl], rows[idx]], 1), width)
        top_s, top_r = new_s, new_r
    return TopK(top_s, top_r)


def _reiterable(shards) -> Callable[[], Iterable]:
    """A function giving a fresh pass over the shards (IVF needs several: count, sample, add)."""
    if callable(shards):
        return shards
    if isinstance(shards, Iterator):  # one-shot: keep it (fine for modest sizes; pass a callable otherwise)
        shards = list(shards)
    return lambda: iter(shards)


STORAGE = {"fp32": "Flat", "fp16": "SQfp16", "sq8": "SQ8"}  # faiss codes for flat/ivf vectors


class FaissIndex:
    """Inner-product faiss index over all shards: exact ("flat") or approximate ("ivf", "ivfpq").

    flat:  every row scanned (exact with storage="fp32"); ivf: only the rows in the nprobe clusters
    (of nlist) nearest the query. Both hold each vector in `storage`: fp32 (4*D bytes a row),
    fp16 (2*D, scores within ~1e-3) or sq8 (D bytes, 8-bit per dimension, trained ranges).
    ivfpq: m * nbits / 8 bytes a row (product quantisation), the smallest and the least accurate.
    """

    def __init__(self, index, rows: np.ndarray, kind: str):
        self.index, self.rows, self.kind = index, np.asarray(rows, dtype=np.int64), kind

    @property
    def nprobe(self) -> int | None:
        return self.index.nprobe if self.kind != "flat" else None

    @classmethod
    def build(cls, shards, kind: str = "flat", nlist: int | None = None, m: int | None = None,
              nprobe: int | None = None, seed: int = 0, train_size: int | None = None,
              storage: str = "fp32", nbits: int = 8) -> FaissIndex:
        """Build from shards of (unit matrix [n_i, D], rows [n_i]).

        Indexes that need training (ivf, ivfpq, sq8) read the shards three times (count, sample, add):
        give a list (e.g. of memmaps) or a callable returning a fresh iterable. Defaults:
        nlist = 4 * sqrt(n); m = the largest divisor of D up to D / 16 (codes of nbits bits each);
        nprobe = max(1, nlist // 16), i.e. ~6% of the rows scanned a query (override per search);
        training uses a seeded uniform sample of train_size = max(40 * nlist, 10_000) rows
        (faiss wants >= 39 points a cluster, PQ 256 a code word), held in float32 while training.
        """
        import faiss

        if kind not in KINDS or storage not in STORAGE:
            raise ValueError(f"unknown index kind {kind!r} or storage {storage!r} (kinds: {', '.join(KINDS)}; "
                             f"storage: {', '.join(STORAGE)})")

        def make(dim: int):
            spec = {"flat": STORAGE[storage], "ivf": f"IVF{nlist},{STORAGE[storage]}",
                    "ivfpq": f"IVF{nlist},PQ{m}x{nbits}"}
            index = faiss.index_factory(dim, spec[kind], faiss.METRIC_INNER_PRODUCT)
            if kind == "ivfpq":
                # The factory turns on polysemous training (a code permutation for Hamming pre-filtering, which
                # this search never uses). On 10k training rows of 4096 dims it made training take 375 s for
                # m=64, against 73 s without it for m=256 (2 loaded cores).
                index.do_polysemous_training = False
            return index

        index, passes = None, shards if callable(shards) else (lambda: shards)  # one pass for flat
        if kind != "flat" or storage == "sq8":
            passes = _reiterable(shards)
            sizes, dim = [], None
            for mat, r in passes():
                sizes.append(len(r))
                dim = dim or (mat.shape[1] if len(r) else None)
            n = sum(sizes)
            nlist = nlist or max(1, min(n, round(4 * math.sqrt(n))))
            m = m or max(d for d in range(1, dim // 16 + 1) if dim % d == 0)
            index = make(dim)
            size = min(n, train_size or max(40 * nlist if kind != "flat" else 0, 10_000))
            take = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
            sample, offset = [], 0
            for (mat, _), n_i in zip(passes(), sizes):
                local = take[(take >= offset) & (take < offset + n_i)] - offset
                if len(local):
                    sample.append(_to_f32(mat[local]))
                offset += n_i
            if kind != "flat":
                index.cp.seed = seed  # seeded k-means too: same shards and seed give the same index
                index.nprobe = min(nlist, nprobe or max(1, nlist // 16))
            index.train(np.ascontiguousarray(np.concatenate(sample)))
            del sample
        convert, rows = _shard_converter(), []
        for mat, r in passes():
            if len(r) == 0:
                continue
            if index is None:
                index = make(mat.shape[1])
            index.add(np.ascontiguousarray(convert(mat)))
            rows.append(np.asarray(r, dtype=np.int64))
        if index is None or not rows:
            raise ValueError("no rows to index")
        return cls(index, np.concatenate(rows), kind)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> TopK:
        """Top-k like exact_topk (nprobe: this call only); an IVF search that finds fewer than k rows
        pads with row -1 and score -inf."""
        import faiss

        q = np.ascontiguousarray(np.atleast_2d(_to_f32(queries)))
        params = faiss.SearchParametersIVF(nprobe=nprobe) if nprobe and self.kind != "flat" else None
        scores, ids = self.index.search(q, min(k, self.index.ntotal), params=params)
        rows = np.where(ids >= 0, self.rows[ids], -1)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return TopK(*sort_topk(scores, rows, k))  # same tie-break as exact_topk

    def save(self, path: str | os.PathLike) -> None:
        """A folder with index.faiss, rows.npy and meta.json."""
        import faiss

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(path / "index.faiss"))
        np.save(path / "rows.npy", self.rows)
        (path / "meta.json").write_text(json.dumps({"kind": self.kind, "nprobe": self.nprobe}) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> FaissIndex:
        import faiss

        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        out = cls(faiss.read_index(str(path / "index.faiss")), np.load(path / "rows.npy"), meta["kind"])
        if meta["nprobe"] is not None:
            out.index.nprobe = meta["nprobe"]
        return out
