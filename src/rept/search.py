"""Scoring modes and exact top-k search over shards of signatures.

Modes (all built from the same stored h and g):
- official: cosine of the raw concatenation [h; g] (the authors' code). On small models |h| is
  hundreds of times |g|, so this ranks like h alone.
- balanced: each half L2-normalised, then concatenated (and scaled to unit norm).
- repsim: h only.  repgrad: g only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

MODES = ("official", "balanced", "repsim", "repgrad")
EPS = 1e-12


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, EPS)  # a zero row stays zero instead of becoming NaN


def signature_matrix(h, g, mode: str) -> np.ndarray:
    """[n, D] float32 rows of unit norm (or zero) whose dot products are the mode's scores."""
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}' (choose from {', '.join(MODES)})")
    h = (h.float().numpy() if isinstance(h, torch.Tensor) else np.asarray(h)).astype(np.float32, copy=False)
    g = (g.float().numpy() if isinstance(g, torch.Tensor) else np.asarray(g)).astype(np.float32, copy=False)
    if mode == "official":
        return _unit(np.concatenate([h, g], axis=1))
    if mode == "balanced":
        return np.concatenate([_unit(h), _unit(g)], axis=1) / np.float32(np.sqrt(2.0))
    return _unit(h if mode == "repsim" else g)


@dataclass
class TopK:
    scores: np.ndarray  # [n_queries, k] float32, descending
    rows: np.ndarray    # [n_queries, k] int64 row ids


def _merge(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k best per query: higher score first, lower row id on ties."""
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def exact_topk(queries: np.ndarray, shards: Iterable[tuple[np.ndarray, np.ndarray]], k: int,
               query_batch: int = 1024) -> TopK:
    """Exact top-k by inner product. One matrix product per (query batch, shard); a running
    top-k per query is merged across shards, so memory is one shard plus queries x k."""
    queries = np.asarray(queries, dtype=np.float32)
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_r = np.zeros((len(queries), 0), dtype=np.int64)
    for matrix, rows in shards:
        if len(rows) == 0:
            continue
        matrix = np.asarray(matrix, dtype=np.float32)
        rows = np.asarray(rows, dtype=np.int64)
        new_s, new_r = [], []
        for a in range(0, len(queries), query_batch):
            s = queries[a:a + query_batch] @ matrix.T
            take = min(k, s.shape[1])
            # argpartition keeps the work linear in the shard size; ties at the cut are resolved
            # exactly by the merge below (rows tied with the k-th score are all kept).
            if take < s.shape[1]:
                kth = -np.partition(-s, take - 1, axis=1)[:, take - 1: take]
                keep = s >= kth
                cand_s = [row_s[m] for row_s, m in zip(s, keep)]
                cand_r = [rows[m] for m in keep]
                width = max(len(c) for c in cand_s)
                ps = np.full((len(s), width), -np.inf, dtype=np.float32)
                pr = np.full((len(s), width), np.iinfo(np.int64).max, dtype=np.int64)
                for i, (cs, cr) in enumerate(zip(cand_s, cand_r)):
                    ps[i, : len(cs)], pr[i, : len(cr)] = cs, cr
            else:
                ps, pr = s, np.broadcast_to(rows, s.shape)
            new_s.append(ps)
            new_r.append(pr)
        s_all = np.concatenate([best_s, np.concatenate(new_s)], axis=1)
        r_all = np.concatenate([best_r, np.concatenate(new_r)], axis=1)
        best_s, best_r = _merge(s_all, r_all, k)
    valid = np.isfinite(best_s).all(0)
    return TopK(best_s[:, valid], best_r[:, valid])
