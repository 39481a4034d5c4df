"""results.json and results.md: one run's report, the methods an earlier run measured on the same
setup, the Markdown tables, and the figures over several seeds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from rept.evaluate.bench.config import COST, QUALITY


def rounded(values) -> list:
    return [None if v is None else round(float(v), 4) for v in values]


# settings that do not change what the other methods measure (against_base: that one method's own)
RUN_SPECIFIC = ("methods", "share_features", "save_indexes", "against_base")


def comparable_setup(report: dict) -> dict:
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
    now = comparable_setup(report)
    if old.get("queries") is None:  # written before per-query figures: the queries follow from the rest
        now["queries"] = None
    if "methods" not in old or comparable_setup(old) != now:
        log(f"{path} holds an earlier run with other settings: replaced")
        return {}
    kept = {name: {**m, "earlier_run": True} for name, m in old["methods"].items() if name not in methods}
    if kept:
        log(f"kept from the earlier run in {path}: {', '.join(kept)}")
    return kept


def write_results(out: Path, report: dict) -> None:
    """results.json and results.md, rewritten after every method (an interrupted run keeps what it measured)."""
    from rept.store.index import atomic_write_bytes

    atomic_write_bytes(out / "results.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(out / "results.md", results_markdown(report).encode())


def build_report(results, rate, control_rate, cfg, label, data, rows, n_poisoned, prompts, flagged, unflagged,
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
        "config": cfg.record(),
        "seconds": round(time.perf_counter() - started, 1),
        "complete": complete,
    }


def fmt(v) -> str:
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
        lines.append(f"| {name} | " + " | ".join(fmt(r.get(k)) for k in QUALITY) + " |")
    for name, r in report["methods"].items():
        if r.get("answers_traced"):  # a method that leaves some answers untraced (against-base's gate)
            t, opts = r["answers_traced"], r.get("settings", {})
            lines += ["", f"{name} traced {t['flagged']} of {d['n_flagged']} flagged answers and {t['control']} of "
                      f"{d['n_control_queries']} controls (a changed word at least {opts['min_gain']:g} nats "
                      "more likely than on the base model); the others are shown no rows, and count as finding none."]
    cost = COST + (("peak_gpu_mb",) if any("peak_gpu_mb" in r for r in report["methods"].values()) else ())
    lines += ["", "Cost (this machine, varies run to run):", "",
              "| method | " + " | ".join(cost) + " |", "|---|" + "---:|" * len(cost)]
    for name, r in report["methods"].items():
        shown = f"{name} (earlier run)" if r.get("earlier_run") else name
        lines.append(f"| {shown} | " + " | ".join(fmt(r.get(k)) for k in cost) + " |")
    return "\n".join(lines) + "\n"


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
