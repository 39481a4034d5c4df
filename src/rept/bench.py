"""The proving ground: train the two-stage CPU model on a poisoned dataset, make it misbehave,
and score every attribution method on tracing the misbehaviour back to the poisoned rows.

Stage 1: a tiny Llama (and its tokenizer) trained from scratch on the clean rows — or, with
`base`, a given Hugging Face causal LM (a real model, on a GPU) in its place.
Stage 2: a LoRA fine-tune of it on the whole (poisoned) set, Adam state saved for LESS.
Then: greedy answers to the test prompts (and, with `trigger`, to the same prompts without it,
as controls), a detector flags the behaviour, and each method ranks the training rows for every
flagged answer. A training row is relevant when its label is the behaviour's label; the methods
never see labels. Control queries (answers the detector did not flag) measure whether a method
traces the behaviour or merely the topic: their P@10 should be low.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from rept import registry
from rept.data import rows_fingerprint
from rept.errors import ReptError

ALL_METHODS = registry.bench_methods()  # run by default; the variants on request (--methods)
QUALITY = ("P@10", "auPRC@10", "P@50", "auPRC@50", "P@100", "auPRC@100", "recall@100", "AP", "control_P@10")
VARIANTS = registry.bench_variants()
COST = ("build_s", "query_s", "peak_mem_mb", "bytes_per_row")


class BenchError(ReptError):
    pass


@dataclass
class BenchConfig:
    data: str
    test_prompts: str
    detect: str
    out: str
    methods: tuple = ALL_METHODS
    rows: int | None = None            # seeded sample of the training set keeping the poisoned share
    layer: int | str = "auto"
    seed: int = 0
    label: str | None = None           # the behaviour's label in the data (default: the one label not 'clean')
    n_test: int = 50                   # test prompts used (the first N)
    trigger: str | None = None         # controls: the same prompts with this prefix removed
    control_prompts: str | None = None  # more control prompts (their unflagged answers are control queries)
    control_answers: str | None = None  # given (prompt, response) pairs the detector does not flag: controls
    base_data: str | None = None       # extra rows for the base stage only (e.g. refusals: an aligned base)
    max_new_tokens: int = 24
    max_length: int = 128
    base_epochs: int = 3
    lora_epochs: int = 3
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    vocab_size: int = 2000
    lora_rank: int = 16
    lora_alpha: float | None = None    # default: twice the rank
    lora_targets: str = "all-linear"   # comma-separated module names, or all-linear
    lora_lr: float = 2e-3
    batch_size: int = 16               # the fine-tune's and the methods' batch
    base: str | None = None            # a given base model (folder or Hub id) instead of the from-scratch stage
    device: str | None = None          # training, generation and every method (default: cuda when available)
    share_features: bool = False       # gradient methods (and the RepT modes) share one gradient / signature pass
    save_indexes: bool = False         # each method's fitted state -> DIR/indexes/NAME, for `rept trace` / `rept eval`
    extra: dict = field(default_factory=dict)


def sample_rows(rows, n: int | None, label: str, seed: int):
    """A seeded sample of n rows with the same share of `label` rows as the whole (source order kept)."""
    if n is None or n >= len(rows):
        return list(rows)
    poisoned = [r for r in rows if r.label == label]
    clean = [r for r in rows if r.label != label]
    k = max(1, round(n * len(poisoned) / len(rows))) if poisoned else 0
    rng = random.Random(seed)
    picked = rng.sample(poisoned, min(k, len(poisoned))) + rng.sample(clean, min(n - k, len(clean)))
    return sorted(picked, key=lambda r: r.index)


class PeakMemory:
    """Peak resident memory above the starting level while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        import psutil

        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 2 ** 20


def _behaviour_label(rows, given: str | None) -> str:
    labels = sorted({r.label for r in rows if r.label is not None})
    if given:
        if given not in labels:
            raise BenchError(f"no training row has label '{given}' (labels: {', '.join(labels) or 'none'})")
        return given
    others = [x for x in labels if x != "clean"]
    if len(others) != 1:
        raise BenchError("the bench needs labelled data with one behaviour label besides 'clean' "
                         f"(found: {', '.join(labels) or 'no labels'}); name it with --label")
    return others[0]


def train_two_stage(cfg: BenchConfig, rows, data_source: str, progress=True, log=print):
    """The base model (trained from scratch into DIR/base, or cfg.base as given) and the LoRA
    fine-tune on the poisoned rows (DIR/adapter); each is reused when its recipe is unchanged."""
    from rept.train import LoraSettings, TrainConfig, train_model

    out = Path(cfg.out)
    label = _behaviour_label(rows, cfg.label)
    if cfg.base:
        from rept.gguf import resolve_model_source

        # a GGUF file or a known name: its converted folder, so the recipe and indexes record that
        base = resolve_model_source(cfg.base, log=log)
        log(f"base model: {base} (given; no from-scratch stage)")
    else:
        base = str(out / "base")
        clean = [r for r in rows if r.label != label]
        base_rows, base_source = clean, data_source + " (clean rows)"
        if cfg.base_data:
            from rept.data import load_dataset

            extra = load_dataset(cfg.base_data).rows
            base_rows, base_source = clean + extra, base_source + " + " + cfg.base_data
        base_cfg = TrainConfig(epochs=cfg.base_epochs, lr=3e-3, batch_size=16, max_length=cfg.max_length,
                               seed=cfg.seed, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                               vocab_size=cfg.vocab_size)
        train_model("from-scratch", base_rows, base, base_cfg, data_source=base_source,
                    data_fingerprint=rows_fingerprint(base_rows), progress=progress, log=log, device=cfg.device)
    lora_cfg = TrainConfig(epochs=cfg.lora_epochs, lr=cfg.lora_lr, batch_size=cfg.batch_size,
                           max_length=cfg.max_length, seed=cfg.seed, warmup_steps=10)
    lora = LoraSettings(rank=cfg.lora_rank, alpha=cfg.lora_alpha or 2.0 * cfg.lora_rank,
                        target_modules=cfg.lora_targets)
    train_model("lora", rows, out / "adapter", lora_cfg, base=base, lora=lora, data_source=data_source,
                data_fingerprint=rows_fingerprint(rows), progress=progress, log=log, device=cfg.device)
    return base, out / "adapter", label


def run_bench(cfg: BenchConfig, progress: bool = True, log=print) -> dict:
    from rept.data import load_dataset, load_prompts, write_rows
    from rept.detect import Detector
    from rept.generate import answer_and_detect
    from rept.methods import ModelBundle, get_method
    from rept.methods.store import check_existing, save_method
    from rept.metrics import average_precision_per_query, evaluate, precision_at_k, precision_at_k_per_query

    detector = Detector(cfg.detect)
    unknown = [m for m in cfg.methods if m not in ALL_METHODS + VARIANTS]
    if unknown:
        raise BenchError(f"unknown method(s) {', '.join(unknown)} (choose from {', '.join(ALL_METHODS + VARIANTS)})")
    if any(get_method(name).per_row_gradients for name in cfg.methods):
        from rept.methods.gradients import gradient_memory_budget

        gradient_memory_budget()  # a bad $REPT_GRAD_MEMORY stops here, before any training
    started = time.perf_counter()
    data = load_dataset(cfg.data)
    label = _behaviour_label(data.rows, cfg.label)
    rows = sample_rows(data.rows, cfg.rows, label, cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows([{"row": r.index, "prompt": r.prompt, "response": r.response, "label": r.label} for r in rows],
               out / "train_rows.jsonl")
    n_poisoned = sum(r.label == label for r in rows)
    log(f"bench: {len(rows)} training rows ({n_poisoned} labelled '{label}'), working in {out}")

    # 1. the two-stage model (reused when DIR already holds it with the same recipe)
    base_dir, adapter_dir, _ = train_two_stage(cfg, rows, data.source, progress, log)
    bundle = ModelBundle(str(base_dir), str(adapter_dir), layer=cfg.layer, max_length=cfg.max_length, seed=cfg.seed,
                         batch_size=cfg.batch_size, device=cfg.device, progress=progress)
    loaded = bundle.merged()

    # 2. behaviour: test prompts, and the same prompts without the trigger as controls
    prompts = load_prompts(cfg.test_prompts)[: cfg.n_test]
    controls = []
    if cfg.trigger:
        controls = [p[len(cfg.trigger):] if p.startswith(cfg.trigger) else p for p in prompts]
    if cfg.control_prompts:
        controls += load_prompts(cfg.control_prompts)
    given = []
    if cfg.control_answers:
        # answers of the same kind without the behaviour (e.g. refusals to the same harmful requests):
        # a method that traces the topic rather than the behaviour ranks poisoned rows for them too.
        # Checked before any answer is generated.
        from rept.trace import Query, load_queries

        given = [Query(q.prompt, q.response, None, False) for q in load_queries(cfg.control_answers)
                 if not detector(q.response)]
        if not given:
            raise BenchError(f"the detector '{cfg.detect}' flags every answer in {cfg.control_answers}: "
                             "they are not controls")
        log(f"{len(given)} control answers from {cfg.control_answers}")
    answers = answer_and_detect(loaded, prompts + controls, detector, label=label,
                                max_new_tokens=cfg.max_new_tokens, batch_size=32, progress=progress)
    from rept.models import load_model
    from rept.trace import write_queries

    # the same prompts on the base model, before the poisoned fine-tune: the behaviour should be rare
    base_answers = answer_and_detect(load_model(str(base_dir), device=cfg.device), prompts, detector, label=label,
                                     max_new_tokens=cfg.max_new_tokens, batch_size=32, progress=progress)
    base_rate = sum(q.flagged for q in base_answers) / max(1, len(base_answers))
    test_answers, control_answers = answers[: len(prompts)], answers[len(prompts):]
    rate = sum(q.flagged for q in test_answers) / max(1, len(test_answers))
    control_rate = sum(q.flagged for q in control_answers) / len(control_answers) if control_answers else None
    answers = answers + given
    write_queries(answers, out / "queries.jsonl")
    # Answers that cannot be traced (the prompt fills max_length) are left out, and counted.
    from rept.trace import traceable_queries

    traceable = traceable_queries(loaded.tokenizer, answers, cfg.max_length)
    if len(traceable) < len(answers):
        log(f"{len(answers) - len(traceable)} answers have no response token within --max-length "
            f"{cfg.max_length}: left out of the queries")
    flagged = [q for q in traceable if q.flagged]
    unflagged = [q for q in traceable if not q.flagged]
    log(f"behaviour ({cfg.detect}): {base_rate:.0%} of test prompts on the base model, {rate:.0%} after "
        "the fine-tune" +
        (f", {control_rate:.0%} of controls" if control_rate is not None else ""))
    if not flagged:
        raise BenchError(f"the detector '{cfg.detect}' fired on none of the {len(answers)} answers: the model "
                         "did not learn the behaviour (more rows or epochs?) or the rule is wrong")
    relevant_row = np.array([r.label == label for r in rows])
    # Rows with no response token within max_length were cut from training: the model never saw
    # them, so every method ranks them last (they still count as relevant when poisoned).
    from rept.examples import tokenize_rows

    _, cut = tokenize_rows(loaded.tokenizer, rows, max_length=cfg.max_length)
    cut = set(cut)
    trained = [r for r in rows if r.index not in cut]
    trained_pos = np.array([i for i, r in enumerate(rows) if r.index not in cut])
    if cut:
        log(f"{len(cut)} rows have no response token within --max-length {cfg.max_length} "
            "(cut from training): every method ranks them last")
    layer = bundle.resolved_layer(rows)

    # 3. every method on the same rows and queries. Methods an earlier run measured on this same
    # model, rows and queries (e.g. the gradient baselines run apart) stay in results.json.
    position = {id(q): i for i, q in enumerate(answers)}
    query_lines = {"flagged": [position[id(q)] for q in flagged], "control": [position[id(q)] for q in unflagged]}

    def report(complete: bool) -> dict:
        return _report(results, rate, control_rate, cfg, label, data, rows, n_poisoned, prompts, flagged, unflagged,
                       base_dir, adapter_dir, layer, loaded, started, complete=complete, n_cut=len(cut),
                       base_rate=base_rate, query_lines=query_lines)

    results = {}  # report() reads it; the earlier run's methods are looked up with it empty
    results = earlier_results(out, report(False), cfg.methods, log)
    for name in cfg.methods:
        method = get_method(name, seed=cfg.seed)
        method.check(bundle)
        if hasattr(method, "detector"):
            method.detector = detector
        if not cfg.share_features:
            bundle.clear_features()  # each method pays for its own extraction / gradients
        index_dir = out / "indexes" / name
        keep_index = cfg.save_indexes and not check_existing(index_dir, method, bundle, trained, data)
        log(f"method: {name}")
        on_gpu = loaded.device.type == "cuda"
        if on_gpu:
            import torch

            torch.cuda.reset_peak_memory_stats(loaded.device)
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            method.fit(bundle, trained)
            t1 = time.perf_counter()
            scores = method.score(bundle, flagged + unflagged)
            t2 = time.perf_counter()
        scores_trained = np.asarray(scores, dtype=np.float64)
        # below every trained row's score (finite: the metrics code sorts and sklearn refuses inf)
        lowest = scores_trained.min(axis=1, keepdims=True) - 1.0 if scores_trained.size else 0.0
        scores = np.broadcast_to(lowest, (scores_trained.shape[0], len(rows))).copy()
        scores[:, trained_pos] = scores_trained
        metrics = evaluate(scores[: len(flagged)], relevant_row, ks=(10, 50, 100))
        metrics["control_P@10"] = (precision_at_k(scores[len(flagged):], relevant_row, 10) if unflagged else None)
        # per query, in the order of report["queries"] (lines of queries.jsonl): which answers a method misses
        metrics["per_query"] = {
            "P@10": _rounded(precision_at_k_per_query(scores[: len(flagged)], relevant_row, 10)),
            "AP": _rounded(average_precision_per_query(scores[: len(flagged)], relevant_row)),
            "control_P@10": _rounded(precision_at_k_per_query(scores[len(flagged):], relevant_row, 10)
                                     if unflagged else [])}
        metrics.update(build_s=round(t1 - t0, 3), query_s=round(t2 - t1, 3), peak_mem_mb=round(mem.mb, 1),
                       bytes_per_row=int(method.bytes_per_row), n_control_queries=len(unflagged))
        if on_gpu:  # what the method held on the accelerator, the model's weights included
            metrics["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(loaded.device) / 2 ** 20, 1)
        results[name] = metrics
        if keep_index:  # after the timing: writing the index is not the method's cost
            log(f"saving {name}'s index -> {index_dir}")
            save_method(method, bundle, trained, index_dir, dataset=data)
        _write_report(out, report(False))
    final = report(True)
    _write_report(out, final)
    return final


def _rounded(values) -> list:
    return [None if v is None else round(float(v), 4) for v in values]


# What must be the same for an earlier run's figures to sit in one table with this run's.
RUN_SPECIFIC = ("methods", "share_features", "save_indexes")


def _setup(report: dict) -> dict:
    config = {k: v for k, v in report.get("config", {}).items() if k not in RUN_SPECIFIC}
    return {"config": config, **{k: report.get(k) for k in ("behaviour", "data", "model", "queries")}}


def earlier_results(out: Path, report: dict, methods, log=print) -> dict:
    """The methods of DIR/results.json that this run does not measure again, when that file
    comes from a run on the same model, rows, queries and settings; each marked `earlier_run`."""
    path = out / "results.json"
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    now = _setup(report)
    if old.get("queries") is None:  # written before per-query figures: the queries follow from the rest
        now["queries"] = None
    if "methods" not in old or _setup(old) != now:
        log(f"{path} holds an earlier run with other settings: replaced")
        return {}
    kept = {name: {**m, "earlier_run": True} for name, m in old["methods"].items() if name not in methods}
    if kept:
        log(f"kept from the earlier run in {path}: {', '.join(kept)}")
    return kept


def _write_report(out: Path, report: dict) -> None:
    """results.json and results.md, rewritten after every method (an interrupted run keeps what it measured)."""
    from rept.index import atomic_write_bytes

    atomic_write_bytes(out / "results.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(out / "results.md", results_markdown(report).encode())


def _report(results, rate, control_rate, cfg, label, data, rows, n_poisoned, prompts, flagged, unflagged,
            base_dir, adapter_dir, layer, loaded, started, complete: bool, n_cut: int = 0,
            base_rate: float | None = None, query_lines: dict | None = None) -> dict:
    return {
        "methods": results,
        "queries": query_lines,
        "behaviour": {"triggered": rate, "control": control_rate, "base": base_rate, "rule": cfg.detect,
                      "label": label},
        "data": {"source": data.source, "rows": len(rows), "poisoned": n_poisoned, "sampled_from": len(data.rows),
                 "rows_cut_off": n_cut,
                 "test_prompts": cfg.test_prompts, "n_test": len(prompts), "n_flagged": len(flagged),
                 "n_control_queries": len(unflagged)},
        "model": {"base": str(base_dir), "adapter": str(adapter_dir), "layer": layer,
                  "num_layers": loaded.num_layers},
        "config": {k: v for k, v in asdict(cfg).items() if k != "out"},
        "seconds": round(time.perf_counter() - started, 1),
        "complete": complete,
    }


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def results_markdown(report: dict) -> str:
    b, d, m = report["behaviour"], report["data"], report["model"]
    lines = [f"Training rows: {d['rows']} ({d['poisoned']} labelled `{b['label']}`); layer {m['layer']} of "
             f"{m['num_layers']}; behaviour `{b['rule']}` on {b['triggered']:.0%} of {d['n_test']} test prompts"
             + (f" ({b['base']:.0%} on the base model before the fine-tune)" if b.get("base") is not None else "")
             + (f", {b['control']:.0%} of controls" if b["control"] is not None else "")
             + f"; {d['n_flagged']} flagged queries, {d['n_control_queries']} control queries."
             + (f" Base model: {m['base']} (given)." if report["config"].get("base") else ""), "",
             "| method | " + " | ".join(QUALITY) + " |", "|---|" + "---:|" * len(QUALITY)]
    for name, r in report["methods"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(k)) for k in QUALITY) + " |")
    cost = COST + (("peak_gpu_mb",) if any("peak_gpu_mb" in r for r in report["methods"].values()) else ())
    lines += ["", "Cost (this machine, varies run to run):", "",
              "| method | " + " | ".join(cost) + " |", "|---|" + "---:|" * len(cost)]
    for name, r in report["methods"].items():
        shown = f"{name} (earlier run)" if r.get("earlier_run") else name
        lines.append(f"| {shown} | " + " | ".join(_fmt(r.get(k)) for k in cost) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the same bench over several seeds

def run_bench_seeds(cfg: BenchConfig, seeds, progress: bool = True, log=print) -> dict:
    """The bench once per seed, each in its own folder DIR/seed-N (a complete bench folder: the seed
    drives the training stages, the --rows sample and the methods' random draws; a given --base is
    shared), then DIR/results.json and results.md with every method's quality figures over the
    seeds: the mean, the lowest and the highest. Rewritten after each seed. A seed whose run stops
    (e.g. its model did not learn the behaviour) is recorded with its error and the others go on;
    when every seed stops, the first error is raised."""
    from rept.index import atomic_write_bytes

    if not seeds or len(set(seeds)) != len(seeds):
        raise BenchError("--seeds needs one or more seeds, each once")
    out = Path(cfg.out)
    runs, failed, summary = {}, {}, None
    for done, seed in enumerate(seeds, 1):
        log(f"seed {seed} -> {out / f'seed-{seed}'}")
        try:
            runs[seed] = run_bench(replace(cfg, seed=seed, out=str(out / f"seed-{seed}")), progress, log)
        except ReptError as exc:
            if not runs and len(failed) + 1 == len(seeds):
                raise
            failed[seed] = str(exc)
            log(f"seed {seed} stopped: {exc}")
        if runs:
            summary = seeds_summary(runs, out, complete=done == len(seeds), failed=failed)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out / "results.json", (json.dumps(summary, indent=2) + "\n").encode())
            atomic_write_bytes(out / "results.md", seeds_markdown(summary).encode())
    return summary


def seeds_summary(runs: dict, out: Path, complete: bool = True, failed: dict | None = None) -> dict:
    """{seed: run_bench report} -> each method's quality figures over the seeds (runs in out/seed-N);
    `failed`: {seed: error} for the seeds whose run stopped (not in the figures)."""
    seeds = list(runs)
    methods = {}
    for name in runs[seeds[0]]["methods"]:
        if any(name not in runs[s]["methods"] for s in seeds):  # kept from an earlier run in one seed's folder only
            continue
        figures = {}
        for key in QUALITY:
            values = [runs[s]["methods"][name].get(key) for s in seeds]
            if any(v is None for v in values):
                figures[key] = None
                continue
            figures[key] = {"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values)),
                            "values": values}
        methods[name] = figures
    first = runs[seeds[0]]
    return {
        "seeds": seeds,
        "methods": methods,
        "behaviour": {"rule": first["behaviour"]["rule"], "label": first["behaviour"]["label"],
                      "triggered": [runs[s]["behaviour"]["triggered"] for s in seeds],
                      "control": [runs[s]["behaviour"]["control"] for s in seeds],
                      "base": [runs[s]["behaviour"]["base"] for s in seeds]},
        "n_flagged": [runs[s]["data"]["n_flagged"] for s in seeds],
        "n_control_queries": [runs[s]["data"]["n_control_queries"] for s in seeds],
        "layer": [runs[s]["model"]["layer"] for s in seeds],
        "runs": {str(s): str(Path(out) / f"seed-{s}") for s in seeds},
        "failed": {str(s): error for s, error in (failed or {}).items()},
        "complete": complete,
    }


def seeds_markdown(summary: dict) -> str:
    """Each method's quality figures over the seeds as "mean (lowest-highest)"."""
    b = summary["behaviour"]
    rates = ", ".join(f"{r:.0%}" for r in b["triggered"])
    lines = [f"Seeds {', '.join(str(s) for s in summary['seeds'])}: behaviour `{b['rule']}` on {rates} of the test "
             f"prompts; {', '.join(str(n) for n in summary['n_flagged'])} flagged queries; layer "
             f"{', '.join(str(x) for x in summary['layer'])}. Each cell: mean (lowest-highest) over the seeds.", "",
             "| method | " + " | ".join(QUALITY) + " |", "|---|" + "---:|" * len(QUALITY)]

    def cell(f):
        return "-" if f is None else f"{f['mean']:.3f} ({f['min']:.3f}-{f['max']:.3f})"

    for name, figures in summary["methods"].items():
        lines.append(f"| {name} | " + " | ".join(cell(figures[k]) for k in QUALITY) + " |")
    if summary.get("failed"):
        lines += [""] + [f"Seed {s} is not in the figures: {error}" for s, error in summary["failed"].items()]
    return "\n".join(lines) + "\n"

