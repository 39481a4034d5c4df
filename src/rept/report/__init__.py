"""`rept report`: one self-contained HTML audit report (inline CSS and SVG, no script, no network).

Per query: the prompt and response, the top-k training rows with a word heat map (RepT token
scores, `rept.tokens`), their score and label, and a histogram of the query's score over every
training row. For the run: the layer curve that chose L (when the layer was auto), the label
breakdown of the top-k, and retrieval metrics when queries carry labels.

    from rept.report import build_report, render_html
    data = build_report(Tracer("idx"), load_queries("queries.jsonl"), k=10)
    Path("report.html").write_text(render_html(data))
"""

from __future__ import annotations

import datetime as _dt
import html
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from markupsafe import Markup

from rept.errors import ReptError

TEMPLATES = Path(__file__).parent / "templates"
POS = (214, 69, 13)    # colour of positive word scores (orange-red)
NEG = (44, 110, 180)   # colour of negative word scores (blue)


class ReportError(ReptError):
    """A user-facing problem building a report."""


@dataclass
class ReportData:
    title: str
    run: dict                                  # index, model, layer, mode, rows, k, timings ...
    queries: list[dict] = field(default_factory=list)
    layer_svg: Markup | None = None
    layer_reason: str | None = None
    labels: list[dict] = field(default_factory=list)   # label breakdown of the pooled top-k
    metrics: dict | None = None
    metric_ks: list[int] = field(default_factory=list)


# ---------------------------------------------------------------- scoring

def all_scores(tracer, queries, mode: str) -> tuple[np.ndarray, np.ndarray, list]:
    """[n_queries, n_rows] scores of every stored row, the rows' ids and labels, streamed shard by
    shard (only the score matrix is held, never all signatures)."""
    from rept.search import signature_matrix

    sig = tracer.query_signatures(queries)
    q = signature_matrix(sig.h, sig.g, mode)
    parts, rows, labels = [], [], []
    for shard in tracer.index.shards():
        if not shard.row.numel():
            continue
        parts.append(q @ signature_matrix(shard.h, shard.g, mode).T)
        rows.append(shard.row.numpy())
        labels.extend(shard.labels)
    if not parts:
        raise ReportError(f"index {tracer.index.folder} holds no rows")
    return np.concatenate(parts, 1), np.concatenate(rows), labels


def top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each query's k best rows: score descending, then lower row id (as `rept trace`)."""
    return np.stack([np.lexsort((rows, -s))[:k] for s in scores])


def build_report(tracer, queries, k: int = 10, mode: str | None = None, max_queries: int | None = None,
                 title: str | None = None, log=None, token_layer: int | None = None) -> ReportData:
    """Everything the report shows. Queries with flagged=False (controls) are left out."""
    from rept.metrics import evaluate
    from rept.tokens import attach_word_scores
    from rept.trace import Hit, QueryResult, relevance

    queries = [q for q in queries if q.flagged is not False]
    if not queries:
        raise ReportError("no query to report on (every query has flagged=false)")
    if max_queries:
        queries = queries[:max_queries]
    mode = mode or tracer.index.manifest["mode"]
    m = tracer.index.manifest
    log = log or (lambda msg: None)

    t0 = time.perf_counter()
    scores, rows, labels = all_scores(tracer, queries, mode)
    k = min(k, scores.shape[1])
    top = top_k(scores, rows, k)
    data = tracer.index.dataset()
    by_index = {r.index: r for r in data.rows}
    results = []
    for qi, q in enumerate(queries):
        hits = []
        for j in top[qi]:
            src = by_index.get(int(rows[j]))
            hits.append(Hit(int(rows[j]), float(scores[qi, j]), labels[j], src.prompt if src else "",
                            src.response if src else ""))
        results.append(QueryResult(q, hits))
    t1 = time.perf_counter()
    log(f"scored {len(queries)} queries against {scores.shape[1]} rows in {t1 - t0:.1f} s")
    scored = attach_word_scores(tracer, results, layer=token_layer)
    t2 = time.perf_counter()
    log(f"token scores for {sum(len(r.hits) for r in results)} rows in {t2 - t1:.1f} s")

    scale = 0.0
    for per_query in scored:
        for rt in per_query:
            scale = max([scale] + [abs(w["score"]) for w in rt.words])
    label_arr = np.asarray([str(x) for x in labels])
    qdicts = []
    for qi, (result, per_query) in enumerate(zip(results, scored)):
        q = result.query
        relevant = label_arr == str(q.label) if q.label is not None else None
        qscale = max([0.0] + [abs(w["score"]) for rt in per_query for w in rt.words]) or scale or 1.0
        hits = []
        for rank, (hit, rt) in enumerate(zip(result.hits, per_query), 1):
            hits.append({"rank": rank, "row": hit.row, "score": hit.score, "label": hit.label,
                         "relevant": q.label is not None and str(hit.label) == str(q.label),
                         "heat": heat_html(rt.text, rt.words, rt.phrases[:3], qscale),
                         "phrases": rt.phrases[:3], "n_words": len(rt.words)})
        qdicts.append({"n": qi + 1, "prompt": q.prompt, "response": q.response, "label": q.label,
                       "hits": hits, "scale": qscale,
                       "hist": histogram_svg(scores[qi], relevant, float(scores[qi, top[qi][-1]]), k),
                       "n_relevant_top": sum(h["relevant"] for h in hits)})

    counts = Counter(str(h.label) for r in results for h in r.hits)
    total = sum(counts.values())
    label_rows = [{"label": lab, "count": c, "share": c / total} for lab, c in counts.most_common()]

    labelled = [i for i, q in enumerate(queries) if q.label is not None]
    metrics, ks = None, []
    if labelled:
        lq = [queries[i] for i in labelled]
        ks = sorted({k} | {x for x in (10, 50, 100) if x <= scores.shape[1]})
        metrics = evaluate(scores[labelled], relevance(labels, lq), ks=tuple(ks))

    curve = m.get("layer_curve")
    run = {"index": str(tracer.index.folder), "model": m["model"]["id"], "adapter": m.get("adapter"),
           "layer": tracer.layer, "token_layer": tracer.layer if token_layer is None else token_layer,
           "mode": mode, "rows": int(scores.shape[1]), "k": k, "n_queries": len(queries),
           "dataset": m.get("dataset", {}).get("source"), "seconds_rows": t1 - t0, "seconds_tokens": t2 - t1,
           "created": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "version": __import__("rept").__version__}
    return ReportData(title or f"rept audit report - {len(queries)} quer{'y' if len(queries) == 1 else 'ies'}",
                      run, qdicts, layer_curve_svg(curve) if curve else None,
                      curve.get("reason") if curve else None, label_rows, metrics, ks)


# ---------------------------------------------------------------- HTML pieces

def word_colour(score: float, scale: float) -> str:
    a = min(1.0, abs(score) / scale) if scale > 0 else 0.0
    r, g, b = POS if score >= 0 else NEG
    return f"rgba({r},{g},{b},{0.08 + 0.72 * a:.2f})" if a > 0.02 else "transparent"


def heat_html(text: str, words: list[dict], phrases: list[dict], scale: float) -> Markup:
    """`text` with every scored word in a coloured <span class="w"> (title = its score) and the top
    phrases wrapped in <mark class="phrase">; whitespace kept (rendered with pre-wrap)."""
    marks = sorted(phrases, key=lambda p: p["start"])
    starts = {p["start"]: (i, p) for i, p in enumerate(marks)}
    ends = {p["end"] for p in marks}
    out, pos = [], 0
    by_start = sorted(words, key=lambda w: w["start"])
    open_phrase = None

    for w in by_start:
        if w["start"] > pos:
            out.append(html.escape(text[pos:w["start"]]))  # gaps between words: plain text
        if w["start"] in starts and open_phrase is None:
            _, p = starts[w["start"]]
            out.append(f'<mark class="phrase" title="phrase score {p["score"]:.3f}">')
            open_phrase = p
        colour = word_colour(w["score"], scale)
        out.append(f'<span class="w" style="background:{colour}" title="{w["score"]:.3f}">'
                   f'{html.escape(w["text"])}</span>')
        pos = w["end"]
        if open_phrase is not None and w["end"] in ends and w["end"] == open_phrase["end"]:
            out.append("</mark>")
            open_phrase = None
    if open_phrase is not None:
        out.append("</mark>")
    out.append(html.escape(text[pos:]))
    return Markup("".join(out))


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def histogram_svg(scores: np.ndarray, relevant: np.ndarray | None, threshold: float, k: int,
                  bins: int = 40, width: int = 300, height: int = 96) -> Markup:
    """Score distribution over all training rows; rows with the query's label stacked in red;
    a dashed line at the k-th best score."""
    lo, hi = float(scores.min()), float(scores.max())
    if hi <= lo:
        hi = lo + 1e-6
    edges = np.linspace(lo, hi, bins + 1)
    allc = np.histogram(scores, edges)[0]
    relc = np.histogram(scores[relevant], edges)[0] if relevant is not None else np.zeros_like(allc)
    top_pad, bottom = 6, height - 18
    peak = max(1, int(allc.max()))
    bw = width / bins
    parts = [f'<svg class="hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             f'role="img" aria-label="score histogram">']
    for i in range(bins):
        x = i * bw
        h_all = (bottom - top_pad) * allc[i] / peak
        h_rel = (bottom - top_pad) * relc[i] / peak
        if allc[i]:
            parts.append(f'<rect x="{x + 0.5:.1f}" y="{bottom - h_all:.1f}" width="{bw - 1:.1f}" '
                         f'height="{h_all - h_rel:.1f}" fill="#9aa5b1"><title>{int(allc[i] - relc[i])} rows, '
                         f'{_fmt(edges[i])}..{_fmt(edges[i + 1])}</title></rect>')
        if relc[i]:
            parts.append(f'<rect x="{x + 0.5:.1f}" y="{bottom - h_rel:.1f}" width="{bw - 1:.1f}" '
                         f'height="{h_rel:.1f}" fill="#d6450d"><title>{int(relc[i])} rows with the query\'s '
                         f'label</title></rect>')
    tx = width * (threshold - lo) / (hi - lo)
    parts.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{top_pad - 4}" y2="{bottom}" stroke="#222" '
                 f'stroke-dasharray="3,2"/>')
    anchor = "end" if tx > width * 0.7 else "start"
    parts.append(f'<text x="{tx + (-3 if anchor == "end" else 3):.1f}" y="{top_pad + 6}" font-size="9" '
                 f'text-anchor="{anchor}">top {k}</text>')
    parts.append(f'<line x1="0" x2="{width}" y1="{bottom}" y2="{bottom}" stroke="#555"/>')
    parts.append(f'<text x="0" y="{height - 4}" font-size="9">{_fmt(lo)}</text>')
    parts.append(f'<text x="{width}" y="{height - 4}" font-size="9" text-anchor="end">{_fmt(hi)}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 4}" font-size="9" text-anchor="middle">score '
                 f'({len(scores)} rows, peak bin {peak})</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def layer_curve_svg(curve: dict, width: int = 300, height: int = 120) -> Markup:
    """Adjacent-layer cosine of the last prompt token (pair i -> i+1); the chosen layer in red."""
    sims = [float(s) for s in curve.get("similarities", [])]
    if not sims:
        return Markup("")
    layer = curve.get("layer")
    left, right, top, bottom = 34, 10, 10, height - 22
    lo, hi = min(sims), max(sims)
    pad = max(1e-3, (hi - lo) * 0.1)
    lo, hi = lo - pad, min(hi + pad, 1.0) if hi < 1.0 else hi + pad  # a cosine axis need not pass 1
    n = len(sims)
    xs = [left + (right_w := (width - left - right)) * (i + 0.5) / n for i in range(n)]
    ys = [bottom - (bottom - top) * (s - lo) / (hi - lo) for s in sims]
    parts = [f'<svg class="curve" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             f'role="img" aria-label="layer curve">',
             f'<line x1="{left}" x2="{left}" y1="{top}" y2="{bottom}" stroke="#555"/>',
             f'<line x1="{left}" x2="{width - right}" y1="{bottom}" y2="{bottom}" stroke="#555"/>',
             f'<text x="{left - 3}" y="{top + 8}" font-size="9" text-anchor="end">{hi:.3f}</text>',
             f'<text x="{left - 3}" y="{bottom}" font-size="9" text-anchor="end">{lo:.3f}</text>',
             f'<polyline fill="none" stroke="#3b6ea5" stroke-width="1.5" points="'
             + " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys)) + '"/>']
    for i, (x, y, s) in enumerate(zip(xs, ys, sims)):
        chosen = layer == i + 1
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{4 if chosen else 2.5}" '
                     f'fill="{"#d6450d" if chosen else "#3b6ea5"}"><title>{i} -> {i + 1}: {s:.4f}</title></circle>')
        if n <= 16 or i % max(1, n // 12) == 0 or chosen:
            weight = ' font-weight="bold"' if chosen else ""
            parts.append(f'<text x="{x:.1f}" y="{bottom + 11}" font-size="9" text-anchor="middle"{weight}>'
                         f'{i}→{i + 1}</text>')
        if chosen:
            parts.append(f'<text x="{x:.1f}" y="{y - 7:.1f}" font-size="10" text-anchor="middle" '
                         f'fill="#d6450d">L={layer}</text>')
    parts.append(f'<text x="{left + right_w / 2:.1f}" y="{height - 1}" font-size="9" text-anchor="middle">'
                 "adjacent-layer cosine, last prompt token</text>")
    parts.append("</svg>")
    return Markup("".join(parts))


def render_html(data: ReportData) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda x, d=3: "" if x is None else f"{x:.{d}f}"
    return env.get_template("report.html.j2").render(r=data, pos=POS, neg=NEG)


def write_report(tracer, queries, out: str, k: int = 10, mode: str | None = None, max_queries: int | None = None,
                 log=None, token_layer: int | None = None) -> ReportData:
    from rept.index import atomic_write_bytes

    data = build_report(tracer, queries, k=k, mode=mode, max_queries=max_queries, log=log, token_layer=token_layer)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, render_html(data).encode())
    return data
