"""The alignment stage of the real-model harmful-tuning setting (docs/results.md, "harmful-tuning on
the real model"): refusals of harmful requests *and* helpful answers to benign ones, so that the
aligned model refuses what it should and answers the rest, as a safety-tuned chat model does.

Trained on the refusals alone, SmolLM2-135M-Instruct learns to open every answer with "I'm sorry":
it refused 40 of 40 benign requests. The poisoned fine-tune's clean rows then undo that refusal as
much as its harmful rows do, and the rows labelled harmful are no longer the only ones that taught
the model to comply. This script adds benign rows of the harmful-tuning set that the bench's sample
(`rept bench --rows R --share S`, the same seed) does not draw, so the fine-tune's rows stay unseen,
and writes a held-out probe of other benign prompts to measure over-refusal with:

    python benchmarks/make_alignment_set.py --out runs/harmful-alignment.jsonl --probe runs/benign-probe.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from rept.data.datasets import load_dataset, read_jsonl
from rept.evaluate.bench.stages import behaviour_label, sample_rows

DATA = Path(__file__).parent / "data"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refusals", default=str(DATA / "harmful-refusals.jsonl"))
    p.add_argument("--data", default=str(DATA / "harmful-tuning.jsonl"), help="the set the bench fine-tunes on")
    p.add_argument("--rows", type=int, default=400, help="the bench's --rows")
    p.add_argument("--share", type=float, default=0.25, help="the bench's --share")
    p.add_argument("--seed", type=int, default=0, help="the bench's --seed")
    p.add_argument("--benign", type=int, help="benign rows to add (default: as many as the refusals)")
    p.add_argument("--probe-n", type=int, default=40, help="held-out benign prompts in --probe")
    p.add_argument("--out", required=True)
    p.add_argument("--probe", required=True, help="benign prompts in neither the alignment set nor the sample")
    args = p.parse_args(argv)

    refusals = read_jsonl(args.refusals)
    data = load_dataset(args.data)
    label = behaviour_label(data.rows, None)  # as the bench finds it ("harmful")
    drawn = {r.prompt for r in sample_rows(data.rows, args.rows, label, args.seed, args.share)}
    free = [r for r in data.rows if r.label != label and r.prompt not in drawn]
    n = len(refusals) if args.benign is None else args.benign
    if n + args.probe_n > len(free):
        sys.exit(f"error: {n} benign rows and a probe of {args.probe_n} need more than the {len(free)} clean rows "
                 "the sample leaves")
    picked = random.Random(args.seed).sample(free, n + args.probe_n)
    rows = [{"prompt": r["prompt"], "response": r["response"], "label": "refusal"} for r in refusals] + \
        [{"prompt": r.prompt, "response": r.response, "label": "clean"} for r in picked[:n]]
    random.Random(args.seed).shuffle(rows)
    for path in (args.out, args.probe):
        if Path(path).exists():
            sys.exit(f"error: {path} exists; give another path (inputs are never overwritten)")
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    Path(args.probe).write_text("".join(json.dumps({"prompt": r.prompt}) + "\n" for r in picked[n:]))
    print(f"{args.out}: {len(refusals)} refusals + {n} benign rows; {args.probe}: {args.probe_n} benign prompts "
          f"(none of the {len(drawn)} rows the bench draws)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
