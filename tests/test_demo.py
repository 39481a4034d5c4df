"""The demo end to end: the tiny model learns the backdoor and RepT finds the poisoned rows."""

import json

from rich.console import Console

from rept.demo import run_demo


def test_demo_learns_backdoor_and_traces_it(tmp_path):
    result = run_demo(out=str(tmp_path / "demo"), n_prompts=30, progress=False, console=Console(quiet=True))
    assert result["rate_triggered"] >= 0.9 and result["rate_clean"] <= 0.1
    assert result["precision@10"] >= 0.9
    work = tmp_path / "demo"
    assert (work / "model" / "config.json").exists() and (work / "index" / "manifest.json").exists()
    queries = [json.loads(line) for line in (work / "queries.jsonl").read_text().splitlines()]
    assert len(queries) == 60 and {"prompt", "response", "label", "flagged"} <= set(queries[0])
    # a second run reuses the trained model and gives the same answer
    again = run_demo(out=str(work), n_prompts=30, progress=False, console=Console(quiet=True))
    assert again["precision@10"] == result["precision@10"]
