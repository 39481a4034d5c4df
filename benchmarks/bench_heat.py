"""Does the report's heat map make a backdoor row's trigger and payload stand out?

For every flagged demo query, its top-k rows are scored word by word (`rept.signatures.tokens`, as `rept
report` does); for each poisoned row among them the benchmark sums the colour the report paints
on each word (its background opacity) and measures the share of that colour mass on the trigger
(`TY`) and the payload (`You are stupid!`) words (by character offsets, as in bench_tokens.py), and
the share of the row's words that get any colour. Two renderings of the same scores:

  before  the first report's scale: opacity 0.08 + 0.72 x |score| / (the query's largest |word
          score| over its top rows), every word above 2% of that scale coloured
  now     rept.report.word_strengths / word_alpha: colour only above the row's upper quartile,
          scaled to the row's best word

plus the share of the words that are trigger or payload words (what an evenly tinted row shows).

    python benchmarks/bench_heat.py --work DIR     # DIR from `rept demo --out DIR`
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tokens import inside, truth_spans  # noqa: E402

from rept.report import word_alpha, word_strengths  # noqa: E402
from rept.signatures.tokens import attach_word_scores  # noqa: E402
from rept.query.trace import Tracer, load_queries  # noqa: E402


def old_alpha(score: float, scale: float) -> float:
    """The opacity the first report gave a word (rept.report.word_colour before the upper-quartile scale)."""
    a = min(1.0, abs(score) / scale) if scale > 0 else 0.0
    return 0.08 + 0.72 * a if a > 0.02 else 0.0


def shares(rows: list[tuple[str, str, list[dict], list[float]]]) -> dict:
    """Mean over rows of (colour mass on trigger+payload words / the row's colour mass) and of the
    share of the row's words with any colour; `rows` = (prompt, response, words, opacities)."""
    mass, coloured, words_share = [], [], []
    for prompt, response, words, alphas in rows:
        trig, pay = truth_spans(prompt, response)
        marked = [inside(w, trig) or inside(w, pay) for w in words]
        total = sum(alphas)
        mass.append(sum(a for a, m in zip(alphas, marked) if m) / total if total else 0.0)
        coloured.append(sum(a > 0 for a in alphas) / len(words))
        words_share.append(sum(marked) / len(words))
    n = max(1, len(rows))
    return {"mass_on_truth": sum(mass) / n, "coloured_words": sum(coloured) / n, "truth_words": sum(words_share) / n,
            "rows": len(rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder made by `rept demo --out DIR` (index/, queries.jsonl)")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--label", default="backdoor")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    work = Path(args.work)
    queries = [q for q in load_queries(str(work / "queries.jsonl")) if q.flagged]
    tracer = Tracer(work / "index")
    results = tracer.trace(queries, k=args.top_k)
    scored = attach_word_scores(tracer, results)
    before, now = [], []
    for result, per_query in zip(results, scored):
        scale = max([0.0] + [abs(w["score"]) for rt in per_query for w in rt.words]) or 1.0
        for hit, rt in zip(result.hits, per_query):
            if hit.label != args.label or not rt.words:
                continue
            before.append((hit.prompt, hit.response, rt.words, [old_alpha(w["score"], scale) for w in rt.words]))
            now.append((hit.prompt, hit.response, rt.words, [word_alpha(x) for x in word_strengths(rt.words)]))
    figures = {"before": shares(before), "now": shares(now)}
    cmd = "python benchmarks/bench_heat.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{cmd.strip()}`: {len(queries)} flagged queries, top {args.top_k} rows, {len(now)} poisoned rows\n")
    print("| rendering | colour mass on trigger + payload | words coloured | trigger + payload words |")
    print("|---|---:|---:|---:|")
    for name, f in figures.items():
        print(f"| {name} | {f['mass_on_truth']:.1%} | {f['coloured_words']:.1%} | {f['truth_words']:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "command": cmd.strip()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
