"""Flags shared by several commands, and how they map onto the library's objects (one place)."""

from __future__ import annotations

import argparse

from rept.registry import MODES as SEARCH_MODES  # noqa: F401  (the --mode choices, the default first)


def add_global_flags(p, after_command: bool = False) -> None:
    """Flags of the whole program that are also accepted after the command (`rept trace ... -q`)."""
    # After the command the default is SUPPRESS, so that leaving the flag out there keeps the value
    # given (or defaulted) before the command.
    extra = {"default": argparse.SUPPRESS} if after_command else {}
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars", **extra)


def layer_value(value: str):
    """--layer: an integer (a hidden_states index) or 'auto'."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"layer must be an integer or 'auto', not '{value}'") from None


def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


# the flags `add_against_base_args` defines (their dests): each means nothing without --against-base
AGAINST_BASE_FLAGS = ("min_gain", "pick", "changed_words", "guess_weight")


def refuse_without_against_base(args, flags) -> None:
    """The first of `flags` (dests) given without --against-base is refused in one line."""
    from rept.errors import ReptError

    given = [flag for flag in flags if getattr(args, flag) is not None]
    if given and not args.against_base:
        raise ReptError(f"--{given[0].replace('_', '-')} belongs to --against-base; give --against-base")


def add_context_arg(p, when: str, default: str) -> None:
    """`--context` / `--no-context`: each position's cosine weighed by its hidden state's, or not
    (rept.query.contrast, `context`); None when neither is given."""
    p.add_argument("--context", action=argparse.BooleanOptionalAction, default=None,
                   help=f"{when}: weigh each position's gradient cosine by its hidden state's cosine with the "
                   f"answer's where the word is said, or not (default: {default}; docs/results.md, \"Where the "
                   "word is said\")")


def add_against_base_args(p, when: str) -> None:
    """Which changed words `--against-base` traces (`rept trace`), and `rept bench`'s `against-base`
    method; `when` opens each help line ("with --against-base")."""
    p.add_argument("--min-gain", type=float, default=None, metavar="NATS",
                   help=f"{when}: trace only the changed words the fine-tune made at least NATS more likely than "
                   "the base model did (log-probability); an answer with none changed in wording only and gets no "
                   "rows (default: 5)")
    p.add_argument("--pick", choices=("first", "most"), default=None,
                   help=f"{when}: of the changed words past --min-gain, trace the first in the answer (default; a "
                   "word after a planted one gains from it too) or the one the fine-tune changed most")
    p.add_argument("--changed-words", type=int, default=None, metavar="K",
                   help=f"{when}: trace each answer against K of its changed words past --min-gain (the first K, "
                   "or with --pick most the K of largest gain), a row keeping its best score (default: 1)")
    p.add_argument("--guess-weight", type=float, default=None, metavar="W",
                   help=f"{when}: how much of the push towards the base model's guess each direction subtracts, "
                   "unit(push to the answer) - W unit(push to the guess) (default: 0.5; 1: the plain difference "
                   "--instead uses)")


def add_against_base_group(p, what: str) -> None:
    """`--against-base` (its help: `what`), its flags, `--context` and `--base-model`, as `rept eval` and
    `rept report` take them; `against_base_request` reads them."""
    g = p.add_argument_group("behaviour, not topic (rept trace --against-base)")
    g.add_argument("--against-base", action="store_true", help=what)
    add_against_base_args(g, "with --against-base")
    add_context_arg(g, "with --against-base", "on")
    g.add_argument("--base-model", metavar="PATH",
                   help="with --against-base: the model before the fine-tune (default: the index's model with its "
                   "adapter off)")


def against_base_request(args) -> tuple[int, float, str, float, bool] | None:
    """The (words, min_gain, pick, weight, context) of `add_against_base_group`'s flags, None without --against-base;
    any of its flags without --against-base is refused in one line."""
    refuse_without_against_base(args, AGAINST_BASE_FLAGS + ("context", "base_model"))
    setting = against_base_setting(args)  # bad values refused before any model loads
    return setting if args.against_base else None


def against_base_setting(args) -> tuple[int, float, str, float, bool]:
    """(words, min_gain, pick, weight, context) from the flags of `add_against_base_args` and
    `--context`, rept.query.contrast's defaults where not given; --changed-words below 1 and a
    negative --guess-weight are refused."""
    from rept.errors import ReptError
    from rept.query.contrast import (DEFAULT_CHANGED_WORDS, DEFAULT_CONTEXT, DEFAULT_GUESS_WEIGHT, DEFAULT_MIN_GAIN,
                                     DEFAULT_PICK, check_weight)

    if args.changed_words is not None and args.changed_words < 1:
        raise ReptError(f"--changed-words must be 1 or more, not {args.changed_words}")
    if args.guess_weight is not None:
        check_weight(args.guess_weight)
    return (DEFAULT_CHANGED_WORDS if args.changed_words is None else args.changed_words,
            DEFAULT_MIN_GAIN if args.min_gain is None else args.min_gain, args.pick or DEFAULT_PICK,
            DEFAULT_GUESS_WEIGHT if args.guess_weight is None else args.guess_weight,
            DEFAULT_CONTEXT if getattr(args, "context", None) is None else args.context)


# against_base_setting's tuple, named as rept.methods.contrast.AgainstBase's attributes
AGAINST_BASE_FIELDS = ("words", "min_gain", "pick", "weight", "context")


def against_base_method_settings(args) -> dict:
    """`against_base_setting` as AgainstBase's attributes ({"words": 1, "min_gain": 5.0, ...})."""
    return dict(zip(AGAINST_BASE_FIELDS, against_base_setting(args)))


def add_data_args(p) -> None:
    p.add_argument("--data", required=True, help="training set: HF save_to_disk folder, .jsonl, .json, .csv or .parquet")
    p.add_argument("--prompt-column", help="column holding the prompt (default: prompts/prompt/instruction)")
    p.add_argument("--response-column", help="column holding the response (default: response/output/completion)")
    p.add_argument("--label-column", help="column holding a label (default: label, if present)")


def add_model_args(p, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="HF model folder, hub id, .gguf file or smollm2-135m-instruct")
    p.add_argument("--adapter", help="PEFT adapter folder")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")


def add_index_model_args(p) -> None:
    p.add_argument("--model", help="model folder, if it moved since the index was built (default: the index's)")
    p.add_argument("--adapter", help="adapter folder, if it moved since the index was built")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the one the index was built with)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip hashing the index's files against the manifest's checksums (docs/security.md)")


def add_mode_arg(p, help: str = "scoring mode (default: the index's)") -> None:
    p.add_argument("--mode", choices=SEARCH_MODES, default=None, help=help)


def open_index(args, signatures_only: bool = False):
    """rept.query.trace.open_tracer from the index flags (add_index_model_args, --mode, --tokens). With
    `signatures_only` a method index is refused: the command needs RepT signatures."""
    from rept.query.trace import open_tracer

    return open_tracer(args.index, model=args.model, adapter=args.adapter, dtype=args.dtype, device=args.device,
                       verify=not args.no_verify, progress=not args.quiet, mode=getattr(args, "mode", None),
                       signature_flags=tuple(flag for flag, on in (
                           ("--tokens", getattr(args, "tokens", False)),
                           ("--instead", getattr(args, "instead", None) is not None),
                           ("--contrast", getattr(args, "contrast", False))) if on),
                       methods=not signatures_only, search=getattr(args, "search", "exact"),
                       nprobe=getattr(args, "nprobe", None))


def model_settings(args):
    """--model/--adapter/--dtype/--device as rept.model.loading.ModelSettings (the local rank's device
    under torchrun)."""
    from rept.model.loading import ModelSettings
    from rept.store.distributed import local_device

    return ModelSettings(args.model, args.adapter, dtype=args.dtype, device=args.device or local_device())


def data_settings(args):
    """--data and the column flags as rept.data.datasets.DataSettings."""
    from rept.data.datasets import DataSettings

    return DataSettings(args.data, args.prompt_column, args.response_column, args.label_column)


def load_model_from_args(args):
    settings = model_settings(args)
    record_settings(args, model=settings)
    return settings.load()


def dataset_from_args(args):
    settings = data_settings(args)
    record_settings(args, data=settings)
    return settings.load()


def record_settings(args, **objects) -> None:
    """Keep settings objects (dataclasses) on `args`, for DIR/rept-run.json ("typed", one entry per name)."""
    from dataclasses import asdict

    typed = vars(args).setdefault("typed_settings", {})
    for name, obj in objects.items():
        typed[name] = {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", **asdict(obj)}
