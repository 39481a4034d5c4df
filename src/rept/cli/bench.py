"""`rept bench`: train the two-stage CPU model on a poisoned set and score every attribution method."""

from __future__ import annotations

import sys

HELP = ("train (or reuse) a tiny base model, or take a given one (--base), LoRA fine-tune it on a poisoned "
        "dataset, make it misbehave, and score every attribution method (writes DIR/results.json and "
        "DIR/results.md)")

# The from-scratch base stage's flags (a given --base replaces that stage): each sets one field of
# the stage's TrainConfig (rept.evaluate.bench.config.default_base_stage holds the defaults).
BASE_STAGE = {"base_epochs": "epochs", "hidden": "hidden", "layers": "layers"}
# The against-base method's flags: each sets one attribute of rept.methods.contrast.AgainstBase.
AGAINST_BASE = {"min_gain": "min_gain", "pick": "pick", "changed_words": "words", "guess_weight": "weight",
                "context": "context"}


def _layer(value: str):
    return value if value == "auto" else int(value)


def add_arguments(p) -> None:
    from rept import registry  # torch-free, so the parser loads no torch

    ALL_METHODS, VARIANTS = registry.bench_methods(), registry.bench_variants()

    p.add_argument("--data", required=True, help="labelled training set (prompt, response, label columns)")
    p.add_argument("--test-prompts", required=True, help="prompts that should trigger the behaviour")
    p.add_argument("--detect", required=True, help="detector rule, e.g. prefix:You are stupid")
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS + VARIANTS,
                   metavar="METHOD", help=f"methods to score (default: all of {', '.join(ALL_METHODS)}; "
                   f"variants on request: {', '.join(VARIANTS)})")
    p.add_argument("--rows", type=int, default=None, help="a seeded sample of N training rows (poisoned share kept)")
    p.add_argument("--share", type=float, default=None, metavar="F",
                   help="with --rows: the behaviour rows' share of the sample (e.g. 0.25) instead of the set's")
    p.add_argument("--layer", type=_layer, default="auto", help="RepT layer (hidden_states index) or auto")
    p.add_argument("--out", required=True, help="working folder (the model is reused from here)")
    seed = p.add_mutually_exclusive_group()
    seed.add_argument("--seed", type=int, default=None, help="default 0")  # None: argparse then sees --seed 0 too
    seed.add_argument("--seeds", type=int, nargs="+", metavar="N",
                      help="run the whole bench once per seed (DIR/seed-N) and report each figure's mean, lowest "
                      "and highest over them in DIR/results.json and results.md")
    p.add_argument("--label", help="the behaviour's label in the data (default: the one label besides 'clean')")
    p.add_argument("--n-test", type=int, default=50, help="test prompts used (the first N)")
    p.add_argument("--trigger", help="controls: the same test prompts with this prefix removed (e.g. 'TY ')")
    p.add_argument("--control-prompts", help="more control prompts (answers the detector does not flag are control "
                   "queries)")
    p.add_argument("--control-answers", help="given (prompt, response) pairs without the behaviour, e.g. refusals "
                   "to the same requests: control queries (those the detector flags are dropped)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--max-length", type=int, default=128)
    g = p.add_argument_group("the base model (default: a tiny Llama trained from scratch on the clean rows)")
    g.add_argument("--base", help="a given Hugging Face causal LM (folder or Hub id) to fine-tune instead; "
                   "the from-scratch stage and its flags below do not apply")
    g.add_argument("--base-data", help="extra rows the base model is trained on before the fine-tune (e.g. harmful "
                   "requests answered with refusals, for an aligned base)")
    g.add_argument("--base-epochs", type=int, default=None, help="default 3")
    g.add_argument("--hidden", type=int, default=None, help="default 128")
    g.add_argument("--layers", type=int, default=None, help="default 2")
    g = p.add_argument_group("the LoRA fine-tune on the poisoned set")
    g.add_argument("--lora-epochs", type=int, default=3)
    g.add_argument("--lora-rank", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=None, help="default: twice the rank")
    g.add_argument("--lora-targets", default="all-linear",
                   help="comma-separated module names (e.g. q_proj,v_proj) or all-linear")
    g.add_argument("--lora-lr", type=float, default=2e-3)
    g = p.add_argument_group("the against-base method (rept trace --against-base)")
    from rept.cli.options import add_against_base_args, add_context_arg

    add_against_base_args(g, "the against-base method")
    add_context_arg(g, "the against-base method", "on")
    p.add_argument("--batch-size", type=int, default=16, help="rows per step of the fine-tune and of every method")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... for training, generation and every method "
                   "(default: cuda when available, else cpu)")
    p.add_argument("--share-features", action="store_true", help="methods share one per-row gradient / signature "
                   "pass (faster; build_s then excludes the shared pass for all but the first method using it)")
    p.add_argument("--save-indexes", action="store_true", help="keep each method's fitted state in DIR/indexes/NAME "
                   "(the index contract), for `rept trace --index` and `rept eval --index` to query again")


def run(args) -> int:
    from dataclasses import replace

    from rept.evaluate.bench import BenchConfig, BenchError, run_bench
    from rept.evaluate.bench.config import default_base_stage, default_lora_stage
    from rept.model.train import LoraSettings

    for name in ("rows", "n_test", "max_new_tokens", "max_length", "base_epochs", "lora_epochs", "hidden", "layers",
                 "lora_rank", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1")
    given = [name for name in ("base_data", *BASE_STAGE) if getattr(args, name) is not None]
    if args.base and given:
        raise BenchError(f"--{given[0].replace('_', '-')} shapes the from-scratch base model; with --base the base "
                         "model is given")
    against_base = {field: getattr(args, flag) for flag, field in AGAINST_BASE.items() if getattr(args, flag) is not None}
    if against_base and "against-base" not in args.methods:
        flag = next(f for f in AGAINST_BASE if getattr(args, f) is not None)
        raise BenchError(f"--{flag.replace('_', '-')} is a setting of the against-base method; "
                         "add against-base to --methods")
    from rept.cli.options import against_base_setting

    against_base_setting(args)  # bad values refused before any training
    # the flags onto the settings objects, in this one place
    base_stage = replace(default_base_stage(), **{field: getattr(args, flag) for flag, field in BASE_STAGE.items()
                                                  if getattr(args, flag) is not None})
    lora_stage = replace(default_lora_stage(), epochs=args.lora_epochs, lr=args.lora_lr, batch_size=args.batch_size)
    lora = LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank,
                        target_modules=args.lora_targets)
    cfg = BenchConfig(data=args.data, test_prompts=args.test_prompts, detect=args.detect, out=args.out,
                      methods=tuple(args.methods), rows=args.rows, share=args.share, layer=args.layer,
                      seed=args.seed or 0, label=args.label,
                      n_test=args.n_test, trigger=args.trigger, control_prompts=args.control_prompts,
                      control_answers=args.control_answers, base_data=args.base_data,
                      max_new_tokens=args.max_new_tokens, max_length=args.max_length, base_stage=base_stage,
                      lora_stage=lora_stage, lora=lora, base=args.base, device=args.device,
                      share_features=args.share_features, save_indexes=args.save_indexes,
                      against_base=against_base)
    from rept.cli.options import record_settings

    record_settings(args, bench=cfg)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.seeds:
        from rept.evaluate.bench import run_bench_seeds, seeds_markdown

        print(seeds_markdown(run_bench_seeds(cfg, args.seeds, progress=not args.quiet, log=log)))
        return 0
    from rept.evaluate.bench import results_markdown

    print(results_markdown(run_bench(cfg, progress=not args.quiet, log=log)))
    return 0
