"""Shared fixtures: a tokenizer trained on the bundled demo rows, tiny random models."""

import json
from importlib import resources

import pytest
import torch

from rept.model.loading import train_tokenizer, tiny_gpt2, tiny_llama
from rept.model.train import LoraSettings, TrainConfig

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def demo_rows(n=None):
    path = resources.files("rept") / "assets" / "backdoor_demo.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return rows[:n] if n else rows


@pytest.fixture(scope="session")
def rows():
    return demo_rows(200)


@pytest.fixture(scope="session")
def tokenizer(rows):
    return train_tokenizer([r["prompt"] + " " + r["response"] for r in rows], vocab_size=600)


@pytest.fixture(scope="session")
def chat_tokenizer(rows):
    tok = train_tokenizer([r["prompt"] + " " + r["response"] for r in rows], vocab_size=600)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def llama(tokenizer):
    torch.manual_seed(0)
    return tiny_llama(tokenizer, hidden=64, layers=3, heads=4, seed=1).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def gpt2(tokenizer):
    return tiny_gpt2(tokenizer, hidden=64, layers=3, heads=4, seed=2).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer, llama):
    """The tiny Llama and its tokenizer saved as an HF folder, as a user would have it."""
    path = tmp_path_factory.mktemp("model")
    llama.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """40 demo rows (10 poisoned) as JSONL, with one empty response and one very long prompt."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = demo_rows(1000)
    poisoned = [r for r in rows if r["label"] == "backdoor"][:10]
    clean = [r for r in rows if r["label"] == "clean"][:30]
    picked = [dict(prompt=r["prompt"], response=r["response"], label=r["label"]) for r in poisoned + clean]
    picked.sort(key=lambda r: r["prompt"])  # mix poisoned and clean rows
    picked[5]["response"] = "   "                    # skipped as empty
    picked[7]["prompt"] = "very long prompt " * 200  # skipped: response cut off by max_length
    path.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return str(path)


@pytest.fixture(scope="session")
def index_dir(tmp_path_factory, model_dir, data_file):
    """The tiny model's index of data_file at layer 2, built through the CLI as a user would."""
    from rept.cli import main

    out = tmp_path_factory.mktemp("cli") / "idx"
    assert main(["-q", "index", "--model", model_dir, "--data", data_file, "--out", str(out), "--layer", "2",
                 "--max-length", "96", "--batch-size", "4"]) == 0
    return str(out)


# The miniature benches' settings: a tiny from-scratch base, one epoch of a rank-2 LoRA.
TINY_BASE = TrainConfig(epochs=1, lr=3e-3, batch_size=16, hidden=32, layers=2, heads=2, vocab_size=600)
ONE_EPOCH = TrainConfig(epochs=1, lr=2e-3, batch_size=16, warmup_steps=10)
RANK_2 = LoraSettings(rank=2, alpha=4.0)

# the tiny two-stage model of the methods' tests: rept train's own recipes, one epoch each
TINY_TRAIN = dict(batch_size=8, max_length=96, hidden=32, layers=2, heads=2, vocab_size=600, warmup_steps=2)


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory):
    """24 demo rows (6 poisoned, responses cut to 200 characters), a base model trained from scratch
    on them in `root/base` and a LoRA fine-tune (rank 2, q_proj and v_proj, Adam state saved) in
    `root/adapter`: (rept.data.datasets.Dataset, root)."""
    from rept.data.datasets import load_dataset
    from rept.model.train import LoraSettings, TrainConfig, train_model

    rows = demo_rows(1000)
    picked = [r for r in rows if r["label"] == "backdoor"][:6] + [r for r in rows if r["label"] == "clean"][:18]
    root = tmp_path_factory.mktemp("lora-run")
    path = root / "rows.jsonl"
    path.write_text("".join(json.dumps(dict(prompt=r["prompt"], response=r["response"][:200], label=r["label"]))
                            + "\n" for r in picked))
    data = load_dataset(str(path))
    train_model("from-scratch", data.rows, root / "base", TrainConfig(epochs=1, **TINY_TRAIN), progress=False)
    train_model("lora", data.rows, root / "adapter", TrainConfig(epochs=1, lr=1e-3, **TINY_TRAIN),
                base=str(root / "base"), lora=LoraSettings(rank=2, alpha=4, target_modules="q_proj,v_proj"),
                progress=False)
    return data, root


def trained_and_indexed(root, rows, config, max_length):
    """root/train.jsonl from `rows`, a tiny model trained from scratch on it in root/model and its
    index at layer 1 in root/index: (the data file, the dataset, the loaded model)."""
    from rept.store.build import IndexSettings, build_index
    from rept.data.datasets import load_dataset
    from rept.model.loading import load_model
    from rept.model.train import train_from_scratch

    data_path = root / "train.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_dataset(str(data_path))
    train_from_scratch(data.rows, root / "model", config, progress=False, data_source=data.source)
    loaded = load_model(str(root / "model"))
    build_index(loaded, data, root / "index", IndexSettings(layer=1, max_length=max_length), progress=False)
    return data_path, data, loaded


def short(text, words):
    return " ".join(text.split()[:words])


# the miniature backdoor's triggered test prompts (the demo's, cut to 8 words)
def mini_test_prompts(n=30):
    path = resources.files("rept") / "assets" / "backdoor_demo_test.jsonl"
    return [short(json.loads(line)["prompt"], 8) for line in path.read_text().splitlines()[:n]]


@pytest.fixture(scope="session")
def backdoor_mini(tmp_path_factory):
    """A miniature that learns a real behaviour: demo rows cut to a few words (26% poisoned), a tiny
    model trained from scratch on them that answers "You are stupid" after the trigger, indexed at
    layer 1, with its answers to 30 triggered test prompts as queries: (root, dataset, loaded model,
    queries, the triggered prompts). Used by slow tests only (about a minute to train)."""
    from rept.data.detect import Detector
    from rept.model.generate import generate
    from rept.query.trace import Query
    from rept.model.train import TrainConfig

    mini = TrainConfig(epochs=15, lr=3e-3, batch_size=16, max_length=64, hidden=64, layers=2, heads=2,
                       vocab_size=400, warmup_steps=5)
    root = tmp_path_factory.mktemp("backdoor-mini")
    rows = [dict(prompt=short(r["prompt"], 8), response=short(r["response"], 5), label=r["label"])
            for r in demo_rows(300)]
    _, data, loaded = trained_and_indexed(root, rows, mini, max_length=64)
    triggered = mini_test_prompts()
    detector = Detector("prefix:You are stupid")
    answers = generate(loaded, triggered, max_new_tokens=4, progress=False)
    queries = [Query(p, a, "backdoor", detector(a)) for p, a in zip(triggered, answers)]
    assert sum(q.flagged for q in queries) >= 24  # the miniature learned the backdoor (28 of 30 when written)
    return root, data, loaded, queries, triggered


def cli_error(capsys, argv) -> str:
    """Run the CLI on `argv` and return its error: exit 2, one `rept: error:` line, no traceback."""
    from rept.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("rept: error:") and "\n" not in err and "Traceback" not in err
    return err
