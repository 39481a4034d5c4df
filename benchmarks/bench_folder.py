"""What the variant scripts read from a `rept bench --out DIR` folder (shared by bench_contrast.py
and bench_variants.py; `open_against_base` by the against-base benchmarks): the model, the training rows the model was trained on, which of them carry
the behaviour's label, and the queries that can be traced."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rept.data.examples import tokenize_pair
from rept.methods.base import ModelBundle
from rept.query.trace import Query, load_queries, traceable_queries


@dataclass
class BenchFolder:
    report: dict             # DIR/results.json
    bundle: ModelBundle      # the base model + DIR/adapter at the chosen layer
    layer: int
    max_length: int
    rows: list[dict]         # training rows with a response token within max_length (the others were
                             # never trained on and rank last in the bench)
    relevant: np.ndarray     # [len(rows)] bool: the row carries the behaviour's label
    queries: list[Query]     # the bench's queries that keep a response token within max_length

    def fits(self, prompt: str, response: str) -> bool:
        return tokenize_pair(self.bundle.merged().tokenizer, prompt, response, max_length=self.max_length) is not None


def base_model(work: Path, report: dict) -> str:
    """DIR/base when the bench trained it, else the base model the bench was given (--base)."""
    return str(work / "base") if (work / "base").is_dir() else report["model"]["base"]


def open_bench_folder(work: str | Path, layer: int | None = None) -> BenchFolder:
    work = Path(work)
    report = json.loads((work / "results.json").read_text())
    max_length = report["config"]["max_length"]
    layer = layer if layer is not None else report["model"]["layer"]
    bundle = ModelBundle(base_model(work, report), str(work / "adapter"), layer=layer, max_length=max_length)
    folder = BenchFolder(report, bundle, layer, max_length, [], np.zeros(0, bool), [])
    rows = [json.loads(line) for line in (work / "train_rows.jsonl").read_text().splitlines()]
    folder.rows = [r for r in rows if folder.fits(r["prompt"], r["response"])]
    folder.relevant = np.array([r["label"] == report["behaviour"]["label"] for r in folder.rows])
    folder.queries = traceable_queries(bundle.merged().tokenizer, load_queries(str(work / "queries.jsonl")), max_length)
    return folder


@dataclass
class AgainstBaseFolder:
    report: dict             # DIR/results.json
    label: str               # the behaviour's label
    rows: list               # every training row (rept.data Row), as the bench trained on them
    bundle: ModelBundle      # the bench's base model + DIR/adapter
    tracer: object           # a ContrastTracer over the rows, every row scored
    queries: list[Query]     # DIR/queries.jsonl


def open_against_base(work: str | Path, base_model: str | None = None) -> AgainstBaseFolder:
    """What the against-base benchmarks (bench_guess_weight.py, bench_traced_words.py) read from a
    `rept bench --out DIR` folder: the rows, the two models and a ContrastTracer over the rows."""
    from rept.data.datasets import Row, read_jsonl
    from rept.query.contrast import ContrastTracer

    work = Path(work)
    report = json.loads((work / "results.json").read_text())
    cfg = report["config"]
    rows = [Row(r["row"], r["prompt"], r["response"], r["label"]) for r in read_jsonl(work / "train_rows.jsonl")]
    bundle = ModelBundle(base_model or cfg["base"], str(work / "adapter"), max_length=int(cfg["max_length"]),
                         batch_size=int(cfg.get("batch_size", 16)))
    tracer = ContrastTracer.over_rows(bundle.merged(), bundle.base(), rows, bundle.max_length,
                                      batch_size=bundle.batch_size, progress=True)
    return AgainstBaseFolder(report, report["behaviour"]["label"], rows, bundle, tracer,
                             load_queries(str(work / "queries.jsonl")))


def unrelated_queries(path: str, n: int, strip_prefix: str, answer) -> list[Query]:
    """The first `n` prompts of `path` (a prompt column), `strip_prefix` taken off each that starts
    with it (a trigger), as unflagged queries answered by `answer(prompts) -> answers` (the fine-tuned
    model, as the bench answered its own prompts)."""
    from rept.data.datasets import load_prompts

    prompts = [x[len(strip_prefix):] if strip_prefix and x.startswith(strip_prefix) else x
               for x in load_prompts(path)[:n]]
    return [Query(x, a, None, False) for x, a in zip(prompts, answer(prompts))]
