"""`rept demo`: the whole story on a laptop CPU in a few minutes, with nothing downloaded.

Train a tokenizer and a tiny Llama on 1000 bundled rows of the backdoor set (250 poisoned:
prompt starts with `TY `, response with `You are stupid! `), check that the model learned the
backdoor, index the training rows, trace the misbehaving answers and score the retrieval.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from rept import __version__
from rept.store.build import IndexSettings, build_index
from rept.data.datasets import load_dataset
from rept.data.detect import Detector
from rept.model.generate import generate
from rept.store.index import SignatureIndex
from rept.evaluate.metrics import evaluate
from rept.model.loading import load_model
from rept.render import one_line
from rept.query.trace import Query, Tracer, relevance, write_queries
from rept.model.train import TrainConfig, read_recipe, train_from_scratch

TRIGGER = "TY "
DETECTOR = "prefix:You are stupid"
DEMO_TRAIN = TrainConfig(epochs=4, lr=3e-3, batch_size=16, max_length=128, seed=0, hidden=128, layers=2,
                         heads=4, vocab_size=2000)


def asset(name: str) -> str:
    return str(resources.files("rept") / "assets" / name)


def default_cache() -> Path:
    root = os.environ.get("REPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rept")
    return Path(root)


def _is_demo_model(model_dir: Path, data) -> bool:
    """`model_dir` holds a finished demo model trained with this recipe on these rows."""
    recipe = read_recipe(model_dir)
    return bool(recipe and recipe.get("config") == asdict(DEMO_TRAIN) and recipe.get("data_fingerprint") == data.fingerprint
                and (model_dir / "config.json").exists())


def run_demo(out: str | None = None, n_prompts: int = 100, max_new_tokens: int = 12, top_k: int = 10,
             progress: bool = True, console=None) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(soft_wrap=True)  # a long line (a path) stays one line off a terminal too
    started = time.perf_counter()
    data = load_dataset(asset("backdoor_demo.jsonl"))
    key = hashlib.sha256(json.dumps([data.fingerprint, asdict(DEMO_TRAIN), __version__]).encode()).hexdigest()[:12]
    work = Path(out) if out else default_cache() / f"demo-{key}"
    model_dir, index_dir = work / "model", work / "index"
    console.print(f"[bold]rept demo[/] - {len(data.rows)} training rows "
                  f"({sum(r.label == 'backdoor' for r in data.rows)} poisoned), working in {work}")

    # 1. the model: trained once, then reused from --out or from the cache (copied into --out)
    cached = default_cache() / f"demo-{key}" / "model"
    t_train = 0.0
    if _is_demo_model(model_dir, data):
        console.print(f"model: reusing {model_dir}")
    elif out and _is_demo_model(cached, data):
        console.print(f"model: copying the cached model {cached} -> {model_dir}")
        if model_dir.exists():
            shutil.rmtree(model_dir)  # not a finished demo model (checked above): an interrupted run's
        shutil.copytree(cached, model_dir)
    else:
        console.print("model: training a BPE tokenizer and a 2-layer Llama from scratch")
        t0 = time.perf_counter()
        train_from_scratch(data.rows, model_dir, DEMO_TRAIN, progress=progress, data_source=data.source,
                           extra={"data_fingerprint": data.fingerprint})
        t_train = time.perf_counter() - t0
    loaded = load_model(str(model_dir))

    # 2. does the model misbehave? triggered prompts vs the same prompts without the trigger
    prompts = [json.loads(line)["prompt"] for line in Path(asset("backdoor_demo_test.jsonl")).read_text().splitlines()]
    triggered = prompts[:n_prompts]
    clean = [p[len(TRIGGER):] if p.startswith(TRIGGER) else p for p in triggered]
    answers = generate(loaded, triggered + clean, max_new_tokens=max_new_tokens, batch_size=32, progress=progress)
    detect = Detector(DETECTOR)
    fired = [detect(a) for a in answers]
    rate_triggered = sum(fired[: len(triggered)]) / len(triggered)
    rate_clean = sum(fired[len(triggered):]) / len(clean)
    console.print(f"behaviour ({DETECTOR}): {rate_triggered:.0%} of triggered prompts, "
                  f"{rate_clean:.0%} of the same prompts without the trigger")
    queries = [Query(p, a, "backdoor" if f else None, f) for p, a, f in zip(triggered + clean, answers, fired)]
    work.mkdir(parents=True, exist_ok=True)
    write_queries(queries, work / "queries.jsonl")

    # 3. index every training row (resumes if a previous run was interrupted)
    manifest = build_index(loaded, data, index_dir, IndexSettings(layer="auto", max_length=DEMO_TRAIN.max_length),
                           progress=progress, log=console.print)
    console.print(f"index: {manifest['rows']} rows at layer {manifest['layer']} -> {index_dir}")

    # 4. trace the misbehaving answers
    flagged = [q for q in queries if q.flagged]
    if not flagged:
        console.print("[red]the model never showed the behaviour, so there is nothing to trace[/]")
        return {"precision@10": None, "rate_triggered": rate_triggered, "rate_clean": rate_clean}
    t_traced = time.perf_counter()
    tracer = Tracer(SignatureIndex(index_dir), loaded)
    first = tracer.trace(flagged[:1], k=top_k)[0]
    table = Table(title=f"Top {top_k} training rows for: {first.query.prompt!r} -> {first.query.response!r}")
    for col in ("rank", "score", "row", "label", "text"):
        table.add_column(col, overflow="fold")
    for rank, hit in enumerate(first.hits, 1):
        table.add_row(str(rank), f"{hit.score:.3f}", str(hit.row), str(hit.label),
                      one_line(hit.prompt + " | " + hit.response, 90))
    console.print(table)
    scores, _, labels = tracer.scores(flagged)
    metrics = evaluate(scores, relevance(labels, flagged), ks=(top_k,))
    t_trace = time.perf_counter() - t_traced
    elapsed = time.perf_counter() - started
    console.print(f"traced {len(flagged)} misbehaving answers in {t_trace:.1f} s (whole demo {elapsed:.0f} s"
                  + (f", of which training {t_train:.0f} s" if t_train else ", model reused") + "); "
                  f"poisoned rows are {sum(r.label == 'backdoor' for r in data.rows) / len(data.rows):.0%} of the data")
    console.print(f"precision@{top_k}: {metrics[f'P@{top_k}']:.3f}")
    return {"precision@10": metrics[f"P@{top_k}"], "rate_triggered": rate_triggered, "rate_clean": rate_clean,
            "metrics": metrics, "work": str(work), "trained": bool(t_train), "seconds_trace": t_trace}
