"""The one interface every attribution method implements, and the model bundle they share.

A method is fitted on the training rows (`fit`: the train-side work, e.g. one gradient or
signature per row) and then scores queries (`score`: a float matrix [n_queries, n_train_rows],
higher = more responsible). `rept.evaluate.metrics.evaluate` scores every method from that matrix.
A method that returns only some rows for a query (`against-base`) scores the others -inf: the bench
counts those as not retrieved (`evaluate`'s `retrieved`). No method ever sees a label.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rept.errors import ReptError


class MethodError(ReptError):
    """A user-facing problem with an attribution method (one line)."""


@dataclass
class ModelBundle:
    """What the methods may look at: a model folder, an optional PEFT adapter (LoRA methods need
    one; its folder also holds the Adam state when trained by `rept train`), the RepT layer."""

    model: str
    adapter: str | None = None
    layer: int | str = "auto"
    max_length: int = 128
    batch_size: int = 16
    device: str | None = None
    seed: int = 0
    progress: bool = False   # progress bars on the per-row passes (signatures, gradients)
    cache: dict = field(default_factory=dict, repr=False)

    def merged(self):
        """The model (adapter merged in) for RepT and generation; eval mode, no parameter grads."""
        if "merged" not in self.cache:
            from rept.model.loading import load_model

            self.cache["merged"] = load_model(self.model, self.adapter, device=self.device)
        return self.cache["merged"]

    def base(self):
        """The model before the fine-tune (the model folder with no adapter); eval mode."""
        if not self.adapter:
            raise MethodError(f"this method compares the model with the model before its fine-tune, but "
                              f"{self.model} has no adapter: give the fine-tune as a LoRA adapter (--adapter)")
        if "base" not in self.cache:
            from rept.model.loading import load_model

            self.cache["base"] = load_model(self.model, None, device=self.device)
        return self.cache["base"]

    def lora(self):
        """(PEFT model with only the LoRA weights trainable, tokenizer) for gradient methods."""
        if not self.adapter:
            raise MethodError("this method needs a LoRA adapter (--adapter), but the model is a full model; "
                              "use tracin, the RepT family, bm25 or random, or fine-tune with `rept train --lora`")
        if "lora" not in self.cache:
            from rept.model.loading import attach_adapter, load_model

            loaded = load_model(self.model, None, device=self.device)
            model = attach_adapter(loaded.model, self.adapter, merge=False, trainable=True)
            model.eval()
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
            if not any(p.requires_grad for p in model.parameters()):
                raise MethodError(f"the adapter in {self.adapter} has no LoRA weights")
            self.cache["lora"] = (model, loaded.tokenizer)
        return self.cache["lora"]

    def trainable(self):
        """(model, tokenizer) whose trainable parameters are those fine-tuned: the LoRA weights
        with an adapter, every weight without one."""
        if self.adapter:
            return self.lora()
        if "full" not in self.cache:
            from rept.model.loading import load_model

            loaded = load_model(self.model, None, device=self.device)
            loaded.model.requires_grad_(True)
            self.cache["full"] = (loaded.model, loaded.tokenizer)
        return self.cache["full"]

    def clear_features(self) -> None:
        """Forget cached per-row features (signatures, gradients) but keep the loaded models, so
        that the next method pays for its own train-side work."""
        for key in [k for k in self.cache if isinstance(k, tuple)]:
            del self.cache[key]

    def resolved_layer(self, rows) -> int:
        if "layer" not in self.cache:
            if self.layer == "auto":
                from rept.signatures.layers import phase_transition_layer

                self.cache["layer"] = phase_transition_layer(self.merged(), rows[:64], max_length=self.max_length).layer
            else:
                from rept.model.loading import resolve_layer

                self.cache["layer"] = resolve_layer(self.merged().model, int(self.layer))
        return self.cache["layer"]


class Method:
    """Base class: set `name`, implement `fit` and `score`."""

    name = "method"
    needs_lora = False
    per_row_gradients = False  # takes every row's gradient: bounded by the gradient memory budget
    storable = True            # its fitted state can be kept as an index (`rept bench --save-indexes`)
    scores_every_row = True    # False: rows it does not show score -inf (not retrieved), as against-base's

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.bytes_per_row = 0   # bytes of train-side state kept per training row

    def check(self, bundle: ModelBundle) -> None:
        if self.needs_lora and not bundle.adapter:
            raise MethodError(f"{self.name} needs LoRA gradients: give a LoRA adapter (the model "
                              f"{bundle.model} has none); fine-tune with `rept train --lora`")

    def fit(self, bundle: ModelBundle, train_rows) -> None:
        raise NotImplementedError

    def score(self, bundle: ModelBundle, queries) -> np.ndarray:
        raise NotImplementedError

    # Persisting the fitted state (rept.store.method_index): what a method keeps per training row goes
    # into the index's shards, and `restore` takes it back instead of fitting.

    def settings(self, bundle: ModelBundle) -> dict:
        """What, besides the per-row state, decides the scores (JSON): recorded in the manifest and
        set on the method again when the index is opened."""
        return {"seed": self.seed}

    def state_chunks(self, bundle: ModelBundle):
        """The fitted per-row state: yields (positions [c], {name: tensor [c, ...]})."""
        return iter(())

    def state_floats_per_row(self, bundle: ModelBundle) -> int:
        """Floats of per-row state an index of this method stores per row (for the disk check)."""
        return self.bytes_per_row // 4

    def save_files(self, folder) -> None:
        """State that is not per row, written beside the shards (BM25's inverted index)."""

    def restore(self, stored, bundle: ModelBundle) -> None:
        """Take the state back from an opened rept.store.method_index.MethodIndex instead of fitting."""
        raise NotImplementedError(f"{self.name} cannot be restored from an index")


def plural(what: str) -> str:
    """Plural of a row kind, for progress bar labels: training row -> training rows, query -> queries."""
    return what[:-1] + "ies" if what.endswith("y") else what + "s"


def query_rows(queries):
    """Queries (rept.query.trace.Query or rows) as (prompt, response) pairs."""
    return [(q.prompt, q.response) for q in queries]


def examples_for(tokenizer, pairs, max_length: int, what: str, loss_chars=None):
    """Examples for (prompt, response) pairs; `loss_chars` (one character range of the response
    per pair, or None) restricts each pair's loss to that part of its response."""
    from rept.data.examples import tokenize_pair

    out = []
    spans = loss_chars if loss_chars is not None else [None] * len(pairs)
    for i, ((prompt, response), span) in enumerate(zip(pairs, spans)):
        ex = tokenize_pair(tokenizer, prompt, response, row=i, max_length=max_length, loss_chars=span)
        if ex is None:
            raise MethodError(f"{what} {i + 1}: no response token left within max_length {max_length}")
        out.append(ex)
    return out
