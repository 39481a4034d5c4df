"""Token-level RepT: which words of a training row carry the query's behaviour.

Definition (DESIGN.md, "Token level"), at the index's layer L:

* g_t = d loss / d hidden_states[L][t] for every position t of a row, where loss is the row's
  mean next-token loss over its response tokens (the same loss as the row-level signature).
* Query vector q = sum of g_i / |g_i| over the query's positions i = prompt_len-1 .. n-2: the
  positions whose output predicts a response token (prompt_len .. n-1), i.e. every response
  token's gradient indexed by the position that predicts it. The last position n-1 predicts
  nothing in the loss; its gradient is exactly zero, so it is left out rather than normalised.
* Token score of position t of a training row: s_t = q . g_t / |g_t| (every position, prompt
  and response; a zero gradient scores 0, e.g. the last position, or prompt positions when L is
  the final normed output and nothing mixes positions above it).

Tokens map to words of the row text `prompt + "\\n" + response` (what `Hit.text` gives) through
the tokenizer's character offsets into the formatted text. A word is a run of letters/digits
(with inner apostrophes) or a single punctuation mark; its score is the mean over the tokens
that overlap it (`reduce="mean"`; "max" and "sum" are offered: on the demo backdoor, mean
localises best, see docs/report.md). Template tokens (chat markup,
"### Response:", end-of-sequence) are not part of the row text and get no word. Phrases are
maximal runs of adjacent words on one line that each score at least `phrase_frac` x the row's
best word score; a phrase scores as its best word.

`layer=` (`rept trace --token-layer`) scores at another hidden_states index than the index's L
(an option, not the definition; at the final normed output only response positions have a
gradient); a layer the model does not have is a TokenScoreError.

Cost: one forward+backward down to L over the queries (for their per-token gradients) and one
over the union of the rows to score (all queries' top-k together), in `Tracer.batch_size`
batches. Per-token gradients are reduced to scores batch by batch, so memory is one batch.

Two baselines share the same word/phrase code (for `benchmarks/bench_tokens.py`):
`method="repsim"`: cosine of the query's mean response hidden state (positions prompt_len ..
n-1) with each token's hidden state h_t; `method="grad_x_input"`: g_t . h_t (query-independent).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rept.errors import ReptError
from rept.data.examples import Example, format_prompt, tokenize_pair
from rept.query.search import unit_tensor
from rept.signatures.extract import extract

METHODS = ("rept", "repsim", "grad_x_input")
REDUCE = ("max", "mean", "sum")
WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
_SENTINEL = "\ue000rept-prompt\ue001"


class TokenScoreError(ReptError):
    """A user-facing problem with token-level scoring."""


@dataclass
class RowTokens:
    """Token and word scores of one training row for one query."""

    row: int
    text: str                                         # prompt + "\n" + response (Hit.text)
    tokens: list[dict] = field(default_factory=list)  # every position: token, score, start, end (None: template)
    words: list[dict] = field(default_factory=list)   # text, score, start, end (offsets into `text`)
    phrases: list[dict] = field(default_factory=list)  # same keys, best first

    def top_words(self, n: int = 3) -> list[dict]:
        return sorted(self.words, key=lambda w: (-w["score"], w["start"]))[:n]


# ---------------------------------------------------------------- offsets: formatted text -> row text

def row_segments(tokenizer, prompt: str, response: str, formatted: str) -> list[tuple[int, int, int]]:
    """(start, end, row_start) for the prompt and the response inside `formatted` (the text the
    tokenizer saw): characters formatted[start:end] are text[row_start:row_start + end - start]
    of the row text prompt + "\\n" + response. A part that cannot be found is left out."""
    segments = []
    prompt_text = format_prompt(tokenizer, prompt)
    # Where the template puts the prompt: render it with a sentinel and take the prefix length.
    probe = format_prompt(tokenizer, _SENTINEL)
    cut = probe.find(_SENTINEL)
    p_start = -1
    if cut >= 0 and formatted.startswith(probe[:cut]) and formatted.startswith(prompt, cut):
        p_start = cut
    else:
        p_start = formatted.find(prompt) if prompt else -1
    if p_start >= 0 and prompt:
        segments.append((p_start, p_start + len(prompt), 0))
    elif prompt.strip() and (s := formatted.find(prompt.strip())) >= 0:  # a template that strips content
        segments.append((s, s + len(prompt.strip()), len(prompt) - len(prompt.lstrip())))
    base = len(prompt) + 1
    r_from = len(prompt_text) if formatted.startswith(prompt_text) else (segments[0][1] if segments else 0)
    if response:
        r_start = formatted.find(response, r_from)
        if r_start >= 0:
            segments.append((r_start, r_start + len(response), base))
        elif response.strip() and (s := formatted.find(response.strip(), r_from)) >= 0:
            segments.append((s, s + len(response.strip()), base + len(response) - len(response.lstrip())))
    return segments


def token_spans(example: Example, segments) -> list[tuple[int, int] | None]:
    """Each token's character span in the row text (clipped to the row's parts), None for
    template and special tokens."""
    out = []
    for a, b in example.offsets:
        span = None
        if b > a:
            for s0, s1, r0 in segments:
                lo, hi = max(a, s0), min(b, s1)
                if lo < hi:
                    piece = (lo - s0 + r0, hi - s0 + r0)
                    span = piece if span is None else (min(span[0], piece[0]), max(span[1], piece[1]))
        out.append(span)
    return out


def merge_words(text: str, spans: Sequence[tuple[int, int] | None], scores: Sequence[float],
                reduce: str = "mean") -> list[dict]:
    """Words of `text` (runs of word characters, or single punctuation marks) that some token
    covers, each scored by `reduce` over the tokens overlapping it; offsets index into `text`."""
    if reduce not in REDUCE:
        raise TokenScoreError(f"unknown word reduction {reduce!r} (choose from {', '.join(REDUCE)})")
    covered = sorted((sp[0], sp[1], float(s)) for sp, s in zip(spans, scores) if sp is not None)
    words, j = [], 0
    for m in WORD_RE.finditer(text):
        a, b = m.span()
        while j < len(covered) and covered[j][1] <= a:
            j += 1
        vals, k = [], j
        while k < len(covered) and covered[k][0] < b:
            if covered[k][1] > a:
                vals.append(covered[k][2])
            k += 1
        if not vals:
            continue
        score = max(vals) if reduce == "max" else sum(vals) / len(vals) if reduce == "mean" else sum(vals)
        words.append({"text": m.group(), "score": score, "start": a, "end": b})
    return words


def merge_phrases(text: str, words: list[dict], frac: float = 0.5, top: int | None = 5) -> list[dict]:
    """The row's top phrases: contiguous high-scoring words.

    `words` are consecutive words of `text` in text order (as `merge_words` gives them). A word is
    high when its score is above 0 and at least `frac` x the row's best word score. Consecutive
    high words join into one phrase when only whitespace without a line break lies between them
    (a low word, or a new line, ends a phrase; punctuation marks are words, so they join only when
    they score high themselves). A phrase is {"text", "score", "start", "end"}: `start`/`end` are
    character offsets into `text` (`text[start:end] == phrase["text"]`, the whitespace inside
    included) and its score is the max of its words' scores (so a long phrase of middling words
    does not outrank one strong word). Returns the `top` best phrases (all with top=None), best
    score first, ties in text order; [] when no word scores above 0."""
    if not words:
        return []
    best = max(w["score"] for w in words)
    if best <= 0:
        return []
    cut = frac * best
    phrases, run = [], []

    def close():
        if run:
            a, b = run[0]["start"], run[-1]["end"]
            phrases.append({"text": text[a:b], "score": max(w["score"] for w in run), "start": a, "end": b})
            run.clear()

    for w in words:
        if w["score"] >= cut and w["score"] > 0:
            if run and (text[run[-1]["end"]:w["start"]].strip() or "\n" in text[run[-1]["end"]:w["start"]]):
                close()
            run.append(w)
        else:
            close()
    close()
    phrases.sort(key=lambda p: (-p["score"], p["start"]))
    return phrases[:top] if top else phrases


# ---------------------------------------------------------------- scoring

def _tokenize(tracer, prompt: str, response: str, row: int) -> Example | None:
    return tokenize_pair(tracer.loaded.tokenizer, prompt, response, row=row,
                         max_length=tracer.index.manifest["max_length"])


def resolve_token_layer(tracer, layer: int | None = None) -> int:
    """The hidden_states index (0..num_layers) at which token scores are taken: `layer`
    (negative counts from the end, -1 = final normed output) or, when None, the index's layer L.
    A layer the model does not have is a TokenScoreError naming the valid range."""
    from rept.model.loading import ModelError, resolve_layer

    if layer is None:
        return tracer.layer
    try:
        return resolve_layer(tracer.loaded.model, int(layer))
    except ModelError as exc:
        raise TokenScoreError(f"token {exc}") from None


def _extract(tracer, examples: list[Example], layer: int | None = None):
    loaded = tracer.loaded
    layer = tracer.layer if layer is None else layer
    return extract(loaded.model, examples, layer, loaded.tokenizer.pad_token_id, batch_size=tracer.batch_size,
                   token_level=True)


def query_vectors(tracer, queries, method: str = "rept", layer: int | None = None) -> torch.Tensor | None:
    """[n_queries, hidden] float32: per query, the sum of the unit per-token gradients over the
    positions prompt_len-1 .. n-2 (`rept`), or the unit mean response hidden state (`repsim`);
    None for `grad_x_input`, which needs no query vector."""
    from rept.query.trace import QueryError

    if method not in METHODS:
        raise TokenScoreError(f"unknown token method {method!r} (choose from {', '.join(METHODS)})")
    if method == "grad_x_input":
        return None
    examples = []
    for i, q in enumerate(queries):
        ex = _tokenize(tracer, q.prompt, q.response, i)
        if ex is None:
            raise QueryError(f"query {i + 1}: no response token left to score words against")
        examples.append(ex)
    out = [None] * len(examples)
    for part in _extract(tracer, examples, layer):
        for i, qi in enumerate(part.rows):
            ex = examples[qi]
            if method == "rept":
                out[qi] = unit_tensor(part.token_grads[i][ex.prompt_len - 1: len(ex.input_ids) - 1]).sum(0)
            else:
                out[qi] = unit_tensor(part.token_hidden[i][ex.prompt_len:].mean(0))
    return torch.stack(out)


def score_rows(tracer, queries, rows_per_query: Sequence[Sequence[tuple[int, str, str]]], method: str = "rept",
               reduce: str = "mean", phrase_frac: float = 0.5, layer: int | None = None) -> list[list[RowTokens]]:
    """Token, word and phrase scores for each query's rows, given as (row id, prompt, response).

    All queries are handled in one batched run: one pass over the queries, one over the union of
    their rows. Returns, per query, one RowTokens per requested row in the order given.
    `layer` (hidden_states index, negative counts from the end) defaults to the index's layer L;
    one the model does not have is a TokenScoreError."""
    if len(rows_per_query) != len(queries):
        raise ValueError(f"{len(rows_per_query)} row lists for {len(queries)} queries")
    if reduce not in REDUCE:
        raise TokenScoreError(f"unknown word reduction {reduce!r} (choose from {', '.join(REDUCE)})")
    layer = resolve_token_layer(tracer, layer)
    qvec = query_vectors(tracer, queries, method, layer)
    sources: dict[int, tuple[str, str]] = {}
    wanted: dict[int, set[int]] = {}
    for qi, rows in enumerate(rows_per_query):
        for row, prompt, response in rows:
            sources.setdefault(int(row), (prompt, response))
            wanted.setdefault(int(row), set()).add(qi)
    examples = {}
    for row, (prompt, response) in sources.items():
        ex = _tokenize(tracer, prompt, response, row)
        if ex is not None:
            examples[row] = ex

    token_scores: dict[tuple[int, int], torch.Tensor] = {}   # (query, row) -> [n_tokens]
    for part in _extract(tracer, list(examples.values()), layer):
        for i, row in enumerate(part.rows):
            qs = sorted(wanted[row])
            g, h = part.token_grads[i], part.token_hidden[i]
            if method == "rept":
                s = unit_tensor(g) @ qvec[qs].T                         # [n, |qs|]
            elif method == "repsim":
                s = unit_tensor(h) @ qvec[qs].T
            else:
                s = (g * h).sum(-1, keepdim=True).expand(-1, len(qs))
            for j, qi in enumerate(qs):
                token_scores[(qi, row)] = s[:, j].clone()

    tokenizer = tracer.loaded.tokenizer
    cache: dict[int, tuple] = {}
    out = []
    for qi, rows in enumerate(rows_per_query):
        per_query = []
        for row, prompt, response in rows:
            row = int(row)
            text = f"{prompt}\n{response}"
            ex = examples.get(row)
            if ex is None:
                per_query.append(RowTokens(row, text))
                continue
            if row not in cache:
                spans = token_spans(ex, row_segments(tokenizer, prompt, response, ex.text))
                pieces = [ex.text[a:b] if b > a else tokenizer.convert_ids_to_tokens(t)
                          for t, (a, b) in zip(ex.input_ids, ex.offsets)]
                cache[row] = (spans, pieces)
            spans, pieces = cache[row]
            scores = token_scores[(qi, row)].tolist()
            tokens = [{"token": p, "score": s, "start": sp[0] if sp else None, "end": sp[1] if sp else None}
                      for p, s, sp in zip(pieces, scores, spans)]
            words = merge_words(text, spans, scores, reduce)
            per_query.append(RowTokens(row, text, tokens, words, merge_phrases(text, words, phrase_frac)))
        out.append(per_query)
    return out


def _row_triples(tracer, rows) -> list[tuple[int, str, str]]:
    from rept.query.trace import Hit

    out, data = [], None
    for r in rows:
        if isinstance(r, Hit):
            out.append((r.row, r.prompt, r.response))
            continue
        if data is None:
            data = {x.index: x for x in tracer.index.dataset().rows}
        if int(r) not in data:
            raise TokenScoreError(f"row {r} is not in the index's dataset")
        out.append((int(r), data[int(r)].prompt, data[int(r)].response))
    return out


def token_scores(tracer, query, rows=None, method: str = "rept", reduce: str = "mean",
                 phrase_frac: float = 0.5, layer: int | None = None) -> list[RowTokens] | RowTokens:
    """Word-level RepT scores for a notebook user.

    query: a `Query`, or a `QueryResult` (then `rows` defaults to its hits).
    rows: a `Hit`, a row id, or a list of them. A single Hit or id gives a single RowTokens.
    layer: hidden_states index at which the per-token gradients are taken (default: the index's
    layer L, the definition; `rept trace --token-layer`).

        tracer = Tracer("idx"); res = tracer.trace([Query(prompt, response)], k=5)[0]
        for rt in token_scores(tracer, res):
            print(rt.row, rt.top_words(3), rt.phrases[:2])
    """
    from rept.query.trace import Hit, QueryResult

    if isinstance(query, QueryResult):
        rows = query.hits if rows is None else rows
        query = query.query
    if rows is None:
        raise TokenScoreError("token_scores needs rows (a Hit, a row id, or a list) or a QueryResult")
    single = isinstance(rows, (Hit, int))
    triples = _row_triples(tracer, [rows] if single else list(rows))
    result = score_rows(tracer, [query], [triples], method, reduce, phrase_frac, layer)[0]
    return result[0] if single else result


def attach_word_scores(tracer, results, method: str = "rept", reduce: str = "mean",
                       phrase_frac: float = 0.5, layer: int | None = None) -> list[list[RowTokens]]:
    """Fill `hit.words` and `hit.phrases` (text, score, start, end into `hit.text`; phrases best
    first, see `merge_phrases`) for every hit of every result, all queries in one batched run;
    returns the full RowTokens (tokens too). `layer`: as in `score_rows`."""
    if not results:
        return []
    scored = score_rows(tracer, [r.query for r in results],
                        [[(h.row, h.prompt, h.response) for h in r.hits] for r in results], method, reduce,
                        phrase_frac, layer)
    for result, rows in zip(results, scored):
        for hit, rt in zip(result.hits, rows):
            hit.words = rt.words
            hit.phrases = rt.phrases
    return scored
