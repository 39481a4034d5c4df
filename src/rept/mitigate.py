"""From diagnosis to repair: select the culprit rows, remove or unlearn them, and measure
whether the behaviour goes away — against removing as many random rows.

The evidence is counterfactual. `remove` retrains with the model's own recipe (same settings
and seed) on the cleaned set; `unlearn` repairs the trained model in a few steps of gradient
ascent on the culprits balanced by descent on kept rows. Both are compared with the same
operation on randomly chosen rows, and a held-out loss shows whether the model still works.
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
from tqdm.auto import tqdm

from rept.data import Row, read_records, write_rows
from rept.detect import Detector
from rept.errors import ReptError
from rept.examples import tokenize_rows
from rept.generate import generate
from rept.index import atomic_write_bytes
from rept.models import LoadedModel, attach_adapter
from rept.signatures import collate, response_losses
from rept.train import TrainConfig, read_recipe


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

def retrain(recipe: dict, rows: list[Row], out: Path, progress: bool) -> LoadedModel:
    """Train again with the model's recorded recipe (same settings and seed) on `rows`."""
    from rept import train

    kind = recipe.get("recipe")
    if kind == "from-scratch":
        return train.train_from_scratch(rows, out, TrainConfig(**recipe["config"]), progress=progress)
    if hasattr(train, "train_from_recipe"):
        return train.train_from_recipe(recipe, rows, out, progress=progress)
    raise MitigationError(f"cannot retrain a model with recipe '{kind}'")


def unlearn(loaded: LoadedModel, culprits: list[Row], keep: list[Row], steps: int = 30, lr: float = 1e-3,
            batch_size: int = 8, max_length: int = 128, seed: int = 0) -> LoadedModel:
    """Gradient ascent on the culprits balanced by descent on kept rows (gradient difference).
    The ascent term stops pushing once the culprits' loss has doubled, so the model is not
    driven into nonsense."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = copy.deepcopy(loaded.model)
    if loaded.adapter:
        model = attach_adapter(model, loaded.adapter, merge=False, trainable=True)
    else:
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
                   progress: bool = True, log=print) -> dict:
    from rept.data import load_dataset

    out = Path(out)
    manifest = tracer.index.manifest
    flagged = [q for q in queries if q.flagged is not False]
    if not flagged:
        raise MitigationError("no flagged query to mitigate (every query has flagged=false)")
    recipe = read_recipe(manifest["model"]["id"]) if method in ("remove", "both") else None
    if method in ("remove", "both") and recipe is None:
        raise MitigationError(f"`remove` needs the training recipe, and {manifest['model']['id']} has none "
                              "(a model trained outside `rept train`/`rept demo`): use --method unlearn")
    dataset = load_dataset(data or manifest["dataset"]["source"], **_columns(manifest, data))
    prompts = prompts or [q.prompt for q in flagged]
    out.mkdir(parents=True, exist_ok=True)

    # 1. culprits
    scores, rows, _ = tracer.scores(flagged)
    culprits = select_culprits(np.atleast_2d(scores), rows, selection)
    by_index = {r.index: r for r in dataset.rows}
    culprit_set = {row for row, _ in culprits}
    missing = culprit_set - set(by_index)
    if missing:
        raise MitigationError(f"{len(missing)} culprit rows are not in {dataset.source}: pass the training set with --data")
    lines = [json.dumps({"row": row, "score": score, "label": by_index[row].label, "prompt": by_index[row].prompt,
                         "response": by_index[row].response}) for row, score in culprits]
    atomic_write_bytes(out / "culprits.jsonl", ("\n".join(lines) + "\n").encode())
    log(f"culprits: {len(culprits)} rows ({selection}) -> {out / 'culprits.jsonl'}")

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
    results = {"removed": len(culprits), "selection": str(selection), "detector": detector.rule,
               "prompts": len(prompts), "method": method, "seeds": seeds, "cleaned": str(cleaned_path),
               "before": behaviour_rate(base, prompts, detector, max_new_tokens),
               "clean_loss": {"before": nll_per_char(base, heldout, max_length)},
               "clean_loss_unit": f"response NLL per character (nats) on {heldout_note}"}
    log(f"behaviour before: {results['before']:.1%} of {len(prompts)} prompts")
    n_random = len(culprits)
    random_sets = [random.Random(1000 + s).sample([r.index for r in dataset.rows], n_random) for s in range(seeds)]

    steps = (1 + seeds) * ((method in ("remove", "both")) + (method in ("unlearn", "both")))
    bar = tqdm(total=steps, desc="mitigate", disable=not progress, dynamic_ncols=True)

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
    lines = [f"# Mitigation: {r['removed']} culprit rows ({r['selection']})", "",
             f"Behaviour detector `{r['detector']}` on {r['prompts']} prompts.", "",
             "| model | behaviour rate | clean loss |", "|---|---|---|",
             f"| before | {r['before']:.1%} | {r['clean_loss']['before']:.4f} |"]
    if "after" in r:
        lines.append(f"| culprits removed, retrained | {r['after']:.1%} | {r['clean_loss']['after']:.4f} |")
        lines.append(f"| {r['removed']} random rows removed, retrained ({len(r['random'])} seeds) | "
                     f"{_rates(r['random'])} (mean {np.mean(r['random']):.1%}) | "
                     f"{np.mean(r['clean_loss']['random']):.4f} |")
    if "unlearn" in r:
        lines.append(f"| culprits unlearned | {r['unlearn']:.1%} | {r['clean_loss']['unlearn']:.4f} |")
        lines.append(f"| random rows unlearned ({len(r['unlearn_random'])} seeds) | {_rates(r['unlearn_random'])} | "
                     f"{np.mean(r['clean_loss']['unlearn_random']):.4f} |")
    lines += ["", f"Clean loss: {r['clean_loss_unit']}.", ""]
    return "\n".join(lines)
