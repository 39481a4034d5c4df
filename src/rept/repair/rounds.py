"""Trace-remove-retrain rounds: when many rows teach a behaviour, one budget leaves teachers behind.

Each round retrains without every culprit found so far, regenerates on the same prompts, traces
the answers that still misbehave against the rows that remain and removes their culprits; it stops
at the target rate (`until`), the round limit or the row budget. Beside every round: random
removal of as many rows (retrained the same way) and, where the rows carry the behaviour's label,
the oracle (every labelled row removed). Tracing uses the index as built: the rows' signatures on
the model the index records, the queries being the retrained model's misbehaving answers.

With `expand` N, each round also removes the N remaining rows that look most like every culprit
removed so far: the removed rows become queries themselves (cosine of the rows' hidden states h at
the index's layer to the removed rows' mean unit h). When many rows teach one behaviour they are
alike, and the answers left misbehaving after a round no longer rank the last of them near the top;
their likeness to the teachers already found still does (docs/results.md, "Rounds whose removed
rows are queries too").

Everything a round makes stays in DIR/round-K/ (removed.jsonl, answers.jsonl, model/, random-S/,
round.json written last), so a run can be inspected, and a rerun with the same settings resumes
after the last finished round.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

from rept.data.detect import Detector
from rept.model.generate import generate
from rept.store.index import atomic_write_bytes
from rept.repair.mitigate import (MitigationError, RetrainClock, Selection, behaviour_label, culprit_scores,
                                  nll_per_char, plan_note, prepare, retrain, retrain_steps, select_culprits,
                                  selection_quality)

DEFAULT_ROUNDS = 10  # the round limit when only --until is given


def like_removed(index, removed: list[int], exclude: set, n: int) -> list[tuple[int, float]]:
    """The `n` rows of a signature index, outside `exclude`, whose unit hidden state is nearest (cosine)
    to the mean unit hidden state of the rows `removed`, with that cosine, best first (ties by row)."""
    import numpy as np

    from rept.query.search import unit_rows

    stored = index.load_all()
    h = unit_rows(stored.h.double().numpy())
    rows = stored.row.numpy()
    at = {int(r): i for i, r in enumerate(rows)}
    centre = h[[at[r] for r in removed if r in at]].mean(0)
    scores = h @ (centre / max(float(np.linalg.norm(centre)), 1e-30))
    order = sorted((i for i in range(len(rows)) if int(rows[i]) not in exclude), key=lambda i: (-scores[i], rows[i]))
    return [(int(rows[i]), float(scores[i])) for i in order[:n]]


def parse_rate(text: str) -> float:
    """A behaviour rate: 0.05 or 5%."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise MitigationError(f"bad --until '{text}': a rate such as 0.05 or 5%") from None
    if not 0 <= value < 1:
        raise MitigationError(f"bad --until '{text}': a rate from 0 up to (not including) 1")
    return value


def _digest(values) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]


def _write_json(path: Path, value) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def _write_jsonl(path: Path, records) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_rounds(tracer, queries, detector: Detector, out: str | Path, selection: Selection, rounds: int | None = None,
               until: float | None = None, max_removed: int | None = None, seeds: int = 1, data: str | None = None,
               prompts: list[str] | None = None, heldout=None, max_new_tokens: int = 16, progress: bool = True,
               log=print, culprits_from: str = "rept", inputs: dict | None = None, overwrite: bool = False,
               expand: int = 0, culprit_settings: dict | None = None) -> dict:
    """Rounds of trace, remove, retrain (see the module's doc). `rounds`: the round limit (default
    DEFAULT_ROUNDS when only `until` is given); `until`: stop once the behaviour rate is at most
    this; `max_removed`: the row budget over all rounds; `selection` picks each round's culprits
    among the rows that remain; `expand`: rows like the removed ones added each round."""
    from rept.query.trace import Query, traceable_queries

    if rounds is None and until is None:
        raise MitigationError("rounds need --rounds N or --until RATE")
    if rounds is not None and rounds < 1:
        raise MitigationError(f"--rounds must be at least 1 (got {rounds})")
    limit = rounds or DEFAULT_ROUNDS
    if expand < 0:
        raise MitigationError(f"--expand must be 0 or more (got {expand})")
    if expand and tracer.method_name is not None:
        raise MitigationError(f"--expand compares the rows' hidden states: it needs a RepT signature index, and "
                              f"{tracer.index.folder} is a {tracer.method_name} index")
    flagged_prompts = [q.prompt for q in queries if q.flagged is not False]
    settings = {"kind": "rounds", "index": str(Path(tracer.index.folder).resolve()), "selection": str(selection),
                "rounds": limit, "until": until, "max_removed": max_removed, "seeds": seeds,
                "culprits_from": culprits_from, "detector": detector.rule, "max_new_tokens": max_new_tokens,
                **({"expand": expand} if expand else {}),  # absent otherwise: earlier runs' folders still resume
                **({"culprits_settings": culprit_settings} if culprit_settings else {}),  # likewise
                "queries": _digest([[q.prompt, q.response, q.label, q.flagged] for q in queries]),
                "prompts": _digest(prompts or flagged_prompts),
                "heldout": _digest([[r.prompt, r.response] for r in heldout]) if heldout else None}
    setup = prepare(tracer, queries, out, "remove", seeds, data, prompts, heldout, culprits_from, inputs,
                    overwrite, log, resumable=settings, progress=progress)
    out, dataset, by_index, recipe, prompts = setup.out, setup.dataset, setup.by_index, setup.recipe, setup.prompts
    all_ids = [r.index for r in dataset.rows]
    if max_removed is not None and not 1 <= max_removed < len(all_ids):
        raise MitigationError(f"--max-removed {max_removed} cannot be reached: the training set has {len(all_ids)} "
                              "rows, and a retrain keeps at least one")
    if selection.kind == "budget" and selection.value >= len(all_ids):
        raise MitigationError(f"--select {selection} cannot be reached: the training set has {len(all_ids)} rows")
    if selection.kind == "separation" and not setup.controls:
        raise MitigationError("--select separation needs control answers (queries with flagged=false) "
                              "to read the threshold off")
    label = behaviour_label(setup.flagged)
    labelled_rows = [i for i in all_ids if by_index[i].label == label] if label else []
    if heldout:
        heldout_rows, heldout_note = heldout, "held-out rows"
    else:  # one fixed sample for every round, so the rounds compare
        heldout_rows = random.Random(0).sample(dataset.rows, min(100, len(dataset.rows)))
        heldout_note = "100 training rows (no --heldout given, so not truly held out)"
    max_length = setup.max_length

    def measure(loaded, what: str, folder: Path | None) -> tuple[float, float, list[dict]]:
        """Behaviour rate and clean loss of a model; its answers are kept in `folder`."""
        answers = generate(loaded, prompts, max_new_tokens=max_new_tokens, batch_size=32, progress=progress,
                           desc=f"generate ({what})")
        records = [{"prompt": p, "response": a, "flagged": bool(detector(a))} for p, a in zip(prompts, answers)]
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            _write_jsonl(folder / "answers.jsonl", records)
        rate = sum(r["flagged"] for r in records) / len(records)
        return rate, nll_per_char(loaded, heldout_rows, max_length), records

    # round 0: the model as it is (nothing is written before the target is known to be unmet)
    zero = out / "round-0"
    if (zero / "round.json").exists():
        before = json.loads((zero / "round.json").read_text())
        answers = _read_jsonl(zero / "answers.jsonl")
    else:
        rate, loss, answers = measure(tracer.loaded, "model before", None)
        before = {"round": 0, "rate": rate, "clean_loss": loss}
    log(f"behaviour before: {before['rate']:.1%} of {len(prompts)} prompts")
    if until is not None and before["rate"] <= until:
        raise MitigationError(f"the behaviour rate is {before['rate']:.1%} before any removal, already at or below "
                              f"--until {until:.1%}: nothing to repair")
    zero.mkdir(parents=True, exist_ok=True)
    _write_json(out / "run.json", settings)
    _write_jsonl(zero / "answers.jsonl", answers)
    _write_json(zero / "round.json", before)

    controls = None
    if selection.kind == "separation":
        controls, _, _ = culprit_scores(tracer, setup.controls, culprits_from, dataset, log=log, bundle=setup.bundle,
                                        settings=culprit_settings)
    permutations = [random.Random(1000 + s).sample(all_ids, len(all_ids)) for s in range(seeds)]
    budget_note = f", at most {max_removed} rows" if max_removed else ""
    target_note = f" until the rate is at most {until:.1%}" if until is not None else ""
    log(f"rounds: up to {limit}{target_note}{budget_note}; each round {selection} of the rows that remain, "
        f"{seeds} random control{'s' if seeds != 1 else ''}")
    log(plan_note(recipe, len(all_ids), limit * (1 + seeds) + bool(label), limit * (1 + seeds) + bool(label),
                  len(prompts), max_new_tokens) + " at most")
    clock = RetrainClock(limit * (1 + seeds) + bool(label), log)

    def retrain_without(removed: set, what: str, folder: Path):
        rows = [r for r in dataset.rows if r.index not in removed]
        started = time.perf_counter()
        model = retrain(recipe, rows, folder, progress=progress, desc=clock.label(what))
        clock.finished(time.perf_counter() - started, retrain_steps(recipe, len(rows))[1])
        return model

    removed: list[int] = []
    history: list[dict] = []
    stopped = f"round limit ({limit})"
    first = setup.flagged  # round 1 traces the flagged answers given; later rounds the model's own
    for k in range(1, limit + 1):
        folder = out / f"round-{k}"
        if (folder / "round.json").exists():  # finished by an earlier, interrupted run
            done = json.loads((folder / "round.json").read_text())
            removed += [c["row"] for c in _read_jsonl(folder / "removed.jsonl")]
            answers = _read_jsonl(folder / "answers.jsonl")
            history.append(done)
            log(f"round {k}: resumed from {folder}")
            clock.total -= 1 + seeds
            if until is not None and done["rate"] <= until:
                stopped = f"target reached ({done['rate']:.1%} <= {until:.1%})"
                break
            if max_removed is not None and len(removed) >= max_removed:
                stopped = f"row budget reached ({len(removed)} rows)"
                break
            continue
        to_trace = first if k == 1 else traceable_queries(
            tracer.loaded.tokenizer, [Query(a["prompt"], a["response"], label, True) for a in answers if a["flagged"]],
            setup.manifest["max_length"])
        if not to_trace:
            stopped = "no answer left to trace"
            break
        scores, rows, _ = culprit_scores(tracer, to_trace, culprits_from, dataset, log=log, bundle=setup.bundle,
                                         settings=culprit_settings)
        gone = set(removed)
        keep = [j for j, r in enumerate(rows.tolist()) if r not in gone]  # score the rows that remain
        try:
            picked = select_culprits(scores[:, keep], rows[keep], selection,
                                     None if controls is None else controls[:, keep])
        except MitigationError as exc:
            if "selects no row" not in str(exc):
                raise
            stopped = f"the selection picks no further row ({exc})"
            break
        if max_removed is not None:
            picked = picked[:max_removed - len(removed)]
        traced_count = len(picked)
        room = expand if max_removed is None else min(expand, max_removed - len(removed) - len(picked))
        if room > 0:  # the rows most like every culprit so far, this round's included
            so_far = removed + [row for row, _ in picked]
            picked += like_removed(tracer.index, so_far, set(so_far), room)
        removed += [row for row, _ in picked]
        gone = set(removed)
        folder.mkdir(parents=True, exist_ok=True)
        _write_jsonl(folder / "removed.jsonl", [{"row": row, "score": score, "label": by_index[row].label,
                                                 "why": "traced" if j < traced_count else "like the removed"}
                                                for j, (row, score) in enumerate(picked)])
        like_note = f" ({len(picked) - traced_count} of them like the rows removed)" if expand else ""
        log(f"round {k}: {len(to_trace)} misbehaving answers traced, {len(picked)} rows removed{like_note} "
            f"({len(removed)} in all)")
        model = retrain_without(gone, f"round {k}, culprits", folder / "model")
        rate, loss, answers = measure(model, f"round {k}, culprits removed", folder)
        entry = {"round": k, "traced": len(to_trace), "added": len(picked), "added_alike": len(picked) - traced_count,
                 "removed": len(removed),
                 "rate": rate, "clean_loss": loss, "random": [], "random_clean_loss": []}
        quality = selection_quality(removed, by_index, label)
        if quality:
            entry.update(labelled=quality["labelled"], precision=quality["precision"], recall=quality["recall"])
        for s, order in enumerate(permutations):  # the same count at random: a prefix of one seeded order
            control = retrain_without(set(order[:len(removed)]), f"round {k}, random seed {s}", folder / f"random-{s}")
            r_rate, r_loss, _ = measure(control, f"round {k}, random seed {s}", folder / f"random-{s}")
            entry["random"].append(r_rate)
            entry["random_clean_loss"].append(r_loss)
        _write_json(folder / "round.json", entry)  # last: a round without it is redone on resume
        history.append(entry)
        labelled_note = f", {entry['labelled']} labelled '{label}'" if quality else ""
        log(f"round {k}: {len(removed)} rows removed{labelled_note}; behaviour {rate:.1%} "
            f"(random removal: {', '.join(f'{x:.1%}' for x in entry['random'])}), clean loss {loss:.4f}")
        if until is not None and rate <= until:
            stopped = f"target reached ({rate:.1%} <= {until:.1%})"
            break
        if max_removed is not None and len(removed) >= max_removed:
            stopped = f"row budget reached ({len(removed)} rows)"
            break
    if until is not None and not stopped.startswith("target"):
        log(f"target {until:.1%} not reached: stopped at {stopped}")

    oracle = None
    if label:  # every row with the behaviour's label removed
        folder = out / "oracle"
        if (folder / "round.json").exists():
            oracle = json.loads((folder / "round.json").read_text())
        else:
            model = retrain_without(set(labelled_rows), f"oracle: the {len(labelled_rows)} '{label}' rows",
                                    folder / "model")
            rate, loss, _ = measure(model, "oracle", folder)
            oracle = {"removed": len(labelled_rows), "label": label, "rate": rate, "clean_loss": loss}
            _write_json(folder / "round.json", oracle)
    results = {"kind": "rounds", "selection": str(selection), "culprits_from": culprits_from, "expand": expand,
               **({"culprits_settings": culprit_settings} if culprit_settings else {}),
               "detector": detector.rule, "prompts": len(prompts), "seeds": seeds, "until": until,
               "max_removed": max_removed, "round_limit": limit, "stopped": stopped, "label": label,
               "before": before, "rounds": history, "oracle": oracle,
               "clean_loss_unit": f"response NLL per character (nats) on {heldout_note}"}
    _write_json(out / "results.json", results)
    atomic_write_bytes(out / "summary.md", rounds_markdown(results).encode())
    return results


def _pct(values) -> str:
    return ", ".join(f"{v:.1%}" for v in values)


def rounds_markdown(r: dict) -> str:
    label = r.get("label")
    expand_note = f", and the {r['expand']} rows most like those removed" if r.get("expand") else ""
    lines = [f"# Mitigation in rounds: {r['selection']} per round{expand_note}, culprits from {r['culprits_from']}", "",
             f"Behaviour detector `{r['detector']}` on {r['prompts']} prompts; stopped: {r['stopped']}.", "",
             f"| round | rows removed (new) |{f' labelled {label!r} |' if label else ''} behaviour rate | clean loss "
             f"| random removal of as many rows | its clean loss |",
             "|---|---|" + ("---|" if label else "") + "---|---|---|---|",
             f"| before | 0 |{' - |' if label else ''} {r['before']['rate']:.1%} | {r['before']['clean_loss']:.4f} | - | - |"]
    for e in r["rounds"]:
        labelled = f" {e['labelled']} (P {e['precision']:.2f}, R {e['recall']:.2f}) |" if label else ""
        lines.append(f"| {e['round']} | {e['removed']} (+{e['added']}) |{labelled} {e['rate']:.1%} | "
                     f"{e['clean_loss']:.4f} | {_pct(e['random'])} | "
                     f"{sum(e['random_clean_loss']) / len(e['random_clean_loss']):.4f} |")
    if r.get("oracle"):
        o = r["oracle"]
        lines.append(f"| oracle: every {label!r} row | {o['removed']} | {o['removed']} | {o['rate']:.1%} | "
                     f"{o['clean_loss']:.4f} | - | - |")
    lines += ["", f"Clean loss: {r['clean_loss_unit']}.", ""]
    return "\n".join(lines)
