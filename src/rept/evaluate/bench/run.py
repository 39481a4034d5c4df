"""`rept bench` end to end: the stages, the behaviour, every method scored, the report written."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from rept.evaluate.bench.config import ALL_METHODS, VARIANTS, BenchConfig, BenchError
from rept.evaluate.bench.measure import PeakMemory
from rept.evaluate.bench.results import build_report, earlier_results, rounded, seeds_markdown, seeds_summary, write_results
from rept.evaluate.bench.stages import behaviour_label, sample_rows, train_two_stage
from rept.errors import ReptError


def run_bench(cfg: BenchConfig, progress: bool = True, log=print) -> dict:
    from rept.data.datasets import load_dataset, load_prompts, write_rows
    from rept.data.detect import Detector
    from rept.model.generate import answer_and_detect
    from rept.methods import ModelBundle, get_method
    from rept.store.method_index import check_existing, save_method
    from rept.evaluate.metrics import average_precision_per_query, evaluate, precision_at_k, precision_at_k_per_query

    detector = Detector(cfg.detect)
    unknown = [m for m in cfg.methods if m not in ALL_METHODS + VARIANTS]
    if unknown:
        raise BenchError(f"unknown method(s) {', '.join(unknown)} (choose from {', '.join(ALL_METHODS + VARIANTS)})")
    if any(get_method(name).per_row_gradients for name in cfg.methods):
        from rept.methods.gradients import gradient_memory_budget

        gradient_memory_budget()  # a bad $REPT_GRAD_MEMORY stops here, before any training
    started = time.perf_counter()
    data = load_dataset(cfg.data)
    label = behaviour_label(data.rows, cfg.label)
    rows = sample_rows(data.rows, cfg.rows, label, cfg.seed, cfg.share)
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
        from rept.query.trace import Query, load_queries

        given = [Query(q.prompt, q.response, None, False) for q in load_queries(cfg.control_answers)
                 if not detector(q.response)]
        if not given:
            raise BenchError(f"the detector '{cfg.detect}' flags every answer in {cfg.control_answers}: "
                             "they are not controls")
        log(f"{len(given)} control answers from {cfg.control_answers}")
    answers = answer_and_detect(loaded, prompts + controls, detector, label=label,
                                max_new_tokens=cfg.max_new_tokens, batch_size=32, progress=progress)
    from rept.model.loading import load_model
    from rept.query.trace import write_queries

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
    from rept.query.trace import traceable_queries

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
    from rept.data.examples import tokenize_rows

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
        return build_report(results, rate, control_rate, cfg, label, data, rows, n_poisoned, prompts, flagged,
                            unflagged, base_dir, adapter_dir, layer, loaded, started, complete=complete,
                            n_cut=len(cut), base_rate=base_rate, query_lines=query_lines)

    results = {}  # report() reads it; the earlier run's methods are looked up with it empty
    results = earlier_results(out, report(False), cfg.methods, log)
    for name in cfg.methods:
        method = get_method(name, seed=cfg.seed)
        if name == "against-base":
            for attribute, value in cfg.against_base.items():  # the flags of rept.cli.bench.AGAINST_BASE
                setattr(method, attribute, value)
        method.check(bundle)
        if hasattr(method, "detector"):
            method.detector = detector
        if not cfg.share_features:
            bundle.clear_features()  # each method pays for its own extraction / gradients
        index_dir = out / "indexes" / name
        keep_index = cfg.save_indexes and method.storable and not check_existing(index_dir, method, bundle, trained,
                                                                                data)
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
        # below every trained row's score; -inf (not retrieved) where the method left rows out of an answer
        lowest = scores_trained.min(axis=1, keepdims=True) - 1.0 if scores_trained.size else 0.0
        scores = np.broadcast_to(lowest, (scores_trained.shape[0], len(rows))).copy()
        scores[:, trained_pos] = scores_trained
        retrieved = scores > -np.inf  # every row, but for a method that shows some (against-base)
        flag, ctrl = slice(None, len(flagged)), slice(len(flagged), None)
        metrics = evaluate(scores[flag], relevant_row, ks=(10, 50, 100), retrieved=retrieved[flag])
        metrics["control_P@10"] = (precision_at_k(scores[ctrl], relevant_row, 10, retrieved[ctrl]) if unflagged
                                   else None)
        # per query, in the order of report["queries"] (lines of queries.jsonl): which answers a method misses
        metrics["per_query"] = {
            "P@10": rounded(precision_at_k_per_query(scores[flag], relevant_row, 10, retrieved[flag])),
            "AP": rounded(average_precision_per_query(scores[flag], relevant_row, retrieved[flag])),
            "control_P@10": rounded(precision_at_k_per_query(scores[ctrl], relevant_row, 10, retrieved[ctrl])
                                     if unflagged else [])}
        words = getattr(method, "traced_words", None)
        if words is not None:  # against-base: the words each answer was traced against (none: untraced)
            metrics["answers_traced"] = {"flagged": sum(map(bool, words[flag])), "control": sum(map(bool, words[ctrl]))}
            metrics["per_query"] |= {"words": words[flag], "control_words": words[ctrl]}
            metrics["settings"] = method.settings(bundle)
        metrics.update(build_s=round(t1 - t0, 3), query_s=round(t2 - t1, 3), peak_mem_mb=round(mem.mb, 1),
                       bytes_per_row=int(method.bytes_per_row), n_control_queries=len(unflagged))
        if on_gpu:  # what the method held on the accelerator, the model's weights included
            metrics["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(loaded.device) / 2 ** 20, 1)
        results[name] = metrics
        if keep_index:  # after the timing: writing the index is not the method's cost
            log(f"saving {name}'s index -> {index_dir}")
            save_method(method, bundle, trained, index_dir, dataset=data)
        write_results(out, report(False))
    final = report(True)
    write_results(out, final)
    return final


def run_bench_seeds(cfg: BenchConfig, seeds, progress: bool = True, log=print) -> dict:
    """The bench once per seed, each in its own folder DIR/seed-N (a complete bench folder: the seed
    drives the training stages, the --rows sample and the methods' random draws; a given --base is
    shared), then DIR/results.json and results.md with every method's quality figures over the
    seeds: the mean, the lowest and the highest. Rewritten after each seed. A seed whose run stops
    (e.g. its model did not learn the behaviour) is recorded with its error and the others go on;
    when every seed stops, the first error is raised."""
    from rept.store.index import atomic_write_bytes

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
