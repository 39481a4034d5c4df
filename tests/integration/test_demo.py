"""The demo end to end: the tiny model learns the backdoor and RepT finds the poisoned rows."""

import io
import json
import re

from rich.console import Console

from rept.demo import run_demo


def test_demo_learns_backdoor_and_traces_it(tmp_path, monkeypatch):
    monkeypatch.setenv("REPT_CACHE", str(tmp_path / "cache"))
    printed = io.StringIO()
    quiet = Console(file=printed, width=200)
    # the README's order: `rept demo` (trains, in the cache), then `rept demo --out DIR` (keeps the outputs)
    result = run_demo(n_prompts=30, progress=False, console=quiet)
    assert result["trained"] and result["work"].startswith(str(tmp_path / "cache"))
    # the trace time is its own figure, the training time apart
    assert re.search(rf"traced \d+ misbehaving answers in {result['seconds_trace']:.1f} s", printed.getvalue())
    assert "of which training" in printed.getvalue()
    assert result["rate_triggered"] >= 0.9 and result["rate_clean"] <= 0.1
    assert result["precision@10"] >= 0.9
    work = tmp_path / "demo"
    kept = run_demo(out=str(work), n_prompts=30, progress=False, console=quiet)
    assert not kept["trained"]  # the cached model is copied, not trained again
    assert "copying the cached model" in printed.getvalue() and "model reused" in printed.getvalue()
    assert kept["precision@10"] == result["precision@10"]
    assert (work / "model" / "config.json").exists() and (work / "index" / "manifest.json").exists()
    assert (work / "model" / "rept_recipe.json").exists()  # `rept mitigate --method remove` retrains with it
    queries = [json.loads(line) for line in (work / "queries.jsonl").read_text().splitlines()]
    assert len(queries) == 60 and {"prompt", "response", "label", "flagged"} <= set(queries[0])
    # a second run reuses the model in --out and gives the same answer
    again = run_demo(out=str(work), n_prompts=30, progress=False, console=quiet)
    assert not again["trained"] and again["precision@10"] == result["precision@10"]


def test_table_cells_are_cut_at_a_word_with_an_ellipsis():
    """The demo's and `rept trace`'s table cells: one line, cut at a word boundary, "…" for the cut."""
    from rept.render import one_line

    assert one_line("a " * 10, 110) == ("a " * 10).strip()
    cut = one_line("Translate the following sentence into French: the cat is on the table", 40)
    assert cut.endswith("…") and len(cut) <= 40 and "Translate the following sentence into…" == cut
