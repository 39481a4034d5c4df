"""Search layer: signatures per mode, exact sharded top-k, faiss indexes."""

import numpy as np
import pytest
import torch

from rept.query.search import FaissIndex, exact_topk, signature_matrix


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(queries, matrix, rows, k):
    """Reference: one product, full sort by (score desc, row asc)."""
    scores = queries @ matrix.T
    order = np.lexsort((np.broadcast_to(rows, scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), rows[order]


def split(matrix, rows, n_shards, rng):
    """Uneven shards (some may be tiny) in order."""
    cuts = np.sort(rng.choice(np.arange(1, len(rows)), n_shards - 1, replace=False)) if n_shards > 1 else []
    return list(zip(np.split(matrix, cuts), np.split(rows, cuts)))


def clustered(n, d, n_clusters, rng, noise=0.5):
    centers = unit(rng.standard_normal((n_clusters, d)))
    x = centers[rng.integers(n_clusters, size=n)] + noise * rng.standard_normal((n, d)) / np.sqrt(d)
    return unit(x).astype(np.float32), centers


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    matrix = unit(rng.standard_normal((600, 24))).astype(np.float32)
    rows = rng.permutation(10_000)[:600].astype(np.int64)  # ids not in storage order
    queries = unit(rng.standard_normal((10, 24))).astype(np.float32)
    return matrix, rows, queries


@pytest.mark.parametrize("n_shards", [1, 3, 7])
@pytest.mark.parametrize("query_batch", [1, 3, 10])
def test_exact_topk_matches_brute_force(data, n_shards, query_batch):
    matrix, rows, queries = data
    shards = split(matrix, rows, n_shards, np.random.default_rng(n_shards))
    top = exact_topk(queries, iter(shards), k=25, query_batch=query_batch)
    want_s, want_r = brute_force(queries, matrix, rows, 25)
    assert top.scores.dtype == np.float32 and top.rows.dtype == np.int64
    np.testing.assert_array_equal(top.rows, want_r)
    np.testing.assert_allclose(top.scores, want_s, rtol=0, atol=1e-6)
    assert (np.diff(top.scores, axis=1) <= 0).all()


def test_exact_topk_k_above_n_returns_all_rows(data):
    matrix, rows, queries = data
    top = exact_topk(queries, split(matrix, rows, 3, np.random.default_rng(1)), k=10_000)
    assert top.rows.shape == (len(queries), len(rows))
    want_s, want_r = brute_force(queries, matrix, rows, len(rows))
    np.testing.assert_array_equal(top.rows, want_r)


def test_exact_topk_ties_go_to_lower_row_ids():
    # integer vectors: every score is exact, and duplicated rows tie exactly, across shard boundaries
    rng = np.random.default_rng(2)
    base = rng.integers(-3, 4, size=(40, 8)).astype(np.float32)
    matrix = np.concatenate([base, base, base[:10]])
    rows = rng.permutation(len(matrix)).astype(np.int64)
    queries = rng.integers(-3, 4, size=(6, 8)).astype(np.float32)
    for n_shards in (1, 4, 9):
        top = exact_topk(queries, split(matrix, rows, n_shards, rng), k=17, query_batch=4)
        want_s, want_r = brute_force(queries, matrix, rows, 17)
        np.testing.assert_array_equal(top.scores, want_s)
        np.testing.assert_array_equal(top.rows, want_r)


def test_exact_topk_reads_float16_and_torch_shards(data):
    matrix, rows, queries = data
    half = matrix.astype(np.float16)
    shards = [(half[:200], rows[:200]), (torch.from_numpy(half[200:]), torch.from_numpy(rows[200:]))]
    top = exact_topk(queries, shards, k=10)
    want_s, want_r = brute_force(queries, half.astype(np.float32), rows, 10)
    np.testing.assert_array_equal(top.rows, want_r)
    np.testing.assert_allclose(top.scores, want_s, atol=1e-6)


def test_signature_modes():
    rng = np.random.default_rng(3)
    h, g = rng.standard_normal((5, 6)) * 100, rng.standard_normal((5, 4)) * 0.01
    bal = signature_matrix(h, g, "balanced")
    np.testing.assert_allclose(bal, np.concatenate([unit(h), unit(g)], 1) / np.sqrt(2), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(bal, axis=1), 1, atol=1e-6)
    off = signature_matrix(h, g, "official")
    raw = np.concatenate([h, g], 1)
    cos = raw @ raw.T / np.outer(np.linalg.norm(raw, axis=1), np.linalg.norm(raw, axis=1))
    np.testing.assert_allclose(off @ off.T, cos, atol=1e-6)
    np.testing.assert_allclose(signature_matrix(h, g, "repsim"), unit(h), atol=1e-6)
    np.testing.assert_allclose(signature_matrix(h, g, "repgrad"), unit(g), atol=1e-6)
    assert all(signature_matrix(h, g, m).dtype == np.float32 for m in ("official", "balanced", "repsim", "repgrad"))
    with pytest.raises(ValueError, match="unknown search mode"):
        signature_matrix(h, g, "cosine")
    # lookahead: three parts that count equally (its score is the mean of the three cosines)
    g_next = rng.standard_normal((5, 4)) * 0.001
    look = signature_matrix(h, g, "lookahead", g_next)
    np.testing.assert_allclose(look @ look.T, (unit(h) @ unit(h).T + unit(g) @ unit(g).T
                                               + unit(g_next) @ unit(g_next).T) / 3, atol=1e-6)
    with pytest.raises(ValueError, match="g_next"):
        signature_matrix(h, g, "lookahead")


def test_signature_zero_rows_stay_zero_and_fp16_works():
    h = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]], dtype=torch.float16)
    g = np.array([[0.0, 0.0], [0.0, 0.0]], dtype=np.float16)
    for mode in ("official", "balanced", "repsim", "repgrad"):
        sig = signature_matrix(h, g, mode)
        assert sig.dtype == np.float32 and np.isfinite(sig).all()
        assert (sig[0] == 0).all()
    np.testing.assert_allclose(signature_matrix(h, g, "balanced")[1], [0.6 / np.sqrt(2), 0.8 / np.sqrt(2), 0, 0, 0],
                               atol=1e-6)
    np.testing.assert_allclose(signature_matrix(h, g, "official")[1], [0.6, 0.8, 0, 0, 0], atol=1e-6)


def test_faiss_flat_equals_exact(data):
    matrix, rows, queries = data
    shards = split(matrix, rows, 3, np.random.default_rng(4))
    flat = FaissIndex.build(shards, "flat")
    want = exact_topk(queries, shards, k=20)
    got = flat.search(queries, 20)
    np.testing.assert_array_equal(got.rows, want.rows)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
    assert flat.search(queries, 10_000).rows.shape == (len(queries), len(rows))


@pytest.mark.parametrize("storage", ["fp16", "sq8"])
def test_faiss_compressed_storage_ranks_like_exact(data, storage):
    matrix, rows, queries = data
    shards = split(matrix, rows, 3, np.random.default_rng(4))
    index = FaissIndex.build(shards, "flat", storage=storage)
    assert recall(index.search(queries, 20), exact_topk(queries, shards, k=20)) > 0.9


@pytest.fixture(scope="module")
def store():
    rng = np.random.default_rng(5)
    matrix, centers = clustered(4000, 32, 40, rng)
    rows = np.arange(100, 4100, dtype=np.int64)
    queries, _ = clustered(30, 32, 40, np.random.default_rng(6))
    return split(matrix, rows, 4, rng), queries


def recall(got, want):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got.rows, want.rows)])


def test_ivf_recall_and_round_trip(store, tmp_path):
    shards, queries = store
    want = exact_topk(queries, shards, k=10)
    ivf = FaissIndex.build(shards, "ivf", nlist=16, nprobe=8, seed=0)
    got = ivf.search(queries, 10)
    assert recall(got, want) > 0.9
    assert recall(ivf.search(queries, 10, nprobe=16), want) == 1.0  # every list scanned: exact
    ivf.save(tmp_path / "ivf")
    again = FaissIndex.load(tmp_path / "ivf")
    assert again.nprobe == 8
    back = again.search(queries, 10)
    np.testing.assert_array_equal(back.rows, got.rows)
    np.testing.assert_array_equal(back.scores, got.scores)
    # same seed, same shards: same index
    np.testing.assert_array_equal(FaissIndex.build(shards, "ivf", nlist=16, nprobe=8).search(queries, 10).rows,
                                  got.rows)


def test_ivfpq_builds_from_callable_and_round_trips(store, tmp_path):
    shards, queries = store
    want = exact_topk(queries, shards, k=10)
    # 4-bit codes: faiss trains one 16-centroid k-means per subquantiser (256 centroids take ~1 s each)
    pq = FaissIndex.build(lambda: iter(shards), "ivfpq", nlist=16, m=8, nbits=4, nprobe=16, seed=0)
    assert not pq.index.do_polysemous_training  # faiss's factory default; it multiplied training time
    got = pq.search(queries, 10)
    assert recall(got, want) > 0.1  # 4 bytes a row for 32 floats: very lossy, but chance is 10/4000
    pq.save(tmp_path / "pq")
    back = FaissIndex.load(tmp_path / "pq").search(queries, 10)
    np.testing.assert_array_equal(back.rows, got.rows)
    np.testing.assert_array_equal(back.scores, got.scores)


def test_few_queries_score_float16_shards_block_by_block_exactly(monkeypatch):
    """A few queries over float16 shards are scored in cache-sized blocks of rows (here 64 rows of
    D = 4096 a block, 5 blocks a shard, the last one short): the same top-k as brute force over the
    float32 values, and as the whole-shard path."""
    import rept.query.search as search

    rng = np.random.default_rng(3)
    matrix = unit(rng.standard_normal((300, 4096))).astype(np.float16)
    rows = np.arange(300, dtype=np.int64)
    queries = unit(rng.standard_normal((3, 4096))).astype(np.float32)
    shards = [(matrix[:290], rows[:290]), (matrix[290:], rows[290:])]
    calls = []
    real = search._blockwise_scores
    monkeypatch.setattr(search, "_blockwise_scores", lambda q, m: calls.append(len(m)) or real(q, m))
    blockwise = exact_topk(queries, shards, k=20)
    assert calls == [290, 10]
    want_s, want_r = brute_force(queries, matrix.astype(np.float32), rows, 20)
    np.testing.assert_array_equal(blockwise.rows, want_r)
    np.testing.assert_allclose(blockwise.scores, want_s, atol=1e-6)
    monkeypatch.setattr(search, "BLOCKWISE_MAX_QUERIES", 0)
    whole = exact_topk(queries, shards, k=20)
    np.testing.assert_array_equal(whole.rows, blockwise.rows)
    np.testing.assert_allclose(whole.scores, blockwise.scores, atol=1e-6)
