"""Attribution metrics. The same code scores every method.

`scores[q, j]` is how responsible training row j is for query q (higher = more);
`relevant[q, j]` says whether row j truly is (e.g. it carries the query's label); a 1-D
`relevant[j]` applies to every query. Ties are broken by the lower row index, so every
ranking is deterministic.

`retrieved[q, j]` (optional, same shapes as `relevant`) says whether the method returned row j for
query q at all: a method that shows only some rows (`rept trace --against-base` shows the rows that
pushed towards the answer, and none for an answer it does not trace) is scored on what it shows. A
row not retrieved never counts as found, wherever its score puts it: an answer shown 3 rows, all
relevant, has P@10 0.3, and its AP counts the relevant rows it was not shown as missed.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score


def _as_2d(scores, relevant, retrieved=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scores, relevant and `found` (relevant and retrieved) as [queries, rows] arrays."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    masks = []
    for name, mask in (("relevant", relevant), ("retrieved", True if retrieved is None else retrieved)):
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim <= 1:
            mask = np.broadcast_to(mask, scores.shape)
        if mask.shape != scores.shape:
            raise ValueError(f"scores {scores.shape} and {name} {mask.shape} differ in shape")
        masks.append(mask)
    relevant, retrieved = masks
    return _finite(scores), relevant, relevant & retrieved


def _finite(scores: np.ndarray) -> np.ndarray:
    """sklearn refuses infinite scores (e.g. -inf for masked rows); AP only depends on the order
    and the ties, so such scores are replaced by their dense rank. NaN has no order: an error."""
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if np.isinf(scores).any():
        return np.unique(scores, return_inverse=True)[1].reshape(scores.shape).astype(np.float64)
    return scores


def _check_k(k: int) -> None:
    if int(k) < 1:
        raise ValueError(f"k must be at least 1, not {k}")


def ranking(scores: np.ndarray) -> np.ndarray:
    """Row indices of each query from most to least responsible (stable: lower index first on ties)."""
    return np.argsort(-scores, axis=1, kind="stable")


def _top(scores, relevant, k):
    order = ranking(scores)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(relevant, order, 1)


def precision_at_k_per_query(scores, relevant, k: int, retrieved=None) -> np.ndarray:
    """Each query's share of relevant (and retrieved) rows in its top k (k clipped to the row count)."""
    _check_k(k)
    scores, _, found = _as_2d(scores, relevant, retrieved)
    k = min(k, scores.shape[1])
    return _top(scores, found, k)[1].sum(1) / k


def precision_at_k(scores, relevant, k: int, retrieved=None) -> float:
    """Mean over queries of the share of relevant rows in the top k (k clipped to the row count)."""
    return float(precision_at_k_per_query(scores, relevant, k, retrieved).mean())


def recall_at_k(scores, relevant, k: int, retrieved=None) -> float:
    """Mean over queries with at least one relevant row of the share of them found in the top k."""
    _check_k(k)
    scores, relevant, found = _as_2d(scores, relevant, retrieved)
    has = relevant.any(1)
    if not has.any():
        return 0.0
    hits = _top(scores, found, min(k, scores.shape[1]))[1].sum(1)
    return float((hits[has] / relevant[has].sum(1)).mean())


def _pooled_ap(top_scores: np.ndarray, top_rel: np.ndarray) -> float:
    if not top_rel.any():
        return 0.0
    return float(average_precision_score(top_rel.ravel(), top_scores.ravel()))


def pooled_auprc_at_k(scores, relevant, k: int, retrieved=None) -> float:
    """The RepT paper's auPRC@k: the (score, relevant) pairs of every query's top-k pooled into
    one list, then average precision over that pool (0.0 when the pool has no relevant row)."""
    _check_k(k)
    scores, _, found = _as_2d(scores, relevant, retrieved)
    return _pooled_ap(*_top(scores, found, min(k, scores.shape[1])))


def average_precision_per_query(scores, relevant, retrieved=None) -> list[float | None]:
    """Each query's AP over the full ranking (None for a query with no relevant row). Relevant rows
    not retrieved count as missed: sklearn's AP over the rows found, times the share of the
    relevant rows found, is the sum of the precision at each row found over all relevant rows."""
    scores, relevant, found = _as_2d(scores, relevant, retrieved)
    out = []
    for s, r, f in zip(scores, relevant, found):
        if not r.any():
            out.append(None)
        else:
            out.append(float(average_precision_score(f, s)) * f.sum() / r.sum() if f.any() else 0.0)
    return out


def average_precision(scores, relevant, retrieved=None) -> float:
    """Mean over queries (with at least one relevant row) of AP over the full ranking."""
    aps = [ap for ap in average_precision_per_query(scores, relevant, retrieved) if ap is not None]
    return float(np.mean(aps)) if aps else 0.0


def evaluate(scores, relevant, ks=(10, 50, 100), retrieved=None) -> dict:
    """P@k, auPRC@k and recall@k for each k (clipped to the row count), AP, and the sizes."""
    out = {}
    for k in ks:
        out[f"P@{k}"] = precision_at_k(scores, relevant, k, retrieved)
        out[f"auPRC@{k}"] = pooled_auprc_at_k(scores, relevant, k, retrieved)
        out[f"recall@{k}"] = recall_at_k(scores, relevant, k, retrieved)
    out["AP"] = average_precision(scores, relevant, retrieved)
    scores = np.atleast_2d(np.asarray(scores))
    out["n_queries"] = int(scores.shape[0])
    out["n_rows"] = int(scores.shape[1])
    return out


def evaluate_topk(top_rows, top_scores, relevant_rows, n_relevant=None, ks=(10, 50, 100),
                  n_rows: int | None = None) -> dict:
    """The metrics of `evaluate` from each query's top-K list only, for when the full score
    matrix is too large to hold.

    top_rows, top_scores: [n_queries, K] row ids and scores (any order; row id -1 = no result).
    relevant_rows: per query, the set of relevant row ids (or one set for every query).
    n_relevant: per query (or one int), how many rows are relevant in the whole training set;
        default: the size of each set. Needed by recall and AP.
    n_rows: the training-set size; k is clipped to it as `evaluate` does. Asking for a k beyond K
        (after clipping) is an error: the list cannot tell what lies below it.

    P@k, recall@k and auPRC@k equal `evaluate`'s whenever k <= K. AP is over the returned list
    only, reported as f"AP@{K}": precision at each relevant row in the list, summed and divided
    by n_relevant, so relevant rows not returned count as missed. It equals `average_precision`
    when the list holds every row (and scores have no ties), and is a lower bound otherwise.
    """
    rows = np.atleast_2d(np.asarray(top_rows, dtype=np.int64))
    scores = np.atleast_2d(np.asarray(top_scores, dtype=np.float64))
    if rows.shape != scores.shape:
        raise ValueError(f"top_rows {rows.shape} and top_scores {scores.shape} differ in shape")
    n_queries, K = rows.shape
    if isinstance(relevant_rows, (set, frozenset)):
        relevant_rows = [relevant_rows] * n_queries
    if len(relevant_rows) != n_queries:
        raise ValueError(f"{len(relevant_rows)} relevant sets for {n_queries} queries")
    if n_relevant is None:
        n_relevant = [len(s) for s in relevant_rows]
    n_relevant = np.broadcast_to(np.asarray(n_relevant, dtype=np.int64), (n_queries,))

    # Same order as `evaluate`: score descending, then lower row id; padding (-1) goes last.
    valid = rows >= 0
    order = np.lexsort((rows, -np.where(valid, scores, 0.0), ~valid), axis=1)
    rows, scores, valid = (np.take_along_axis(a, order, 1) for a in (rows, scores, valid))
    scores = _finite(np.where(valid, scores, 0.0))
    rel = np.stack([np.isin(r, np.fromiter(s, np.int64, len(s))) for r, s in zip(rows, relevant_rows)]) & valid

    has = n_relevant > 0
    out = {}
    for k in ks:
        _check_k(k)
        kk = min(k, n_rows) if n_rows else k
        if kk > K:
            raise ValueError(f"metrics at k={k} need the top {kk} of each query, but the lists hold {K}")
        hits = rel[:, :kk].sum(1)
        out[f"P@{k}"] = float(hits.mean() / kk)
        pool = valid[:, :kk]
        out[f"auPRC@{k}"] = _pooled_ap(scores[:, :kk][pool], rel[:, :kk][pool])
        out[f"recall@{k}"] = float((hits[has] / n_relevant[has]).mean()) if has.any() else 0.0
    # AP over the list: precision at each relevant position, divided by all relevant rows.
    precision_at = np.cumsum(rel, 1) / np.arange(1, K + 1)
    ap = (precision_at * rel).sum(1)[has] / n_relevant[has]
    out[f"AP@{K}"] = float(ap.mean()) if has.any() else 0.0
    out["n_queries"] = int(n_queries)
    if n_rows:
        out["n_rows"] = int(n_rows)
    return out


def per_query_table(scores: np.ndarray, relevant: np.ndarray, queries, k: int, retrieved=None) -> list[dict]:
    """Each query's P@k and AP with its text, the lowest P@k first (then the lowest AP): which
    answers a method misses."""
    out = [{"query": i, "prompt": q.prompt, "response": q.response, f"P@{k}": float(p), "AP": ap}
           for i, (q, p, ap) in enumerate(zip(queries, precision_at_k_per_query(scores, relevant, k, retrieved),
                                              average_precision_per_query(scores, relevant, retrieved)))]
    return sorted(out, key=lambda q: (q[f"P@{k}"], -1.0 if q["AP"] is None else q["AP"]))
