"""What rept reads from disk it does not trust: no pickle is ever loaded, so a crafted file runs no code."""

import os
import pickle
import shutil

import pytest

from rept.cli import main
from rept.store.safefile import UnsafeFileError
from rept.model.train import OPTIMIZER_FILE, load_adam_state


class _RunsCode:
    """Unpickling this creates the marker file: the proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_pickle(path, marker):
    path.write_bytes(pickle.dumps(_RunsCode(marker)))


def test_a_crafted_optimizer_pickle_in_an_adapter_runs_no_code(lora_run, tmp_path, capsys):
    data, root = lora_run
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "adapter", adapter)
    marker = tmp_path / "ran"
    # beside the real state: the pickle is never opened
    _plant_pickle(adapter / "optimizer.pt", marker)
    assert load_adam_state(adapter)["exp_avg"]
    assert main(["-q", "index", "--method", "less", "--model", str(root / "base"), "--adapter", str(adapter),
                 "--data", data.source, "--out", str(tmp_path / "idx"), "--max-length", "96"]) == 0
    assert not marker.exists()
    # alone: refused in one line, still not opened
    (adapter / OPTIMIZER_FILE).unlink()
    with pytest.raises(UnsafeFileError, match="is a pickle"):
        load_adam_state(adapter)
    capsys.readouterr()
    assert main(["-q", "index", "--method", "less", "--model", str(root / "base"), "--adapter", str(adapter),
                 "--data", data.source, "--out", str(tmp_path / "idx2"), "--max-length", "96"]) == 2
    err = capsys.readouterr().err
    assert "is a pickle" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_a_crafted_checkpoint_pickle_runs_no_code(lora_run, tmp_path):
    data, _ = lora_run
    out = tmp_path / "m"
    (out / "checkpoint").mkdir(parents=True)
    marker = tmp_path / "ran"
    _plant_pickle(out / "checkpoint" / "state.pt", marker)
    assert main(["-q", "train", "--data", data.source, "--out", str(out), "--from-scratch", "--epochs", "1",
                 "--hidden", "32", "--layers", "2", "--heads", "2", "--vocab-size", "600", "--max-length", "96"]) == 0
    assert not marker.exists()
    assert (out / OPTIMIZER_FILE).exists() and not (out / "checkpoint").exists()


def test_no_source_file_unpickles():
    """The rule itself: no torch.load / pickle.load in the package."""
    from pathlib import Path

    import rept

    for path in Path(rept.__file__).parent.rglob("*.py"):
        text = path.read_text()
        for banned in ("torch.load(", "pickle.load", "weights_only=False"):
            assert banned not in text, f"{path.name} uses {banned}"
