"""From diagnosis to repair: select the culprit rows, remove or unlearn them, and measure
whether the behaviour goes away — against removing as many random rows.

The evidence is counterfactual. `remove` retrains with the model's own recipe (same settings
and seed) on the cleaned set; `unlearn` repairs the trained model in a few steps of gradient
ascent on the culprits balanced by descent on kept rows. Both are compared with the same
operation on randomly chosen rows, and a held-out loss shows whether the model still works.
The culprits are the RepT index's choice by default; `culprits_from` lets another attribution
method (rept.methods: a RepT mode, tracin, less, datainf, rapidin, bm25, random) choose them under the same
selection rule, so methods compare at the same budget.
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rept.progress import progress_bar

from rept.data import Row, read_records, write_rows
from rept.detect import Detector
from rept.errors import ReptError
from rept.examples import tokenize_rows
from rept.generate import generate
from rept.index import atomic_write_bytes
from rept.models import LoadedModel, attach_adapter
from rept.signatures import collate, response_losses
from rept.train import OPTIMIZER_FILE, read_recipe


class MitigationError(ReptError):
    pass


@dataclass(frozen=True)
class Selection:
    kind: str     # "top-k", "threshold" or "budget"
    value: float

    @classmethod
    def parse(cls, text: str) -> "Selection":
        kind, _, value = text.partition(":")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if kind not in ("top-k", "threshold", "budget") or math.isnan(number) or (kind != "threshold" and number < 1):
            raise MitigationError(f"bad --select '{text}': use top-k:K, threshold:S or budget:N")
        return cls(kind, number)

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"


def select_culprits(scores: np.ndarray, rows: np.ndarray, selection: Selection) -> list[tuple[int, float]]:
    """(row, score) of the culprits, strongest first. A row's score is its highest score over
    the flagged queries. top-k:K = the union of every query's top K rows; threshold:S = rows
    scoring at least S; budget:N = the N strongest rows."""
    best = scores.max(axis=0)
    order = np.lexsort((rows, -best))  # strongest first, lower row id on ties
    if selection.kind == "top-k":
        k = int(selection.value)
        picked = set()
        for q in scores:
            picked.update(np.lexsort((rows, -q))[:k].tolist())
        chosen = [i for i in order if i in picked]
    elif selection.kind == "threshold":
        chosen = [i for i in order if best[i] >= selection.value]
    else:
        n = int(selection.value)
        if n > len(rows):
            raise MitigationError(f"--select budget:{n} is larger than the training set ({len(rows)} indexed rows)")
        chosen = order[:n].tolist()
    if not chosen:
        raise MitigationError(f"--select {selection} selects no row (the highest score is {best.max():.4f})")
    return [(int(rows[i]), float(best[i])) for i in chosen]


# ------------------------------------------------------------------ who chooses the culprits

# `--culprits-from`: "rept" scores with the index (its mode, or --mode); a RepT mode scores with
# the index's stored signatures in that mode; any other rept.methods name fits that method on the
# indexed training rows, on the model the index records, and scores the flagged queries.
INDEX_MODES = {"rept": None, "rept-official": "official", "rept-balanced": "balanced", "repsim": "repsim",
               "repgrad": "repgrad", "rept-lookahead": "lookahead"}


def culprit_sources() -> list[str]:
    from rept.methods import METHODS

    return list(INDEX_MODES) + [m for m in METHODS if m not in INDEX_MODES]


def check_culprit_source(name: str) -> None:
    if name not in culprit_sources():
        raise MitigationError(f"unknown --culprits-from '{name}' (choose from {', '.join(culprit_sources())})")


def model_paths(manifest: dict) -> tuple[str, str | None]:
    """(model folder, adapter folder or None) of the model the index records. A model folder that
    is itself a `rept train` LoRA output (its recipe names the base) counts as base + adapter."""
    model, adapter = manifest["model"]["id"], manifest.get("adapter")
    if adapter is None and Path(model).is_dir() and (Path(model) / "adapter_config.json").exists():
        recipe = read_recipe(model) or {}
        if recipe.get("recipe") == "lora" and recipe.get("base"):
            return recipe["base"], model
    return model, adapter


def method_bundle(tracer, seed: int = 0, progress: bool = False):
    """rept.methods.ModelBundle on the model the index records (same layer and max_length)."""
    from rept.methods import ModelBundle

    manifest = tracer.index.manifest
    model, adapter = model_paths(manifest)
    return ModelBundle(model, adapter, layer=tracer.layer, max_length=manifest["max_length"],
                       device=str(tracer.loaded.device), seed=seed, progress=progress)


def culprit_scores(tracer, flagged, source: str, dataset, seed: int = 0, log=print,
                   bundle=None) -> tuple[np.ndarray, np.ndarray, str]:
    """([n_flagged, n_rows] scores, the row ids of the columns, a one-line description) for the
    culprit source `source` (see INDEX_MODES). Methods are fitted on the rows the index stores, so
    every source ranks the same candidate rows."""
    from rept.methods import MethodError, get_method
    from rept.models import ModelError
    from rept.train import TrainError

    check_culprit_source(source)
    if source in INDEX_MODES:
        mode = tracer.search_mode(INDEX_MODES[source])
        scores, rows, _ = tracer.scores(flagged, mode=mode)
        method = getattr(tracer, "method", None)  # a method index (rept.trace.MethodTracer): its method scores
        note = (f"{method.name} index {tracer.index.folder}" if method is not None
                else f"RepT index {tracer.index.folder} (mode {mode}, layer {tracer.layer})")
        return np.atleast_2d(scores), np.asarray(rows), note
    ids = sorted(tracer.index.labels())
    by_index = {r.index: r for r in dataset.rows}
    missing = [i for i in ids if i not in by_index]
    if missing:
        raise MitigationError(f"{len(missing)} indexed rows (e.g. row {missing[0]}) are not in {dataset.source}: "
                              "pass the training set with --data")
    train_rows = [by_index[i] for i in ids]
    bundle = bundle or method_bundle(tracer, seed)
    try:
        method = get_method(source, seed=seed)
        method.check(bundle)
        log(f"culprits from {source}: fitting on {len(train_rows)} indexed rows")
        method.fit(bundle, train_rows)
        scores = np.asarray(method.score(bundle, flagged), dtype=np.float64)
    except (MethodError, TrainError, ModelError) as exc:
        raise MitigationError(f"--culprits-from {source}: {exc}") from None
    if not np.isfinite(scores).all():
        raise MitigationError(f"--culprits-from {source}: the method gave non-finite scores")
    model = bundle.model + (f" + adapter {bundle.adapter}" if bundle.adapter else "")
    return np.atleast_2d(scores), np.asarray(ids), f"{source} on {model} ({len(ids)} indexed rows)"


# ------------------------------------------------------------------ measurements

def behaviour_rate(loaded: LoadedModel, prompts: list[str], detector: Detector, max_new_tokens: int,
                   batch_size: int = 32) -> float:
    answers = generate(loaded, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    return sum(map(detector, answers)) / len(prompts)


@torch.no_grad()
def nll_per_char(loaded: LoadedModel, rows: list[Row], max_length: int, batch_size: int = 16) -> float:
    """Response negative log-likelihood per character of response text (nats). Per character,
    not per token, so models with different tokenizers (a from-scratch retrain) compare fairly."""
    examples, _ = tokenize_rows(loaded.tokenizer, rows, max_length=max_length)
    total_nll, total_chars = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batch = collate(chunk, loaded.tokenizer.pad_token_id, "right", loaded.device)
        logits = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, use_cache=False).logits
        losses = response_losses(logits, batch)
        for e, loss in zip(chunk, losses):
            start = e.offsets[e.prompt_len][0]
            end = e.offsets[-1][1]
            total_nll += float(loss) * e.n_response
            total_chars += max(1, end - start)
    return total_nll / max(1, total_chars)


# ------------------------------------------------------------------ repairs

def can_retrain(recipe: dict) -> bool:
    from rept.train import RECIPES

    return recipe.get("recipe") in RECIPES


def retrain(recipe: dict, rows: list[Row], out: Path, progress: bool) -> LoadedModel:
    """Train again with the model's recorded recipe (same base, settings and seed) on `rows`."""
    from rept.train import train_from_recipe

    return train_from_recipe(recipe, rows, out, progress=progress)


def unlearn(loaded: LoadedModel, culprits: list[Row], keep: list[Row], steps: int = 30, lr: float = 1e-3,
            batch_size: int = 8, max_length: int = 128, seed: int = 0) -> LoadedModel:
    """Gradient ascent on the culprits balanced by descent on kept rows (gradient difference).
    The ascent term stops pushing once the culprits' loss has doubled, so the model is not
    driven into nonsense."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if loaded.adapter:
        # `loaded.model` has the adapter merged in (rept.models.load_model): start again from the base
        # weights and train the adapter's LoRA weights, or the adapter would count twice.
        from rept.models import load_model

        dtype = str(next(loaded.model.parameters()).dtype).replace("torch.", "")
        base = load_model(loaded.model_id, None, dtype=dtype, device=str(loaded.device))
        model = attach_adapter(base.model, loaded.adapter, merge=False, trainable=True)
    else:
        model = copy.deepcopy(loaded.model)
        model.requires_grad_(True)
    tok = loaded.tokenizer
    bad, _ = tokenize_rows(tok, culprits, max_length=max_length)
    good, _ = tokenize_rows(tok, keep, max_length=max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()

    def batch_loss(examples):
        batch = collate(examples, tok.pad_token_id, "right", loaded.device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False).logits
        return response_losses(logits, batch).mean()

    with torch.no_grad():
        start_bad = float(batch_loss(bad[: min(len(bad), 32)]))
    for _ in range(steps):
        loss_bad = batch_loss(rng.sample(bad, min(batch_size, len(bad))))
        loss_good = batch_loss(rng.sample(good, min(batch_size, len(good))))
        ascent = torch.clamp(2 * start_bad - loss_bad, min=0)  # zero once the culprit loss doubled
        (loss_good + ascent).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval().requires_grad_(False)
    if loaded.adapter:
        model = model.merge_and_unload()
    return LoadedModel(model, tok, loaded.model_id, None)


# ------------------------------------------------------------------ the whole run

def run_mitigation(tracer, queries, detector: Detector, out: str | Path, selection: Selection,
                   method: str = "remove", seeds: int = 3, data: str | None = None, prompts: list[str] | None = None,
                   heldout: list[Row] | None = None, max_new_tokens: int = 16, unlearn_steps: int = 30,
                   progress: bool = True, log=print, culprits_from: str = "rept") -> dict:
    """`culprits_from`: "rept" (the index's scores), a RepT mode, or another rept.methods name
    (bm25, tracin, less, datainf, rapidin, random) fitted on the model the index records; the same
    `selection` rule applies to its scores."""
    from rept.data import load_dataset

    out = Path(out)
    manifest = tracer.index.manifest
    check_culprit_source(culprits_from)
    method_index = getattr(tracer, "method", None)  # a method index: the culprits are its method's
    if method_index is not None:
        if culprits_from != "rept":
            raise MitigationError(f"{tracer.index.folder} is a {method_index.name} index: its culprits are "
                                  f"{method_index.name}'s; leave out --culprits-from {culprits_from}")
    if seeds < 1:
        raise MitigationError(f"--seeds must be at least 1 (got {seeds}): the random rows are the control")
    flagged = [q for q in queries if q.flagged is not False]
    if not flagged:
        raise MitigationError("no flagged query to mitigate (every query has flagged=false)")
    bundle = None
    # fail before any work when the index or the method cannot score on this model
    if culprits_from in INDEX_MODES:  # e.g. lookahead on an index built without g_next
        tracer.search_mode(INDEX_MODES[culprits_from])
    else:
        from rept.methods import MethodError, get_method

        bundle = method_bundle(tracer, progress=progress)
        try:
            get_method(culprits_from).check(bundle)
        except MethodError as exc:
            raise MitigationError(f"--culprits-from {culprits_from}: {exc}") from None
        if culprits_from == "less" and not (Path(bundle.adapter) / OPTIMIZER_FILE).exists():
            raise MitigationError(f"--culprits-from less needs the Adam state that `rept train` saves beside the "
                                  f"adapter ({OPTIMIZER_FILE} is missing in {bundle.adapter})")
    model_dir, adapter_dir = model_paths(manifest)
    recipe_dir = adapter_dir or model_dir  # with an adapter, its recipe is the model's
    recipe = read_recipe(recipe_dir) if method in ("remove", "both") else None
    if method in ("remove", "both") and recipe is None:
        raise MitigationError(f"`remove` needs the training recipe, and {recipe_dir} has none "
                              "(a model trained outside `rept train`/`rept demo`): use --method unlearn")
    if recipe is not None and not can_retrain(recipe):
        raise MitigationError(f"`remove` cannot retrain a model with recipe '{recipe.get('recipe')}' "
                              f"({recipe_dir}): use --method unlearn")
    dataset = load_dataset(data or manifest["dataset"]["source"], **_columns(manifest, data))
    prompts = prompts or [q.prompt for q in flagged]
    # Answers that cannot be traced (the prompt fills max_length) are left out of the culprit search
    # (their prompts are still measured).
    from rept.trace import traceable_queries

    traceable = traceable_queries(tracer.loaded.tokenizer, flagged, manifest["max_length"])
    if not traceable:
        raise MitigationError(f"none of the {len(flagged)} flagged answers keeps a response token within the "
                              f"index's max_length {manifest['max_length']}: nothing to trace")
    if len(traceable) < len(flagged):
        log(f"{len(flagged) - len(traceable)} of {len(flagged)} flagged answers have no response token within "
            f"max_length {manifest['max_length']}: left out of the culprit search")
    out.mkdir(parents=True, exist_ok=True)

    # 1. culprits
    scores, rows, source_note = culprit_scores(tracer, traceable, culprits_from, dataset, log=log, bundle=bundle)
    if method_index is not None:
        culprits_from = method_index.name
    culprits = select_culprits(scores, rows, selection)
    by_index = {r.index: r for r in dataset.rows}
    culprit_set = {row for row, _ in culprits}
    missing = culprit_set - set(by_index)
    if missing:
        raise MitigationError(f"{len(missing)} culprit rows are not in {dataset.source}: pass the training set with --data")
    lines = [json.dumps({"row": row, "score": score, "label": by_index[row].label, "prompt": by_index[row].prompt,
                         "response": by_index[row].response}) for row, score in culprits]
    atomic_write_bytes(out / "culprits.jsonl", ("\n".join(lines) + "\n").encode())
    log(f"culprits: {len(culprits)} rows ({selection}, from {culprits_from}) -> {out / 'culprits.jsonl'}")

    # 2. the cleaned training set, in the input's format; the input is never touched
    source = Path(dataset.source)
    records = read_records(str(source))
    cleaned_path = out / ("cleaned" + (source.suffix if source.is_file() else ""))
    write_rows([rec for i, rec in enumerate(records) if i not in culprit_set], cleaned_path)
    kept = [r for r in dataset.rows if r.index not in culprit_set]
    log(f"cleaned training set: {len(kept)} rows -> {cleaned_path}")

    max_length = (recipe or {}).get("config", {}).get("max_length", manifest["max_length"])
    heldout_note = "held-out rows"
    if not heldout:
        heldout = random.Random(0).sample(kept, min(100, len(kept)))
        heldout_note = "100 kept training rows (no --heldout given, so not truly held out)"
    base = tracer.loaded
    results = {"removed": len(culprits), "selection": str(selection), "culprits_from": culprits_from,
               "culprits_scored_by": source_note, "detector": detector.rule,
               "prompts": len(prompts), "method": method, "seeds": seeds, "cleaned": str(cleaned_path),
               "before": behaviour_rate(base, prompts, detector, max_new_tokens),
               "clean_loss": {"before": nll_per_char(base, heldout, max_length)},
               "clean_loss_unit": f"response NLL per character (nats) on {heldout_note}"}
    log(f"behaviour before: {results['before']:.1%} of {len(prompts)} prompts")
    n_random = len(culprits)
    random_sets = [random.Random(1000 + s).sample([r.index for r in dataset.rows], n_random) for s in range(seeds)]

    steps = (1 + seeds) * ((method in ("remove", "both")) + (method in ("unlearn", "both")))
    bar = progress_bar(total=steps, desc="mitigate", disable=not progress, dynamic_ncols=True)

    def compare(key: str, random_key: str, repair) -> None:
        """Repair once for the culprits (removed=None) and once per random control set, and record
        each model's behaviour rate and clean loss."""
        for removed, seed in [(None, 0)] + [(r, s) for s, r in enumerate(random_sets)]:
            model = repair(removed, seed)
            rate = behaviour_rate(model, prompts, detector, max_new_tokens)
            loss = nll_per_char(model, heldout, max_length)
            bar.update(1)
            if removed is None:
                results[key], results["clean_loss"][key] = rate, loss
            else:
                results.setdefault(random_key, []).append(rate)
                results["clean_loss"].setdefault(random_key, []).append(loss)

    def rows_without(removed):
        gone = set(removed)
        return [r for r in dataset.rows if r.index not in gone]

    if method in ("remove", "both"):
        compare("after", "random", lambda removed, seed: retrain(
            recipe, kept if removed is None else rows_without(removed),
            out / ("model-cleaned" if removed is None else f"model-random-{seed}"), progress=False))
    if method in ("unlearn", "both"):
        bad = [by_index[row] for row, _ in culprits]
        compare("unlearn", "unlearn_random", lambda removed, seed: unlearn(
            base, bad if removed is None else [by_index[i] for i in removed],
            kept if removed is None else rows_without(removed),
            steps=unlearn_steps, max_length=max_length, seed=seed))
    bar.close()
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(out / "summary.md", summary_markdown(results).encode())
    return results


def _columns(manifest: dict, data: str | None) -> dict:
    if data:  # another file: find its columns by name
        return {}
    cols = manifest["dataset"]["columns"]
    return {"prompt_column": cols.get("prompt"), "response_column": cols.get("response"),
            "label_column": cols.get("label")}


def _rates(values) -> str:
    return ", ".join(f"{v:.1%}" for v in values)


def summary_markdown(r: dict) -> str:
    source = r.get("culprits_from", "rept")
    lines = [f"# Mitigation: {r['removed']} culprit rows ({r['selection']}) chosen by {source}", "",
             f"Culprits scored by {r.get('culprits_scored_by', source)}; the random controls remove as many rows.", "",
             f"Behaviour detector `{r['detector']}` on {r['prompts']} prompts.", "",
             "| model | behaviour rate | clean loss |", "|---|---|---|",
             f"| before | {r['before']:.1%} | {r['clean_loss']['before']:.4f} |"]
    if "after" in r:
        lines.append(f"| culprits removed, retrained | {r['after']:.1%} | {r['clean_loss']['after']:.4f} |")
        lines.append(f"| {r['removed']} random rows removed, retrained ({_seeds(len(r['random']))}) | "
                     f"{_rates(r['random'])} (mean {np.mean(r['random']):.1%}) | "
                     f"{np.mean(r['clean_loss']['random']):.4f} |")
    if "unlearn" in r:
        lines.append(f"| culprits unlearned | {r['unlearn']:.1%} | {r['clean_loss']['unlearn']:.4f} |")
        lines.append(f"| random rows unlearned ({_seeds(len(r['unlearn_random']))}) | {_rates(r['unlearn_random'])} | "
                     f"{np.mean(r['clean_loss']['unlearn_random']):.4f} |")
    lines += ["", f"Clean loss: {r['clean_loss_unit']}.", ""]
    return "\n".join(lines)


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"
