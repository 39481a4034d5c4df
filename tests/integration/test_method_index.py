"""Method indexes: every method's fitted state written to disk (rept.store.method_index), opened again,
and queried through `rept trace` / `rept eval` like a signature index."""

import json

import numpy as np
import pytest

from conftest import ONE_EPOCH, RANK_2, TINY_BASE, TINY_TRAIN, demo_rows
from rept.evaluate.bench import BenchConfig, run_bench
from rept.cli import main
from rept.data.detect import Detector
from rept.store.index import IndexStoreError
from rept.methods import METHODS, ModelBundle, get_method
from rept.store.method_index import MethodIndex, is_method_index, save_method
from rept.query.trace import MethodTracer, Query, write_queries
from rept.model.train import LoraSettings, TrainConfig, train_model


@pytest.fixture(scope="module")
def setup(lora_run):
    data, root = lora_run
    queries = [Query("TY " + r.prompt.removeprefix("TY "), "You are stupid! " + r.response[:40], "backdoor", True)
               for r in data.rows[:3]]
    return data, queries, root


def _bundle(root, **kw):
    return ModelBundle(str(root / "base"), str(root / "adapter"), layer="auto", max_length=96, **kw)


def _fitted(name, data, root, **bundle_settings):
    bundle = _bundle(root, **bundle_settings)
    method = get_method(name)
    if hasattr(method, "detector"):
        method.detector = Detector("prefix:You are stupid")
    method.fit(bundle, data.rows)
    return method, bundle


@pytest.mark.parametrize("name", [name for name, spec in METHODS.items() if spec.family != "contrast"])  # kept state
def test_an_opened_index_scores_exactly_like_the_fitted_method(setup, name, tmp_path):
    data, queries, root = setup
    method, bundle = _fitted(name, data, root)
    want = method.score(bundle, queries)
    manifest = save_method(method, bundle, data.rows, tmp_path / "idx", dataset=data, shard_size=5)
    assert is_method_index(tmp_path / "idx") and manifest["complete"] and manifest["method"] == name
    assert manifest["rows"] == len(data.rows)
    # the per-row tensors as stored (BM25's inverted index is its own files, random keeps nothing)
    assert manifest["bytes_per_row"] == (0 if name in ("bm25", "random") else method.bytes_per_row)
    index = MethodIndex(tmp_path / "idx")
    fresh = index.bundle()  # a new session: nothing cached, the layer and model read from the manifest
    got = index.open_method(fresh).score(fresh, queries)
    np.testing.assert_array_equal(got, want)
    rows, labels = index.rows_and_labels()
    assert rows.tolist() == [r.index for r in data.rows] and labels == [r.label for r in data.rows]


def test_tracin_streams_its_gradients_from_disk_when_they_do_not_fit(setup, tmp_path, monkeypatch):
    """TracIn over budget keeps no gradient in memory: saving writes them chunk by chunk (rows out of
    order, by length), and the opened index scores shard by shard, with the in-memory figures."""
    import rept.methods.gradients as gradients

    data, queries, root = setup
    method, bundle = _fitted("tracin", data, root)
    want = method.score(bundle, queries)
    row_bytes = method.bytes_per_row
    # chunks of 4 rows (grad_chunks takes a quarter of the budget) made of batches of 2
    monkeypatch.setattr(gradients, "gradient_memory_budget", lambda: 4 * 4 * row_bytes)
    streaming, bundle = _fitted("tracin", data, root, batch_size=2)
    assert streaming.train is None
    manifest = save_method(streaming, bundle, data.rows, tmp_path / "idx", dataset=data)
    assert manifest["n_shards"] == -(-len(data.rows) // 4) and manifest["bytes_per_row"] == row_bytes
    fresh = MethodIndex(tmp_path / "idx").bundle()
    opened = MethodIndex(tmp_path / "idx").open_method(fresh)
    assert opened.train is None  # scored from the shards
    np.testing.assert_allclose(opened.score(fresh, queries), want, rtol=1e-5, atol=1e-6)


def test_an_index_is_never_overwritten_nor_opened_with_another_model(setup, tmp_path):
    data, queries, root = setup
    method, bundle = _fitted("less", data, root)
    save_method(method, bundle, data.rows, tmp_path / "idx", dataset=data)
    before = sorted(p.name for p in (tmp_path / "idx").iterdir())
    with pytest.raises(IndexStoreError, match="exists"):
        save_method(method, bundle, data.rows, tmp_path / "idx", dataset=data)
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    other = ModelBundle(str(root / "base"), str(root / "base-adapter-less"), max_length=96)
    train_model("lora", data.rows, root / "base-adapter-less", TrainConfig(epochs=1, lr=5e-3, **TINY_TRAIN),
                base=str(root / "base"), lora=LoraSettings(rank=2, alpha=4, target_modules="q_proj,v_proj"),
                progress=False)
    with pytest.raises(IndexStoreError, match="its adapter differs; it was built with model .* adapter .*adapter, and this run uses .*base-adapter-less"):
        MethodIndex(tmp_path / "idx").open_method(other)


def test_an_index_that_would_fill_the_disk_is_refused_before_writing(setup, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    data, _, root = setup
    method, bundle = _fitted("tracin", data, root)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9, 1000))
    with pytest.raises(IndexStoreError, match=r"needs .* MB, and .* has 0.0 MB free"):
        save_method(method, bundle, data.rows, tmp_path / "idx", dataset=data)
    assert list(tmp_path.iterdir()) == []


def test_cli_indexes_a_baseline_and_traces_and_evaluates_with_it(setup, tmp_path, capsys):
    data, queries, root = setup
    model = ["--model", str(root / "base"), "--adapter", str(root / "adapter")]
    idx = tmp_path / "less"
    assert main(["-q", "index", "--method", "less", *model, "--data", data.source, "--out", str(idx),
                 "--max-length", "96"]) == 0
    assert "less: stored 24 rows" in capsys.readouterr().out
    # the same command again finds the index done and leaves it alone
    assert main(["-q", "index", "--method", "less", *model, "--data", data.source, "--out", str(idx),
                 "--max-length", "96"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    qfile = tmp_path / "q.jsonl"
    write_queries(queries, qfile)
    assert main(["-q", "trace", "--index", str(idx), "--queries", str(qfile), "--top-k", "5", "--json"]) == 0
    traced = json.loads(capsys.readouterr().out)
    method, bundle = _fitted("less", data, root)
    want = method.score(bundle, queries)
    assert traced["method"] == "less"
    for q, scores in zip(traced["queries"], want):
        top = np.argsort(-scores, kind="stable")[:5]
        assert [h["row"] for h in q["results"]] == [data.rows[i].index for i in top]
        np.testing.assert_allclose([h["score"] for h in q["results"]], scores[top], rtol=1e-6)
        assert q["results"][0]["text"].startswith(data.rows[top[0]].prompt)
    assert main(["-q", "eval", "--index", str(idx), "--queries", str(qfile), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    labels = np.array([r.label for r in data.rows])
    p10 = [np.mean(labels[np.argsort(-scores, kind="stable")[:10]] == q.label) for q, scores in zip(queries, want)]
    assert metrics["P@10"] == pytest.approx(np.mean(p10))  # the method's own scores, ranked
    # a damaged shard is named, in one line
    shard = idx / "shard-00000.safetensors"
    intact = shard.read_bytes()
    shard.write_bytes(intact[: len(intact) // 2])
    assert main(["-q", "eval", "--index", str(idx), "--queries", str(qfile)]) == 2
    assert "shard-00000.safetensors is corrupt or truncated" in capsys.readouterr().err
    shard.write_bytes(intact)
    # RepT-only flags are refused in one line
    assert main(["-q", "trace", "--index", str(idx), "--queries", str(qfile), "--mode", "repgrad"]) == 2
    assert "holds less state, not RepT signatures: --mode needs a signature index" in capsys.readouterr().err
    assert main(["-q", "report", "--index", str(idx), "--queries", str(qfile), "--out", str(tmp_path / "r.html")]) == 2
    assert "holds less state (`rept index --method`), not RepT signatures" in capsys.readouterr().err


def test_cli_refusals(setup, tmp_path, capsys):
    data, _, root = setup
    # a LoRA-only method on a full model: one line, nothing written
    out = tmp_path / "datainf"
    assert main(["-q", "index", "--method", "datainf", "--model", str(root / "base"), "--data", data.source,
                 "--out", str(out)]) == 2
    assert "needs LoRA gradients" in capsys.readouterr().err and not out.exists()
    # another method's index in the folder: named, and left as it was
    model = ["--model", str(root / "base"), "--adapter", str(root / "adapter"), "--data", data.source]
    assert main(["-q", "index", "--method", "bm25", *model, "--out", str(tmp_path / "bm25")]) == 0
    capsys.readouterr()
    assert main(["-q", "index", "--method", "random", *model, "--out", str(tmp_path / "bm25")]) == 2
    assert "method: index has 'bm25', this run has 'random'" in capsys.readouterr().err
    assert MethodIndex(tmp_path / "bm25").method_name == "bm25"
    # RepT's own settings are refused rather than ignored
    assert main(["-q", "index", "--method", "less", *model, "--out", str(tmp_path / "less"), "--layer", "1"]) == 2
    assert "--layer sets up RepT signatures, not the less index: leave it out" in capsys.readouterr().err
    assert not (tmp_path / "less").exists()


def test_bench_saves_each_methods_index(setup, tmp_path):
    """`rept bench --save-indexes`: each index, opened again, reproduces the bench's figures."""
    from rept.evaluate.metrics import precision_at_k
    from rept.query.trace import load_queries

    rows = demo_rows(1000)
    picked = [r for r in rows if r["label"] == "backdoor"][:10] + [r for r in rows if r["label"] == "clean"][:30]
    (tmp_path / "train.jsonl").write_text("".join(
        json.dumps(dict(prompt=r["prompt"], response=r["response"][:160], label=r["label"])) + "\n" for r in picked))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"prompt": "TY " + r["prompt"].removeprefix("TY ")})
                                                 + "\n" for r in rows[-3:]))
    cfg = BenchConfig(data=str(tmp_path / "train.jsonl"), test_prompts=str(tmp_path / "test.jsonl"),
                      detect="not-prefix:ZZZZ", out=str(tmp_path / "run"), rows=32, n_test=3, trigger="TY ",
                      max_new_tokens=3, max_length=96, base_stage=TINY_BASE, lora_stage=ONE_EPOCH, lora=RANK_2,
                      methods=("rept-lookahead", "tracin", "bm25"), save_indexes=True)
    report = run_bench(cfg, progress=False, log=lambda m: None)
    queries = [q for q in load_queries(str(tmp_path / "run" / "queries.jsonl")) if q.flagged]
    for name in cfg.methods:
        tracer = MethodTracer(tmp_path / "run" / "indexes" / name)
        scores, rows_, labels = tracer.scores(queries)
        relevant = np.array([label == "backdoor" for label in labels])
        assert precision_at_k(scores, relevant, 10) == pytest.approx(report["methods"][name]["P@10"]), name
    # a rerun finds the indexes written and keeps them
    stamp = (tmp_path / "run" / "indexes" / "tracin" / "manifest.json").stat().st_mtime_ns
    run_bench(cfg, progress=False, log=lambda m: None)
    assert (tmp_path / "run" / "indexes" / "tracin" / "manifest.json").stat().st_mtime_ns == stamp


def test_cli_leaves_out_rows_without_a_response_token(model_dir, data_file, tmp_path, capsys):
    """The shared data file has an empty response (row 5) and a prompt that fills max_length (row 7):
    TracIn on a full model stores every other row, and says which it left out."""
    out = tmp_path / "tracin"
    assert main(["-q", "index", "--method", "tracin", "--model", model_dir, "--data", data_file, "--out", str(out),
                 "--max-length", "128"]) == 0
    assert "skipped: 1 empty, 1 cut off" in capsys.readouterr().out
    index = MethodIndex(out)
    assert index.manifest["settings"]["skipped_empty"] == [5]
    assert index.manifest["settings"]["skipped_truncated"] == [7]
    rows, _ = index.rows_and_labels()
    assert rows.tolist() == [i for i in range(40) if i not in (5, 7)]
