"""What the audit app does, without the web: one object over a tracer that the HTTP layer calls.

`AuditService` holds the index's tracer (its model loaded once), the queries file and the
mitigation results, and answers the app's questions: generate an answer, trace one
(prompt, response), list the queries with their top rows and metrics, group the culprit rows,
and write the culprits as JSONL for `rept mitigate --culprits FILE`.

One model call at a time: every call that touches the model (or the caches built from it) holds
`self.lock`, so concurrent requests queue instead of running the model in parallel. Requests
are checked before any work; a bad one raises `AppError` with the HTTP status to answer with.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from rept.errors import ReptError

MAX_PROMPT_CHARS = 8000       # longer prompts or responses are refused (413), before any model work
MAX_NEW_TOKENS = 512
MAX_GROUPS = 12
HIT_TEXT_CHARS = 200          # the queries view cuts each hit's prompt and response to this (full: /api/rows/N)


class AppError(ReptError):
    """A request the app refuses; `status` is the HTTP status to answer with (4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class QueryView:
    """One query of the queries file with its scores over every stored row (cached per mode)."""
    n: int
    prompt: str
    response: str
    label: str | None
    flagged: bool | None


def _check_text(name: str, text, allow_empty: bool = False) -> str:
    if not isinstance(text, str):
        raise AppError(f"{name} must be a string")
    if not allow_empty and not text.strip():
        raise AppError(f"{name} is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise AppError(f"{name} is {len(text)} characters; the app takes at most {MAX_PROMPT_CHARS}", 413)
    return text


class AuditService:
    """The app's state: a Tracer (RepT index) or MethodTracer (a baseline's index), the queries,
    the mitigation results; caches of the stored signatures and of the queries' scores per mode."""

    def __init__(self, tracer, queries=None, mitigations=(), max_queries: int | None = None, correction=None,
                 correction_folder: str | None = None, base_model: str | None = None):
        from rept.report import load_mitigation, mitigation_section

        self.tracer = tracer
        # rept.repair.correct.Correction (checked against the tracer's model by the caller): answers are
        # generated with it unless a request asks for the model as it is; traces never use it
        self.correction, self.correction_folder = correction, correction_folder
        # --against-base traces on the model before the fine-tune: `base_model`, or the index's model
        # with its adapter off; loaded on the first such trace (rept.query.contrast)
        self.base_model, self._contrast = base_model, None
        self.lock = threading.Lock()
        self.is_rept = tracer.method_name is None  # RepT signatures: word scores, modes, signature groups
        self.mitigations = [mitigation_section(load_mitigation(p)) for p in mitigations]
        queries = list(queries or [])[:max_queries] if max_queries else list(queries or [])
        self.queries = [QueryView(i, q.prompt, q.response, q.label, q.flagged) for i, q in enumerate(queries)]
        self._stored: dict[str, np.ndarray] = {}        # mode -> unit signatures of every stored row
        self._query_scores: dict[str, np.ndarray] = {}  # mode -> [queries, rows] scores
        self._cache: dict[tuple, object] = {}           # groups, and the queries' metrics and rankings, per mode
        if self.is_rept:
            stored = tracer.index.load_all()
            self._shard = stored
            self.rows = stored.row.numpy()
            self.labels = list(stored.labels)
        else:
            self.rows, self.labels = np.asarray(tracer.rows), list(tracer.labels)
        if not len(self.rows):
            raise AppError(f"index {tracer.index.folder} holds no rows", 400)
        self.column = {int(r): j for j, r in enumerate(self.rows.tolist())}
        self.data = {r.index: r for r in tracer.index.dataset().rows}

    # ------------------------------------------------------------ settings and checks

    @property
    def modes(self) -> list[str]:
        """The scoring modes this index can be searched in (none for a method index)."""
        if not self.is_rept:
            return []
        from rept.query.search import MODES

        out = []
        for mode in MODES:
            try:
                self.tracer.search_mode(mode)
                out.append(mode)
            except ReptError:
                pass
        return out

    def mode(self, mode: str | None) -> str | None:
        """The mode to score in (the index's default when None); a bad mode is a 400 naming the choices."""
        if not self.is_rept:
            if mode:
                raise AppError(f"this index holds {self.tracer.method_name} state: it has no scoring modes")
            return None
        if mode is not None and mode not in self.modes:
            raise AppError(f"unknown mode {mode!r} for this index (choose from {', '.join(self.modes)})")
        return self.tracer.search_mode(mode)

    def k(self, k) -> int:
        n = len(self.rows)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise AppError(f"k must be an integer from 1 to {n} (the rows in the index), not {k!r}")
        return k

    def row(self, row) -> dict:
        if isinstance(row, bool) or not isinstance(row, int) or row not in self.column or row not in self.data:
            raise AppError(f"unknown row {row!r}: not a row of this index", 404)
        r = self.data[row]
        return {"row": row, "label": r.label, "prompt": r.prompt, "response": r.response}

    def info(self) -> dict:
        m = self.tracer.index.manifest
        labels = Counter(str(x) for x in self.labels)
        return {"index": str(self.tracer.index.folder), "model": m.get("model", {}).get("id"),
                "adapter": m.get("adapter"), "kind": "rept" if self.is_rept else self.tracer.method_name,
                "layer": self.tracer.layer, "mode": self.mode(None), "modes": self.modes, "rows": len(self.rows),
                "labels": dict(labels.most_common()), "queries": len(self.queries),
                "flagged": sum(q.flagged is not False for q in self.queries),
                "word_scores": self.is_rept, "mitigations": len(self.mitigations),
                "max_prompt_chars": MAX_PROMPT_CHARS, "correction": self._correction_info(),
                "against_base": self.is_rept and bool(self.base_model or m.get("adapter")),
                "version": __import__("rept").__version__}

    def _correction_info(self) -> dict | None:
        c = self.correction
        if c is None:
            return None
        return {"folder": self.correction_folder, "source": c.source, "layer": c.layer, "strength": c.strength}

    def _use_correction(self, corrected: bool | None):
        """The correction a generation runs with: the loaded one unless `corrected` is False."""
        if corrected is None:
            corrected = self.correction is not None
        if corrected and self.correction is None:
            raise AppError("no correction is loaded (start the app with rept serve --correction DIR)")
        return self.correction if corrected else None

    # ------------------------------------------------------------ the model

    def generate(self, prompt: str, max_new_tokens: int = 64, corrected: bool | None = None) -> str:
        """The model's greedy answer; with the loaded correction applied unless `corrected` is False."""
        from rept.repair.correct import corrected as applied

        _check_text("prompt", prompt)
        self._check_new_tokens(max_new_tokens)
        correction = self._use_correction(corrected)
        with self.lock, applied(self.tracer.loaded.model, correction):
            return self.tracer.generate([prompt], max_new_tokens=max_new_tokens)[0]

    def _check_new_tokens(self, n) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS:
            raise AppError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS}, not {n!r}")

    def generate_stream(self, prompt: str, max_new_tokens: int = 64, corrected: bool | None = None):
        """Check the request, then start generating; returns an iterator of ("text", answer so far)
        pairs and a last ("done", answer) with the answer `rept.model.generate` gives (greedy, one prompt).
        The model runs in a worker thread that holds the lock until the answer is complete, so a
        client that goes away mid-answer never leaves the lock taken."""
        import torch
        from transformers import TextIteratorStreamer

        from rept.repair.correct import corrected as applied
        from rept.data.examples import uses_template, format_prompt
        from rept.model.generate import decode_answer

        _check_text("prompt", prompt)
        self._check_new_tokens(max_new_tokens)
        correction = self._use_correction(corrected)
        loaded = self.tracer.loaded
        tok = loaded.tokenizer
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        out: dict = {}

        def run():
            try:
                with self.lock, torch.no_grad(), applied(loaded.model, correction):
                    enc = tok([format_prompt(tok, prompt)], return_tensors="pt",
                              add_special_tokens=not uses_template(tok)).to(loaded.device)
                    ids = loaded.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                                streamer=streamer)
                    out["answer"] = decode_answer(tok, ids[0, enc["input_ids"].shape[1]:].tolist())
            except Exception as exc:  # surfaced to the reader, after the streamer is ended
                out["error"] = exc
                streamer.end()

        worker = threading.Thread(target=run, daemon=True, name="rept-generate")
        worker.start()

        def pieces():
            text = ""
            for piece in streamer:
                text += piece
                if piece:
                    yield ("text", text)
            worker.join()
            if "error" in out:
                yield ("error", f"generation failed: {out['error']}")
            else:
                yield ("done", out["answer"])
        return pieces()

    def _stored_signatures(self, mode: str) -> np.ndarray:
        from rept.query.search import signatures_of

        if mode not in self._stored:
            self._stored[mode] = signatures_of(self._shard, mode)
        return self._stored[mode]

    def _scores(self, queries, mode: str | None) -> np.ndarray:
        """[queries, stored rows] scores, columns in `self.rows` order. Caller holds the lock."""
        from rept.query.search import signatures_of
        from rept.query.trace import QueryError

        try:
            if not self.is_rept:
                return self.tracer.scores(queries)[0]
            sig = self.tracer.query_signatures(queries)
            return signatures_of(sig, mode) @ self._stored_signatures(mode).T
        except QueryError as exc:
            raise AppError(str(exc), 422) from None

    def _top(self, scores: np.ndarray, k: int) -> np.ndarray:
        """Column indices of the k best rows: score descending, then the lower row id (as `rept trace`)."""
        return np.lexsort((self.rows, -scores))[:k]

    def _hit(self, j: int, score: float, query_label=None, clip: int | None = None) -> dict:
        """Column j as a hit; `clip` cuts its prompt and response to that many characters (lists)."""
        row = int(self.rows[j])
        r = self.data.get(row)
        prompt, response = (r.prompt, r.response) if r else ("", "")
        return {"row": row, "score": float(score), "label": self.labels[j],
                "relevant": query_label is not None and str(self.labels[j]) == str(query_label),
                "prompt": prompt[:clip], "response": response[:clip]}

    def trace(self, prompt: str, response: str, k: int = 10, mode: str | None = None, words: bool = True,
              label: str | None = None) -> dict:
        """The top k rows for one (prompt, response): score, label, text, word heat map and top phrases
        (RepT index), and the score distribution over every row."""
        from rept.report import histogram_svg
        from rept.query.trace import Query

        _check_text("prompt", prompt)
        _check_text("response", response, allow_empty=True)
        k, mode = self.k(k), self.mode(mode)
        t0 = time.perf_counter()
        query = Query(prompt, response, label)
        with self.lock:
            scores = self._scores([query], mode)[0]
            top = self._top(scores, k)
            hits = [self._hit(j, scores[j], label) for j in top]
            t1 = time.perf_counter()
            scale = self._attach_words(query, hits) if words and self.is_rept else 0.0
        t2 = time.perf_counter()
        relevant = None
        if label is not None:
            relevant = np.asarray([str(x) == str(label) for x in self.labels])
        counts, edges = np.histogram(scores, bins=40)
        return {"prompt": prompt, "response": response, "mode": mode, "k": k, "rows": len(self.rows),
                "hits": hits, "word_scale": scale,
                "histogram": {"counts": counts.tolist(), "edges": edges.tolist(),
                              "svg": str(histogram_svg(scores, relevant, float(scores[top[-1]]), k))},
                "seconds": {"rows": t1 - t0, "words": t2 - t1}}

    def trace_against_base(self, prompt: str, response: str, k: int = 10, label: str | None = None,
                           min_gain: float | None = None, guess_weight: float | None = None,
                           context: bool | None = None) -> dict:
        """`trace`'s answer for `rept trace --against-base --candidates 0 --tokens`: the answer against
        the base model's guess at the word the fine-tune planted, every row scored on the base model
        (signed), the default settings (`min_gain`: another gate, in nats; `guess_weight`: as
        `--guess-weight`; `context`: False for `--no-context`). Only rows that pushed towards the
        answer are shown (perhaps fewer than k; none when it is not traced); `against_base` says what
        it was traced against, or why not; the histogram is of the signed score over every row (none
        when not traced)."""
        from rept.query.contrast import ContrastTracer, check_weight, open_base
        from rept.query.trace import Query
        from rept.report import heat_html, histogram_svg

        _check_text("prompt", prompt)
        _check_text("response", response, allow_empty=True)
        k = self.k(k)
        if min_gain is not None and (isinstance(min_gain, bool) or not isinstance(min_gain, (int, float))
                                     or not np.isfinite(min_gain)):
            raise AppError(f"min_gain must be a number of nats, not {min_gain!r}")
        if guess_weight is not None:
            try:
                check_weight(guess_weight)
            except ReptError:
                raise AppError(f"guess_weight must be a number of 0 or more, not {guess_weight!r}") from None
        if not self.is_rept:
            raise AppError(f"--against-base reads the training rows of a RepT index; this index holds "
                           f"{self.tracer.method_name} state")
        t0 = time.perf_counter()
        with self.lock:
            try:
                if self._contrast is None:
                    self._contrast = ContrastTracer(self.tracer, open_base(self.tracer, self.base_model),
                                                    candidates=None)
                given = {key: float(v) for key, v in {"min_gain": min_gain, "weight": guess_weight}.items()
                         if v is not None}
                if context is not None:
                    given["context"] = bool(context)
                run = self._contrast.against_base([Query(prompt, response, label)], **given)
                (result,) = run.results(k, tokens=True)
            except ReptError as exc:  # no base model (an index without an adapter), an answer it cannot take
                raise AppError(str(exc), 422) from None
        (traced,) = run.traced()
        changed = run.changed[0]
        if not changed:
            note = "not traced: the base model predicts every token of this answer"
        elif not traced:
            note = (f"not traced: the word the fine-tune changed most, {changed[0].word!r}, is only "
                    f"{changed[0].gain:.1f} nats more likely than on the base model (the gate: {run.setting[1]:g}): "
                    "a change of wording")
        else:
            said, other = run.contrast(0, traced[0]).words
            note = f"{said!r} against the base model's {other!r} ({changed[traced[0]].gain:+.1f} nats on the fine-tuned model)"
        hits, scale = [], max([0.0] + [abs(w["score"]) for h in result.hits for w in h.words]) or 1.0
        for h in result.hits:
            hit = self._hit(self.column[h.row], h.score, label)
            hit["words"], hit["phrases"] = h.words, h.phrases[:3]
            hit["heat_html"] = str(heat_html(h.text, h.words, h.phrases[:3]))
            hits.append(hit)
        histogram = None
        signed = run.best_scores()
        if signed:
            scores = np.array([signed.get((0, int(r)), 0.0) for r in self.rows])
            relevant = np.asarray([str(x) == str(label) for x in self.labels]) if label is not None else None
            counts, edges = np.histogram(scores, bins=40)
            kth = hits[-1]["score"] if hits else float(scores.max())
            histogram = {"counts": counts.tolist(), "edges": edges.tolist(),
                         "svg": str(histogram_svg(scores, relevant, kth, len(hits)))}
        return {"prompt": prompt, "response": response, "mode": None, "k": k, "rows": len(self.rows),
                "hits": hits, "word_scale": scale, "histogram": histogram,
                "against_base": {"traced": bool(traced), "note": note, "guess_weight": run.weight,
                                 "context": run.context,
                                 "words": [{"word": changed[j].word, "gain": changed[j].gain,
                                            "instead": changed[j].instead} for j in traced]},
                "seconds": {"rows": time.perf_counter() - t0, "words": 0.0}}

    def _attach_words(self, query, hits: list[dict]) -> float:
        """Fill each hit's words, top phrases and heat-map HTML (`rept.signatures.tokens`, `rept.report.heat_html`),
        coloured as the report colours them (above each row's upper quartile); returns the largest
        |word score|. Caller holds the lock."""
        from rept.report import heat_html
        from rept.signatures.tokens import attach_word_scores
        from rept.query.trace import Hit, QueryResult

        result = QueryResult(query, [Hit(h["row"], h["score"], h["label"], h["prompt"], h["response"]) for h in hits])
        attach_word_scores(self.tracer, [result])
        scale = max([0.0] + [abs(w["score"]) for h in result.hits for w in h.words]) or 1.0
        for h, scored in zip(hits, result.hits):
            h["words"], h["phrases"] = scored.words, scored.phrases[:3]
            h["heat_html"] = str(heat_html(scored.text, scored.words, scored.phrases[:3]))
        return scale

    def words(self, prompt: str, response: str, rows) -> dict:
        """Word scores of the given rows for one (prompt, response): what the page asks for after a
        trace has shown the rows, so the rows appear before their heat maps."""
        from rept.query.trace import Query

        _check_text("prompt", prompt)
        _check_text("response", response, allow_empty=True)
        if not self.is_rept:
            raise AppError(f"word scores need RepT signatures; this index holds {self.tracer.method_name} state")
        if not isinstance(rows, list) or not rows or len(rows) > len(self.rows):
            raise AppError(f"rows must be a list of 1 to {len(self.rows)} row ids")
        hits = []
        for row in rows:
            self.row(row)  # unknown rows: 404
            hits.append(self._hit(self.column[row], 0.0))
        t0 = time.perf_counter()
        with self.lock:
            try:
                scale = self._attach_words(Query(prompt, response), hits)
            except ReptError as exc:
                raise AppError(str(exc), 422) from None
        return {"word_scale": scale, "seconds": time.perf_counter() - t0,
                "rows": [{k: h[k] for k in ("row", "words", "phrases", "heat_html")} for h in hits]}

    # ------------------------------------------------------------ the queries file

    def _query_matrix(self, mode: str | None) -> np.ndarray:
        """Every query's scores over every row (computed once per mode). Caller holds the lock."""
        from rept.query.trace import Query

        key = mode or ""
        if key not in self._query_scores:
            self._query_scores[key] = self._scores([Query(q.prompt, q.response, q.label) for q in self.queries],
                                                   mode)
        return self._query_scores[key]

    def _need_queries(self) -> None:
        if not self.queries:
            raise AppError("no queries file: start the app with `rept serve --queries FILE`", 404)

    def queries_view(self, k: int = 10, mode: str | None = None, label: str | None = None, search: str | None = None,
                     sort: str = "flagged", metric_k: int = 10) -> dict:
        """Every query with its top k rows and, for labelled queries, its P@metric_k and AP;
        flagged first (sort="flagged") or the lowest P@k first (sort="worst"); filtered by the
        query's label and a case-insensitive text search over prompt and response."""
        from rept.evaluate.metrics import average_precision_per_query, precision_at_k_per_query
        from rept.query.trace import relevance

        self._need_queries()
        k, mode = self.k(k), self.mode(mode)
        metric_k = min(metric_k, len(self.rows))
        if sort not in ("flagged", "worst", "order"):
            raise AppError(f"unknown sort {sort!r} (choose from flagged, worst, order)")
        with self.lock:
            scores = self._query_matrix(mode)
            key = ("metrics", mode, metric_k)
            if key not in self._cache:  # per-query metrics and rankings: once per mode
                labelled = [i for i, q in enumerate(self.queries) if q.label is not None]
                p_at, ap = {}, {}
                if labelled:
                    from rept.query.trace import Query

                    rel = relevance(self.labels, [Query(self.queries[i].prompt, "", self.queries[i].label)
                                                  for i in labelled])
                    for i, p, a in zip(labelled, precision_at_k_per_query(scores[labelled], rel, metric_k),
                                       average_precision_per_query(scores[labelled], rel)):
                        p_at[i], ap[i] = float(p), None if a is None else float(a)
                order = np.lexsort((np.broadcast_to(self.rows, scores.shape), -scores), axis=1)
                self._cache[key] = (p_at, ap, order)
            p_at, ap, order = self._cache[key]
        out = []
        needle = (search or "").strip().lower()
        for q in self.queries:
            if label is not None and str(q.label) != label:
                continue
            if needle and needle not in q.prompt.lower() and needle not in q.response.lower():
                continue
            out.append({"n": q.n, "prompt": q.prompt, "response": q.response, "label": q.label,
                        "flagged": q.flagged, "precision": p_at.get(q.n), "ap": ap.get(q.n),
                        "hits": [self._hit(j, scores[q.n, j], q.label, clip=HIT_TEXT_CHARS)
                                 for j in order[q.n, :k]]})
        if sort == "flagged":
            out.sort(key=lambda q: (q["flagged"] is False, q["n"]))
        elif sort == "worst":
            out.sort(key=lambda q: (q["precision"] is None, q["precision"] or 0.0,
                                    -1.0 if q["ap"] is None else q["ap"], q["n"]))
        labels = sorted({str(q.label) for q in self.queries if q.label is not None})
        return {"mode": mode, "k": k, "metric_k": metric_k, "total": len(self.queries), "labels": labels,
                "queries": out}

    # ------------------------------------------------------------ groups

    def groups(self, k: int = 10, mode: str | None = None, n_groups: int | None = None, examples: int = 5) -> dict:
        """The flagged queries' culprit rows (the union of their top k) clustered into a few groups:
        by their unit signatures (RepT index) or, for a method index, by their score profiles over
        the flagged queries. Each group: size, label counts, most common top phrases, example rows."""
        from sklearn.cluster import KMeans

        self._need_queries()
        k, mode = self.k(k), self.mode(mode)
        if n_groups is not None and (isinstance(n_groups, bool) or not isinstance(n_groups, int)
                                     or not 1 <= n_groups <= MAX_GROUPS):
            raise AppError(f"n_groups must be an integer from 1 to {MAX_GROUPS}, not {n_groups!r}")
        key = (k, mode, n_groups)
        with self.lock:
            if key in self._cache:
                return self._cache[key]
            scores = self._query_matrix(mode)
            flagged = [q.n for q in self.queries if q.flagged is not False]
            if not flagged:
                raise AppError("no flagged query (every query has flagged=false): nothing to group", 404)
            sub = scores[flagged]
            tops = {qi: self._top(scores[qi], k) for qi in flagged}
            columns = sorted({int(j) for t in tops.values() for j in t})
            best_query = {j: max(flagged, key=lambda qi: scores[qi, j]) for j in columns}
            if self.is_rept:
                features = self._stored_signatures(mode)[columns]
                basis = f"their {mode} signatures"
            else:  # a baseline's index has no signatures: a row's scores over the flagged queries
                prof = sub[:, columns].T.astype(np.float64)
                prof = prof - prof.mean(1, keepdims=True)
                features = prof / np.maximum(np.linalg.norm(prof, axis=1, keepdims=True), 1e-12)
                basis = f"their {self.tracer.method_name} scores over the flagged queries"
            n = n_groups or max(1, min(6, round(len(columns) ** 0.5 / 1.5)))
            n = min(n, len(columns))
            assign = KMeans(n_clusters=n, n_init=10, random_state=0).fit_predict(features) if n > 1 \
                else np.zeros(len(columns), dtype=int)
            phrases = self._group_phrases(columns, best_query) if self.is_rept else {}
            groups = []
            for g in range(n):
                members = [j for j, a in zip(columns, assign) if a == g]
                if not members:
                    continue
                members.sort(key=lambda j: -float(scores[best_query[j], j]))
                hits = sum(int(j in set(t.tolist())) for t in tops.values() for j in members)
                common = Counter(p for j in members for p in phrases.get(j, []))
                rows = [self._hit(j, scores[best_query[j], j]) | {"query": best_query[j]} for j in members]
                groups.append({"size": len(members), "labels": dict(Counter(str(self.labels[j]) for j in members)
                                                                    .most_common()),
                               "phrases": [{"text": t, "rows": c} for t, c in common.most_common(5)],
                               "top_hits": hits, "rows": rows, "examples": rows[:examples]})
            groups.sort(key=lambda g: -g["size"])
            for i, g in enumerate(groups):
                g["id"] = i
            result = {"mode": mode, "k": k, "flagged": len(flagged), "rows": len(columns), "basis": basis,
                      "groups": groups}
            self._cache[key] = result
            return result

    def _group_phrases(self, columns, best_query) -> dict[int, list[str]]:
        """Each culprit row's top phrases (lower-cased) for the flagged query it scores highest on.
        Caller holds the lock."""
        from rept.signatures.tokens import score_rows
        from rept.query.trace import Query

        by_query: dict[int, list[int]] = {}
        for j in columns:
            by_query.setdefault(best_query[j], []).append(j)
        qids = sorted(by_query)
        queries = [Query(self.queries[i].prompt, self.queries[i].response) for i in qids]
        triples = [[(int(self.rows[j]), self.data[int(self.rows[j])].prompt, self.data[int(self.rows[j])].response)
                    for j in by_query[i]] for i in qids]
        out = {}
        for i, per_query in zip(qids, score_rows(self.tracer, queries, triples)):
            for j, rt in zip(by_query[i], per_query):
                out[j] = list(dict.fromkeys(p["text"].lower() for p in rt.phrases[:3]))
        return out

    # ------------------------------------------------------------ export

    def export(self, items) -> str:
        """JSONL of the marked rows, one object per line with row, score, label, prompt and response
        (the format of `rept mitigate`'s culprits.jsonl, which `--culprits FILE` reads), strongest first.
        `items`: row ids, or {"row": id, "score": s} objects (score optional: null when not given)."""
        if not isinstance(items, list) or not items:
            raise AppError("no rows to export: mark at least one row")
        picked: dict[int, float | None] = {}
        for item in items:
            row, score = (item.get("row"), item.get("score")) if isinstance(item, dict) else (item, None)
            self.row(row)  # unknown rows: 404
            if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                                      or not np.isfinite(score)):
                raise AppError(f"row {row}: score must be a finite number, not {score!r}")
            old = picked.get(row)
            picked[row] = score if old is None else (old if score is None else max(old, score))
        order = sorted(picked, key=lambda r: (picked[r] is None, -(picked[r] or 0.0), r))
        lines = []
        for row in order:
            r = self.data[row]
            score = picked[row]
            lines.append(json.dumps({"row": row, "score": None if score is None else float(score), "label": r.label,
                                     "prompt": r.prompt, "response": r.response}))
        return "\n".join(lines) + "\n"
