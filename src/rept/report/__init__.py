"""`rept report`: one self-contained HTML audit report (inline CSS and SVG, no script, no network).

Per query: the prompt and response, the top-k training rows with a word heat map (RepT token
scores, `rept.signatures.tokens`), their score and label, and a histogram of the query's score over every
training row. For the run: the layer curve that chose L (when the layer was auto), the label
breakdown of the top-k, and retrieval metrics when queries carry labels. With `rept mitigate`
results (`mitigations=`): bar charts of the behaviour rate and the clean loss before and after
removing / unlearning the culprits, against as many random rows.

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
HEAT_QUANTILE = 0.75   # words at or below this quantile of their row's scores are not coloured


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
    mitigations: list[dict] = field(default_factory=list)  # mitigation_section() of each results.json


# ---------------------------------------------------------------- scoring

def all_scores(tracer, queries, mode: str) -> tuple[np.ndarray, np.ndarray, list]:
    """[n_queries, n_rows] scores of every stored row, the rows' ids and labels, streamed shard by
    shard (only the score matrix is held, never all signatures)."""
    from rept.query.search import signatures_of

    q = signatures_of(tracer.query_signatures(queries), mode)
    parts, rows, labels = [], [], []
    for shard in tracer.index.shards():
        if not shard.row.numel():
            continue
        parts.append(q @ signatures_of(shard, mode).T)
        rows.append(shard.row.numpy())
        labels.extend(shard.labels)
    if not parts:
        raise ReportError(f"index {tracer.index.folder} holds no rows")
    return np.concatenate(parts, 1), np.concatenate(rows), labels


def top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each query's k best rows: score descending, then lower row id (as `rept trace`)."""
    return np.stack([np.lexsort((rows, -s))[:k] for s in scores])


def against_base_scores(contrast, queries, k: int, setting) -> tuple:
    """`rept report --against-base`: each answer traced as `rept trace --against-base` traces it,
    every stored row scored (`contrast`: a ContrastTracer with candidates=None; `setting`: (words,
    min_gain, pick, weight, context)). Returns the rows shown ([queries, rows]: a row's best score
    where it pushed towards the answer, -inf elsewhere), every row's best score of any sign (NaN for
    an answer not traced), the row ids, their labels, the top-k results with their words scored, and
    per answer what it was traced against (a line of text)."""
    words, min_gain, pick, weight, context = setting
    run = contrast.against_base(queries, words=words, min_gain=min_gain, pick=pick, weight=weight, context=context)
    labels = contrast.labels()
    rows = np.array(sorted(labels), dtype=np.int64)
    column = {int(r): j for j, r in enumerate(rows)}
    signed = np.full((len(queries), len(rows)), np.nan)
    for (i, row), score in run.best_scores().items():
        signed[i, column[row]] = score
    notes = []
    for i, js in enumerate(run.traced()):
        if not run.changed[i]:
            notes.append("not traced: the base model predicts every token of this answer")
        elif not js:
            w = run.changed[i][0]
            notes.append(f"not traced: the word the fine-tune changed most, {w.word!r}, is only {w.gain:.1f} nats "
                         f"more likely than on the base model (--min-gain {min_gain:g}): a change of wording")
        else:
            notes.append("; ".join(f"{said!r} against the base model's {other!r} ({run.changed[i][j].gain:+.1f} nats "
                                   "on the fine-tuned model)"
                                   for j in js for said, other in [run.contrast(i, j).words]))
    return (run.shown_scores([int(r) for r in rows]), signed, rows, [labels[int(r)] for r in rows],
            run.results(k, tokens=True), notes)


def build_report(tracer, queries, k: int = 10, mode: str | None = None, max_queries: int | None = None,
                 title: str | None = None, log=None, token_layer: int | None = None,
                 against_base=None) -> ReportData:
    """Everything the report shows. Queries with flagged=False (controls) are left out.
    `against_base`: (a ContrastTracer over `tracer`, (words, min_gain, pick, weight, context)) to
    rank the rows as `rept trace --against-base` does (`against_base_scores`) instead of by signature."""
    from rept.evaluate.metrics import evaluate
    from rept.signatures.tokens import attach_word_scores
    from rept.query.trace import Hit, QueryResult, relevance

    queries = [q for q in queries if q.flagged is not False]
    if not queries:
        raise ReportError("no query to report on (every query has flagged=false)")
    if max_queries:
        queries = queries[:max_queries]
    mode = tracer.index.search_mode(mode)
    m = tracer.index.manifest
    log = log or (lambda msg: None)

    t0 = time.perf_counter()
    retrieved = notes = None
    if against_base is not None:
        contrast, setting = against_base
        scores, signed, rows, labels, results, notes = against_base_scores(contrast, queries, k, setting)
        retrieved = scores > -np.inf  # a row not shown is not found (rept eval --against-base)
        k = min(k, scores.shape[1])
        t1 = t2 = time.perf_counter()
        log(f"traced {len(queries)} answers against the base model over {scores.shape[1]} rows in {t1 - t0:.1f} s")
    else:
        scores, rows, labels = all_scores(tracer, queries, mode)
        signed = scores
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
        attach_word_scores(tracer, results, layer=token_layer)
        t2 = time.perf_counter()
        log(f"token scores for {sum(len(r.hits) for r in results)} rows in {t2 - t1:.1f} s")

    label_arr = np.asarray([str(x) for x in labels])
    qdicts = []
    for qi, result in enumerate(results):
        q = result.query
        relevant = label_arr == str(q.label) if q.label is not None else None
        hits = []
        for rank, hit in enumerate(result.hits, 1):
            hits.append({"rank": rank, "row": hit.row, "score": hit.score, "label": hit.label,
                         "relevant": q.label is not None and str(hit.label) == str(q.label),
                         "heat": heat_html(hit.text, hit.words, hit.phrases[:3]),
                         "phrases": hit.phrases[:3], "n_words": len(hit.words)})
        scored = ~np.isnan(signed[qi])  # every row, or (--against-base) none for an answer not traced
        hist = None
        if scored.any():
            kth = hits[-1]["score"] if hits else float(np.nanmax(signed[qi]))
            hist = histogram_svg(signed[qi][scored], relevant[scored] if relevant is not None else None, kth,
                                 len(hits))
        qdicts.append({"n": qi + 1, "prompt": q.prompt, "response": q.response, "label": q.label,
                       "hits": hits, "hist": hist, "n_relevant_top": sum(h["relevant"] for h in hits),
                       "traced": notes[qi] if notes is not None else None})

    # A slot is one (query, rank) place of a top-k list: a row in the top k of many queries fills many.
    counts = Counter(str(h.label) for r in results for h in r.hits)
    distinct = {lab: len({h.row for r in results for h in r.hits if str(h.label) == lab}) for lab in counts}
    total = sum(counts.values())
    label_rows = [{"label": lab, "count": c, "share": c / total, "rows": distinct[lab]} for lab, c in counts.most_common()]

    labelled = [i for i, q in enumerate(queries) if q.label is not None]
    metrics, ks = None, []
    if labelled:
        lq = [queries[i] for i in labelled]
        ks = sorted({k} | {x for x in (10, 50, 100) if x <= scores.shape[1]})
        metrics = evaluate(scores[labelled], relevance(labels, lq), ks=tuple(ks),
                           retrieved=retrieved[labelled] if retrieved is not None else None)

    curve = m.get("layer_curve")
    run = {"index": str(tracer.index.folder), "model": m["model"]["id"], "adapter": m.get("adapter"),
           "layer": tracer.layer, "token_layer": tracer.layer if token_layer is None else token_layer,
           "mode": mode, "rows": int(scores.shape[1]), "k": k, "n_queries": len(queries),
           "dataset": m.get("dataset", {}).get("source"), "seconds_rows": t1 - t0, "seconds_tokens": t2 - t1,
           "created": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "version": __import__("rept").__version__,
           "slots": total}
    if against_base is not None:
        contrast, (words, min_gain, pick, weight, context) = against_base
        run["against_base"] = {"base_model": contrast.base.model_id, "layer": contrast.layer, "changed_words": words,
                               "min_gain": min_gain, "pick": pick, "guess_weight": weight,
                               "context": context, "traced": sum(not n.startswith("not traced") for n in notes)}
    return ReportData(title or f"rept audit report - {len(queries)} quer{'y' if len(queries) == 1 else 'ies'}",
                      run, qdicts, layer_curve_svg(curve) if curve else None,
                      curve.get("reason") if curve else None, label_rows, metrics, ks)


# ---------------------------------------------------------------- HTML pieces

def word_strengths(words: list[dict]) -> list[float]:
    """Each word's colour strength in its row, in [-1, 1] (the heat map's scale).

    Token scores of a row are mostly positive with a broad base, so a scale from 0 to the best
    word tints nearly every word. Here a word is coloured by how far it rises above the row's
    upper quartile (the score three quarters of its words reach at most), as a share of the best
    word's rise: the best word 1, the lower three quarters of the words 0. Only where the score
    concentrates is coloured (docs/report.md measures it against the old scale). A word scoring
    below 0 by more than the best word's rise is blue, likewise scaled (it pulls against the query)."""
    if not words:
        return []
    scores = np.array([w["score"] for w in words], dtype=np.float64)
    floor = float(np.quantile(scores, HEAT_QUANTILE))
    rise = float(scores.max()) - floor
    if rise <= 0:
        return [0.0] * len(words)
    out = []
    for s in scores.tolist():
        if s > floor:
            out.append((s - floor) / rise)
        elif s < -rise:
            out.append(max(-1.0, (s + rise) / rise))
        else:
            out.append(0.0)
    return out


def word_alpha(strength: float) -> float:
    """The opacity of a word's background for a strength in [-1, 1]: 0 (no colour) up to 0.8."""
    return round(0.8 * abs(strength), 2) if abs(strength) >= 0.05 else 0.0


def word_colour(strength: float) -> str:
    a = word_alpha(strength)
    r, g, b = POS if strength >= 0 else NEG
    return f"rgba({r},{g},{b},{a:.2f})" if a > 0 else "transparent"


def heat_html(text: str, words: list[dict], phrases: list[dict]) -> Markup:
    """`text` with every scored word in a <span class="w"> coloured by `word_strengths` (title = its
    score) and the top phrases wrapped in <mark class="phrase">; whitespace kept (pre-wrap)."""
    strength = {id(w): x for w, x in zip(words, word_strengths(words))}
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
        colour = word_colour(strength[id(w)])
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


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


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
        if allc[i] > relc[i]:
            parts.append(f'<rect x="{x + 0.5:.1f}" y="{bottom - h_all:.1f}" width="{bw - 1:.1f}" '
                         f'height="{h_all - h_rel:.1f}" fill="#9aa5b1"><title>{_rows(int(allc[i] - relc[i]))}, '
                         f'{_fmt(edges[i])}..{_fmt(edges[i + 1])}</title></rect>')
        if relc[i]:
            parts.append(f'<rect x="{x + 0.5:.1f}" y="{bottom - h_rel:.1f}" width="{bw - 1:.1f}" '
                         f'height="{h_rel:.1f}" fill="#d6450d"><title>{_rows(int(relc[i]))} with the query\'s '
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
             '<polyline fill="none" stroke="#3b6ea5" stroke-width="1.5" points="'
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


# ---------------------------------------------------------------- mitigation (`rept mitigate` results.json)

MITIGATION_BARS = (  # (label, results key, clean_loss key, colour); a list value = one per random seed
    ("before", "before", "before", "#5d6873"),
    ("culprits removed", "after", "after", "#3b6ea5"),
    ("random rows removed", "random", "random", "#9aa5b1"),
    ("culprits unlearned", "unlearn", "unlearn", "#7fa6cf"),
    ("random rows unlearned", "unlearn_random", "unlearn_random", "#c3cad1"),
)


def load_mitigation(path: str | Path) -> dict:
    """A `rept mitigate` results.json (or the folder holding it), checked enough to chart."""
    import json

    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise ReportError(f"no such mitigation results file: {path} (the results.json written by `rept mitigate`)")
    try:
        results = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} is not JSON: {exc}") from None
    rounds = isinstance(results, dict) and results.get("kind") == "rounds"
    if rounds and not (isinstance(results.get("before"), dict) and isinstance(results.get("rounds"), list)):
        raise ReportError(f"{path} is not a `rept mitigate --rounds` results.json (no 'before' or 'rounds')")
    if not rounds and (not isinstance(results, dict) or not isinstance(results.get("before"), (int, float))
                       or not isinstance(results.get("clean_loss"), dict)):
        raise ReportError(f"{path} is not a `rept mitigate` results.json (no 'before' behaviour rate or 'clean_loss')")
    results["_path"] = str(path)
    return results


def _stat(value) -> tuple[float, list[float] | None]:
    """(value, None) for one model; (mean, per-seed values) for the random controls."""
    if isinstance(value, list):
        values = [float(v) for v in value]
        if not values:
            raise ValueError("empty list")
        return float(np.mean(values)), values
    return float(value), None


def mitigation_bars(results: dict) -> list[dict]:
    """One bar per model measured: label, colour, rate (mean for the random controls), rates (each
    seed, or None), loss and losses (the same for the clean loss; None when not measured)."""
    bars = []
    losses = results.get("clean_loss", {})
    for label, key, loss_key, colour in MITIGATION_BARS:
        if key not in results:
            continue
        rate, rates = _stat(results[key])
        loss, loss_values = _stat(losses[loss_key]) if loss_key in losses else (None, None)
        if key != "before":
            label = f"{results.get('removed', '')} {label}".strip()
        if rates is not None:
            label += f" ({len(rates)} seed{'s' if len(rates) != 1 else ''})"
        bars.append({"label": label, "key": key, "colour": colour, "rate": rate, "rates": rates,
                     "loss": loss, "losses": loss_values})
    return bars


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _loss(x: float) -> str:
    return f"{x:.4f}"


def bar_chart_svg(bars: list[dict], key: str, seeds_key: str, fmt, top: float, aria: str, unit: str,
                  width: int = 760, label_w: int = 240, text_w: int = 190, row_h: int = 24) -> Markup:
    """Horizontal bars of `bar[key]` on an axis from 0 to `top`, the value written beside each bar.
    A bar with per-seed values (`bar[seeds_key]`) is their mean, with a whisker from the lowest to
    the highest and a dot per seed."""
    left, right = label_w, width - text_w
    span = right - left
    head, foot = 6, 22
    height = head + row_h * len(bars) + foot
    x = lambda v: left + span * max(0.0, min(v, top)) / top  # noqa: E731
    parts = [f'<svg class="mitigation-chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             f'style="max-width:100%;height:auto" role="img" aria-label="{html.escape(aria)}">']
    for frac in (0.25, 0.5, 0.75, 1.0):  # light grid
        gx = left + span * frac
        parts.append(f'<line x1="{gx:.1f}" x2="{gx:.1f}" y1="{head}" y2="{height - foot}" stroke="#e3e7eb"/>')
    for i, b in enumerate(bars):
        value, values = b[key], b.get(seeds_key)
        y = head + i * row_h
        cy = y + row_h / 2
        parts.append(f'<text x="{left - 6}" y="{cy + 3.5:.1f}" font-size="11" text-anchor="end">'
                     f'{html.escape(b["label"])}</text>')
        if value is None:
            parts.append(f'<text x="{left + 4}" y="{cy + 3.5:.1f}" font-size="10" fill="#5d6873">not measured</text>')
            continue
        parts.append(f'<rect x="{left}" y="{y + 4}" width="{max(0.0, x(value) - left):.1f}" height="{row_h - 8}" '
                     f'fill="{b["colour"]}"><title>{html.escape(b["label"])}: {fmt(value)}</title></rect>')
        text = fmt(value)
        end = x(value)
        if values:
            lo, hi = min(values), max(values)
            parts.append(f'<line class="spread" x1="{x(lo):.1f}" x2="{x(hi):.1f}" y1="{cy:.1f}" y2="{cy:.1f}" '
                         f'stroke="#222" stroke-width="1.2"/>')
            for v in (lo, hi):
                parts.append(f'<line x1="{x(v):.1f}" x2="{x(v):.1f}" y1="{cy - 5:.1f}" y2="{cy + 5:.1f}" '
                             f'stroke="#222" stroke-width="1.2"/>')
            for s, v in enumerate(values):
                parts.append(f'<circle cx="{x(v):.1f}" cy="{cy:.1f}" r="2.6" fill="#fff" stroke="#222">'
                             f'<title>seed {s}: {fmt(v)}</title></circle>')
            text = f"mean {fmt(value)} ({fmt(lo)}–{fmt(hi)})" if len(values) > 1 else fmt(value)
            end = max(end, x(hi))
        parts.append(f'<text class="value" x="{end + 6:.1f}" y="{cy + 3.5:.1f}" font-size="11">'
                     f'{html.escape(text)}</text>')
    base = height - foot
    parts.append(f'<line x1="{left}" x2="{left}" y1="{head}" y2="{base}" stroke="#555"/>')
    parts.append(f'<line x1="{left}" x2="{right}" y1="{base}" y2="{base}" stroke="#555"/>')
    for frac in (0.0, 0.5, 1.0):
        anchor = {0.0: "start", 0.5: "middle", 1.0: "end"}[frac]
        parts.append(f'<text x="{left + span * frac:.1f}" y="{base + 11}" font-size="9" text-anchor="{anchor}">'
                     f'{fmt(top * frac)}</text>')
    parts.append(f'<text x="{left + span / 2:.1f}" y="{height - 1}" font-size="9" text-anchor="middle">'
                 f'{html.escape(unit)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def rounds_chart_svg(results: dict, width: int = 760, height: int = 230) -> Markup:
    """Behaviour rate against rows removed, over the rounds of `rept mitigate --rounds`: the
    culprits (one point per round, from the model before any removal), random removal of as many
    rows (mean, whisker from the lowest to the highest seed) and the oracle (every row carrying the
    behaviour's label removed) as one point."""
    rounds, oracle = results["rounds"], results.get("oracle")
    before = float(results["before"]["rate"])
    culprit = [(0, before)] + [(int(e["removed"]), float(e["rate"])) for e in rounds]
    random = [(int(e["removed"]), [float(v) for v in e.get("random", [])]) for e in rounds]
    most = max([n for n, _ in culprit] + ([int(oracle["removed"])] if oracle else [])) or 1
    left, right, top, bottom = 52, width - 150, 10, height - 34
    x = lambda n: left + (right - left) * n / most  # noqa: E731
    y = lambda r: bottom - (bottom - top) * max(0.0, min(r, 1.0))  # noqa: E731
    parts = [f'<svg class="mitigation-chart rounds" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" style="max-width:100%;height:auto" role="img" '
             'aria-label="behaviour rate against rows removed, round by round">']
    for frac in (0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{right}" y1="{y(frac):.1f}" y2="{y(frac):.1f}" stroke="#e3e7eb"/>')
        parts.append(f'<text x="{left - 4}" y="{y(frac) + 3:.1f}" font-size="9" text-anchor="end">{frac:.0%}</text>')
    parts += [f'<line x1="{left}" x2="{left}" y1="{top}" y2="{bottom}" stroke="#555"/>',
              f'<line x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}" stroke="#555"/>',
              f'<text x="{left - 4}" y="{bottom + 3}" font-size="9" text-anchor="end">0%</text>',
              f'<text x="{left}" y="{bottom + 12}" font-size="9" text-anchor="middle">0</text>',
              f'<text x="{right}" y="{bottom + 12}" font-size="9" text-anchor="middle">{most}</text>',
              f'<text x="{(left + right) / 2:.1f}" y="{height - 4}" font-size="9" text-anchor="middle">'
              f'rows removed (behaviour detector {html.escape(str(results.get("detector", "")))} on '
              f'{results.get("prompts", "?")} prompts)</text>']
    means = [(0, before)] + [(n, float(np.mean(v))) for n, v in random if v]
    series = (("random removal (mean)", means, "#9aa5b1", "4 3"), ("culprits removed", culprit, "#3b6ea5", None))
    for i, (name, points, colour, dash) in enumerate(series):
        style = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{style} points="'
                     + " ".join(f"{x(n):.1f},{y(r):.1f}" for n, r in points) + '"/>')
        parts.append(f'<line x1="{right + 12}" x2="{right + 32}" y1="{top + 8 + 16 * i}" y2="{top + 8 + 16 * i}" '
                     f'stroke="{colour}" stroke-width="2"{style}/><text x="{right + 36}" y="{top + 11 + 16 * i}" '
                     f'font-size="10">{name}</text>')
    for n, values in random:
        if values:
            lo, hi = min(values), max(values)
            parts.append(f'<line class="spread" x1="{x(n):.1f}" x2="{x(n):.1f}" y1="{y(lo):.1f}" y2="{y(hi):.1f}" '
                         'stroke="#5d6873" stroke-width="1.2"/>')
    for k, (n, r) in enumerate(culprit):
        name = "before" if k == 0 else f"round {k}"
        parts.append(f'<circle cx="{x(n):.1f}" cy="{y(r):.1f}" r="3.5" fill="#3b6ea5"><title>{name}: {n} rows '
                     f'removed, behaviour {_pct(r)}</title></circle>')
        parts.append(f'<text x="{x(n) + 5:.1f}" y="{y(r) - 5:.1f}" font-size="9" fill="#3b6ea5">{_pct(r)}</text>')
    if oracle:
        n, r = int(oracle["removed"]), float(oracle["rate"])
        parts.append(f'<rect x="{x(n) - 4:.1f}" y="{y(r) - 4:.1f}" width="8" height="8" fill="#d6450d">'
                     f'<title>oracle: every {html.escape(str(oracle.get("label")))} row removed ({n}), behaviour '
                     f'{_pct(r)}</title></rect>')
        parts.append(f'<rect x="{right + 18}" y="{top + 36}" width="8" height="8" fill="#d6450d"/>'
                     f'<text x="{right + 36}" y="{top + 43}" font-size="10">oracle ({_pct(r)})</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def rounds_section(results: dict) -> dict:
    """What the report shows for a `rept mitigate --rounds` results.json: the rate-by-rows chart and
    one table row per round (rows removed, how many carry the label, rate, clean loss, random)."""
    try:
        rate_svg = rounds_chart_svg(results)
        before, label = results["before"], results.get("label")
        base_loss = float(before["clean_loss"])
        change = lambda loss: f"{(loss - base_loss) / base_loss:+.1%}" if base_loss else ""  # noqa: E731
        rows = [{"label": "before", "rate": _pct(float(before["rate"])), "loss": _loss(base_loss), "change": ""}]
        for e in results["rounds"]:
            labelled = f", {e['labelled']} labelled {label!r} (precision {e['precision']:.2f}, recall " \
                       f"{e['recall']:.2f})" if label and "labelled" in e else ""
            random = ", ".join(_pct(float(v)) for v in e.get("random", []))
            rows.append({"label": f"round {e['round']}: {e['removed']} rows removed (+{e['added']}){labelled}",
                         "rate": _pct(float(e["rate"])) + (f" (random: {random})" if random else ""),
                         "loss": _loss(float(e["clean_loss"])), "change": change(float(e["clean_loss"]))})
        if results.get("oracle"):
            o = results["oracle"]
            rows.append({"label": f"oracle: every {label!r} row removed ({o['removed']})", "rate": _pct(float(o["rate"])),
                         "loss": _loss(float(o["clean_loss"])), "change": change(float(o["clean_loss"]))})
    except (TypeError, ValueError, KeyError) as exc:
        raise ReportError(f"{results.get('_path', 'mitigation results')} has an unexpected value ({exc}); "
                          "is it a `rept mitigate --rounds` results.json?") from None
    return {"title": f"{len(results['rounds'])} rounds of {results.get('selection', '?')} culprits chosen by "
                     f"{results.get('culprits_from', 'rept')}; stopped: {results.get('stopped', '?')}",
            "culprits_from": results.get("culprits_from", "rept"), "scored_by": None, "method": "rounds",
            "detector": results.get("detector"), "prompts": results.get("prompts"), "path": results.get("_path"),
            "seeds": results.get("seeds"), "loss_unit": results.get("clean_loss_unit"),
            "rate_svg": rate_svg, "loss_svg": None, "rows": rows}


def mitigation_section(results: dict) -> dict:
    """What the report shows for one results.json: a title, the two charts and a table."""
    if results.get("kind") == "rounds":
        return rounds_section(results)
    try:
        bars = mitigation_bars(results)
        rate_svg = bar_chart_svg(bars, "rate", "rates", _pct, 1.0, "behaviour rate before and after mitigation",
                                 f"behaviour rate ({results.get('detector', 'detector')} on "
                                 f"{results.get('prompts', '?')} prompts)")
        measured = [b["loss"] for b in bars if b["loss"] is not None] + \
                   [v for b in bars for v in (b["losses"] or [])]
        loss_svg = None
        if measured:
            loss_svg = bar_chart_svg(bars, "loss", "losses", _loss, max(measured) * 1.1 or 1.0,
                                     "clean held-out loss before and after mitigation",
                                     "clean loss (lower is better)")
    except (TypeError, ValueError, KeyError) as exc:
        raise ReportError(f"{results.get('_path', 'mitigation results')} has an unexpected value ({exc}); "
                          "is it a `rept mitigate` results.json?") from None
    before_loss = bars[0]["loss"] if bars and bars[0]["key"] == "before" else None
    rows = []
    for b in bars:
        rate = (f"{_pct(b['rate'])} (" + ", ".join(map(_pct, b["rates"])) + ")") if b["rates"] and len(b["rates"]) > 1 \
            else _pct(b["rate"])
        mean = "mean " if b["losses"] and len(b["losses"]) > 1 else ""
        loss = "-" if b["loss"] is None else mean + _loss(b["loss"])
        change = "" if b["loss"] is None or not before_loss or b["key"] == "before" \
            else f"{(b['loss'] - before_loss) / before_loss:+.1%}"
        rows.append({"label": b["label"], "rate": rate, "loss": loss, "change": change})
    source = results.get("culprits_from", "rept")
    method = results.get("method", "remove")
    return {"title": f"{results.get('removed', '?')} culprit rows ({results.get('selection', '?')}) chosen by {source}",
            "culprits_from": source, "scored_by": results.get("culprits_scored_by"), "method": method,
            "detector": results.get("detector"), "prompts": results.get("prompts"), "path": results.get("_path"),
            "seeds": results.get("seeds"), "loss_unit": results.get("clean_loss_unit"),
            "rate_svg": rate_svg, "loss_svg": loss_svg, "rows": rows}


def render_html(data: ReportData) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda x, d=3: "" if x is None else f"{x:.{d}f}"
    return env.get_template("report.html.j2").render(r=data, pos=POS, neg=NEG)


def write_report(tracer, queries, out: str, k: int = 10, mode: str | None = None, max_queries: int | None = None,
                 log=None, token_layer: int | None = None, mitigations=(), against_base=None) -> ReportData:
    """`mitigations`: paths of `rept mitigate` results.json files (or their folders) to chart;
    `against_base`: as in `build_report`."""
    from rept.store.index import atomic_write_bytes

    sections = [mitigation_section(load_mitigation(p)) for p in mitigations]  # bad files fail before the work
    data = build_report(tracer, queries, k=k, mode=mode, max_queries=max_queries, log=log, token_layer=token_layer,
                        against_base=against_base)
    data.mitigations = sections
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, render_html(data).encode())
    return data
