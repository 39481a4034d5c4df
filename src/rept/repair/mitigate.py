"""From diagnosis to repair: select the culprit rows, remove or unlearn them, and measure
whether the behaviour goes away — against removing as many random rows.

The evidence is counterfactual. `remove` retrains with the model's own recipe (same settings
and seed) on the cleaned set; `unlearn` repairs the trained model in a few steps of gradient
ascent on the culprits balanced by descent on kept rows. Both are compared with the same
operation on randomly chosen rows, and a held-out loss shows whether the model still works.
The culprits are the RepT index's choice by default; `culprits_from` lets another attribution
method (rept.methods: a RepT mode, tracin, less, datainf, rapidin, against-base, bm25, random) choose
them under the same selection rule, so methods compare at the same budget. `against-base` (`rept
trace --against-base`, with its defaults or the settings given) scores only the rows it shows, those
that pushed towards an answer it traces; the others are never culprits, so a selection may find
fewer rows than it asks for.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rept import registry
from rept.data.datasets import Row, read_records, write_rows
from rept.data.detect import Detector
from rept.errors import ReptError
from rept.data.examples import tokenize_rows
from rept.model.generate import generate
from rept.store.index import atomic_write_bytes
from rept.model.loading import LoadedModel, attach_adapter
from rept.signatures.extract import collate, response_losses
from rept.model.train import OPTIMIZER_FILE, read_recipe, steps_per_epoch


class MitigationError(ReptError):
    pass


@dataclass(frozen=True)
class Selection:
    kind: str     # "top-k", "threshold", "budget" or "separation"
    value: float  # K, S or N (nan for separation)

    @classmethod
    def parse(cls, text: str) -> "Selection":
        if text == "separation":
            return cls("separation", math.nan)
        kind, _, value = text.partition(":")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if kind not in ("top-k", "threshold", "budget") or math.isnan(number) or (kind != "threshold" and number < 1):
            raise MitigationError(f"bad --select '{text}': use top-k:K, threshold:S, budget:N or separation")
        return cls(kind, number)

    def __str__(self) -> str:
        return self.kind if self.kind == "separation" else f"{self.kind}:{self.value:g}"


def select_culprits(scores: np.ndarray, rows: np.ndarray, selection: Selection,
                    control_scores: np.ndarray | None = None) -> list[tuple[int, float]]:
    """(row, score) of the culprits, strongest first. A row's score is its highest score over
    the flagged queries. top-k:K = the union of every query's top K rows; threshold:S = rows
    scoring at least S; budget:N = the N strongest rows; separation = the rows the flagged answers
    score higher than any control answer does: each row's threshold is read off its own scores
    (`control_scores`: [control queries, rows], the same columns), so a row that answers without
    the behaviour explain as well is kept, however many rows pass (a rule that aims for recall)."""
    best = scores.max(axis=0)
    # a row no flagged answer scored (-inf: against-base shows only the rows that pushed towards
    # an answer it traced) is never a culprit
    order = [i for i in np.lexsort((rows, -best)) if np.isfinite(best[i])]  # strongest first, lower id on ties
    if selection.kind == "separation":
        if control_scores is None or len(control_scores) == 0:
            raise MitigationError("--select separation needs control answers (queries with flagged=false) "
                                  "to read the threshold off")
        control_best = np.asarray(control_scores).max(axis=0)
        chosen = [i for i in order if best[i] > control_best[i]]
    elif selection.kind == "top-k":
        k = int(selection.value)
        picked = set()
        for q in scores:
            picked.update(i for i in np.lexsort((rows, -q))[:k].tolist() if np.isfinite(q[i]))
        chosen = [i for i in order if i in picked]
    elif selection.kind == "threshold":
        chosen = [i for i in order if best[i] >= selection.value]
    else:
        n = int(selection.value)
        if n > len(rows):
            raise MitigationError(f"--select budget:{n} is larger than the training set ({len(rows)} indexed rows)")
        chosen = order[:n]
    if not chosen:
        if not np.isfinite(best).any():  # (rounds stop on "selects no row")
            raise MitigationError(f"--select {selection} selects no row: none of the rows was scored for a flagged "
                                  "answer (against-base scores only the rows that pushed towards an answer it "
                                  "traces, and traces none whose changed words all gained less than its gate)")
        raise MitigationError(f"--select {selection} selects no row (the highest score is {best.max():.4f})")
    return [(int(rows[i]), float(best[i])) for i in chosen]


# ------------------------------------------------------------------ who chooses the culprits

# `--culprits-from`: "rept" scores with the index (its mode, or --mode); a RepT mode scores with
# the index's stored signatures in that mode; any other rept.methods name fits that method on the
# indexed training rows, on the model the index records, and scores the flagged queries.
INDEX_MODES = registry.index_sources()  # name -> the mode it scores the index in (None: the index's own)


def check_culprit_source(name: str) -> None:
    if name not in registry.culprit_sources():
        raise MitigationError(f"unknown --culprits-from '{name}' (choose from {', '.join(registry.culprit_sources())})")


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
                   bundle=None, settings: dict | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """([n_flagged, n_rows] scores, the row ids of the columns, a one-line description) for the
    culprit source `source` (see INDEX_MODES). Methods are fitted on the rows the index stores, so
    every source ranks the same candidate rows. `settings`: attributes of the method set before it
    is fitted (against-base's words, min_gain, pick, weight, context)."""
    from rept.methods import MethodError, get_method
    from rept.model.loading import ModelError
    from rept.model.train import TrainError

    check_culprit_source(source)
    if source in INDEX_MODES:
        mode = tracer.search_mode(INDEX_MODES[source])
        scores, rows, _ = tracer.scores(flagged, mode=mode)
        method = tracer.method_name  # a method index (rept.query.trace.MethodTracer): its method scores
        note = (f"{method} index {tracer.index.folder}" if method is not None
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
        for attribute, value in (settings or {}).items():
            setattr(method, attribute, value)
        method.check(bundle)
        log(f"culprits from {source}: fitting on {len(train_rows)} indexed rows")
        method.fit(bundle, train_rows)
        scores = np.asarray(method.score(bundle, flagged), dtype=np.float64)
    except (MethodError, TrainError, ModelError) as exc:
        raise MitigationError(f"--culprits-from {source}: {exc}") from None
    # -inf is a row the method does not show (against-base); from a method that scores every row, a fault
    unscored_allowed = not method.scores_every_row
    if np.isnan(scores).any() or np.isposinf(scores).any() or (np.isneginf(scores).any() and not unscored_allowed):
        raise MitigationError(f"--culprits-from {source}: the method gave non-finite scores")
    model = bundle.model + (f" + adapter {bundle.adapter}" if bundle.adapter else "")
    return np.atleast_2d(scores), np.asarray(ids), f"{source} on {model} ({len(ids)} indexed rows)"


# ------------------------------------------------------------------ measurements

def behaviour_rate(loaded: LoadedModel, prompts: list[str], detector: Detector, max_new_tokens: int,
                   batch_size: int = 32, progress: bool = False, desc: str = "generate") -> float:
    answers = generate(loaded, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                       desc=desc)
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
    from rept.model.train import RECIPES

    return recipe.get("recipe") in RECIPES


def retrain(recipe: dict, rows: list[Row], out: Path, progress: bool, desc: str | None = None) -> LoadedModel:
    """Train again with the model's recorded recipe (same base, settings and seed) on `rows`."""
    from rept.model.train import train_from_recipe

    return train_from_recipe(recipe, rows, out, progress=progress, desc=desc)


def unlearn(loaded: LoadedModel, culprits: list[Row], keep: list[Row], steps: int = 30, lr: float = 1e-3,
            batch_size: int = 8, max_length: int = 128, seed: int = 0) -> LoadedModel:
    """Gradient ascent on the culprits balanced by descent on kept rows (gradient difference).
    The ascent term stops pushing once the culprits' loss has doubled, so the model is not
    driven into nonsense."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if loaded.adapter:
        # `loaded.model` has the adapter merged in (rept.model.loading.load_model): start again from the base
        # weights and train the adapter's LoRA weights, or the adapter would count twice.
        from rept.model.loading import load_model

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


# ------------------------------------------------------------------ what a run reads and writes

# What a run writes in --out: files, the cleaned set (a file, or a folder for a save_to_disk input),
# retrained models and the rounds' folders. None of them may be, or lie inside, one of the run's
# inputs; a folder that already holds one of them holds an earlier run's results.
OUTPUT_NAMES = ("culprits.jsonl", "results.json", "summary.md", "run.json", "cleaned", "cleaned.*",
                "model-cleaned", "model-random-*", "round-*", "oracle")


def _is_output_name(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OUTPUT_NAMES)


def check_outputs(out: str | Path, inputs: dict[str, str | None]) -> None:
    """Refuse an --out that would write over an input: --out is an input or lies inside an input
    folder, or an input lies where the run writes in --out (compared as resolved paths)."""
    out_path = Path(out).resolve()
    for what, given in inputs.items():
        if not given or not os.path.exists(given):  # e.g. a Hub id: nothing on disk to overwrite
            continue
        path = Path(given).resolve()
        if out_path == path or (path.is_dir() and out_path.is_relative_to(path)):
            raise MitigationError(f"--out {out} is {'the' if out_path == path else 'inside the'} {what} {given}: "
                                  "rept mitigate never writes into its inputs; choose another --out")
        if path.is_relative_to(out_path) and _is_output_name(path.relative_to(out_path).parts[0]):
            written = out_path / path.relative_to(out_path).parts[0]
            raise MitigationError(f"--out {out} would overwrite the {what} {given} (the run writes {written}); "
                                  "choose another --out")


def earlier_outputs(out: str | Path) -> list[str]:
    """The names in `out` that an earlier run wrote (empty when `out` is new)."""
    out = Path(out)
    return sorted(p.name for p in out.iterdir() if _is_output_name(p.name)) if out.is_dir() else []


def clear_outputs(out: str | Path) -> None:
    """Remove what an earlier run wrote in `out` (--overwrite); nothing else in the folder is touched."""
    for name in earlier_outputs(out):
        path = Path(out) / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def refuse_earlier_run(out: str | Path, found: list[str]) -> None:
    shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
    raise MitigationError(f"--out {out} holds an earlier run's results ({shown}): pass --overwrite to replace "
                          "them, or choose another --out")


def check_dataset(dataset, manifest: dict) -> None:
    """The rows a run removes are named by their index in the dataset: it must be the index's."""
    expected = manifest.get("dataset_fingerprint")
    if expected and dataset.fingerprint != expected:
        recorded = (manifest.get("dataset") or {}).get("source", "?")
        raise MitigationError(f"{dataset.source} is not the dataset the index was built from (fingerprint "
                              f"{dataset.fingerprint[:12]}; the index's, of {recorded}: {expected[:12]}): its row "
                              "numbers would name other rows")


def read_culprits(path: str | Path, dataset) -> list[tuple[int, float | None]]:
    """(row, score or None) from a culprits JSONL file (the format culprits.jsonl has: `row`
    required; `score`, `label`, `prompt`, `response` optional), checked against `dataset`: an
    unknown row, a repeated row, or a prompt/response that is not that row's is refused."""
    from rept.data.datasets import DataError, read_jsonl

    name = Path(path).name
    try:
        records = read_jsonl(path)
    except (DataError, OSError, UnicodeDecodeError) as exc:
        raise MitigationError(f"--culprits {path}: {exc}") from None
    if not records:
        raise MitigationError(f"--culprits {path}: no culprit rows in the file")
    by_index = {r.index: r for r in dataset.rows}
    culprits, seen = [], set()
    for number, rec in enumerate(records, 1):
        row = rec.get("row")
        where = f"--culprits {name} culprit {number}"
        if not isinstance(row, int) or isinstance(row, bool):
            raise MitigationError(f"{where}: 'row' must be an integer row number, got {row!r}")
        if row not in by_index:
            raise MitigationError(f"{where}: row {row} is not a training row of {dataset.source} "
                                  f"({len(dataset.rows)} rows, numbered 0-{dataset.n_total - 1})")
        if row in seen:
            raise MitigationError(f"{where}: row {row} is listed twice")
        for key in ("prompt", "response"):
            if key in rec and rec[key] != getattr(by_index[row], key):
                raise MitigationError(f"{where}: the {key} given for row {row} is not that row's {key} in "
                                      f"{dataset.source} (a culprits file of another dataset?)")
        score = rec.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise MitigationError(f"{where}: 'score' must be a number, got {score!r}")
        seen.add(row)
        culprits.append((row, None if score is None else float(score)))
    return culprits


def behaviour_label(flagged) -> str | None:
    """The label the flagged queries carry (the most common one), the rows' label for the behaviour."""
    labels = [q.label for q in flagged if q.label is not None]
    return max(sorted(set(labels)), key=labels.count) if labels else None


def selection_quality(removed, by_index: dict, label: str | None) -> dict | None:
    """Precision and recall of the removed rows against the rows carrying the behaviour's label."""
    if label is None:
        return None
    labelled = sum(by_index[r].label == label for r in removed)
    total = sum(r.label == label for r in by_index.values())
    return {"label": label, "labelled": labelled, "label_rows": total,
            "precision": labelled / max(1, len(removed)), "recall": labelled / max(1, total)}


class RetrainClock:
    """Labels each retrain ("retrain 2/4 (random seed 1)") and, after the first, projects the rest
    from its measured time."""

    def __init__(self, total: int, log):
        self.total, self.done, self.log, self.first = total, 0, log, None

    def label(self, what: str) -> str:
        return f"retrain {self.done + 1}/{self.total} ({what})"

    def finished(self, seconds: float, steps: int) -> None:
        self.done += 1
        if self.first is None:
            self.first = seconds
            if self.total > self.done:
                left = self.total - self.done
                self.log(f"retrain 1 took {seconds:.0f} s ({steps / max(seconds, 1e-9):.1f} steps/s): "
                         f"about {_minutes(seconds * left)} for the other {left}")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def retrain_steps(recipe: dict, n_rows: int) -> tuple[int, int]:
    """(epochs, optimizer steps) of one retrain on `n_rows` rows with `recipe`."""
    cfg = recipe.get("config", {})
    epochs, batch = int(cfg.get("epochs", 4)), int(cfg.get("batch_size", 16))
    return epochs, epochs * steps_per_epoch(n_rows, batch)


def plan_note(recipe: dict, n_rows: int, retrains: int, generations: int, prompts: int, max_new_tokens: int) -> str:
    epochs, steps = retrain_steps(recipe, n_rows)
    return (f"plan: {retrains} retrain{'s' if retrains != 1 else ''} x ~{n_rows} rows x {epochs} epochs "
            f"= {retrains * n_rows * epochs} row passes ({steps} optimizer steps each), and {generations} "
            f"generations of {prompts} answers x {max_new_tokens} new tokens")


# ------------------------------------------------------------------ the whole run

@dataclass
class Setup:
    """What every mitigation run works from, checked before anything is written."""
    out: Path
    manifest: dict
    dataset: object              # rept.data.datasets.Dataset, the index's own rows
    by_index: dict               # row id -> Row
    recipe: dict | None          # the training recipe (None for unlearn only)
    flagged: list                # flagged queries that can be traced
    controls: list               # queries with flagged=false that can be traced
    prompts: list[str]
    heldout: list[Row] | None
    max_length: int
    bundle: object = None        # rept.methods.ModelBundle for a fitted culprit source


def prepare(tracer, queries, out, method: str, seeds: int, data: str | None, prompts, heldout,
            culprits_from: str, inputs: dict | None, overwrite: bool, log, resumable: dict | None = None,
            progress: bool = False) -> Setup:
    """Every check of a run, before any work: the culprit source, the recipe, the dataset against
    the index, the outputs against the inputs and against an earlier run. `resumable`: a rounds
    run's settings; an unfinished run with the same settings in --out resumes instead of refusing."""
    from rept.data.datasets import load_dataset

    out = Path(out)
    manifest = tracer.index.manifest
    check_culprit_source(culprits_from)
    index_method = tracer.method_name  # a method index: the culprits are its method's
    if index_method is not None and culprits_from != "rept":
        raise MitigationError(f"{tracer.index.folder} is a {index_method} index: its culprits are "
                              f"{index_method}'s; leave out --culprits-from {culprits_from}")
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
    data_source = data or manifest["dataset"]["source"]
    every_input = {"training set": data_source, "index": str(tracer.index.folder), "model": model_dir,
                   "adapter": adapter_dir, "base model": (recipe or {}).get("base"), **(inputs or {})}
    check_outputs(out, every_input)
    dataset = load_dataset(data_source, **_columns(manifest, data))
    check_dataset(dataset, manifest)
    found = earlier_outputs(out)
    if found and not overwrite:
        run_file = out / "run.json"
        same_run = (resumable is not None and "results.json" not in found and run_file.exists()
                    and json.loads(run_file.read_text()) == resumable)
        if not same_run:
            refuse_earlier_run(out, found)
        log(f"resuming the unfinished run in {out}")
    elif found:
        log(f"--overwrite: removing the earlier run's {', '.join(found)} in {out}")
        clear_outputs(out)
    # Answers that cannot be traced (the prompt fills max_length) are left out of the culprit search
    # (their prompts are still measured).
    from rept.query.trace import traceable_queries

    traceable = traceable_queries(tracer.loaded.tokenizer, flagged, manifest["max_length"])
    if not traceable:
        raise MitigationError(f"none of the {len(flagged)} flagged answers keeps a response token within the "
                              f"index's max_length {manifest['max_length']}: nothing to trace")
    if len(traceable) < len(flagged):
        log(f"{len(flagged) - len(traceable)} of {len(flagged)} flagged answers have no response token within "
            f"max_length {manifest['max_length']}: left out of the culprit search")
    controls = traceable_queries(tracer.loaded.tokenizer, [q for q in queries if q.flagged is False],
                                 manifest["max_length"])
    max_length = (recipe or {}).get("config", {}).get("max_length", manifest["max_length"])
    return Setup(out, manifest, dataset, {r.index: r for r in dataset.rows}, recipe, traceable, controls,
                 prompts or [q.prompt for q in flagged], heldout, max_length, bundle)


def clean_heldout(setup: Setup, kept: list[Row]) -> tuple[list[Row], str]:
    if setup.heldout:
        return setup.heldout, "held-out rows"
    return (random.Random(0).sample(kept, min(100, len(kept))),
            "100 kept training rows (no --heldout given, so not truly held out)")


def write_culprits(path: Path, culprits, by_index: dict) -> None:
    lines = [json.dumps({"row": row, "score": score, "label": by_index[row].label, "prompt": by_index[row].prompt,
                         "response": by_index[row].response}) for row, score in culprits]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def run_mitigation(tracer, queries, detector: Detector, out: str | Path, selection: Selection,
                   method: str = "remove", seeds: int = 3, data: str | None = None, prompts: list[str] | None = None,
                   heldout: list[Row] | None = None, max_new_tokens: int = 16, unlearn_steps: int = 30,
                   progress: bool = True, log=print, culprits_from: str = "rept", culprits_file: str | None = None,
                   inputs: dict | None = None, overwrite: bool = False, culprit_settings: dict | None = None) -> dict:
    """`culprits_from`: "rept" (the index's scores), a RepT mode, or another rept.methods name
    (bm25, tracin, less, datainf, rapidin, against-base, random) run on the model the index records,
    `culprit_settings` its settings (`culprit_scores`); the same `selection` rule applies to its scores. `culprits_file`: culprits read from a JSONL file
    instead (no tracing). `inputs`: {what: path} of the caller's input files (queries, prompts,
    held-out rows), which no output may replace; the run's own (data, index, model) are added."""
    setup = prepare(tracer, queries, out, method, seeds, data, prompts, heldout, culprits_from, inputs,
                    overwrite, log, progress=progress)
    out, dataset, by_index, recipe, prompts = setup.out, setup.dataset, setup.by_index, setup.recipe, setup.prompts
    index_method = tracer.method_name
    if culprits_file is None and selection.kind == "separation" and not setup.controls:
        raise MitigationError("--select separation needs control answers (queries with flagged=false) "
                              "to read the threshold off")
    if culprits_file is not None:
        culprits = read_culprits(culprits_file, dataset)
        culprits_from, source_note = "file", f"the culprits file {culprits_file}"

    # 1. culprits
    if culprits_file is None:
        scores, rows, source_note = culprit_scores(tracer, setup.flagged, culprits_from, dataset, log=log,
                                                   bundle=setup.bundle, settings=culprit_settings)
        controls = None
        if selection.kind == "separation" and setup.controls:
            controls, _, _ = culprit_scores(tracer, setup.controls, culprits_from, dataset, log=log,
                                            bundle=setup.bundle, settings=culprit_settings)
        if index_method is not None:
            culprits_from = index_method
        culprits = select_culprits(scores, rows, selection, controls)
        missing = {row for row, _ in culprits} - set(by_index)
        if missing:
            raise MitigationError(f"{len(missing)} culprit rows are not in {dataset.source}: "
                                  "pass the training set with --data")
    culprit_set = {row for row, _ in culprits}
    out.mkdir(parents=True, exist_ok=True)  # only once there are culprits: a refused run leaves nothing
    write_culprits(out / "culprits.jsonl", culprits, by_index)
    chosen = "from the file" if culprits_file else f"{selection}, from {culprits_from}"
    log(f"culprits: {len(culprits)} rows ({chosen}) -> {out / 'culprits.jsonl'}")
    label = behaviour_label(setup.flagged)
    quality = selection_quality(culprit_set, by_index, label)
    if quality:
        log(f"culprits carrying the label '{label}': {quality['labelled']} of {len(culprits)} "
            f"(precision {quality['precision']:.2f}, recall {quality['recall']:.2f} of {quality['label_rows']})")

    # 2. the cleaned training set, in the input's format; the input is never touched
    source = Path(dataset.source)
    records = read_records(str(source))
    cleaned_path = out / ("cleaned" + (source.suffix if source.is_file() else ""))
    write_rows([rec for i, rec in enumerate(records) if i not in culprit_set], cleaned_path)
    kept = [r for r in dataset.rows if r.index not in culprit_set]
    log(f"cleaned training set: {len(kept)} rows -> {cleaned_path}")

    heldout, heldout_note = clean_heldout(setup, kept)
    max_length = setup.max_length
    base = tracer.loaded
    results = {"removed": len(culprits), "selection": "file" if culprits_file else str(selection),
               "culprits_from": culprits_from, "culprits_scored_by": source_note, "detector": detector.rule,
               "prompts": len(prompts), "method": method, "seeds": seeds, "cleaned": str(cleaned_path)}
    if culprit_settings:
        results["culprits_settings"] = culprit_settings
    if quality:
        results["selection_quality"] = quality
    retrains = (1 + seeds) * (method in ("remove", "both"))
    unlearns = (1 + seeds) * (method in ("unlearn", "both"))
    if recipe is not None:
        log(plan_note(recipe, len(kept), retrains, 1 + retrains + unlearns, len(prompts), max_new_tokens))
    results["before"] = behaviour_rate(base, prompts, detector, max_new_tokens, progress=progress,
                                       desc="generate (model before)")
    results["clean_loss"] = {"before": nll_per_char(base, heldout, max_length)}
    results["clean_loss_unit"] = f"response NLL per character (nats) on {heldout_note}"
    log(f"behaviour before: {results['before']:.1%} of {len(prompts)} prompts")
    n_random = len(culprits)
    random_sets = [random.Random(1000 + s).sample([r.index for r in dataset.rows], n_random) for s in range(seeds)]
    clock = RetrainClock(retrains, log)

    def compare(key: str, random_key: str, repair, verb: str) -> None:
        """Repair once for the culprits (removed=None) and once per random control set, and record
        each model's behaviour rate and clean loss."""
        for removed, seed in [(None, 0)] + [(r, s) for s, r in enumerate(random_sets)]:
            what = "culprits" if removed is None else f"random seed {seed}"
            model = repair(removed, seed, what)
            rate = behaviour_rate(model, prompts, detector, max_new_tokens, progress=progress,
                                  desc=f"generate ({what} {verb})")
            loss = nll_per_char(model, heldout, max_length)
            log(f"{what} {verb}: behaviour {rate:.1%}, clean loss {loss:.4f}")
            if removed is None:
                results[key], results["clean_loss"][key] = rate, loss
            else:
                results.setdefault(random_key, []).append(rate)
                results["clean_loss"].setdefault(random_key, []).append(loss)

    def rows_without(removed):
        gone = set(removed)
        return [r for r in dataset.rows if r.index not in gone]

    def removal(removed, seed, what):
        rows = kept if removed is None else rows_without(removed)
        started = time.perf_counter()
        model = retrain(recipe, rows, out / ("model-cleaned" if removed is None else f"model-random-{seed}"),
                        progress=progress, desc=clock.label(what))
        clock.finished(time.perf_counter() - started, retrain_steps(recipe, len(rows))[1])
        return model

    if method in ("remove", "both"):
        compare("after", "random", removal, "removed")
    if method in ("unlearn", "both"):
        bad = [by_index[row] for row, _ in culprits]
        compare("unlearn", "unlearn_random", lambda removed, seed, what: unlearn(
            base, bad if removed is None else [by_index[i] for i in removed],
            kept if removed is None else rows_without(removed),
            steps=unlearn_steps, max_length=max_length, seed=seed), "unlearned")
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
             f"Behaviour detector `{r['detector']}` on {r['prompts']} prompts.", ""]
    q = r.get("selection_quality")
    if q:
        lines += [f"Culprits carrying the label '{q['label']}': {q['labelled']} of {r['removed']} (precision "
                  f"{q['precision']:.2f}, recall {q['recall']:.2f} of the {q['label_rows']} labelled rows).", ""]
    lines += ["| model | behaviour rate | clean loss |", "|---|---|---|",
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
