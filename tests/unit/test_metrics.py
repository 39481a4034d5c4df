"""Attribution metrics: hand-computed values, sklearn agreement, invariances, top-K lists."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from rept.evaluate.metrics import (average_precision, average_precision_per_query, evaluate, evaluate_topk,
                                   pooled_auprc_at_k, precision_at_k, precision_at_k_per_query, recall_at_k)

# 2 queries x 6 training rows.
SCORES = np.array([[0.9, 0.1, 0.8, 0.3, 0.7, 0.2],
                   [0.5, 0.5, 0.4, 0.6, 0.1, 0.0]])
RELEVANT = np.array([[1, 0, 0, 1, 1, 0],
                     [0, 1, 0, 0, 0, 1]], dtype=bool)
# Rankings (ties to the lower row index):
#   q0: rows 0 (.9) 2 (.8) 4 (.7) 3 (.3) 5 (.2) 1 (.1)  -> relevant 1 0 1 1 0 0
#   q1: rows 3 (.6) 0 (.5) 1 (.5) 2 (.4) 4 (.1) 5 (.0)  -> relevant 0 0 1 0 0 1


def test_precision_by_hand():
    # top-2: q0 1/2, q1 0/2 (row 0 before row 1 on the tie) -> 0.25
    assert precision_at_k(SCORES, RELEVANT, 2) == pytest.approx(0.25)
    # top-3: q0 2/3, q1 1/3 -> 0.5
    assert precision_at_k(SCORES, RELEVANT, 3) == pytest.approx(0.5)


def test_recall_by_hand():
    # top-3: q0 finds 2 of 3, q1 1 of 2 -> (2/3 + 1/2) / 2 = 7/12
    assert recall_at_k(SCORES, RELEVANT, 3) == pytest.approx(7 / 12)
    # A query with no relevant row is left out of the mean.
    relevant = RELEVANT.copy()
    relevant[1] = False
    assert recall_at_k(SCORES, relevant, 3) == pytest.approx(2 / 3)
    assert recall_at_k(SCORES, np.zeros_like(RELEVANT), 3) == 0.0


def test_pooled_auprc_by_hand():
    # Pool of the top-3s: .9(1) .8(0) .7(1) | .6(0) .5(0) .5(1). sklearn's AP sums
    # (recall gain) x precision at each distinct threshold, with the tied .5s taken together:
    #   .9: P 1/1, R 1/3 -> 1/3 * 1;  .7: P 2/3, R 2/3 -> 1/3 * 2/3;  .5: P 3/6, R 3/3 -> 1/3 * 1/2
    # = 1/3 + 2/9 + 1/6 = 13/18
    assert pooled_auprc_at_k(SCORES, RELEVANT, 3) == pytest.approx(13 / 18)
    # A pool without a relevant row scores 0.
    assert pooled_auprc_at_k(SCORES, np.zeros_like(RELEVANT), 3) == 0.0


def test_average_precision_by_hand():
    # q0: relevant at ranks 1, 3, 4 -> (1/1 + 2/3 + 3/4) / 3 = 29/36
    # q1: threshold .5 takes rows 3, 0, 1 together: P 1/3 at R 1/2; row 5 last: P 2/6 at R 1
    #     -> 1/2 * 1/3 + 1/2 * 1/3 = 1/3 = 12/36
    assert average_precision(SCORES, RELEVANT) == pytest.approx((29 / 36 + 12 / 36) / 2)


def test_evaluate_collects_everything_and_clips_k():
    out = evaluate(SCORES, RELEVANT, ks=(3, 100))
    assert out["P@3"] == pytest.approx(0.5)
    assert out["recall@3"] == pytest.approx(7 / 12)
    assert out["auPRC@3"] == pytest.approx(13 / 18)
    assert out["AP"] == pytest.approx(41 / 72)
    assert (out["n_queries"], out["n_rows"]) == (2, 6)
    # k = 100 > 6 rows: clipped to 6, so P is the share of relevant rows, recall is 1.
    assert out["P@100"] == pytest.approx(5 / 12)
    assert out["recall@100"] == 1.0
    assert out["P@100"] == precision_at_k(SCORES, RELEVANT, 6)


def test_pooled_auprc_equals_sklearn_on_the_pooled_list():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(7, 300))
    relevant = rng.random((7, 300)) < 0.2
    k = 25
    pooled_scores, pooled_rel = [], []
    for s, r in zip(scores, relevant):
        top = sorted(range(len(s)), key=lambda j: (-s[j], j))[:k]
        pooled_scores += [s[j] for j in top]
        pooled_rel += [r[j] for j in top]
    expected = average_precision_score(pooled_rel, pooled_scores)
    assert pooled_auprc_at_k(scores, relevant, k) == pytest.approx(expected)


def test_metrics_ignore_the_order_of_training_rows():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(5, 80))
    relevant = rng.random((5, 80)) < 0.3
    perm = rng.permutation(80)
    assert evaluate(scores[:, perm], relevant[:, perm], ks=(5, 20)) == pytest.approx(
        evaluate(scores, relevant, ks=(5, 20)))


def test_perfect_ranking_scores_one():
    relevant = np.array([[1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]], dtype=bool)
    scores = relevant + np.random.default_rng(2).random(relevant.shape) * 0.5  # relevant rows on top
    assert precision_at_k(scores, relevant, 3) == 1.0
    assert recall_at_k(scores, relevant, 4) == 1.0
    assert pooled_auprc_at_k(scores, relevant, 3) == 1.0
    assert average_precision(scores, relevant) == 1.0


def test_one_relevance_row_applies_to_every_query():
    flat = np.array([1, 0, 0, 1, 1, 0], dtype=bool)
    assert evaluate(SCORES, flat, ks=(2, 3)) == evaluate(SCORES, np.tile(flat, (2, 1)), ks=(2, 3))


def test_infinite_scores_are_ranked_and_nan_refused():
    # Infinite scores (sklearn refuses them) rank like very large finite ones.
    scores, finite = SCORES.copy(), SCORES.copy()
    scores[0, 1], finite[0, 1] = -np.inf, -1e9
    scores[1, 3], finite[1, 3] = np.inf, 1e9
    assert evaluate(scores, RELEVANT, ks=(3, 6)) == pytest.approx(evaluate(finite, RELEVANT, ks=(3, 6)))
    scores[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate(scores, RELEVANT)


def test_rows_not_retrieved_never_count_as_found():
    """`retrieved`: a method that shows some rows is scored on those (-inf here marks the others,
    ranked last as they would be); an answer shown nothing finds nothing."""
    scores = np.array([[0.9, 0.8, -np.inf, -np.inf, 0.1], [-np.inf] * 5])
    relevant = np.array([1, 0, 1, 1, 0], dtype=bool)
    shown = scores > -np.inf
    assert precision_at_k_per_query(scores, relevant, 5, shown).tolist() == [0.2, 0.0]
    assert precision_at_k_per_query(scores, relevant, 5).tolist() == [0.6, 0.6]  # every row retrieved
    assert recall_at_k(scores, relevant, 5, shown) == pytest.approx(1 / 6)
    # the one relevant row found is first: precision 1 there, over the 3 relevant rows; nothing shown: 0
    assert average_precision_per_query(scores, relevant, shown) == pytest.approx([1 / 3, 0.0])
    out = evaluate(scores, relevant, ks=(2, 5), retrieved=shown)
    assert out["P@2"] == pytest.approx(0.25) and out["AP"] == pytest.approx(1 / 6)
    # every row retrieved is the same as no mask
    assert evaluate(SCORES, RELEVANT, ks=(3,), retrieved=np.ones_like(RELEVANT)) == evaluate(SCORES, RELEVANT, ks=(3,))
    with pytest.raises(ValueError, match="retrieved"):
        evaluate(SCORES, RELEVANT, retrieved=RELEVANT[:, :5])


def test_bad_inputs():
    with pytest.raises(ValueError, match="differ in shape"):
        precision_at_k(SCORES, RELEVANT[:, :5], 2)
    with pytest.raises(ValueError, match="at least 1"):
        precision_at_k(SCORES, RELEVANT, 0)


# ------------------------------------------------------------------------------------------ top-K lists

def topk_lists(scores, K, rng=None):
    """Each query's top-K (row ids, scores), shuffled within the list when rng is given."""
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    if rng is not None:
        rows = np.stack([rng.permutation(r) for r in rows])
    return rows, np.take_along_axis(scores, rows, 1)


def relevant_sets(relevant):
    return [set(np.flatnonzero(r).tolist()) for r in relevant]


def test_evaluate_topk_agrees_with_evaluate():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(6, 400))
    relevant = rng.random((6, 400)) < 0.15
    relevant[2] = False  # a query with nothing relevant
    rows, top_scores = topk_lists(scores, 60, rng)
    full = evaluate(scores, relevant, ks=(10, 50))
    top = evaluate_topk(rows, top_scores, relevant_sets(relevant), relevant.sum(1), ks=(10, 50))
    for key in ("P@10", "P@50", "recall@10", "recall@50", "auPRC@10", "auPRC@50"):
        assert top[key] == pytest.approx(full[key]), key
    assert top["n_queries"] == 6
    # The list's AP counts relevant rows below the list as missed: a lower bound of the full AP.
    assert 0 < top["AP@60"] < full["AP"]


def test_evaluate_topk_with_the_whole_ranking_gives_the_full_ap():
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(4, 50))
    relevant = rng.random((4, 50)) < 0.3
    rows, top_scores = topk_lists(scores, 50, rng)
    top = evaluate_topk(rows, top_scores, relevant_sets(relevant), ks=(5, 100), n_rows=50)
    full = evaluate(scores, relevant, ks=(5, 100))
    assert top["AP@50"] == pytest.approx(full["AP"])
    for key in ("P@5", "P@100", "recall@100", "auPRC@100"):  # k = 100 clipped to the 50 rows
        assert top[key] == pytest.approx(full[key]), key


def test_evaluate_topk_breaks_ties_like_evaluate():
    # Integer scores: many ties, decided by the lower row id in both.
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 4, size=(5, 30)).astype(float)
    relevant = rng.random((5, 30)) < 0.4
    rows, top_scores = topk_lists(scores, 12, rng)
    top = evaluate_topk(rows, top_scores, relevant_sets(relevant), relevant.sum(1), ks=(3, 7, 12))
    full = evaluate(scores, relevant, ks=(3, 7, 12))
    for k in (3, 7, 12):
        for name in ("P", "recall", "auPRC"):
            assert top[f"{name}@{k}"] == pytest.approx(full[f"{name}@{k}"]), (name, k)


def test_evaluate_topk_hand_example_with_padding_and_one_set():
    # The lists of SCORES' top-3, q1 padded with row -1 (no result) in a longer list.
    rows = [[4, 0, 2, -1], [1, 3, 0, -1]]
    scores = [[0.7, 0.9, 0.8, -np.inf], [0.5, 0.6, 0.5, -np.inf]]
    sets = [{0, 3, 4}, {1, 5}]
    out = evaluate_topk(rows, scores, sets, [3, 2], ks=(2, 3))
    assert out["P@2"] == pytest.approx(0.25) and out["P@3"] == pytest.approx(0.5)
    assert out["recall@3"] == pytest.approx(7 / 12)
    assert out["auPRC@3"] == pytest.approx(13 / 18)
    # AP over the 4-long lists: q0 hits at ranks 1, 3 -> (1 + 2/3) / 3; q1 at rank 3 -> (1/3) / 2
    assert out["AP@4"] == pytest.approx(((1 + 2 / 3) / 3 + (1 / 3) / 2) / 2)
    # One set for every query, n_relevant from its size.
    one = evaluate_topk(rows, scores, {0, 1}, ks=(2,))
    assert one["P@2"] == pytest.approx((1 + 1) / 4)  # q0 top-2 rows 0, 2; q1 rows 3, 0


def test_evaluate_topk_refuses_k_beyond_the_lists():
    rows, top_scores = topk_lists(SCORES, 3)
    with pytest.raises(ValueError, match="need the top 5 of each query, but the lists hold 3"):
        evaluate_topk(rows, top_scores, relevant_sets(RELEVANT), ks=(5,))
    with pytest.raises(ValueError, match="need the top 6"):
        evaluate_topk(rows, top_scores, relevant_sets(RELEVANT), ks=(100,), n_rows=6)
