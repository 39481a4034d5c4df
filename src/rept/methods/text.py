"""Baselines that look at no model: BM25 over the row text, and seeded random scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rept.methods.base import Method


def _text(prompt: str, response: str) -> str:
    return f"{prompt}\n{response}"


class BM25(Method):
    """bm25s over prompt + response; the query is the query's prompt + response."""

    name = "bm25"

    def fit(self, bundle, train_rows):
        import bm25s

        self.n = len(train_rows)
        tokens = bm25s.tokenize([_text(r.prompt, r.response) for r in train_rows], stopwords="en",
                                show_progress=False)
        self.retriever = bm25s.BM25()
        self.retriever.index(tokens, show_progress=False)
        self.bytes_per_row = int(sum(getattr(v, "nbytes", 0) for v in self.retriever.scores.values()) / max(1, self.n))

    def score(self, bundle, queries) -> np.ndarray:
        import bm25s

        toks = bm25s.tokenize([_text(q.prompt, q.response) for q in queries], stopwords="en", return_ids=False,
                              show_progress=False)
        return np.stack([self.retriever.get_scores(t) if t else np.zeros(self.n) for t in toks]).astype(np.float32)

    def save_files(self, folder) -> None:
        self.retriever.save(str(Path(folder) / "bm25"), show_progress=False)

    def restore(self, stored, bundle) -> None:
        import bm25s

        self.n = stored.n_rows
        self.retriever = bm25s.BM25.load(str(stored.folder / "bm25"), show_progress=False,
                                         allow_pickle=False)  # checked against the manifest's checksums
        self.bytes_per_row = int(sum(getattr(v, "nbytes", 0) for v in self.retriever.scores.values()) / max(1, self.n))


class Random(Method):
    name = "random"

    def fit(self, bundle, train_rows):
        self.n = len(train_rows)

    def restore(self, stored, bundle) -> None:
        self.n = stored.n_rows

    def score(self, bundle, queries) -> np.ndarray:
        return np.random.default_rng(self.seed).random((len(queries), self.n)).astype(np.float32)
