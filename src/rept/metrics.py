"""Attribution metrics. The same code scores every method.

`scores[q, j]` is how responsible training row j is for query q (higher = more);
`relevant[q, j]` says whether row j truly is (e.g. it carries the query's label).
Ties are broken by the lower row index, so every ranking is deterministic.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score


def _as_2d(scores, relevant) -> tuple[np.ndarray, np.ndarray]:
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    relevant = np.asarray(relevant, dtype=bool)
    if relevant.ndim == 1:
        relevant = np.broadcast_to(relevant, scores.shape)
    if relevant.shape != scores.shape:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} differ in shape")
    return scores, relevant


def ranking(scores: np.ndarray) -> np.ndarray:
    """Row indices of each query from most to least responsible (stable: lower index first on ties)."""
    return np.argsort(-scores, axis=1, kind="stable")


def _top(scores, relevant, k):
    order = ranking(scores)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(relevant, order, 1)


def precision_at_k(scores, relevant, k: int) -> float:
    scores, relevant = _as_2d(scores, relevant)
    k = min(k, scores.shape[1])
    return float(_top(scores, relevant, k)[1].sum(1).mean() / k)


def recall_at_k(scores, relevant, k: int) -> float:
    scores, relevant = _as_2d(scores, relevant)
    has = relevant.any(1)
    if not has.any():
        return 0.0
    hits = _top(scores, relevant, min(k, scores.shape[1]))[1].sum(1)
    return float((hits[has] / relevant[has].sum(1)).mean())


def pooled_auprc_at_k(scores, relevant, k: int) -> float:
    """The RepT paper's auPRC@k: the (score, relevant) pairs of every query's top-k pooled into
    one list, then average precision over that pool."""
    scores, relevant = _as_2d(scores, relevant)
    top_scores, top_rel = _top(scores, relevant, min(k, scores.shape[1]))
    if not top_rel.any():
        return 0.0
    return float(average_precision_score(top_rel.ravel(), top_scores.ravel()))


def average_precision(scores, relevant) -> float:
    """Mean over queries (with at least one relevant row) of AP over the full ranking."""
    scores, relevant = _as_2d(scores, relevant)
    aps = [average_precision_score(r, s) for s, r in zip(scores, relevant) if r.any()]
    return float(np.mean(aps)) if aps else 0.0


def evaluate(scores, relevant, ks=(10, 50, 100)) -> dict:
    scores, relevant = _as_2d(scores, relevant)
    out = {}
    for k in ks:
        out[f"P@{k}"] = precision_at_k(scores, relevant, k)
        out[f"auPRC@{k}"] = pooled_auprc_at_k(scores, relevant, k)
        out[f"recall@{k}"] = recall_at_k(scores, relevant, k)
    out["AP"] = average_precision(scores, relevant)
    out["n_queries"] = int(scores.shape[0])
    out["n_rows"] = int(scores.shape[1])
    return out
