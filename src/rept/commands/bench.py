"""`rept bench`: train the two-stage CPU model on a poisoned set and score every attribution method."""

from __future__ import annotations

import sys

HELP = ("train (or reuse) a tiny base + LoRA model on a poisoned dataset, make it misbehave, and score "
        "every attribution method (writes DIR/results.json and DIR/results.md)")


def _layer(value: str):
    return value if value == "auto" else int(value)


def add_arguments(p) -> None:
    from rept.bench import ALL_METHODS, VARIANTS

    p.add_argument("--data", required=True, help="labelled training set (prompt, response, label columns)")
    p.add_argument("--test-prompts", required=True, help="prompts that should trigger the behaviour")
    p.add_argument("--detect", required=True, help="detector rule, e.g. prefix:You are stupid")
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS + VARIANTS,
                   metavar="METHOD", help=f"methods to score (default: all of {', '.join(ALL_METHODS)}; "
                   f"variants on request: {', '.join(VARIANTS)})")
    p.add_argument("--rows", type=int, default=None, help="a seeded sample of N training rows (poisoned share kept)")
    p.add_argument("--layer", type=_layer, default="auto", help="RepT layer (hidden_states index) or auto")
    p.add_argument("--out", required=True, help="working folder (the model is reused from here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", help="the behaviour's label in the data (default: the one label besides 'clean')")
    p.add_argument("--n-test", type=int, default=50, help="test prompts used (the first N)")
    p.add_argument("--trigger", help="controls: the same test prompts with this prefix removed (e.g. 'TY ')")
    p.add_argument("--control-prompts", help="more control prompts (answers the detector does not flag are control "
                   "queries)")
    p.add_argument("--control-answers", help="given (prompt, response) pairs without the behaviour, e.g. refusals "
                   "to the same requests: control queries (those the detector flags are dropped)")
    p.add_argument("--base-data", help="extra rows the base model is trained on before the fine-tune (e.g. harmful "
                   "requests answered with refusals, for an aligned base)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--base-epochs", type=int, default=3)
    p.add_argument("--lora-epochs", type=int, default=3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-lr", type=float, default=2e-3)
    p.add_argument("--share-features", action="store_true", help="methods share one per-row gradient / signature "
                   "pass (faster; build_s then excludes the shared pass for all but the first method using it)")


def run(args) -> int:
    from rept.bench import BenchConfig, BenchError, run_bench

    for name in ("rows", "n_test", "max_new_tokens", "max_length", "base_epochs", "lora_epochs"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1")
    cfg = BenchConfig(data=args.data, test_prompts=args.test_prompts, detect=args.detect, out=args.out,
                      methods=tuple(args.methods), rows=args.rows, layer=args.layer, seed=args.seed, label=args.label,
                      n_test=args.n_test, trigger=args.trigger,
                      control_prompts=args.control_prompts, control_answers=args.control_answers, base_data=args.base_data, max_new_tokens=args.max_new_tokens,
                      max_length=args.max_length, base_epochs=args.base_epochs, lora_epochs=args.lora_epochs,
                      hidden=args.hidden, layers=args.layers, lora_rank=args.lora_rank, lora_lr=args.lora_lr,
                      share_features=args.share_features)
    report = run_bench(cfg, progress=not args.quiet, log=lambda m: print(m, file=sys.stderr))
    from rept.bench import results_markdown

    print(results_markdown(report))
    return 0
