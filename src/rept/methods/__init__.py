"""Attribution methods behind one interface (rept.methods.base.Method): fit on the training
rows, then score queries -> float matrix [n_queries, n_train] (higher = more responsible),
which rept.evaluate.metrics.evaluate turns into P@k, auPRC@k, AP and recall@k for every method alike.

    bundle = ModelBundle(model_dir, adapter_dir, layer="auto")
    m = get_method("less", seed=0); m.fit(bundle, rows); scores = m.score(bundle, queries)
"""

from __future__ import annotations

from rept.methods.base import Method, MethodError, ModelBundle
from rept.methods.contrast import AgainstBase
from rept.methods.gradients import LESS, DataInf, RapidIn, TracIn, oporp_compress, rademacher_project
from rept.methods.rept import RepT
from rept.methods.text import BM25, Random

from rept import registry

METHODS = registry.METHODS  # name -> rept.registry.MethodSpec


def get_method(name: str, seed: int = 0) -> Method:
    if name not in METHODS:
        raise MethodError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")
    return METHODS[name].create(seed=seed)


def score(name: str, bundle: ModelBundle, train_rows, queries, seed: int = 0, detector=None):
    """One call: fit `name` on the training rows and score the queries ([n_queries, n_train]).
    `detector` (rept.data.detect.Detector) is what the `-span` variants restrict the query loss with."""
    method = get_method(name, seed)
    method.check(bundle)
    if detector is not None and hasattr(method, "detector"):
        method.detector = detector
    method.fit(bundle, train_rows)
    return method.score(bundle, queries)


__all__ = ["METHODS", "Method", "MethodError", "ModelBundle", "get_method", "score", "rademacher_project",
           "oporp_compress", "RepT", "TracIn", "LESS", "DataInf", "RapidIn", "AgainstBase", "BM25", "Random"]
