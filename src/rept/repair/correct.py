"""Correction at inference: an edit of the hidden state at layer L, built from the culprits'
signatures and applied with a forward hook, no retraining.

The edit is one unit direction d at hidden_states[L] (the layer the index stores h and g at),
applied at every position: h <- h - strength * ((h . d) - c) d. With the default anchor c is the
clean rows' mean of h . d, so at strength 1 every position's component along d is set to where the
clean rows have it (a mean ablation); with anchor `zero` (c = 0) d is projected out.
d is built from the culprit rows (the top rows RepT traces the flagged answers to) against the
other indexed rows:
- `h`: the difference of the mean representations, culprits minus the rest, unit-normalised —
  what the culprits' prompts have in common that the other rows' do not;
- `g`: the same difference of the rows' unit-normalised gradients.
The edit is stored as safetensors (the direction) and JSON (layer, strength, the model's identity),
and is refused on a model other than the one it was built for, naming what differs.
A correction is only as good as its measurement, so `run_correction` compares it with random
directions of the same norm and strength, and measures the clean held-out loss and the answers to
unrelated prompts.
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rept.errors import ReptError

FORMAT_VERSION = 1
DIRECTION_FILE = "correction.safetensors"
SETTINGS_FILE = "correction.json"
SOURCES = ("h", "g")


class CorrectionError(ReptError):
    """A user-facing problem with a correction (one line)."""


@dataclass
class Correction:
    direction: torch.Tensor   # [hidden] float32, unit norm
    layer: int                # hidden_states index (0..num_layers) the edit acts on
    strength: float = 1.0     # 1: the component along d is set to `offset`; 0: no edit
    offset: float = 0.0       # c: the value h . d is moved to (the clean rows' mean, or 0 to project d out)
    source: str = "h"         # what the direction was built from: h, g, or random
    identity: dict = field(default_factory=dict)  # rept.store.identity.ModelIdentity's fields, of the model it is for
    info: dict = field(default_factory=dict)      # how it was built (index, culprit rows, seed)

    def edit(self, hidden: torch.Tensor) -> torch.Tensor:
        d = self.direction.to(device=hidden.device, dtype=hidden.dtype)
        return hidden - self.strength * ((hidden @ d) - self.offset).unsqueeze(-1) * d

    def settings(self) -> dict:
        return {"format_version": FORMAT_VERSION, "layer": self.layer, "strength": self.strength,
                "offset": self.offset, "source": self.source, "hidden_size": int(self.direction.numel()),
                "identity": self.identity,
                "info": self.info}

    def save(self, folder: str | Path) -> None:
        from rept.store.index import atomic_write_bytes

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{DIRECTION_FILE}.tmp"
        save_file({"direction": self.direction.detach().float().cpu().contiguous()}, str(tmp),
                  metadata={"format": "rept-correction"})
        tmp.replace(folder / DIRECTION_FILE)
        atomic_write_bytes(folder / SETTINGS_FILE, (json.dumps(self.settings(), indent=2) + "\n").encode())

    @classmethod
    def load(cls, folder: str | Path) -> "Correction":
        folder = Path(folder)
        settings_path, direction_path = folder / SETTINGS_FILE, folder / DIRECTION_FILE
        if not settings_path.exists() or not direction_path.exists():
            raise CorrectionError(f"{folder} holds no correction (made by `rept correct`: {SETTINGS_FILE} "
                                  f"and {DIRECTION_FILE})")
        try:
            settings = json.loads(settings_path.read_text())
        except json.JSONDecodeError as exc:
            raise CorrectionError(f"{settings_path} is not valid JSON ({exc.msg})") from None
        if settings.get("format_version") != FORMAT_VERSION:
            raise CorrectionError(f"{settings_path}: correction format {settings.get('format_version')} is not "
                                  f"supported (this rept reads format {FORMAT_VERSION})")
        try:
            with safe_open(str(direction_path), framework="pt") as f:
                direction = f.get_tensor("direction").float()
        except Exception as exc:  # safetensors raises several kinds for a damaged file
            raise CorrectionError(f"cannot read {direction_path}: {exc}") from None
        if direction.ndim != 1 or direction.numel() != settings.get("hidden_size"):
            raise CorrectionError(f"{direction_path}: the direction has shape {tuple(direction.shape)}, "
                                  f"not ({settings.get('hidden_size')},) as {SETTINGS_FILE} says")
        return cls(direction, int(settings["layer"]), float(settings["strength"]), float(settings.get("offset", 0.0)),
                   settings.get("source", "h"), settings.get("identity", {}), settings.get("info", {}))

    def check_model(self, loaded) -> None:
        """Refuse a model, adapter, tokenizer or template other than the one the edit was built for."""
        from rept.store.identity import ModelIdentity, differences, from_fields

        diffs = differences(from_fields(ModelIdentity, self.identity), ModelIdentity.of(loaded),
                            have_as="correction", want_as="this model")
        if diffs:
            raise CorrectionError(f"the correction was built for another model than {loaded.model_id}"
                                  + (f" + {loaded.adapter}" if loaded.adapter else "") + ": " + "; ".join(diffs))
        hidden = loaded.model.config.hidden_size
        if self.direction.numel() != hidden:
            raise CorrectionError(f"the correction's direction has {self.direction.numel()} values, "
                                  f"the model's hidden size is {hidden}")


def random_like(correction: Correction, seed: int, clean_h: torch.Tensor | None = None) -> Correction:
    """The control: a random unit direction at the same layer with the same strength, anchored by the
    same rule (at the clean rows' mean along it, `clean_h`, when the correction is anchored there)."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(correction.direction.numel(), generator=gen)
    d = d / d.norm()
    anchor = correction.info.get("anchor", "zero")
    if anchor == "clean" and clean_h is None:
        raise CorrectionError("a random control for a clean-anchored correction needs the clean rows' h")
    offset = float((clean_h.float() @ d).mean()) if anchor == "clean" else 0.0
    return Correction(d, correction.layer, correction.strength, offset, "random", correction.identity,
                      {"seed": seed, "anchor": anchor})


@contextmanager
def corrected(model, correction: Correction | None):
    """Within the block, every forward pass of `model` has the edit applied to hidden_states[L] at
    every position (prompt and generated tokens alike). Hooked where rept.signatures.extract.layer_tap reads
    h and g: the input of block L, or the final norm's output for the last layer."""
    from rept.model.loading import decoder_layers, final_norm, resolve_layer

    if correction is None:
        yield
        return
    layers = decoder_layers(model)
    layer = resolve_layer(model, correction.layer)
    if layer < len(layers):
        def pre_hook(module, args, kwargs):
            if args:
                return (correction.edit(args[0]),) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = correction.edit(kwargs["hidden_states"])
            return args, kwargs

        handle = layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        handle = final_norm(model).register_forward_hook(lambda module, args, output: correction.edit(output))
    try:
        yield
    finally:
        handle.remove()


# ------------------------------------------------------------------ building the edit

def culprit_rows(scores: np.ndarray, rows: np.ndarray, top_k: int) -> list[tuple[int, float]]:
    """(row, score) of the union of every flagged query's top `top_k` rows, strongest first (a row's
    score is its best over the queries; ties: the lower row id first)."""
    picked = set()
    for q in np.atleast_2d(scores):
        picked.update(np.lexsort((rows, -q))[:top_k].tolist())
    best = np.atleast_2d(scores).max(axis=0)
    order = [i for i in np.lexsort((rows, -best)) if i in picked]
    return [(int(rows[i]), float(best[i])) for i in order]


ANCHORS = ("clean", "zero")


def clean_mask(stored, culprit_ids: set[int]) -> torch.Tensor:
    """True for the stored rows that are not culprits."""
    return torch.tensor([int(r) not in culprit_ids for r in stored.row.tolist()], dtype=torch.bool)


def direction_from(stored, culprit_ids: set[int], source: str) -> torch.Tensor:
    """Unit difference of means, culprit rows minus the other stored rows, of h or of unit g."""
    if source not in SOURCES:
        raise CorrectionError(f"unknown direction source '{source}' (choose from {', '.join(SOURCES)})")
    is_culprit = ~clean_mask(stored, culprit_ids)
    if is_culprit.all():
        raise CorrectionError("every indexed row is a culprit: no other rows to contrast them with (lower --top-k)")
    vectors = stored.h.float() if source == "h" else torch.nn.functional.normalize(stored.g.float(), dim=1)
    diff = vectors[is_culprit].mean(0) - vectors[~is_culprit].mean(0)
    if not torch.isfinite(diff).all() or diff.norm() == 0:
        raise CorrectionError(f"the culprits' {source} does not differ from the other rows': no direction to remove")
    return diff / diff.norm()


def build_correction(tracer, flagged, top_k: int = 10, source: str = "h", strength: float = 1.0,
                     mode: str | None = None, anchor: str = "clean") -> tuple[Correction, list[tuple[int, float]]]:
    """The edit built from the culprits of `flagged` (traced over the tracer's index), and the culprits."""
    from rept.store.identity import ModelIdentity, flat

    if not flagged:
        raise CorrectionError("no flagged query to build a correction from (every query has flagged=false)")
    if top_k < 1:
        raise CorrectionError(f"--top-k must be at least 1 (got {top_k})")
    if not strength > 0:
        raise CorrectionError(f"--strength must be above 0 (got {strength}): 1 is the full edit")
    if anchor not in ANCHORS:
        raise CorrectionError(f"unknown anchor '{anchor}' (choose from {', '.join(ANCHORS)})")
    mode = tracer.search_mode(mode)
    scores, rows, _ = tracer.scores(flagged, mode=mode)
    culprits = culprit_rows(np.asarray(scores), np.asarray(rows), top_k)
    stored, culprit_ids = tracer.index.load_all(), {r for r, _ in culprits}
    direction = direction_from(stored, culprit_ids, source)
    # where the clean rows' h sits along d (the h of the rows, whatever d was built from)
    offset = 0.0
    if anchor == "clean":
        offset = float((stored.h[clean_mask(stored, culprit_ids)].float() @ direction).mean())
    info = {"index": str(tracer.index.folder), "mode": mode, "anchor": anchor, "top_k": top_k,
            "flagged_queries": len(flagged),
            "culprit_rows": [r for r, _ in culprits], "model": tracer.loaded.model_id,
            "adapter": tracer.loaded.adapter}
    return Correction(direction, tracer.layer, strength, offset, source, flat(ModelIdentity.of(tracer.loaded)),
                      info), culprits


# ------------------------------------------------------------------ measuring it

def _answers(loaded, prompts, correction, max_new_tokens):
    from rept.model.generate import generate

    return generate(loaded, prompts, max_new_tokens=max_new_tokens, batch_size=32, progress=False,
                    correction=correction)


def _loss(loaded, rows, correction, max_length):
    from rept.repair.mitigate import nll_per_char

    with corrected(loaded.model, correction):
        return nll_per_char(loaded, rows, max_length)


def run_correction(tracer, queries, detector, out: str | Path, top_k: int = 10, source: str = "h",
                   strength: float = 1.0, seeds: int = 3, prompts: list[str] | None = None,
                   unrelated: list[str] | None = None, heldout=None, max_new_tokens: int = 16,
                   mode: str | None = None, anchor: str = "clean", log=print) -> dict:
    """Build the correction, save it in `out`, and measure it against `seeds` random directions:
    behaviour rate on `prompts` (default: the flagged queries' prompts), clean loss on `heldout`
    rows, and the answers to `unrelated` prompts (default: the unflagged queries' prompts)."""
    from rept.store.index import atomic_write_bytes
    from rept.query.trace import traceable_queries

    if seeds < 1:
        raise CorrectionError(f"--seeds must be at least 1 (got {seeds}): the random directions are the control")
    manifest = tracer.index.manifest
    flagged = [q for q in queries if q.flagged is not False]
    traceable = traceable_queries(tracer.loaded.tokenizer, flagged, manifest["max_length"])
    if flagged and not traceable:
        raise CorrectionError(f"none of the {len(flagged)} flagged answers keeps a response token within the "
                              f"index's max_length {manifest['max_length']}: nothing to trace")
    correction, culprits = build_correction(tracer, traceable, top_k, source, strength, mode, anchor)
    out = Path(out)
    correction.save(out)
    dataset = tracer.index.dataset()
    by_index = {r.index: r for r in dataset.rows}
    lines = [json.dumps({"row": row, "score": score, "label": by_index[row].label if row in by_index else None})
             for row, score in culprits]
    atomic_write_bytes(out / "culprits.jsonl", ("\n".join(lines) + "\n").encode())
    log(f"correction: {source} direction at layer {correction.layer} from {len(culprits)} culprit rows "
        f"(top {top_k} of {len(traceable)} flagged answers) -> {out}")

    prompts = prompts or [q.prompt for q in flagged]
    unrelated = unrelated or [q.prompt for q in queries if q.flagged is False]
    heldout_note = "held-out rows"
    if not heldout:
        culprit_ids = {r for r, _ in culprits}
        heldout = random.Random(0).sample([r for r in dataset.rows if r.index not in culprit_ids],
                                          min(100, len(dataset.rows) - len(culprit_ids)))
        heldout_note = "indexed rows that are not culprits (no --heldout given, so not truly held out)"
    max_length = manifest["max_length"]
    stored = tracer.index.load_all()
    clean_h = stored.h[clean_mask(stored, {r for r, _ in culprits})]
    variants = [("before", None), ("after", correction)] + [
        (f"random-{s}", random_like(correction, 1000 + s, clean_h)) for s in range(seeds)]
    measured = {}
    for name, edit in variants:
        answers = _answers(tracer.loaded, prompts, edit, max_new_tokens)
        other = _answers(tracer.loaded, unrelated, edit, max_new_tokens) if unrelated else []
        measured[name] = {"rate": sum(map(detector, answers)) / len(prompts), "answers": answers,
                          "unrelated": other, "loss": _loss(tracer.loaded, heldout, edit, max_length)}
        log(f"{name}: behaviour {measured[name]['rate']:.1%}, clean loss {measured[name]['loss']:.4f}")

    def changed(name):  # share of unrelated answers that differ from the uncorrected model's
        pairs = list(zip(measured["before"]["unrelated"], measured[name]["unrelated"]))
        return sum(a != b for a, b in pairs) / len(pairs) if pairs else None

    def unrelated_rate(name):
        answers = measured[name]["unrelated"]
        return sum(map(detector, answers)) / len(answers) if answers else None

    randoms = [f"random-{s}" for s in range(seeds)]
    results = {"layer": correction.layer, "source": source, "strength": strength, "anchor": anchor,
               "offset": correction.offset, "top_k": top_k,
               "culprits": len(culprits), "culprit_labels": _label_counts(culprits, by_index),
               "detector": detector.rule, "prompts": len(prompts),
               "before": measured["before"]["rate"], "after": measured["after"]["rate"],
               "random": [measured[n]["rate"] for n in randoms], "random_seeds": [1000 + s for s in range(seeds)],
               "clean_loss": {"before": measured["before"]["loss"], "after": measured["after"]["loss"],
                              "random": [measured[n]["loss"] for n in randoms]},
               "clean_loss_unit": f"response NLL per character (nats) on {len(heldout)} {heldout_note}",
               "unrelated": {"prompts": len(unrelated),
                             "behaviour": {"before": unrelated_rate("before"), "after": unrelated_rate("after"),
                                           "random": [unrelated_rate(n) for n in randoms]},
                             "changed": {"after": changed("after"), "random": [changed(n) for n in randoms]},
                             "examples": [{"prompt": p, "before": b, "after": a} for p, b, a in
                                          zip(unrelated, measured["before"]["unrelated"],
                                              measured["after"]["unrelated"])][:5]},
               "max_new_tokens": max_new_tokens}
    answers = [{"prompt": p, "before": measured["before"]["answers"][i], "after": measured["after"]["answers"][i]}
               for i, p in enumerate(prompts)]
    atomic_write_bytes(out / "answers.jsonl", "".join(json.dumps(a) + "\n" for a in answers).encode())
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(out / "summary.md", summary_markdown(results).encode())
    return results


def _label_counts(culprits, by_index) -> dict:
    counts: dict[str, int] = {}
    for row, _ in culprits:
        label = str(by_index[row].label) if row in by_index else "None"
        counts[label] = counts.get(label, 0) + 1
    return counts


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def summary_markdown(r: dict) -> str:
    rand, u = r["random"], r["unrelated"]
    anchor = ("moved to the clean rows' mean along it" if r.get("anchor", "zero") == "clean"
              else "projected out")
    lines = [f"# Correction at inference: the culprits' {r['source']} direction at layer {r['layer']} "
             f"(strength {r['strength']:g}, {anchor})", "",
             f"Built from {r['culprits']} culprit rows (the union of every flagged answer's top {r['top_k']}; "
             f"labels: {', '.join(f'{k} {v}' for k, v in r['culprit_labels'].items())}). The controls remove "
             f"random unit directions at the same layer and strength ({len(rand)} seeds).", "",
             f"Behaviour detector `{r['detector']}` on {r['prompts']} prompts; {u['prompts']} unrelated prompts.", "",
             "| model | behaviour rate | clean loss | unrelated answers changed | behaviour on unrelated |",
             "|---|---|---|---|---|",
             f"| no correction | {r['before']:.1%} | {r['clean_loss']['before']:.4f} | - | "
             f"{_pct(u['behaviour']['before'])} |",
             f"| correction | {r['after']:.1%} | {r['clean_loss']['after']:.4f} | {_pct(u['changed']['after'])} | "
             f"{_pct(u['behaviour']['after'])} |",
             f"| random directions | {', '.join(f'{v:.1%}' for v in rand)} (mean {np.mean(rand):.1%}) | "
             f"{np.mean(r['clean_loss']['random']):.4f} | "
             f"{_pct(None if u['changed']['random'][0] is None else float(np.mean(u['changed']['random'])))} | "
             f"{_pct(None if u['behaviour']['random'][0] is None else float(np.mean(u['behaviour']['random'])))} |",
             "", f"Clean loss: {r['clean_loss_unit']}.", ""]
    if u["examples"]:
        lines += ["Unrelated prompts, before and after:", ""]
        lines += [f"- {e['prompt']!r}: {e['before']!r} -> {e['after']!r}" for e in u["examples"]]
        lines.append("")
    return "\n".join(lines)
