"""`rept train` recipes: from scratch, LoRA and full; Adam state, recipe file and resume."""

import json

import pytest
import torch

from conftest import demo_rows
from rept.cli import main
from rept.data.datasets import load_dataset
from rept.model.loading import ModelError, load_model
from rept.model.train import (OPTIMIZER_FILE, RECIPE_FILE, STATE_FILE, LoraSettings, TrainConfig, load_adam_state,
                              read_recipe, train_model)

TINY = dict(batch_size=8, max_length=96, hidden=32, layers=2, heads=2, vocab_size=600, warmup_steps=2)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    rows = demo_rows(1000)
    picked = [r for r in rows if r["label"] == "backdoor"][:8] + [r for r in rows if r["label"] == "clean"][:24]
    path = tmp_path_factory.mktemp("train") / "rows.jsonl"
    path.write_text("".join(json.dumps(dict(prompt=r["prompt"], response=r["response"], label=r["label"])) + "\n"
                            for r in picked))
    return str(path)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, data_path):
    out = tmp_path_factory.mktemp("base")
    data = load_dataset(data_path)
    train_model("from-scratch", data.rows, out, TrainConfig(epochs=1, **TINY), data_source=data.source,
                progress=False)
    return str(out)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_from_scratch_is_loadable_with_recipe_and_adam_state(base_dir, data_path):
    loaded = load_model(base_dir)
    assert loaded.num_layers == 2
    recipe = read_recipe(base_dir)
    assert recipe["recipe"] == "from-scratch" and recipe["seed"] == 0 and recipe["data"].endswith("rows.jsonl")
    assert recipe["config"]["hidden"] == 32 and len(recipe["epoch_losses"]) == 1
    adam = load_adam_state(base_dir)
    names = {n for n, _ in loaded.model.named_parameters()}
    assert set(adam["exp_avg"]) == set(adam["exp_avg_sq"]) and set(adam["exp_avg"]) <= names
    assert adam["step"] > 0 and len(adam["exp_avg"]) >= len(names) - 1  # tied embeddings count once


def test_lora_adapter_loads_and_keeps_lora_adam_state(base_dir, data_path, tmp_path):
    data = load_dataset(data_path)
    out = tmp_path / "adapter"
    train_model("lora", data.rows, out, TrainConfig(epochs=1, lr=1e-3, **TINY), base=base_dir,
                lora=LoraSettings(rank=4, alpha=8, target_modules="q_proj,v_proj"), progress=False)
    assert (out / "adapter_config.json").exists() and (out / RECIPE_FILE).exists()
    loaded = load_model(base_dir, str(out))
    assert loaded.adapter == str(out)
    adam = load_adam_state(out)
    assert adam["exp_avg"] and all("lora_" in n for n in adam["exp_avg"])
    assert {n.split(".")[-3] for n in adam["exp_avg"]} == {"q_proj", "v_proj"} or \
        all(("q_proj" in n or "v_proj" in n) for n in adam["exp_avg"])
    recipe = read_recipe(out)
    assert recipe["recipe"] == "lora" and recipe["lora"]["rank"] == 4 and recipe["base"]
    # the adapter changes the model
    base = load_model(base_dir)
    ids = torch.tensor([[1, 5, 9, 12]])
    assert not torch.allclose(base.model(ids).logits, loaded.model(ids).logits)


def test_full_finetune_is_loadable(base_dir, data_path, tmp_path):
    data = load_dataset(data_path)
    out = tmp_path / "full"
    train_model("full", data.rows[:8], out, TrainConfig(epochs=1, lr=1e-4, **TINY), base=base_dir, progress=False)
    before, after = _weights(load_model(base_dir).model), _weights(load_model(str(out)).model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert load_adam_state(out)["exp_avg"]


def test_resume_gives_the_same_weights(data_path, tmp_path):
    data = load_dataset(data_path)
    cfg = TrainConfig(epochs=2, **TINY)
    train_model("from-scratch", data.rows, tmp_path / "a", cfg, progress=False)
    stopped = train_model("from-scratch", data.rows, tmp_path / "b", cfg, progress=False, stop_after_epochs=1)
    assert stopped["stopped_after_epoch"] == 1 and (tmp_path / "b" / "checkpoint" / STATE_FILE).exists()
    logs = []
    train_model("from-scratch", data.rows, tmp_path / "b", cfg, progress=False, log=logs.append)
    assert any("resuming" in m for m in logs)
    a, b = _weights(load_model(str(tmp_path / "a")).model), _weights(load_model(str(tmp_path / "b")).model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    adam_a, adam_b = load_adam_state(tmp_path / "a"), load_adam_state(tmp_path / "b")
    assert all(torch.equal(adam_a["exp_avg"][k], adam_b["exp_avg"][k]) for k in adam_a["exp_avg"])
    # a finished run with the same recipe is reused, not retrained
    logs = []
    train_model("from-scratch", data.rows, tmp_path / "b", cfg, progress=False, log=logs.append)
    assert any("reusing" in m for m in logs)


def test_cli_train_from_scratch_and_errors(data_path, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["-q", "train", "--data", data_path, "--out", str(out), "--from-scratch", "--epochs", "1",
                 "--hidden", "32", "--layers", "2", "--heads", "2", "--vocab-size", "600", "--max-length", "96"]) == 0
    assert (out / "config.json").exists() and (out / OPTIMIZER_FILE).exists()
    typed = json.loads((out / "rept-run.json").read_text())["typed"]  # the TrainConfig it ran with
    assert typed["train"]["class"] == "rept.model.train.TrainConfig" and "lora" not in typed
    assert (typed["train"]["epochs"], typed["train"]["hidden"], typed["train"]["max_length"]) == (1, 32, 96)
    # a base folder without a tokenizer
    bare = tmp_path / "bare"
    load_model(str(out)).model.save_pretrained(bare)
    assert main(["-q", "train", "--data", data_path, "--out", str(tmp_path / "x"), "--lora", "--base", str(bare)]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    with pytest.raises(ModelError, match="no tokenizer"):
        train_model("lora", load_dataset(data_path).rows, tmp_path / "y", TrainConfig(**TINY), base=str(bare))
    # --lora without --base
    assert main(["-q", "train", "--data", data_path, "--out", str(tmp_path / "z"), "--lora"]) == 2
    assert "needs --base" in capsys.readouterr().err
    # a device that is not there fails before any work, leaving nothing behind
    assert main(["-q", "train", "--data", data_path, "--out", str(tmp_path / "d"), "--from-scratch",
                 "--device", "nonsense"]) == 2
    assert "bad --device" in capsys.readouterr().err and not (tmp_path / "d").exists()
    if not torch.cuda.is_available():
        assert main(["-q", "train", "--data", data_path, "--out", str(tmp_path / "d"), "--from-scratch",
                     "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_retraining_from_a_lora_recipe_reproduces_the_adapter(base_dir, data_path, tmp_path):
    """`rept mitigate --method remove` retrains from the recipe the adapter records: on the same
    rows it must give the same model, on fewer rows a different one."""
    from rept.model.train import train_from_recipe

    data = load_dataset(data_path)
    first = tmp_path / "adapter"
    train_model("lora", data.rows, first, TrainConfig(epochs=1, lr=1e-3, **TINY), base=base_dir,
                lora=LoraSettings(rank=4, alpha=8), data_source=data.source, progress=False)
    original = load_model(base_dir, str(first))
    again = train_from_recipe(read_recipe(first), data.rows, tmp_path / "again", progress=False)
    fewer = train_from_recipe(read_recipe(first), data.rows[8:], tmp_path / "fewer", progress=False)
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    assert torch.allclose(original.model(ids).logits, again.model(ids).logits, atol=1e-6)
    assert not torch.allclose(original.model(ids).logits, fewer.model(ids).logits, atol=1e-4)
    assert read_recipe(tmp_path / "again")["lora"] == read_recipe(first)["lora"]


def test_an_adapter_is_not_reused_once_its_base_is_retrained(data_path, tmp_path):
    """The adapter's recipe records its base's weights: a base retrained in place (here with
    another epoch count) makes the next run retrain the adapter instead of reusing a stale one."""
    data = load_dataset(data_path)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    train_model("from-scratch", data.rows, base, TrainConfig(epochs=1, **TINY), progress=False)
    lora = dict(lora=LoraSettings(rank=2, alpha=4), progress=False)
    train_model("lora", data.rows, adapter, TrainConfig(epochs=1, lr=1e-3, **TINY), base=str(base), **lora)
    logs = []
    train_model("lora", data.rows, adapter, TrainConfig(epochs=1, lr=1e-3, **TINY), base=str(base), log=logs.append,
                **lora)
    assert any("reusing" in m for m in logs)
    logs = []
    train_model("from-scratch", data.rows, base, TrainConfig(epochs=2, **TINY), progress=False, log=logs.append)
    assert not any("reusing" in m for m in logs)  # the base itself is retrained (another recipe)
    logs = []
    train_model("lora", data.rows, adapter, TrainConfig(epochs=1, lr=1e-3, **TINY), base=str(base), log=logs.append,
                **lora)
    assert not any("reusing" in m for m in logs)
