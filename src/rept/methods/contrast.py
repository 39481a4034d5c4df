"""`rept trace --against-base` as an attribution method (`against-base` in `rept bench`): each answer
against the base model's guess at the word the fine-tune changed (rept.query.contrast), every
training row scored on the base model. Unlike the other methods it does not rank every row for every
answer: it returns the rows that pushed towards the answer (score > 0), and none for an answer whose
changed words all gained less than `min_gain` nats (a change of wording, not traced). The rows it
does not return score -inf, which the bench counts as not retrieved."""

from __future__ import annotations

import numpy as np

from rept.methods.base import Method, MethodError, ModelBundle


class AgainstBase(Method):
    name = "against-base"
    storable = False  # nothing per row outlives the queries: each row's gradients are taken against their directions
    scores_every_row = False  # the rows it does not show score -inf

    def __init__(self, seed: int = 0, words: int | None = None, min_gain: float | None = None,
                 pick: str | None = None, layer: int | None = None, weight: float | None = None,
                 context: bool | None = None):
        from rept.query import contrast

        super().__init__(seed)
        self.words = contrast.DEFAULT_CHANGED_WORDS if words is None else words
        self.min_gain = contrast.DEFAULT_MIN_GAIN if min_gain is None else min_gain
        self.pick = pick or contrast.DEFAULT_PICK
        self.weight = contrast.DEFAULT_GUESS_WEIGHT if weight is None else weight
        self.layer = contrast.DEFAULT_LAYER if layer is None else layer
        self.context = contrast.DEFAULT_CONTEXT if context is None else context  # positions weighed by hidden state
        self.traced_words = None  # after `score`: per query, the changed words traced (none: untraced)

    def check(self, bundle: ModelBundle) -> None:
        if not bundle.adapter:
            raise MethodError(f"{self.name} compares the fine-tuned model with the model before the fine-tune: "
                              f"give the fine-tune as a LoRA adapter ({bundle.model} has none)")

    def fit(self, bundle: ModelBundle, train_rows) -> None:
        # no train-side work before the queries: a row's per-token gradients are taken in one pass
        # against every query's direction (ContrastTracer.row_scores)
        self.rows = list(train_rows)

    def score(self, bundle: ModelBundle, queries) -> np.ndarray:
        from rept.query.contrast import ContrastTracer

        tracer = ContrastTracer.over_rows(bundle.merged(), bundle.base(), self.rows, bundle.max_length,
                                          batch_size=bundle.batch_size, layer=self.layer, seed=self.seed,
                                          progress=bundle.progress)
        run = tracer.against_base(list(queries), words=self.words, min_gain=self.min_gain, pick=self.pick,
                                  weight=self.weight, context=self.context)
        self.traced_words = run.traced_words()
        return run.shown_scores([r.index for r in self.rows])  # the rows `rept trace --against-base` shows

    def settings(self, bundle: ModelBundle) -> dict:
        return {"seed": self.seed, "words": self.words, "min_gain": self.min_gain, "pick": self.pick,
                "weight": self.weight, "layer": self.layer, "context": self.context}
