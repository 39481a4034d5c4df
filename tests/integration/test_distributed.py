"""An index built by two torchrun ranks (gloo on CPU) equals a single-process build, row for row."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from rept.store.index import SignatureIndex

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    return env


def _index_args(model_dir, data_file, out):
    # Shard size 8 over 40 rows: 5 shards, so each rank writes more than one (ranks take k % 2).
    return ["-m", "rept", "-q", "index", "--model", model_dir, "--data", data_file, "--out", str(out),
            "--layer", "2", "--shard-size", "8", "--batch-size", "4", "--max-length", "128"]


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def test_two_ranks_equal_one_process(model_dir, data_file, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    run = dict(env=_env(), capture_output=True, text=True, timeout=180)
    one = subprocess.run([sys.executable] + _index_args(model_dir, data_file, single), **run)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(_torchrun() + ["--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                                        "--master-port", str(_free_port())]
                         + _index_args(model_dir, data_file, multi), **run)
    assert two.returncode == 0, two.stderr[-3000:]
    # The summary line is printed once (rank 0), not once per rank.
    assert two.stdout.count("indexed ") == 1, two.stdout

    a, b = SignatureIndex(single), SignatureIndex(multi)
    assert b.manifest["complete"] and b.manifest["rows"] == a.manifest["rows"]
    assert b.n_shards == a.n_shards == 5
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())  # no temp files left
    for key in ("rows", "skipped_empty", "skipped_truncated", "layer", "dataset_fingerprint", "model_weights_hash"):
        assert a.manifest[key] == b.manifest[key], key
    sa, sb = a.load_all(), b.load_all()
    assert torch.equal(sa.row, sb.row)
    assert sa.labels == sb.labels and sa.text_hash == sb.text_hash
    # Same rows in the same batches on both sides, so the signatures agree to the last bit or nearly.
    torch.testing.assert_close(sb.h, sa.h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sb.g, sa.g, rtol=1e-5, atol=1e-6)


# --- a rank that fails must not leave the others waiting at a barrier ------------------------------------
#
# The ranks are started directly (RANK / WORLD_SIZE / MASTER_* set by hand, no torchrun agent): torchrun's
# agent stops the other workers once one exits, which would hide a rank that waits at a barrier. The fault is
# injected by a wrapper script written by the test (rank 0's write_manifest raises), so the product code has
# no test hook. Before the fix, rank 1 waited at the first barrier for gloo's 30-minute timeout.

_WRAPPER = """
import os, sys
import rept.store.build

def _injected_fault(*args, **kwargs):
    raise OSError("injected fault: disk full")

if os.environ["RANK"] == os.environ["REPT_TEST_FAIL_RANK"] and os.environ["REPT_TEST_FAIL_AT"] == "manifest":
    rept.store.build.write_manifest = _injected_fault
if os.environ["RANK"] == os.environ["REPT_TEST_FAIL_RANK"] and os.environ["REPT_TEST_FAIL_AT"] == "shard":
    _save = rept.store.build.save_shard
    def _save_then_fail(folder, k, *args, **kwargs):
        if k >= 2:  # the rank's first shard is written, its second fails
            _injected_fault()
        return _save(folder, k, *args, **kwargs)
    rept.store.build.save_shard = _save_then_fail
from rept.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_ranks(tmp_path, args, fail_rank, fail_at, timeout=60):
    """Start 2 ranks by hand through the fault-injecting wrapper (written to tmp_path); returns
    [(returncode, stderr)] per rank, or fails the test after `timeout` s."""
    import time

    script = tmp_path / "wrapper.py"
    script.write_text(_WRAPPER)
    port, procs = _free_port(), []
    for rank in range(2):
        env = _env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), REPT_TEST_FAIL_RANK=str(fail_rank),
                   REPT_TEST_FAIL_AT=fail_at)
        procs.append(subprocess.Popen([sys.executable, str(script)] + args[2:], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    start, out = time.monotonic(), []
    try:
        for p in procs:
            _, err = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
            out.append((p.returncode, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank still ran {timeout} s after rank {fail_rank} failed (waiting at a barrier?)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def test_rank0_failing_before_the_first_barrier_stops_every_rank(model_dir, data_file, tmp_path):
    out = tmp_path / "idx"
    (r0, err0), (r1, err1) = _run_ranks(tmp_path, _index_args(model_dir, data_file, out), 0, "manifest")
    assert r0 != 0 and "injected fault: disk full" in err0, err0[-3000:]
    assert r1 != 0, err1[-3000:]
    # rank 1 says in one line which rank failed and why
    line = [ln for ln in err1.splitlines() if ln.startswith("rept: error:")]
    assert line and "rank 0" in line[0] and "injected fault: disk full" in line[0], err1[-3000:]
    assert "Traceback" not in err1, err1[-3000:]
    assert not list(out.glob("*.safetensors"))  # no rank went on to write shards


def test_rank_failing_mid_build_stops_every_rank_and_keeps_written_shards(model_dir, data_file, tmp_path):
    out = tmp_path / "idx"
    # 5 shards: rank 0 writes 0, 2, 4 and fails at 2; rank 1 writes 1 and 3
    (r0, err0), (r1, err1) = _run_ranks(tmp_path, _index_args(model_dir, data_file, out), 0, "shard")
    assert r0 != 0 and "injected fault" in err0, err0[-3000:]
    assert r1 != 0 and "rank 0" in err1, err1[-3000:]
    assert sorted(p.name for p in out.glob("shard-*.safetensors")) == [
        "shard-00000.safetensors", "shard-00001.safetensors", "shard-00003.safetensors"]
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    # a rerun (here single-process) resumes, keeps what was written and finishes the index
    env = _env()
    done = subprocess.run([sys.executable] + _index_args(model_dir, data_file, out), env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert SignatureIndex(out).manifest["complete"]


def test_torchrun_with_a_mismatched_index_fails_fast_on_every_rank(model_dir, data_file, tmp_path):
    """Bad input that rank 0 alone used to check: an --out holding an index built with other settings."""
    out = tmp_path / "idx"
    run = dict(env=_env(), capture_output=True, text=True, timeout=180)
    args = _index_args(model_dir, data_file, out)
    first = subprocess.run([sys.executable] + args, **run)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    args[args.index("--layer") + 1] = "1"
    two = subprocess.run(_torchrun() + ["--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                                        "--master-port", str(_free_port())] + args, **dict(run, timeout=60))
    assert two.returncode != 0
    # One line says what differs (torchrun stops the other rank once one exits, so it may not get to print).
    errors = [ln for ln in two.stderr.splitlines() if "rept: error:" in ln]
    assert errors and all("holds an index built with other settings" in ln and "layer" in ln for ln in errors), \
        two.stderr[-3000:]
    assert "exitcode  : 2" in two.stderr, two.stderr[-3000:]  # the first rank to stop left as a rept error does
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing written or lost
