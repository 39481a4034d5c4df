"""`rept generate`: greedy answers for a prompt file, each checked by a detector, written as queries."""

from __future__ import annotations

import sys

HELP = "answer prompts greedily, flag the answers a detector rule fires on, and write a queries JSONL"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--adapter", help="PEFT adapter folder")
    p.add_argument("--prompts", required=True, help="prompts file (.jsonl, .csv, .parquet or save_to_disk folder)")
    p.add_argument("--prompt-column", help="column holding the prompt (default: prompts/prompt/instruction)")
    p.add_argument("--out", required=True, help="queries JSONL to write (prompt, response, label, flagged)")
    p.add_argument("--detect", required=True, help="detector rule: prefix:TEXT, contains:TEXT, regex:PATTERN, "
                   "not-prefix:TEXT, not-contains:TEXT")
    p.add_argument("--label", default="flagged", help="behaviour name written as the label of flagged answers")
    p.add_argument("--max-new-tokens", type=int, default=64, help="an answer's length at most")
    p.add_argument("--batch-size", type=int, default=16, help="prompts answered at once")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--allow-none", action="store_true", help="write the file even if the detector never fires")
    p.add_argument("--correction", metavar="DIR", help="answer with the correction `rept correct` saved in DIR "
                   "applied (refused on another model than it was built for)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")


def run(args) -> int:
    from rept.model.generate import answer_and_detect
    from rept.data.datasets import load_prompts
    from rept.data.detect import Detector, DetectorError
    from rept.model.loading import load_model
    from rept.query.trace import write_queries

    detector = Detector(args.detect)  # a bad rule fails before the model loads
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise DetectorError("--max-new-tokens and --batch-size must be at least 1")
    prompts = load_prompts(args.prompts, args.prompt_column)
    if args.limit:
        prompts = prompts[: args.limit]
    from rept.repair.correct import Correction, corrected

    correction = Correction.load(args.correction) if args.correction else None  # before the model loads
    loaded = load_model(args.model, args.adapter, dtype=args.dtype, device=args.device)
    if correction is not None:
        correction.check_model(loaded)
        print(f"with the correction in {args.correction} ({correction.source} direction at layer "
              f"{correction.layer}, strength {correction.strength:g})", file=sys.stderr)
    with corrected(loaded.model, correction):
        queries = answer_and_detect(loaded, prompts, detector, label=args.label,
                                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                    progress=not args.quiet)
    fired = sum(bool(q.flagged) for q in queries)
    if fired == 0 and not args.allow_none:
        raise DetectorError(f"the detector '{args.detect}' fired on none of the {len(queries)} answers, so there is "
                            "nothing to trace (check the rule, or pass --allow-none to write them anyway)")
    write_queries(queries, args.out)
    print(f"{fired} of {len(queries)} answers flagged by '{args.detect}' ({fired / len(queries):.0%}) -> {args.out}",
          file=sys.stderr)
    return 0
