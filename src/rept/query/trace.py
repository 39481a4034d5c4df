"""From a misbehaving (prompt, response) to the training rows that taught it."""

from __future__ import annotations

from rept.errors import ReptError

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rept.store.identity import ModelIdentity
from rept.data.examples import tokenize_pair
from rept.store.index import SignatureIndex
from rept.model.loading import LoadedModel, load_model
from rept.query.search import KINDS, FaissIndex, TopK, exact_topk, signatures_of, sort_topk
from rept.signatures.extract import SignatureBatch, extract_all


class QueryError(ReptError):
    """A user-facing problem with queries (one line)."""


SEARCH_KINDS = ("exact",) + KINDS  # `rept trace --search`


@dataclass
class Query:
    prompt: str
    response: str
    label: str | None = None
    flagged: bool | None = None
    instead: str | None = None   # what the model should have said (`rept trace --instead`, rept.query.contrast)


@dataclass
class Hit:
    row: int
    score: float
    label: str | None
    prompt: str
    response: str
    words: list | None = None   # token-level scores, filled by `rept.signatures.tokens` when asked
    phrases: list | None = None  # top phrases (contiguous high-scoring words), best first, likewise

    @property
    def text(self) -> str:
        return f"{self.prompt}\n{self.response}"


@dataclass
class QueryResult:
    query: Query
    hits: list[Hit] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {"prompt": self.query.prompt, "response": self.query.response, "label": self.query.label,
               "flagged": self.query.flagged}
        if self.query.instead is not None:
            out["instead"] = self.query.instead
        return out | {"results": [_hit_dict(h) for h in self.hits]}


def _hit_dict(hit: Hit) -> dict:
    out = {"row": hit.row, "score": hit.score, "label": hit.label, "text": hit.text}
    if hit.words is not None:
        out["words"] = hit.words
    if hit.phrases is not None:
        out["phrases"] = hit.phrases
    return out


_TRUE = {"1", "true", "yes", "y", "t"}


def load_queries(path: str, need_response: bool = True) -> list[Query]:
    """Queries from JSONL, CSV or Parquet with columns prompt (or prompts), response (or
    output / expected_response), and optional label, flagged and instead (what the model should
    have said, for `rept trace --instead`)."""
    import pandas as pd

    from rept.data.datasets import DataError, check_queries_path, read_jsonl, unreadable

    suffix = Path(path).suffix.lower()
    try:
        check_queries_path(path)
        if suffix in (".jsonl", ".json"):  # the records as they are: pandas would turn 1 into 1.0 beside a gap
            records = read_jsonl(path)
        elif suffix == ".csv":
            records = pd.read_csv(path, keep_default_na=False, dtype=str).to_dict("records")
        else:
            records = pd.read_parquet(path).to_dict("records")
    except DataError as exc:
        raise QueryError(str(exc)) from None
    except Exception as exc:  # a bad encoding, a parse error of pandas/pyarrow, an unreadable file
        raise QueryError(str(unreadable(path, exc))) from None
    if not records:
        raise QueryError(f"{path} holds no queries")
    cols = list(dict.fromkeys(c for rec in records for c in rec))
    prompt_col = next((c for c in ("prompt", "prompts") if c in cols), None)
    response_col = next((c for c in ("response", "output", "expected_response") if c in cols), None)
    if prompt_col is None or (need_response and response_col is None):
        missing = "prompt" if prompt_col is None else "response"
        raise QueryError(f"{path}: no {missing} column (columns: {', '.join(map(str, cols))})")
    from rept.data.datasets import LabelKinds, cell_label, cell_text

    name = os.path.basename(path)
    kinds = LabelKinds("label", name)
    queries = []
    try:
        for i, rec in enumerate(records):
            label, kind = cell_label(rec.get("label"), "label", i, name)
            kinds.see(kind, i, rec.get("label"))
            flagged = rec.get("flagged")
            if isinstance(flagged, str):
                flagged = flagged.strip().lower() in _TRUE
            instead = rec.get("instead")
            missing = instead is None or instead == "" or (isinstance(instead, float) and instead != instead)  # NaN
            instead = None if missing else cell_text(instead, "instead", i, name)
            queries.append(Query(cell_text(rec.get(prompt_col), prompt_col, i, name),
                                 cell_text(rec.get(response_col), response_col, i, name) if response_col else "",
                                 label, None if flagged is None else bool(flagged), instead))
    except DataError as exc:
        raise QueryError(str(exc)) from None
    return queries


def write_queries(queries: list[Query], path: str | os.PathLike) -> None:
    from rept.store.index import atomic_write_bytes

    # `instead` only where a query has one: files written before it existed read the same
    body = "".join(json.dumps({k: v for k, v in asdict(q).items() if k != "instead" or v is not None}) + "\n"
                   for q in queries)
    atomic_write_bytes(Path(path), body.encode())


def traceable_queries(tokenizer, queries: list[Query], max_length: int) -> list[Query]:
    """The queries that keep a response token within max_length. One whose prompt fills it leaves
    no response token to take a loss on, so no method can trace it."""
    return [q for q in queries if tokenize_pair(tokenizer, q.prompt, q.response, max_length=max_length) is not None]


class Tracer:
    """Opens an index with the model it was built from and ranks training rows for queries."""

    def __init__(self, index: str | os.PathLike | SignatureIndex, loaded: LoadedModel | None = None,
                 device: str | None = None, batch_size: int = 16, verify: bool = True, mode: str | None = None,
                 search: str = "exact", nprobe: int | None = None):
        self.index = index if isinstance(index, SignatureIndex) else SignatureIndex(index, verify=verify)
        self.mode = self.index.search_mode(mode)  # the default scoring mode: `mode`, or the index's; checked now
        # top-k search: exact (every row scored, shard by shard) or a faiss index built over the stored
        # signatures on first use (flat: exact in faiss; ivf / ivfpq: approximate, see docs/performance.md)
        if search not in SEARCH_KINDS:
            raise QueryError(f"unknown search {search!r} (choose from {', '.join(SEARCH_KINDS)})")
        self.search_kind, self.nprobe, self._faiss = search, nprobe, {}
        m = self.index.manifest
        if loaded is None:
            loaded = load_model(m["model"]["id"], m.get("adapter"), dtype=m.get("compute_dtype", "float32"),
                                device=device)
        self.loaded = loaded
        self.index.check_model(ModelIdentity.of(loaded), {"model": loaded.model_id, "adapter": loaded.adapter})
        self.batch_size = batch_size

    method_name = None  # the baseline a method index holds (MethodTracer); None: RepT signatures

    @property
    def layer(self) -> int:
        return self.index.layer

    def query_signatures(self, queries: list[Query], token_level: bool = False) -> SignatureBatch:
        examples = []
        for i, q in enumerate(queries):
            # An empty response still has its end-of-sequence token(s) to trace ("the model said nothing").
            ex = tokenize_pair(self.loaded.tokenizer, q.prompt, q.response, row=i,
                               max_length=self.index.manifest["max_length"])
            if ex is None:
                raise QueryError(f"query {i + 1}: no response token left (empty response without an end token, "
                                 f"or cut off by max_length {self.index.manifest['max_length']})")
            examples.append(ex)
        return extract_all(self.loaded.model, examples, self.layer, self.loaded.tokenizer.pad_token_id,
                           batch_size=self.batch_size, token_level=token_level)

    def search(self, sig: SignatureBatch, k: int, mode: str | None = None) -> TopK:
        mode = self.search_mode(mode)

        def shards():  # one pass over the stored signatures in this mode (IVF training takes several)
            return ((signatures_of(s, mode), s.row.numpy()) for s in self.index.shards())

        if self.search_kind == "exact":
            return exact_topk(signatures_of(sig, mode), shards(), k)
        if mode not in self._faiss:  # built once per mode, held in memory (never written: rept reads no pickles)
            self._faiss[mode] = FaissIndex.build(shards, kind=self.search_kind, nprobe=self.nprobe)
        return self._faiss[mode].search(signatures_of(sig, mode), k, nprobe=self.nprobe)

    def scores(self, queries: list[Query], mode: str | None = None) -> tuple[np.ndarray, np.ndarray, list]:
        """Full score matrix [queries, stored rows], the row ids and labels of its columns."""
        mode = self.search_mode(mode)
        sig = self.query_signatures(queries)
        stored = self.index.load_all()
        return signatures_of(sig, mode) @ signatures_of(stored, mode).T, stored.row.numpy(), stored.labels

    def search_mode(self, mode: str | None = None) -> str:
        """The mode to score in: `mode`, or the tracer's default; raises when the index cannot do it."""
        return self.index.search_mode(mode or self.mode)

    def trace(self, queries: list[Query], k: int = 10, mode: str | None = None,
              with_text: bool = True) -> list[QueryResult]:
        mode = self.search_mode(mode)  # before any model work
        sig = self.query_signatures(queries)
        top = self.search(sig, k, mode)
        return _results(queries, top, self.index.labels(), self.index.dataset() if with_text else None)

    def generate(self, prompts: list[str], max_new_tokens: int = 64, progress: bool = False) -> list[str]:
        from rept.model.generate import generate

        return generate(self.loaded, prompts, max_new_tokens=max_new_tokens, batch_size=self.batch_size,
                        progress=progress)


def _results(queries: list[Query], top: TopK, labels: dict, data) -> list[QueryResult]:
    """Each query's top rows as hits, with their label and (when `data` is given) their text."""
    rows_by_index = {r.index: r for r in data.rows} if data else {}
    results = []
    for qi, q in enumerate(queries):
        hits = []
        for score, row in zip(top.scores[qi], top.rows[qi]):
            if row < 0:  # an approximate (IVF) search that found fewer than k rows pads with -1
                continue
            src = rows_by_index.get(int(row))
            hits.append(Hit(int(row), float(score), labels.get(int(row)),
                            src.prompt if src else "", src.response if src else ""))
        results.append(QueryResult(q, hits))
    return results


class MethodTracer:
    """Ranks training rows for queries with a baseline method's stored state (a method index,
    `rept index --method`): the method scores every stored row, and the top k are shown."""

    def __init__(self, index, model: str | None = None, adapter: str | None = None, device: str | None = None,
                 batch_size: int = 16, progress: bool = False, verify: bool = True):
        from rept.store.method_index import MethodIndex

        self.index = index if isinstance(index, MethodIndex) else MethodIndex(index, verify=verify)
        self.bundle = self.index.bundle(model, adapter, device=device, batch_size=batch_size, progress=progress)
        self.method = self.index.open_method(self.bundle)
        self.rows, self.labels = self.index.rows_and_labels()

    @staticmethod
    def error(index, flags: list[str]) -> QueryError:
        return QueryError(f"index {index.folder} holds {index.method_name} state, not RepT signatures: "
                          f"{', '.join(flags)} need{'s' if len(flags) == 1 else ''} a signature index "
                          "(`rept index` without --method)")

    @property
    def method_name(self) -> str:
        return self.method.name

    @property
    def layer(self) -> int | None:
        return self.index.manifest.get("layer")

    @property
    def loaded(self) -> LoadedModel:
        """The index's model (adapter merged), for generation and the behaviour measurements."""
        return self.bundle.merged()

    def search_mode(self, mode: str | None = None) -> None:
        if mode:
            raise self.error(self.index, ["--mode"])
        return None

    def scores(self, queries: list[Query], mode: str | None = None) -> tuple[np.ndarray, np.ndarray, list]:
        """Full score matrix [queries, stored rows], the row ids and labels of its columns."""
        self.search_mode(mode)
        return np.asarray(self.method.score(self.bundle, queries), dtype=np.float32), self.rows, self.labels

    def trace(self, queries: list[Query], k: int = 10, mode: str | None = None,
              with_text: bool = True) -> list[QueryResult]:
        scores, rows, labels = self.scores(queries, mode)
        top = TopK(*sort_topk(scores, np.broadcast_to(rows, scores.shape), k))  # ties: the lower row id first
        return _results(queries, top, dict(zip(rows.tolist(), labels)), self.index.dataset() if with_text else None)

    def generate(self, prompts: list[str], max_new_tokens: int = 64, progress: bool = False) -> list[str]:
        from rept.model.generate import generate

        return generate(self.loaded, prompts, max_new_tokens=max_new_tokens,
                        batch_size=self.bundle.batch_size, progress=progress)


def open_tracer(index: str | os.PathLike, model: str | None = None, adapter: str | None = None,
                dtype: str | None = None, device: str | None = None, verify: bool = True, progress: bool = False,
                mode: str | None = None, signature_flags: tuple[str, ...] = (), methods: bool = True,
                search: str = "exact", nprobe: int | None = None):
    """A tracer over any index: a Tracer over RepT signatures, or a MethodTracer over a baseline's
    stored state (`rept index --method`), with the index's own model or the one given (checked against
    the index). `signature_flags` names the options in use that need RepT signatures (e.g. "--tokens"):
    a method index refuses them in one line; with methods=False it is refused whatever is given (the
    caller needs signatures). Callers need not know which kind they opened."""
    from rept.store.method_index import MethodIndex, is_method_index

    if methods and is_method_index(index):
        store = MethodIndex(index, verify=verify)
        flags = (["--mode"] if mode else []) + list(signature_flags) + (["--dtype"] if dtype else []) \
            + (["--search"] if search != "exact" else [])
        if flags:
            raise MethodTracer.error(store, flags)
        return MethodTracer(store, model=model, adapter=adapter, device=device, progress=progress, verify=verify)
    store = SignatureIndex(index, verify=verify)
    store.search_mode(mode)  # a mode the index cannot score in fails before the model loads
    m = store.manifest
    loaded = load_model(model or m["model"]["id"], adapter or m.get("adapter"),
                        dtype=dtype or m.get("compute_dtype", "float32"), device=device)
    return Tracer(store, loaded, mode=mode, search=search, nprobe=nprobe)


def relevance(labels: list, queries: list[Query]) -> np.ndarray:
    """relevant[q, j]: training row j carries query q's label."""
    labels_arr = np.asarray([str(x) if x is not None else "\x00none" for x in labels])
    return np.stack([labels_arr == str(q.label) for q in queries])

