"""An index built by two torchrun ranks (gloo on CPU) equals a single-process build, row for row."""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from rept.index import SignatureIndex

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
