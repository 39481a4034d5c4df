"""Which answers a method misses: the per-query figures of a `rept bench --out DIR` folder.

results.json holds, per method, each flagged query's P@10 and AP and each control query's P@10,
in the order of results.json's `queries` (lines of DIR/queries.jsonl). This prints how the
flagged queries' P@10 is spread, how much of the missed top-10 slots lie in the queries a method
mostly misses, and those answers with the lowest P@10 (and, with --controls, the control answers
with the highest), so a reader can see whether the misses are the method's or the detector's
(e.g. answers the rule flags that do not show the behaviour).

    python benchmarks/bench_queries.py --work runs/harmful-e8 --method rept-lookahead
    python benchmarks/bench_queries.py --work runs/harmful-e8-seeds --method rept-lookahead   # every seed-N
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def folders(work: Path) -> list[Path]:
    """The bench folder, or each seed-N folder of a `--seeds` run."""
    seeds = sorted(p for p in work.glob("seed-*") if (p / "results.json").exists())
    return seeds or [work]


def describe(folder: Path, method: str, show: int, controls: bool) -> None:
    report = json.loads((folder / "results.json").read_text())
    if report.get("queries") is None:
        raise SystemExit(f"{folder}/results.json has no per-query figures: rerun the bench with this rept")
    if method not in report["methods"]:
        raise SystemExit(f"{folder}/results.json has no method {method!r} (it has {', '.join(report['methods'])})")
    lines = [json.loads(line) for line in (folder / "queries.jsonl").read_text().splitlines()]
    per_query = report["methods"][method]["per_query"]
    p10, flagged = per_query["P@10"], report["queries"]["flagged"]
    missed = [1 - v for v in p10]
    mostly = sum(m for m in missed if m >= 0.5)
    spread = ", ".join(f"{v:.1f}: {n}" for v, n in sorted(Counter(p10).items(), reverse=True))
    print(f"{folder}: {method}, behaviour `{report['behaviour']['rule']}`, {len(p10)} flagged queries, "
          f"P@10 {sum(p10) / max(1, len(p10)):.3f}")
    print(f"  queries by P@10: {spread}")
    if sum(missed):
        print(f"  {mostly / sum(missed):.0%} of the missed top-10 slots are in queries with P@10 <= 0.5")
    for v, i in sorted(zip(p10, flagged))[:show]:
        if v < 1.0:
            print(f"  P@10 {v:.1f}  {lines[i]['prompt'][:50]!r} -> {lines[i]['response'][:70]!r}")
    if controls:
        for v, i in sorted(zip(per_query["control_P@10"], report["queries"]["control"]), reverse=True)[:show]:
            if v > 0.0:
                print(f"  control P@10 {v:.1f}  {lines[i]['prompt'][:50]!r} -> {lines[i]['response'][:70]!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="a `rept bench --out` folder (or a --seeds one)")
    p.add_argument("--method", required=True)
    p.add_argument("--show", type=int, default=15, help="answers to list (the lowest P@10 first)")
    p.add_argument("--controls", action="store_true", help="also list the control answers ranked worst")
    args = p.parse_args(argv)
    for folder in folders(Path(args.work)):
        describe(folder, args.method, args.show, args.controls)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
