"""Every attribution method and RepT scoring mode rept knows, by name: the one list that the CLI's
choices, the bench, `rept mitigate --culprits-from`, the method store and `rept.methods.get_method`
read.

It imports nothing heavy, so that building the command line does not load torch: each method names
the class that implements it as "module:Class", imported on first use (the way transformers' auto
classes map a name to a module). Adding a method is one `MethodSpec` line here plus its class
(docs/architecture.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

# RepT scoring modes over the stored h and g (rept.query.search.signature_matrix); the default first.
MODES = ("balanced", "official", "repsim", "repgrad", "lookahead")
DEFAULT_MODE = MODES[0]

# families: what a method needs from the model. contrast: the fine-tuned model and the one before it
REPT, GRADIENT, TEXT, CONTRAST = "rept", "gradient", "text", "contrast"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str               # rept: one signature extraction; gradient: per-example gradients; text: no model;
    #                           contrast: per-token gradients on the base model against each answer's changed word
    target: str               # "module:Class" implementing rept.methods.base.Method
    mode: str | None = None   # rept family: the scoring mode
    span: bool = False        # rept family: the query's loss only on the span the detector flagged
    variant: bool = False     # run by the bench on request only (--methods), not by default

    def create(self, seed: int = 0):
        module, _, attr = self.target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if self.family == REPT:
            return cls(self.mode, seed, span=self.span)
        return cls(seed=seed)


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("rept-official", REPT, "rept.methods.rept:RepT", mode="official"),
    MethodSpec("rept-balanced", REPT, "rept.methods.rept:RepT", mode="balanced"),
    MethodSpec("repsim", REPT, "rept.methods.rept:RepT", mode="repsim"),
    MethodSpec("repgrad", REPT, "rept.methods.rept:RepT", mode="repgrad"),
    # [h; g; g at the first response position], each part normalised
    MethodSpec("rept-lookahead", REPT, "rept.methods.rept:RepT", mode="lookahead"),
    MethodSpec("tracin", GRADIENT, "rept.methods.gradients:TracIn"),
    MethodSpec("less", GRADIENT, "rept.methods.gradients:LESS"),
    MethodSpec("datainf", GRADIENT, "rept.methods.gradients:DataInf"),
    MethodSpec("rapidin", GRADIENT, "rept.methods.gradients:RapidIn"),
    # the answer against the base model's guess at the word the fine-tune changed (rept trace --against-base)
    MethodSpec("against-base", CONTRAST, "rept.methods.contrast:AgainstBase"),
    MethodSpec("bm25", TEXT, "rept.methods.text:BM25"),
    MethodSpec("random", TEXT, "rept.methods.text:Random"),
    # variants: the query's loss restricted to the span the detector flagged
    MethodSpec("rept-balanced-span", REPT, "rept.methods.rept:RepT", mode="balanced", span=True, variant=True),
    MethodSpec("repgrad-span", REPT, "rept.methods.rept:RepT", mode="repgrad", span=True, variant=True),
)}

# The method name of each RepT mode (the span variants aside): `rept-official` <-> `official`.
MODE_METHODS = {spec.mode: name for name, spec in METHODS.items() if spec.family == REPT and not spec.span}


def names(family: str | None = None, variants: bool = True) -> tuple[str, ...]:
    """Method names in the registry's order, optionally of one family, optionally without the variants."""
    return tuple(name for name, spec in METHODS.items()
                 if (family is None or spec.family == family) and (variants or not spec.variant))


def bench_methods() -> tuple[str, ...]:
    """What `rept bench` runs by default."""
    return names(variants=False)


def bench_variants() -> tuple[str, ...]:
    return tuple(name for name, spec in METHODS.items() if spec.variant)


def index_methods() -> tuple[str, ...]:
    """`rept index --method` choices: rept (signatures, every mode) and each baseline's stored state."""
    return ("rept",) + names(GRADIENT) + names(TEXT)


def index_sources() -> dict[str, str | None]:
    """The `rept mitigate --culprits-from` names scored with the index's own signatures, and the mode
    each scores in: rept (the index's mode, None) and each RepT mode's method name."""
    return {"rept": None} | {name: METHODS[name].mode for name in names(REPT, variants=False)}


def culprit_sources() -> tuple[str, ...]:
    """Every `--culprits-from` choice: the index sources, then the methods fitted on the indexed rows."""
    return tuple(index_sources()) + names(GRADIENT) + names(CONTRAST) + names(TEXT)


def needs_model(name: str) -> bool:
    """A method that reads the model (everything but the text baselines)."""
    return METHODS[name].family != TEXT
