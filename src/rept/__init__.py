"""rept: trace a language model's output back to the training rows (and words) that taught it.

The package follows the flow of one trace, one folder per step (docs/architecture.md):

    data/ -> model/ -> signatures/ -> store/ -> query/ -> evaluate/, report/, app/, repair/

The names a notebook needs are importable from here directly (`from rept import Tracer`); each is
loaded on first use, so `import rept` stays cheap and loads no torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "load_dataset": "rept.data.datasets",
    "Detector": "rept.data.detect",
    "load_model": "rept.model.loading",
    "TrainConfig": "rept.model.train",
    "LoraSettings": "rept.model.train",
    "train_model": "rept.model.train",
    "ExtractionSettings": "rept.signatures.extract",
    "extract_all": "rept.signatures.extract",
    "phase_transition_layer": "rept.signatures.layers",
    "token_scores": "rept.signatures.tokens",
    "attach_word_scores": "rept.signatures.tokens",
    "IndexSettings": "rept.store.build",
    "build_index": "rept.store.build",
    "SignatureIndex": "rept.store.index",
    "open_store": "rept.store.index",
    "MethodIndex": "rept.store.method_index",
    "build_method_index": "rept.store.method_index",
    "Query": "rept.query.trace",
    "Tracer": "rept.query.trace",
    "MethodTracer": "rept.query.trace",
    "open_tracer": "rept.query.trace",
    "load_queries": "rept.query.trace",
    "ContrastTracer": "rept.query.contrast",
    "open_base": "rept.query.contrast",
    "ModelBundle": "rept.methods.base",
    "get_method": "rept.methods",
    "write_report": "rept.report",
    "run_mitigation": "rept.repair.mitigate",
    "run_rounds": "rept.repair.rounds",
    "run_correction": "rept.repair.correct",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'rept' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
