"""RepT and its ablations from one signature extraction: official ([h; g] raw), balanced (each
half normalised), repsim (h only), repgrad (g only), lookahead ([h; g; g_next], thirds normalised:
g_next is the gradient at the first response position). See rept.query.search.signature_matrix."""

from __future__ import annotations

import numpy as np

from rept.methods.base import Method, MethodError, ModelBundle, examples_for, plural, query_rows


def extract_hg(bundle: ModelBundle, pairs, what: str, loss_chars=None):
    """h and g at the bundle's layer; `loss_chars` (one character range of the response per pair,
    or None) restricts each pair's loss to that part of its response."""
    from rept.signatures.extract import extract_all

    loaded = bundle.merged()
    layer = bundle.resolved_layer([_Row(p, r) for p, r in pairs])
    examples = examples_for(loaded.tokenizer, pairs, bundle.max_length, what, loss_chars)
    from rept.progress import progress_bar

    with progress_bar(total=len(examples), desc=f"signatures ({plural(what)})", disable=not bundle.progress,
                      dynamic_ncols=True) as bar:
        sig = extract_all(loaded.model, examples, layer, loaded.tokenizer.pad_token_id, batch_size=bundle.batch_size,
                          progress=bar.update)
    return sig.h.numpy(), sig.g.numpy(), sig.g_next.numpy()


class _Row:
    def __init__(self, prompt, response):
        self.prompt, self.response, self.index, self.label = prompt, response, 0, None


class RepT(Method):
    """mode: official, balanced, repsim, repgrad or lookahead. The training-row extraction is shared by every
    RepT-family method fitted on the same bundle and rows (it is cached in the bundle)."""

    def __init__(self, mode: str = "balanced", seed: int = 0, span: bool = False):
        super().__init__(seed)
        self.mode = mode
        from rept.registry import MODE_METHODS

        self.name = MODE_METHODS[mode]
        # span: a query's loss covers only the part of its answer the detector flagged
        # (rept.data.detect.Detector.span; the whole answer when the rule names no span)
        self.span = span
        self.detector = None
        if span:
            self.name += "-span"

    def fit(self, bundle, train_rows):
        from rept.query.search import signature_matrix

        pairs = [(r.prompt, r.response) for r in train_rows]
        key = ("rept-train", len(pairs), hash(tuple(pairs)))
        if key not in bundle.cache:
            bundle.cache[key] = extract_hg(bundle, pairs, "training row")
        h, g, g_next = bundle.cache[key]
        self.train = signature_matrix(h, g, self.mode, g_next)
        self.bytes_per_row = self.train.itemsize * self.train.shape[1]  # the floats each mode keeps per row

    def score(self, bundle, queries) -> np.ndarray:
        from rept.query.search import signature_matrix

        pairs = query_rows(queries)
        spans = None
        if self.span:
            if self.detector is None:
                raise MethodError(f"{self.name} needs the detector rule that flagged the queries")
            spans = [self.detector.span(r) for _, r in pairs]
        h, g, g_next = extract_hg(bundle, pairs, "query", loss_chars=spans)
        return signature_matrix(h, g, self.mode, g_next) @ self.train.T

    def settings(self, bundle) -> dict:
        # the layer the signatures were taken at, and the rule a -span variant cuts query losses with
        return {"seed": self.seed, "layer": bundle.cache.get("layer"),
                "detect": self.detector.rule if self.span and self.detector is not None else None}

    def state_chunks(self, bundle):
        import torch

        yield torch.arange(len(self.train)), {"signature": torch.from_numpy(self.train)}

    def restore(self, stored, bundle) -> None:
        settings = stored.manifest["method_settings"]
        bundle.cache["layer"] = settings["layer"]
        if settings.get("detect"):
            from rept.data.detect import Detector

            self.detector = Detector(settings["detect"])
        self.train = stored.load_all()["signature"].numpy()
        self.bytes_per_row = self.train.itemsize * self.train.shape[1]
