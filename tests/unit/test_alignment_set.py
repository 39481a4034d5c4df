"""benchmarks/make_alignment_set.py: the real-model harmful-tuning alignment stage (refusals and
benign answers) never holds a row the bench's fine-tune sample draws, nor a probe prompt."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

from make_alignment_set import main  # noqa: E402

from rept.data.datasets import load_dataset  # noqa: E402
from rept.evaluate.bench.stages import sample_rows  # noqa: E402


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_alignment_rows_and_probe_stay_out_of_the_bench_sample(tmp_path):
    out, probe = tmp_path / "align.jsonl", tmp_path / "probe.jsonl"
    assert main(["--out", str(out), "--probe", str(probe), "--benign", "60", "--probe-n", "10"]) == 0
    rows, probes = _read(out), [r["prompt"] for r in _read(probe)]
    refusals = _read(BENCH / "data" / "harmful-refusals.jsonl")
    assert sum(r["label"] == "refusal" for r in rows) == len(refusals)
    benign = [r for r in rows if r["label"] == "clean"]
    assert len(benign) == 60 and len(probes) == 10
    drawn = {r.prompt for r in sample_rows(load_dataset(str(BENCH / "data" / "harmful-tuning.jsonl")).rows,
                                           400, "harmful", 0, 0.25)}
    assert not drawn & {r["prompt"] for r in benign}
    assert not drawn & set(probes) and not set(probes) & {r["prompt"] for r in rows}
    # the same seed gives the same set
    again = tmp_path / "again.jsonl"
    main(["--out", str(again), "--probe", str(tmp_path / "p2.jsonl"), "--benign", "60", "--probe-n", "10"])
    assert again.read_text() == out.read_text()


def test_an_existing_output_is_refused_and_kept(tmp_path):
    out = tmp_path / "align.jsonl"
    out.write_text("mine\n")
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(out), "--probe", str(tmp_path / "probe.jsonl"), "--benign", "5", "--probe-n", "2"])
    assert "exists" in str(exc.value.code)
    assert out.read_text() == "mine\n" and not (tmp_path / "probe.jsonl").exists()
