"""`rept index`: the signature of every training row (or a baseline's train-side state), stored."""

from __future__ import annotations

import sys

from rept import registry
from rept.cli.options import SEARCH_MODES, add_data_args, add_model_args, layer_value, positive

HELP = "compute and store the signature of every training row (resumable)"

# RepT-only flags and their defaults: a baseline's index (--method) refuses them when changed
REPT_ONLY = {"layer": "auto", "mode": registry.DEFAULT_MODE, "max_tokens": None, "probe_rows": 64}


def add_arguments(p) -> None:
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument("--method", choices=registry.index_methods(), default="rept",
                   help="rept (default): RepT signatures; or a baseline's train-side state (gradients, projections, "
                   "BM25's inverted index) for `rept trace` and `rept eval` to score queries with")
    p.add_argument("--layer", type=layer_value, default=REPT_ONLY["layer"],
                   help="hidden_states index, or 'auto' (default)")
    p.add_argument("--mode", choices=SEARCH_MODES, default=REPT_ONLY["mode"],
                   help="default scoring mode recorded in the index (any other is computable from what is stored, "
                   "but lookahead needs an index built in that mode: it stores a third vector per row)")
    p.add_argument("--batch-size", type=positive, default=16, help="rows per forward/backward pass")
    p.add_argument("--max-tokens", type=positive, default=REPT_ONLY["max_tokens"],
                   help="padded tokens per batch at most (default: no cap)")
    p.add_argument("--max-length", type=positive, default=512,
                   help="tokens per row; a row left with no response token is skipped and counted")
    p.add_argument("--store-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of the stored signatures (float16: half the bytes)")
    p.add_argument("--shard-size", type=positive, default=1024, help="dataset rows per shard")
    p.add_argument("--probe-rows", type=positive, default=REPT_ONLY["probe_rows"], help="rows used by --layer auto")


def run(args) -> int:
    from rept.cli.options import dataset_from_args, load_model_from_args, record_settings

    if args.method != "rept":
        return _index_method(args)
    from rept.store.build import IndexSettings, build_index
    from rept.store.distributed import rank_and_world

    loaded, data = load_model_from_args(args), dataset_from_args(args)
    settings = IndexSettings(layer=args.layer, mode=args.mode, batch_size=args.batch_size, max_tokens=args.max_tokens,
                             max_length=args.max_length, store_dtype=args.store_dtype, shard_size=args.shard_size,
                             probe_rows=args.probe_rows)
    record_settings(args, index=settings)
    manifest = build_index(loaded, data, args.out, settings, progress=not args.quiet,
                           log=lambda msg: print(msg, file=sys.stderr))
    if rank_and_world()[0] == 0:
        print(f"indexed {manifest['rows']} rows at layer {manifest['layer']} -> {args.out} "
              f"(skipped: {len(manifest['skipped_empty'])} empty, {len(manifest['skipped_truncated'])} cut off by "
              f"--max-length {manifest['max_length']})")
    return 0


def _index_method(args) -> int:
    """`rept index --method NAME`: fit a baseline on the training rows and store its state."""
    from rept.cli.options import dataset_from_args
    from rept.methods import ModelBundle
    from rept.methods.base import MethodError
    from rept.store.method_index import build_method_index

    if args.dtype != "float32" and registry.needs_model(args.method):
        raise MethodError(f"{args.method} takes float32 gradients: leave out --dtype {args.dtype}")
    rept_only = [f"--{name.replace('_', '-')}" for name, default in REPT_ONLY.items()
                 if getattr(args, name) != default]
    if rept_only:
        raise MethodError(f"{', '.join(rept_only)} set{'s' if len(rept_only) == 1 else ''} up RepT signatures, "
                          f"not the {args.method} index: leave {'it' if len(rept_only) == 1 else 'them'} out")
    bundle = ModelBundle(args.model, args.adapter, max_length=args.max_length, batch_size=args.batch_size,
                         device=args.device, progress=not args.quiet)
    build_method_index(args.method, bundle, dataset_from_args(args), args.out, shard_size=args.shard_size,
                       store_dtype=args.store_dtype, log=print)
    return 0
