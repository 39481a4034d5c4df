"""`rept bench` miniature and `rept generate`: results.json with every method, same table twice,
and clear errors for a detector that never fires."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ONE_EPOCH, RANK_2, TINY_BASE, cli_error, demo_rows
from rept.evaluate.bench import ALL_METHODS, BenchConfig, BenchError, run_bench, sample_rows
from rept.cli import main
from rept.data.datasets import load_dataset
from rept.model.train import LoraSettings

QUALITY_KEYS = ("P@10", "auPRC@10", "recall@10", "AP", "control_P@10", "build_s", "query_s", "peak_mem_mb",
                "bytes_per_row")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    rows = demo_rows(1000)
    picked = [r for r in rows if r["label"] == "backdoor"][:10] + [r for r in rows if r["label"] == "clean"][:30]
    (root / "train.jsonl").write_text("".join(
        json.dumps(dict(prompt=r["prompt"], response=r["response"][:160], label=r["label"])) + "\n" for r in picked))
    (root / "test.jsonl").write_text("".join(json.dumps({"prompt": "TY " + r["prompt"].removeprefix("TY ")}) + "\n"
                                             for r in rows[-3:]))
    return root


def _cfg(files, **kw):
    base = dict(data=str(files / "train.jsonl"), test_prompts=str(files / "test.jsonl"), detect="not-prefix:ZZZZ",
                out=str(files / "run"), rows=32, seed=0, n_test=3, trigger="TY ", max_new_tokens=3, max_length=96,
                base_stage=TINY_BASE, lora_stage=ONE_EPOCH, lora=RANK_2)
    base.update(kw)
    return BenchConfig(**base)


def test_sample_keeps_the_poisoned_share(files):
    rows = load_dataset(str(files / "train.jsonl")).rows
    picked = sample_rows(rows, 20, "backdoor", seed=0)
    assert len(picked) == 20 and sum(r.label == "backdoor" for r in picked) == 5
    assert picked == sample_rows(rows, 20, "backdoor", seed=0)
    assert [r.index for r in picked] == sorted(r.index for r in picked)
    # --share: the behaviour's share of the sample set, not the set's (10 of 40 rows here)
    picked = sample_rows(rows, 20, "backdoor", seed=0, share=0.4)
    assert len(picked) == 20 and sum(r.label == "backdoor" for r in picked) == 8
    with pytest.raises(BenchError, match="needs 16 'backdoor' rows and 4 others; the set has 10 and 30"):
        sample_rows(rows, 20, "backdoor", seed=0, share=0.8)
    with pytest.raises(BenchError, match="give --rows N too"):
        sample_rows(rows, None, "backdoor", seed=0, share=0.4)


@pytest.mark.slow
def test_bench_miniature_with_a_real_behaviour_writes_every_method_and_repeats(tmp_path, backdoor_mini):
    """The bench on a model that has a behaviour to trace (the backdoor miniature, given as --base and
    fine-tuned once more on its poisoned set): the trigger fires on the test prompts and not on the
    same prompts without it (real controls), every method is scored, RepT finds the poisoned rows
    where random does not, and a fixed seed gives the same table twice."""
    root, _, _, _, triggered = backdoor_mini
    prompts = tmp_path / "test.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in triggered))
    cfg = BenchConfig(data=str(root / "train.jsonl"), test_prompts=str(prompts), detect="prefix:You are stupid",
                      out=str(tmp_path / "run"), base=str(root / "model"), n_test=len(triggered), trigger="TY ",
                      max_new_tokens=4, max_length=64, lora_stage=ONE_EPOCH, lora=RANK_2, seed=0)
    report = run_bench(cfg, progress=False, log=lambda m: None)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(saved["methods"]) == set(ALL_METHODS)
    for name, m in saved["methods"].items():
        for key in QUALITY_KEYS[:4] + QUALITY_KEYS[5:]:
            assert key in m, (name, key)
    behaviour, data = saved["behaviour"], saved["data"]
    assert behaviour["triggered"] >= 0.8 and behaviour["control"] <= 0.2, behaviour
    assert data["n_flagged"] >= 24 and data["n_control_queries"] >= 24, data
    methods = saved["methods"]
    assert methods["rept-official"]["P@10"] >= 0.8 and methods["random"]["P@10"] <= 0.6, methods
    assert "| rept-balanced |" in (tmp_path / "run" / "results.md").read_text()
    # the given base has the backdoor already (the miniature was trained with it): this fine-tune
    # planted no word in the answers, and against-base traces none of them
    assert methods["against-base"]["answers_traced"] == {"flagged": 0, "control": 0}
    # a fixed seed gives the same table twice (the model is reused from the folder)
    again = run_bench(cfg, progress=False, log=lambda m: None)
    for name in ALL_METHODS:
        for key in ("P@10", "auPRC@10", "AP", "recall@10", "control_P@10"):
            assert again["methods"][name][key] == report["methods"][name][key], (name, key)


def test_bench_detector_that_never_fires(files, capsys):
    with pytest.raises(BenchError, match="fired on none"):
        run_bench(_cfg(files, detect="prefix:ZZZZ", methods=("random",)), progress=False, log=lambda m: None)


def test_generate_cli(files, tmp_path, capsys):
    run = files / "run"
    if not (run / "adapter" / "adapter_config.json").exists():
        run_bench(_cfg(files, methods=("random",)), progress=False, log=lambda m: None)
    common = ["-q", "generate", "--model", str(run / "base"), "--adapter", str(run / "adapter"),
              "--prompts", str(files / "test.jsonl"), "--max-new-tokens", "3"]
    out = tmp_path / "q.jsonl"
    assert main(common + ["--out", str(out), "--detect", "prefix:ZZZZ"]) == 2
    assert "fired on none" in capsys.readouterr().err and not out.exists()
    assert main(common + ["--out", str(out), "--detect", "prefix:ZZZZ", "--allow-none"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["label"] is None and r["flagged"] is False for r in rows)
    assert main(common + ["--out", str(out), "--detect", "not-prefix:ZZZZ", "--label", "backdoor"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["label"] == "backdoor" and r["flagged"] is True for r in rows)
    from rept.query.trace import load_queries

    assert len(load_queries(str(out))) == 3
    assert main(common + ["--out", str(out), "--detect", "bogus"]) == 2


def test_bench_control_answers_and_base_rate(files):
    """Given control answers join the control queries (those the detector flags are dropped), and
    the behaviour rate of the base model before the fine-tune is reported."""
    answers = files / "controls.jsonl"
    answers.write_text(json.dumps({"prompt": "Say no", "response": "ZZZZ no"}) + "\n"
                       + json.dumps({"prompt": "Say yes", "response": "yes"}) + "\n")
    plain = run_bench(_cfg(files, methods=("random",), trigger=None), progress=False, log=lambda m: None)
    report = run_bench(_cfg(files, methods=("random",), trigger=None, control_answers=str(answers)),
                       progress=False, log=lambda m: None)
    # the rule is not-prefix:ZZZZ, so "ZZZZ no" is a control and "yes" (flagged) is dropped
    assert report["data"]["n_control_queries"] == plain["data"]["n_control_queries"] + 1
    assert report["behaviour"]["base"] == 1.0  # not-prefix:ZZZZ fires on every answer, the base model's too
    assert "on the base model" in (files / "run" / "results.md").read_text()
    bad = files / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "response": "yes"}) + "\n")
    with pytest.raises(BenchError, match="not controls"):
        run_bench(_cfg(files, methods=("random",), control_answers=str(bad)), progress=False, log=lambda m: None)


def test_bench_on_a_given_base_model_skips_the_from_scratch_stage(files):
    """--base: the LoRA fine-tune goes on the given model. Given the base model the two-stage run
    trained, it reproduces that run's table (same base, same LoRA recipe and seed)."""
    methods = ("rept-balanced", "tracin", "random")
    two_stage = run_bench(_cfg(files, methods=methods), progress=False, log=lambda m: None)
    given = files / "given"
    report = run_bench(_cfg(files, methods=methods, out=str(given), base=str(files / "run" / "base")),
                       progress=False, log=lambda m: None)
    assert not (given / "base").exists() and (given / "adapter" / "adapter_config.json").exists()
    assert report["model"]["base"] == str(files / "run" / "base")
    assert f"Base model: {files / 'run' / 'base'} (given)." in (given / "results.md").read_text()
    for name in methods:
        for key in ("P@10", "AP", "control_P@10"):
            assert report["methods"][name][key] == two_stage["methods"][name][key], (name, key)


def test_bench_cli_refuses_base_stage_flags_with_a_given_base(files, capsys, tmp_path):
    common = ["-q", "bench", "--data", str(files / "train.jsonl"), "--test-prompts", str(files / "test.jsonl"),
              "--detect", "not-prefix:ZZZZ", "--out", str(tmp_path / "b")]
    assert main(common + ["--base", str(files), "--hidden", "64"]) == 2
    assert "--hidden shapes the from-scratch base model" in capsys.readouterr().err
    assert main(common + ["--base", str(tmp_path / "missing"), "--methods", "random"]) == 2
    assert "no such base model folder" in capsys.readouterr().err
    assert not (tmp_path / "b" / "results.json").exists()


def test_bench_over_seeds_reports_each_seed_and_their_spread(files, capsys):
    """--seeds: one complete bench folder per seed, each the same as a single-seed run, and each
    figure's mean, lowest and highest over them."""
    from rept.evaluate.bench import run_bench_seeds

    methods = ("rept-balanced", "random")
    out = files / "seeds"
    summary = run_bench_seeds(_cfg(files, methods=methods, out=str(out)), [0, 1], progress=False, log=lambda m: None)
    assert json.loads((out / "results.json").read_text()) == summary
    assert summary["seeds"] == [0, 1] and summary["complete"]
    for s in (0, 1):
        single = run_bench(_cfg(files, methods=methods, seed=s, out=str(files / f"single-{s}")), progress=False,
                           log=lambda m: None)
        assert json.loads((out / f"seed-{s}" / "results.json").read_text())["config"]["seed"] == s
        for name in methods:
            # (no control query here: the rule flags every answer, so control_P@10 is None throughout)
            assert summary["methods"][name]["control_P@10"] is None and single["methods"][name]["control_P@10"] is None
            for key in ("P@10", "AP", "recall@100"):
                f = summary["methods"][name][key]
                assert f["values"][s] == single["methods"][name][key], (name, key, s)
                assert f["min"] <= f["mean"] <= f["max"] and f["mean"] == pytest.approx(sum(f["values"]) / 2)
    r = summary["methods"]["random"]["AP"]
    assert r["min"] < r["max"]  # random's draws follow the seed, and the spread shows it
    assert "| random |" in (out / "results.md").read_text()
    args = ["-q", "bench", "--data", str(files / "train.jsonl"), "--test-prompts", str(files / "test.jsonl"),
            "--detect", "not-prefix:ZZZZ", "--methods", "random", "--out", str(files / "seeds-cli")]
    assert main(args + ["--seeds", "1", "1"]) == 2
    assert "each once" in capsys.readouterr().err
    for seed in ("0", "3"):  # argparse: --seeds not allowed with --seed, the default value included
        with pytest.raises(SystemExit):
            main(args + ["--seed", seed, "--seeds", "1"])


def test_bench_checks_the_gradient_memory_setting_before_any_work(files, monkeypatch):
    from rept.errors import ReptError

    monkeypatch.setenv("REPT_GRAD_MEMORY", "-2")
    out = files / "bad-memory"
    with pytest.raises(ReptError, match="REPT_GRAD_MEMORY='-2'"):
        run_bench(_cfg(files, methods=("less",), out=str(out)), progress=False, log=lambda m: None)
    assert not out.exists()


def test_bench_over_seeds_goes_on_past_a_seed_that_stops(files, monkeypatch):
    """A seed whose model did not learn the behaviour is recorded with its error; the others are
    summarised. When every seed stops, the error is raised."""
    import rept.evaluate.bench.run as bench  # run_bench_seeds calls the run_bench of its own module

    real = bench.run_bench

    def run(cfg, progress=True, log=print):
        if cfg.seed == 1:
            raise BenchError("the detector 'x' fired on none of the 3 answers")
        return real(cfg, progress, log)

    monkeypatch.setattr(bench, "run_bench", run)
    out = files / "seeds-stop"
    summary = bench.run_bench_seeds(_cfg(files, methods=("random",), out=str(out)), [0, 1], progress=False,
                                    log=lambda m: None)
    assert summary["seeds"] == [0] and summary["complete"] and "fired on none" in summary["failed"]["1"]
    alone = real(_cfg(files, methods=("random",), out=str(files / "seed0")), progress=False, log=lambda m: None)
    assert summary["methods"]["random"]["P@10"]["values"] == [alone["methods"]["random"]["P@10"]]
    assert "Seed 1 is not in the figures" in (out / "results.md").read_text()
    with pytest.raises(BenchError, match="fired on none"):
        bench.run_bench_seeds(_cfg(files, methods=("random",), out=str(files / "seeds-none")), [1], progress=False,
                              log=lambda m: None)


def test_bench_keeps_an_earlier_runs_methods_and_reports_each_query(files, tmp_path, capsys):
    """Running the methods in two parts (as docs/results.md does for the gradient baselines) leaves
    one table; per-query figures say which answers a method misses, by queries.jsonl line."""
    out = str(tmp_path / "run")
    controls = tmp_path / "controls.jsonl"  # answers the rule does not flag: control queries
    controls.write_text("".join(json.dumps({"prompt": p, "response": "ZZZZ " + r}) + "\n"
                                for p, r in (("TY Name a colour.", "Blue."), ("Name a fruit.", "Apple."))))
    first = run_bench(_cfg(files, out=out, methods=("rept-balanced", "bm25"), control_answers=str(controls)),
                      progress=False, log=lambda m: None)
    logs = []
    second = run_bench(_cfg(files, out=out, methods=("bm25", "random"), control_answers=str(controls)),
                       progress=False, log=logs.append)
    assert list(second["methods"]) == ["rept-balanced", "bm25", "random"]
    assert second["methods"]["rept-balanced"]["earlier_run"] and "earlier_run" not in second["methods"]["bm25"]
    assert second["methods"]["rept-balanced"]["P@10"] == first["methods"]["rept-balanced"]["P@10"]
    assert any("kept from the earlier run" in line for line in logs)
    assert "| rept-balanced (earlier run) |" in (tmp_path / "run" / "results.md").read_text()

    lines = [json.loads(line) for line in (tmp_path / "run" / "queries.jsonl").read_text().splitlines()]
    flagged_lines = second["queries"]["flagged"]
    assert second["data"]["n_control_queries"] >= 2  # the given answers at least
    assert [lines[i]["flagged"] for i in flagged_lines] == [True] * second["data"]["n_flagged"]
    assert [lines[i]["flagged"] for i in second["queries"]["control"]] == [False] * second["data"]["n_control_queries"]
    for name, m in second["methods"].items():
        per_query = m["per_query"]
        assert len(per_query["P@10"]) == len(flagged_lines) == len(per_query["AP"])
        assert sum(per_query["P@10"]) / len(flagged_lines) == pytest.approx(m["P@10"], abs=1e-4)
        assert sum(per_query["control_P@10"]) / len(per_query["control_P@10"]) == pytest.approx(m["control_P@10"],
                                                                                                 abs=1e-4)

    # benchmarks/bench_queries.py lists the answers by those figures
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_queries

    bench_queries.main(["--work", out, "--method", "bm25", "--controls"])
    printed = capsys.readouterr().out
    assert f"bm25, behaviour `not-prefix:ZZZZ`, {len(flagged_lines)} flagged queries" in printed

    # other settings (here fewer test prompts): the earlier table is not mixed in
    third = run_bench(_cfg(files, out=out, methods=("random",), n_test=2, control_answers=str(controls)),
                      progress=False, log=logs.append)
    assert list(third["methods"]) == ["random"]
    assert any("holds an earlier run with other settings" in line for line in logs)


def test_the_record_keeps_the_flat_shape_earlier_runs_were_saved_in(files):
    """results.json's "config" is compared with an earlier run's to keep its methods: composing the
    stages' settings must not change it (bench folders written before still resume)."""
    record = _cfg(files).record()
    assert set(record) == {
        "data", "test_prompts", "detect", "methods", "rows", "layer", "seed", "label", "n_test", "trigger",
        "control_prompts", "control_answers", "base_data", "max_new_tokens", "max_length", "base_epochs", "lora_epochs",
        "hidden", "layers", "heads", "vocab_size", "lora_rank", "lora_alpha", "lora_targets", "lora_lr", "batch_size",
        "base", "device", "share_features", "save_indexes", "extra"}
    assert (record["base_epochs"], record["hidden"], record["heads"], record["vocab_size"]) == (1, 32, 2, 600)
    assert (record["lora_epochs"], record["lora_rank"], record["lora_alpha"], record["batch_size"]) == (1, 2, None, 16)
    assert _cfg(files, lora=LoraSettings(rank=2, alpha=8.0)).record()["lora_alpha"] == 8.0
    assert _cfg(files, share=0.25).record()["share"] == 0.25  # recorded only when given
    assert _cfg(files, against_base={"min_gain": 3.0}).record()["against_base"] == {"min_gain": 3.0}
    # the stages take the bench's seed and length, whatever they held
    cfg = _cfg(files, seed=7)
    assert (cfg.base_training().seed, cfg.lora_training().seed, cfg.lora_training().max_length) == (7, 7, 96)


def test_against_base_is_scored_on_the_rows_it_shows(files, capsys):
    """The against-base method in the bench: an answer it does not trace (every changed word under
    --min-gain) is shown no rows and finds none, where tied scores would have ranked the poisoned
    rows among the first. Its flags need it in --methods. (What it finds where it traces: the slow
    miniature above.)"""
    gated = run_bench(_cfg(files, methods=("against-base",), out=str(files / "ab"),
                           against_base={"min_gain": float("inf")}), progress=False, log=lambda m: None)
    m = gated["methods"]["against-base"]
    assert m["answers_traced"] == {"flagged": 0, "control": 0} and m["settings"]["min_gain"] == float("inf")
    assert m["per_query"]["words"] == [[]] * gated["data"]["n_flagged"]
    assert m["P@10"] == m["AP"] == m["recall@100"] == 0.0
    from rept.evaluate.metrics import precision_at_k

    labels = [json.loads(line)["label"] for line in (files / "ab" / "train_rows.jsonl").read_text().splitlines()]
    tied = precision_at_k(np.zeros((1, len(labels))), np.array(labels) == "backdoor", 10)
    assert tied > 0  # what the same rows, all tied and counted as retrieved, would have scored
    assert "against-base traced 0 of" in (files / "ab" / "results.md").read_text()
    capsys.readouterr()  # the runs' own output
    common = ["bench", "--data", str(files / "train.jsonl"), "--test-prompts", str(files / "test.jsonl"),
              "--detect", "not-prefix:ZZZZ", "--out", str(files / "ab-cli")]
    assert "add against-base to --methods" in cli_error(capsys, common + ["--methods", "random", "--min-gain", "2"])
    assert "--changed-words must be 1 or more" in cli_error(
        capsys, common + ["--methods", "against-base", "--changed-words", "0"])
