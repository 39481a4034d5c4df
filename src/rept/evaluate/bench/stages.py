"""The bench's stages before any method runs: the training rows (a seeded sample keeping the poisoned
share), the behaviour's label, and the two-stage model (a base, then a LoRA fine-tune on the rows)."""

from __future__ import annotations

import random
from pathlib import Path

from rept.evaluate.bench.config import BenchConfig, BenchError
from rept.data.datasets import rows_fingerprint


def sample_rows(rows, n: int | None, label: str, seed: int, share: float | None = None):
    """A seeded sample of n rows with the same share of `label` rows as the whole, or `share` of
    them when given (source order kept)."""
    poisoned = [r for r in rows if r.label == label]
    clean = [r for r in rows if r.label != label]
    if share is not None:
        if n is None:
            raise BenchError("--share sets the behaviour's share of a sample: give --rows N too")
        if not 0 < share < 1:
            raise BenchError(f"--share {share}: a share between 0 and 1 (not included), e.g. 0.25")
        k = max(1, round(n * share))
        if k > len(poisoned) or n - k > len(clean):
            raise BenchError(f"--rows {n} --share {share} needs {k} '{label}' rows and {n - k} others; the set has "
                             f"{len(poisoned)} and {len(clean)}")
    elif n is None or n >= len(rows):
        return list(rows)
    else:
        k = max(1, round(n * len(poisoned) / len(rows))) if poisoned else 0
    rng = random.Random(seed)
    picked = rng.sample(poisoned, min(k, len(poisoned))) + rng.sample(clean, min(n - k, len(clean)))
    return sorted(picked, key=lambda r: r.index)


def behaviour_label(rows, given: str | None) -> str:
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
    from rept.model.train import train_model

    out = Path(cfg.out)
    label = behaviour_label(rows, cfg.label)
    if cfg.base:
        from rept.model.gguf import resolve_model_source

        # a GGUF file or a known name: its converted folder, so the recipe and indexes record that
        base = resolve_model_source(cfg.base, log=log)
        log(f"base model: {base} (given; no from-scratch stage)")
    else:
        base = str(out / "base")
        clean = [r for r in rows if r.label != label]
        base_rows, base_source = clean, data_source + " (clean rows)"
        if cfg.base_data:
            from rept.data.datasets import load_dataset

            extra = load_dataset(cfg.base_data).rows
            base_rows, base_source = clean + extra, base_source + " + " + cfg.base_data
        train_model("from-scratch", base_rows, base, cfg.base_training(), data_source=base_source,
                    data_fingerprint=rows_fingerprint(base_rows), progress=progress, log=log, device=cfg.device)
    train_model("lora", rows, out / "adapter", cfg.lora_training(), base=base, lora=cfg.lora, data_source=data_source,
                data_fingerprint=rows_fingerprint(rows), progress=progress, log=log, device=cfg.device)
    return base, out / "adapter", label
