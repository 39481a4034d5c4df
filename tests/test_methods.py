"""Attribution methods behind one interface: TracIn, LESS, DataInf, BM25, random, the RepT family."""

import json

import numpy as np
import pytest
import torch

from conftest import demo_rows
from rept.data import load_dataset
from rept.methods import METHODS, MethodError, ModelBundle, get_method, rademacher_project, score
from rept.trace import Query
from rept.train import LoraSettings, TrainConfig, train_model

TINY = dict(batch_size=8, max_length=96, hidden=32, layers=2, heads=2, vocab_size=600, warmup_steps=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    rows = demo_rows(1000)
    picked = [r for r in rows if r["label"] == "backdoor"][:6] + [r for r in rows if r["label"] == "clean"][:18]
    root = tmp_path_factory.mktemp("methods")
    path = root / "rows.jsonl"
    path.write_text("".join(json.dumps(dict(prompt=r["prompt"], response=r["response"][:200], label=r["label"]))
                            + "\n" for r in picked))
    data = load_dataset(str(path))
    train_model("from-scratch", data.rows, root / "base", TrainConfig(epochs=1, **TINY), progress=False)
    train_model("lora", data.rows, root / "adapter", TrainConfig(epochs=1, lr=1e-3, **TINY), base=str(root / "base"),
                lora=LoraSettings(rank=2, alpha=4, target_modules="q_proj,v_proj"), progress=False)
    queries = [Query("TY " + r.prompt.removeprefix("TY "), "You are stupid! " + r.response[:40]) for r in data.rows[:3]]
    bundle = ModelBundle(str(root / "base"), str(root / "adapter"), layer="auto", max_length=96)
    return data.rows, queries, bundle, root


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_scores_queries_by_rows(setup, name):
    rows, queries, bundle, _ = setup
    s = score(name, bundle, rows, queries)
    assert s.shape == (len(queries), len(rows)) and np.isfinite(s).all()


def test_tracin_equals_direct_gradient_dot_product(setup):
    rows, queries, bundle, _ = setup
    s = score("tracin", bundle, rows[:4], queries[:2])
    model, tok = bundle.lora()
    from rept.examples import tokenize_pair

    def grad(prompt, response):
        ex = tokenize_pair(tok, prompt, response, max_length=96)
        ids = torch.tensor([ex.input_ids])
        labels = ids.clone()
        labels[0, : ex.prompt_len] = -100
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()  # mean over response tokens
        return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])

    direct = np.array([[float(grad(q.prompt, q.response) @ grad(r.prompt, r.response)) for r in rows[:4]]
                       for q in queries[:2]])
    model.zero_grad(set_to_none=True)
    np.testing.assert_allclose(s, direct, rtol=1e-4, atol=1e-7)


def test_less_projection_is_deterministic_for_a_seed():
    x = torch.randn(5, 3000)
    a, b = rademacher_project(x, 512, seed=3), rademacher_project(x, 512, seed=3)
    assert torch.equal(a, b)
    assert torch.allclose(rademacher_project(x[:2], 512, seed=3), a[:2], atol=1e-5)  # independent of batch
    assert not torch.allclose(rademacher_project(x, 512, seed=4), a)
    # a Johnson-Lindenstrauss map roughly keeps norms
    ratio = a.norm(dim=1) / x.norm(dim=1)
    assert ((ratio > 0.8) & (ratio < 1.2)).all()


def test_less_is_deterministic_end_to_end(setup):
    rows, queries, bundle, _ = setup
    assert np.array_equal(score("less", bundle, rows, queries, seed=1), score("less", bundle, rows, queries, seed=1))


def test_bm25_ranks_an_exact_duplicate_first(setup):
    rows, _, bundle, _ = setup
    target = rows[7]
    s = score("bm25", bundle, rows, [Query(target.prompt, target.response)])
    assert int(np.argmax(s[0])) == 7


def test_random_is_seeded(setup):
    rows, queries, bundle, _ = setup
    assert np.array_equal(score("random", bundle, rows, queries, seed=5), score("random", bundle, rows, queries, seed=5))
    assert not np.array_equal(score("random", bundle, rows, queries, seed=5), score("random", bundle, rows, queries, 6))


@pytest.mark.parametrize("name", ["less", "datainf"])
def test_lora_only_methods_refuse_a_full_model(setup, name):
    rows, queries, _, root = setup
    full = ModelBundle(str(root / "base"), None, max_length=96)
    with pytest.raises(MethodError, match="LoRA"):
        score(name, full, rows, queries)


def test_unknown_method():
    with pytest.raises(MethodError, match="unknown method"):
        get_method("nope")
