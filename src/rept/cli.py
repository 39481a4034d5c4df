"""The `rept` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from rept.errors import ReptError

# rept.search.MODES (not imported here: it loads torch), the default first
SEARCH_MODES = ("balanced", "official", "repsim", "repgrad", "lookahead")
# what `rept index --method` stores besides RepT signatures (rept.methods, not imported here either)
INDEX_METHODS = ("rept", "tracin", "less", "datainf", "rapidin", "bm25", "random")

# Quiet the libraries before they are imported: rept prints its own progress.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


# name -> module under rept.commands
EXTRA_COMMANDS: dict[str, str] = {
    "train": "rept.commands.train",
    "generate": "rept.commands.generate",
    "bench": "rept.commands.bench",
    "mitigate": "rept.commands.mitigate",
    "report": "rept.commands.report",
    "correct": "rept.commands.correct",
    "serve": "rept.commands.serve",
}


class ReptArgumentParser(argparse.ArgumentParser):
    """argparse with its errors in rept's one-line form (`rept: error: ...`, exit 2), not a usage block."""

    def error(self, message: str):
        command = self.prog.removeprefix("rept").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"rept: error: {where}{message} (see `{self.prog} --help`)\n")


# Flags of the whole program that are also accepted after the command (`rept trace ... -q`).
def _add_global_flags(p, after_command: bool = False) -> None:
    # After the command the default is SUPPRESS, so that leaving the flag out there keeps the value
    # given (or defaulted) before the command.
    extra = {"default": argparse.SUPPRESS} if after_command else {}
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars", **extra)


def _layer(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"layer must be an integer or 'auto', not '{value}'") from None


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _add_data_args(p):
    p.add_argument("--data", required=True, help="training set: HF save_to_disk folder, .jsonl, .json, .csv or .parquet")
    p.add_argument("--prompt-column", help="column holding the prompt (default: prompts/prompt/instruction)")
    p.add_argument("--response-column", help="column holding the response (default: response/output/completion)")
    p.add_argument("--label-column", help="column holding a label (default: label, if present)")


def _add_model_args(p, required=True):
    p.add_argument("--model", required=required, help="HF model folder, hub id, .gguf file or smollm2-135m-instruct")
    p.add_argument("--adapter", help="PEFT adapter folder")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")


def _add_index_model_args(p):
    p.add_argument("--model", help="model folder, if it moved since the index was built (default: the index's)")
    p.add_argument("--adapter", help="adapter folder, if it moved since the index was built")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the one the index was built with)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip hashing the index's files against the manifest's checksums (docs/security.md)")


def _tracer(args, methods: bool = True):
    """A Tracer over --index with the index's own model, or the one given (checked against the index);
    with `methods`, a MethodTracer when the index holds a baseline's state (`rept index --method`)."""
    from rept.index import SignatureIndex
    from rept.methods.store import MethodIndex, is_method_index
    from rept.models import load_model
    from rept.trace import MethodTracer, Tracer

    if methods and is_method_index(args.index):
        index = MethodIndex(args.index, verify=not args.no_verify)
        given = [flag for flag, value in (("--mode", args.mode), ("--tokens", getattr(args, "tokens", False)),
                                          ("--dtype", args.dtype)) if value]
        if given:
            raise MethodTracer.error(index, given)
        return MethodTracer(index, model=args.model, adapter=args.adapter, device=args.device,
                            progress=not args.quiet, verify=not args.no_verify)
    index = SignatureIndex(args.index, verify=not args.no_verify)
    m = index.manifest
    loaded = load_model(args.model or m["model"]["id"], args.adapter or m.get("adapter"),
                        dtype=args.dtype or m.get("compute_dtype", "float32"), device=args.device)
    return Tracer(index, loaded)


def build_parser() -> argparse.ArgumentParser:
    parser = ReptArgumentParser(prog="rept", description="Trace an LLM's behaviour back to the training rows "
                                "that taught it (representation-gradient tracing, RepT).")
    parser.add_argument("--version", action="version", version=f"rept {__import__('rept').__version__}")
    _add_global_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train a tiny backdoored model on bundled data, then trace it (no downloads)")
    p.add_argument("--out", help="keep the model, index and queries here (default: a cache folder)")
    p.add_argument("--prompts", type=_positive, default=100, help="triggered test prompts to generate for")

    p = sub.add_parser("layers", help="find the phase-transition layer on a probe set")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--probe-rows", type=_positive, default=64, help="the first N rows make the probe set")
    p.add_argument("--max-length", type=_positive, default=512, help="tokens per row (longer rows are cut)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("index", help="compute and store the signature of every training row (resumable)")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument("--method", choices=INDEX_METHODS, default="rept",
                   help="rept (default): RepT signatures; or a baseline's train-side state (gradients, projections, "
                   "BM25's inverted index) for `rept trace` and `rept eval` to score queries with")
    p.add_argument("--layer", type=_layer, default="auto", help="hidden_states index, or 'auto' (default)")
    p.add_argument("--mode", choices=SEARCH_MODES, default="balanced",
                   help="default scoring mode recorded in the index (any other is computable from what is stored, "
                   "but lookahead needs an index built in that mode: it stores a third vector per row)")
    p.add_argument("--batch-size", type=_positive, default=16, help="rows per forward/backward pass")
    p.add_argument("--max-tokens", type=_positive, default=None, help="padded tokens per batch at most (default: no cap)")
    p.add_argument("--max-length", type=_positive, default=512,
                   help="tokens per row; a row left with no response token is skipped and counted")
    p.add_argument("--store-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of the stored signatures (float16: half the bytes)")
    p.add_argument("--shard-size", type=_positive, default=1024, help="dataset rows per shard")
    p.add_argument("--probe-rows", type=_positive, default=64, help="rows used by --layer auto")

    p = sub.add_parser("trace", help="rank training rows for a misbehaving output")
    p.add_argument("--index", required=True, help="index folder made by `rept index`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt (with --response, or --generate)")
    src.add_argument("--queries", help="JSONL/CSV/Parquet with prompt, response[, label, flagged] "
                     "(with --generate, prompts only)")
    p.add_argument("--response", help="the output to trace")
    p.add_argument("--generate", action="store_true", help="let the model answer greedily and trace its answers")
    p.add_argument("--max-new-tokens", type=_positive, default=64, help="with --generate: the answer's length at most")
    p.add_argument("--top-k", type=_positive, default=10, help="training rows to show per query")
    p.add_argument("--mode", choices=SEARCH_MODES, default=None,
                   help="scoring mode (default: the index's)")
    p.add_argument("--tokens", action="store_true",
                   help="score every word of the top rows; show their top phrases (JSON: words and phrases)")
    p.add_argument("--token-layer", type=int, default=None, metavar="N",
                   help="with --tokens: hidden_states index for the per-token gradients (default: the index's layer)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_index_model_args(p)

    p = sub.add_parser("eval", help="precision@k, pooled auPRC@k, AP and recall@k for labelled queries")
    p.add_argument("--index", required=True, help="index folder made by `rept index` (or a method index)")
    p.add_argument("--queries", required=True, help="queries with a label column (flagged=false rows are skipped)")
    p.add_argument("--k", type=_positive, nargs="+", default=[10, 50, 100], help="the k of P@k, auPRC@k, recall@k")
    p.add_argument("--mode", choices=SEARCH_MODES, default=None, help="scoring mode (default: the index's)")
    p.add_argument("--per-query", action="store_true",
                   help="also each query's P@k (the smallest k) and AP, worst first: which answers are missed")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_index_model_args(p)

    p = sub.add_parser("verify", help="check an index against its manifest: every file's sha256, every shard's "
                       "layer, dims and row range, the row count (no model is loaded)")
    p.add_argument("--index", required=True, help="index folder (signatures or a method index)")
    p.add_argument("--json", action="store_true", help="print JSON")

    # Commands that live in their own modules: each exposes HELP, add_arguments(parser) and run(args).
    for name, module in EXTRA_COMMANDS.items():
        mod = importlib.import_module(module)
        mod.add_arguments(sub.add_parser(name, help=mod.HELP, description=mod.HELP))
    for p in dict.fromkeys(sub.choices.values()):  # each command once (an alias maps to the same parser)
        _add_global_flags(p, after_command=True)
    return parser


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # rept shows its own progress


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from rept.preflight import check_args

        check_args(args)  # files, rules, flag pairs, the device: before torch is imported or a model loaded
        _quiet_libraries()
        if args.command in EXTRA_COMMANDS:
            return importlib.import_module(EXTRA_COMMANDS[args.command]).run(args)
        return COMMANDS[args.command](args)
    except ReptError as exc:
        print(f"rept: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rept: interrupted (an index build resumes when rerun with the same command)", file=sys.stderr)
        return 130


def cmd_demo(args) -> int:
    from rept.demo import run_demo

    result = run_demo(out=args.out, n_prompts=args.prompts, progress=not args.quiet)
    return 0 if result.get("precision@10") is not None else 1


def _load(args):
    from rept.distributed import local_device
    from rept.models import load_model

    return load_model(args.model, args.adapter, dtype=args.dtype, device=args.device or local_device())


def _dataset(args):
    from rept.data import load_dataset

    return load_dataset(args.data, args.prompt_column, args.response_column, args.label_column)


def cmd_layers(args) -> int:
    from rich.console import Console

    from rept.layers import phase_transition_layer

    loaded, data = _load(args), _dataset(args)
    choice = phase_transition_layer(loaded, data.rows[: args.probe_rows], max_length=args.max_length)
    if args.json:
        print(json.dumps(choice.as_dict()))
        return 0
    console = Console()
    console.print("adjacent-layer cosine of the last prompt token (hidden_states i -> i+1):")
    low = min(choice.similarities)
    for i, s in enumerate(choice.similarities):
        bar = "#" * max(1, round(40 * (s - low + 0.02) / (1 - low + 0.02)))
        mark = "  <- chosen" if i + 1 == choice.layer else ""
        console.print(f"  {i:>3} -> {i + 1:<3} {s:7.4f} {bar}{mark}")
    console.print(f"layer: {choice.layer} ({choice.reason})")
    return 0


def cmd_index(args) -> int:
    from rept.build import IndexSettings, build_index

    if args.method != "rept":
        return _index_method(args)
    loaded, data = _load(args), _dataset(args)
    settings = IndexSettings(layer=args.layer, mode=args.mode, batch_size=args.batch_size, max_tokens=args.max_tokens,
                             max_length=args.max_length, store_dtype=args.store_dtype, shard_size=args.shard_size,
                             probe_rows=args.probe_rows)
    manifest = build_index(loaded, data, args.out, settings, progress=not args.quiet,
                           log=lambda msg: print(msg, file=sys.stderr))
    from rept.distributed import rank_and_world

    if rank_and_world()[0] == 0:
        print(f"indexed {manifest['rows']} rows at layer {manifest['layer']} -> {args.out} "
              f"(skipped: {len(manifest['skipped_empty'])} empty, {len(manifest['skipped_truncated'])} cut off by "
              f"--max-length {manifest['max_length']})")
    return 0


def _index_method(args) -> int:
    """`rept index --method NAME`: fit a baseline on the training rows and store its state."""
    from rept.methods import ModelBundle
    from rept.methods.base import MethodError
    from rept.methods.store import TEXT_METHODS, build_method_index

    if args.dtype != "float32" and args.method not in TEXT_METHODS:
        raise MethodError(f"{args.method} takes float32 gradients: leave out --dtype {args.dtype}")
    rept_only = [flag for flag, value, default in (("--layer", args.layer, "auto"), ("--mode", args.mode, "balanced"),
                                                   ("--max-tokens", args.max_tokens, None),
                                                   ("--probe-rows", args.probe_rows, 64)) if value != default]
    if rept_only:
        raise MethodError(f"{', '.join(rept_only)} set{'s' if len(rept_only) == 1 else ''} up RepT signatures, "
                          f"not the {args.method} index: leave {'it' if len(rept_only) == 1 else 'them'} out")
    bundle = ModelBundle(args.model, args.adapter, max_length=args.max_length, batch_size=args.batch_size,
                         device=args.device, progress=not args.quiet)
    build_method_index(args.method, bundle, _dataset(args), args.out, shard_size=args.shard_size,
                       store_dtype=args.store_dtype, log=print)
    return 0


def _queries_from_args(args, tracer):
    from rept.trace import Query, QueryError, load_queries

    if args.queries:
        queries = load_queries(args.queries, need_response=not args.generate)
        if args.generate:
            answers = tracer.generate([q.prompt for q in queries], max_new_tokens=args.max_new_tokens,
                                      progress=not args.quiet)
            queries = [Query(q.prompt, a, q.label, q.flagged) for q, a in zip(queries, answers)]
        return queries
    if args.generate:
        return [Query(args.prompt, tracer.generate([args.prompt], max_new_tokens=args.max_new_tokens)[0])]
    if args.response is None:
        raise QueryError("--prompt needs --response, or --generate to let the model answer")
    return [Query(args.prompt, args.response)]


def cmd_trace(args) -> int:
    from rept.tokens import attach_word_scores, resolve_token_layer

    tracer = _tracer(args)
    token_layer = resolve_token_layer(tracer, args.token_layer) if args.tokens else None  # checked before any work
    mode = tracer.search_mode(args.mode)  # likewise: before any answer is generated
    queries = _queries_from_args(args, tracer)
    results = tracer.trace(queries, k=args.top_k, mode=mode)
    if args.tokens:
        attach_word_scores(tracer, results, layer=token_layer)
    if args.json:
        out = {"layer": tracer.layer, "mode": mode}
        if hasattr(tracer, "method"):
            out["method"] = tracer.method.name
        if args.tokens:
            out["token_layer"] = token_layer
        out["queries"] = [r.to_dict() for r in results]
        print(json.dumps(out, indent=2))
        return 0
    from rept.render import print_results

    print_results(results, show_words=args.tokens, token_layer=token_layer)
    return 0


def cmd_eval(args) -> int:
    from rept.metrics import evaluate
    from rept.trace import QueryError, load_queries, relevance

    queries = [q for q in load_queries(args.queries) if q.flagged is not False]
    labelled = [q for q in queries if q.label is not None]
    if not labelled:
        raise QueryError(f"{args.queries}: no query has a label (eval needs a label column naming the behaviour)")
    tracer = _tracer(args)
    scores, _, labels = tracer.scores(labelled, mode=args.mode)
    relevant = relevance(labels, labelled)
    metrics = evaluate(scores, relevant, ks=tuple(args.k))
    worst = _per_query(scores, relevant, labelled, min(args.k)) if args.per_query else None
    if args.json:
        print(json.dumps(metrics | ({"per_query": worst} if worst is not None else {}), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(labelled)} labelled queries, {scores.shape[1]} training rows")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    if worst:
        k = min(args.k)
        table = Table(title=f"the 10 queries with the lowest P@{k}")
        for column in (f"P@{k}", "AP", "prompt", "response"):
            table.add_column(column, justify="right" if column in (f"P@{k}", "AP") else "left")
        from rept.render import one_line

        for q in worst[:10]:
            table.add_row(f"{q[f'P@{k}']:.2f}", "-" if q["AP"] is None else f"{q['AP']:.3f}", one_line(q["prompt"], 60),
                          one_line(q["response"], 60))
        Console().print(table)
    return 0


def _per_query(scores, relevant, queries, k: int) -> list[dict]:
    """Each query's P@k and AP with its text, the lowest P@k first (then the lowest AP)."""
    from rept.metrics import average_precision_per_query, precision_at_k_per_query

    out = [{"query": i, "prompt": q.prompt, "response": q.response, f"P@{k}": float(p), "AP": ap}
           for i, (q, p, ap) in enumerate(zip(queries, precision_at_k_per_query(scores, relevant, k),
                                              average_precision_per_query(scores, relevant)))]
    return sorted(out, key=lambda q: (q[f"P@{k}"], -1.0 if q["AP"] is None else q["AP"]))


def cmd_verify(args) -> int:
    from rept.index import SignatureIndex
    from rept.methods.store import MethodIndex, is_method_index

    index = MethodIndex(args.index) if is_method_index(args.index) else SignatureIndex(args.index)
    problems = index.check()
    files = index.manifest["files"]
    if args.json:
        print(json.dumps({"index": args.index, "ok": not problems, "files": len(files),
                          "bytes": sum(f["bytes"] for f in files.values()), "problems": problems}, indent=2))
    elif problems:
        for problem in problems:
            print(f"rept: error: {problem}", file=sys.stderr)
    else:
        print(f"{args.index}: {len(files)} files, {index.manifest['rows']} rows: every checksum matches")
    return 2 if problems else 0


COMMANDS = {"demo": cmd_demo, "layers": cmd_layers, "index": cmd_index, "trace": cmd_trace, "eval": cmd_eval,
            "verify": cmd_verify}
