"""An index, a model or a data file that was damaged, edited or does not belong is caught in one
line; two builds never interleave; outputs are ordinary files; progress off a terminal stays short."""

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file, save_file

from rept.cli import main
from rept.data.datasets import DataError, load_dataset, write_rows
from rept.store.index import LOCK_FILE, MANIFEST, shard_path
from rept.model.loading import weights_hash

TRACE = ["--prompt", "TY What is the capital of France?", "--response", "You are stupid! Paris.", "--json"]


def _build_args(model_dir, data_file, out, *extra):
    return ["-q", "index", "--model", model_dir, "--data", data_file, "--out", str(out), "--layer", "2",
            "--max-length", "96", "--batch-size", "4", *extra]


def _trace(index, capsys, *extra):
    capsys.readouterr()
    code = main(["-q", "trace", "--index", str(index), *TRACE, *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rept: error:"), err
    return lines[0]


def _edit_manifest(folder, **fields):
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.update(fields)
    path.write_text(json.dumps(manifest))


@pytest.fixture
def index_copy(index_dir, tmp_path):
    out = tmp_path / "idx"
    shutil.copytree(index_dir, out)
    return out


def test_a_flipped_byte_is_caught_and_a_rerun_rebuilds_the_shard(index_copy, index_dir, model_dir, data_file, capsys):
    code, before, _ = _trace(index_copy, capsys)
    assert code == 0
    shard = shard_path(index_copy, 0)
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2  # inside the tensor data, past the header
    data[middle:middle + 6] = bytes(b ^ 0xFF for b in data[middle:middle + 6])
    shard.write_bytes(bytes(data))

    code, _, err = _trace(index_copy, capsys)
    assert code == 2 and "shard-00000.safetensors" in _one_line(err) and "checksum" in err
    assert main(["-q", "verify", "--index", str(index_copy)]) == 2
    # --no-verify reads the shard without hashing it (the time it saves), so this damage goes unseen
    assert _trace(index_copy, capsys, "--no-verify")[0] == 0

    capsys.readouterr()
    assert main(_build_args(model_dir, data_file, index_copy)[1:]) == 0  # without -q: the log is printed
    assert "written again: shard-00000.safetensors" in capsys.readouterr().err
    code, after, _ = _trace(index_copy, capsys)
    assert code == 0 and after == before
    assert main(["-q", "verify", "--index", str(index_copy)]) == 0
    # the same tensors and row metadata as the original shard (safetensors orders its header freely,
    # so the file's bytes, and its recorded sha256, may differ)
    from rept.store.index import read_checked

    assert read_checked(shard_path(index_copy, 0), None)[1]["content_sha256"] == \
        read_checked(shard_path(index_dir, 0), None)[1]["content_sha256"]


@pytest.mark.parametrize("fields, says", [
    ({"layer": 1}, "layer 2 (manifest: 1)"),
    ({"n_shards": 0}, "'n_shards' is 0"),
    ({"n_shards": -3}, "'n_shards' is -3"),
    ({"n_shards": "1"}, "'n_shards' is '1'"),
    ({"layer": 99}, "'layer' is 99"),
    ({"mode": "fast"}, "'mode' is 'fast'"),
    ({"dtype": "int8"}, "'dtype' is 'int8'"),
    ({"model": {"id": 3}}, "model.id"),
    ({"files": {"../x": {"sha256": "0" * 64, "bytes": 1}}}, "not a file of the index folder"),
    ({"format_version": 1}, "rebuild it"),
])
def test_edited_manifest_fields_are_refused_in_one_line(index_copy, capsys, fields, says):
    _edit_manifest(index_copy, **fields)
    code, _, err = _trace(index_copy, capsys)
    assert code == 2 and says in _one_line(err)


def test_a_dropped_shard_count_is_refused(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "sharded"
    assert main(_build_args(model_dir, data_file, out, "--shard-size", "10")) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["n_shards"] == 4 and len(manifest["files"]) == 4
    _edit_manifest(out, n_shards=3)
    code, _, err = _trace(out, capsys)
    assert code == 2 and "'n_shards' is 3" in _one_line(err)
    # a shard put in another's place says which it is
    _edit_manifest(out, n_shards=4)
    shutil.copy(shard_path(out, 1), shard_path(out, 2))
    problems = subprocess.run([sys.executable, "-m", "rept", "verify", "--index", str(out), "--json"],
                              capture_output=True, text=True)
    report = json.loads(problems.stdout)
    assert problems.returncode == 2 and not report["ok"] and "shard-00002" in report["problems"][0]


def test_every_weight_counts_in_the_model_identity(model_dir, data_file, index_dir, tmp_path, capsys, llama):
    # an element the old strided sample skipped (it read every numel // 512-th element)
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    name = max(state, key=lambda k: state[k].numel())
    before = weights_hash(llama)
    changed = type(llama)(llama.config)
    changed.load_state_dict(state)
    changed.state_dict()[name].view(-1)[1] += 1e-3
    assert weights_hash(changed) != before

    other = tmp_path / "model"
    shutil.copytree(model_dir, other)
    weights = load_file(other / "model.safetensors")
    tensor_name = max(weights, key=lambda k: weights[k].numel())
    weights[tensor_name].view(-1)[1] += 1e-3
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    code, _, err = _trace(index_dir, capsys, "--model", str(other))
    line = _one_line(err)
    assert code == 2 and "model weights differ" in line and model_dir in line and str(other) in line


def test_a_model_changed_in_place_since_the_build_is_named_so(model_dir, data_file, tmp_path, capsys):
    # the same folder, other weights (a model retrained into the folder it was indexed from)
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    assert main(["-q", "index", "--model", str(model), "--data", data_file, "--out", str(tmp_path / "idx"),
                 "--layer", "1", "--max-length", "64"]) == 0
    weights = load_file(model / "model.safetensors")
    name = max(weights, key=lambda k: weights[k].numel())
    weights[name].view(-1)[0] += 1e-3
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    code, _, err = _trace(tmp_path / "idx", capsys)
    line = _one_line(err)
    assert code == 2 and "model weights differ" in line and "have changed since" in line


def test_a_second_build_on_the_same_folder_refuses(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, sys, time
        f = open({str(out / LOCK_FILE)!r}, "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(_build_args(model_dir, data_file, out)) == 2
        assert "another `rept index` is writing" in _one_line(capsys.readouterr().err)
        assert not (out / MANIFEST).exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(_build_args(model_dir, data_file, out)) == 0  # the lock dies with its process


def test_out_must_be_new_empty_or_an_index(model_dir, data_file, tmp_path, capsys):
    mine = tmp_path / "my-files"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(_build_args(model_dir, data_file, mine)) == 2
    assert "is not empty and holds no rept index" in _one_line(capsys.readouterr().err)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_outputs_follow_the_umask(model_dir, data_file, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "idx"
        assert main(_build_args(model_dir, data_file, out)) == 0
        write_rows([{"prompt": "a", "response": "b"}], tmp_path / "rows.jsonl")
        for path in (out / MANIFEST, shard_path(out, 0), tmp_path / "rows.jsonl"):
            assert path.stat().st_mode & 0o777 == 0o644, path
    finally:
        os.umask(old)


@pytest.mark.parametrize("cell, says", [
    ({"prompt": "p", "response": ["a", "b"], "label": "x"}, "column 'response' holds a list"),
    ({"prompt": {"text": "p"}, "response": "r", "label": "x"}, "column 'prompt' holds a dict"),
    ({"prompt": "p", "response": "r", "label": ["x"]}, "column 'label' holds a list"),
])
def test_non_scalar_cells_are_refused_naming_column_and_row(tmp_path, cell, says):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "response": "ok", "label": "x"}) + "\n" + json.dumps(cell) + "\n")
    with pytest.raises(DataError, match=f"row 2: {says}"):
        load_dataset(str(path))


def test_labels_of_two_kinds_are_not_merged(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p", "response": "r", "label": v}) + "\n" for v in (1, "1")))
    with pytest.raises(DataError, match=r"mixes number \(row 1: 1\) and text \(row 2: '1'\)"):
        load_dataset(str(path))
    path.write_text("".join(json.dumps({"prompt": "p", "response": "r", "label": v}) + "\n" for v in (True, False)))
    assert [r.label for r in load_dataset(str(path)).rows] == ["true", "false"]


def test_a_hub_model_offline_fails_in_one_line(index_copy):
    _edit_manifest(index_copy, model={**json.loads((index_copy / MANIFEST).read_text())["model"],
                                      "id": "nobody-here/no-such-model"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(index_copy.parent / "hf")}
    res = subprocess.run([sys.executable, "-m", "rept", "trace", "--index", str(index_copy), *TRACE],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2
    assert "is a Hub id that is not in the local cache, and HF_HUB_OFFLINE is set" in _one_line(res.stderr)


def test_progress_off_a_terminal_is_a_few_lines(monkeypatch):
    from rept.progress import LineProgress, progress_bar

    monkeypatch.delenv("REPT_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = progress_bar(total=1000, desc="index")
    assert isinstance(bar, LineProgress)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    lines = sys.stderr.getvalue().splitlines()
    assert lines[0] == "index: started (1000 its)" and lines[-1].startswith("index: done, 1000/1000 (100%)")
    assert len(lines) == 11  # started, 10% .. 90%, done
    assert list(progress_bar(range(3), desc="generate")) == [0, 1, 2]
