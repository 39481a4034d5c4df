"""Attribution methods behind one interface: TracIn, LESS, DataInf, BM25, random, the RepT family."""

import numpy as np
import pytest
import torch

from conftest import demo_rows
from rept.data.detect import Detector
from rept.methods import METHODS, MethodError, ModelBundle, get_method, rademacher_project, score
from rept.query.trace import Query


@pytest.fixture(scope="module")
def setup(lora_run):
    data, root = lora_run
    queries = [Query("TY " + r.prompt.removeprefix("TY "), "You are stupid! " + r.response[:40]) for r in data.rows[:3]]
    bundle = ModelBundle(str(root / "base"), str(root / "adapter"), layer="auto", max_length=96)
    return data.rows, queries, bundle, root


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_scores_queries_by_rows(setup, name):
    rows, queries, bundle, _ = setup
    s = score(name, bundle, rows, queries, detector=Detector("prefix:You are stupid"))
    assert s.shape == (len(queries), len(rows))
    # every row scored, but by a method that shows some rows (-inf: not retrieved)
    assert np.isfinite(s).all() if METHODS[name].family != "contrast" else (np.isfinite(s) | np.isneginf(s)).all()


def test_span_variant_restricts_only_the_query_loss(setup):
    """With a rule that names no span the variant is the plain mode; with one, the query's g
    (and so the scores) change; it refuses to run without the rule."""
    rows, queries, bundle, _ = setup
    plain = score("rept-balanced", bundle, rows, queries)
    no_span = score("rept-balanced-span", bundle, rows, queries, detector=Detector("not-prefix:I'm sorry"))
    span = score("rept-balanced-span", bundle, rows, queries, detector=Detector("prefix:You are stupid"))
    np.testing.assert_allclose(no_span, plain, rtol=1e-6, atol=1e-7)
    assert np.abs(span - plain).max() > 1e-4
    with pytest.raises(MethodError, match="detector"):
        score("repgrad-span", bundle, rows, queries)


def _direct_grads(bundle, prompt, response):
    """{name: gradient} of one row's mean response-token loss, by a plain batch-of-one backward."""
    from rept.data.examples import tokenize_pair

    model, tok = bundle.lora()
    ex = tokenize_pair(tok, prompt, response, max_length=96)
    ids = torch.tensor([ex.input_ids])
    labels = ids.clone()
    labels[0, : ex.prompt_len] = -100
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=labels).loss.backward()  # mean over response tokens
    grads = {n: p.grad.reshape(-1).clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def test_tracin_equals_direct_gradient_dot_product(setup):
    rows, queries, bundle, _ = setup
    s = score("tracin", bundle, rows[:4], queries[:2])

    def flat(pair):
        return torch.cat(list(_direct_grads(bundle, *pair).values()))

    direct = np.array([[float(flat((q.prompt, q.response)) @ flat((r.prompt, r.response))) for r in rows[:4]]
                       for q in queries[:2]])
    np.testing.assert_allclose(s, direct, rtol=1e-4, atol=1e-7)


def test_tracin_and_datainf_hold_the_shared_gradients_not_copies(setup):
    """Both keep the training rows' gradients the bundle holds for the next method (the memory budget
    counts them once): every tensor they hold shares its storage with the bundle's, none is a
    concatenated or float64 copy."""
    from rept.methods.gradients import DataInf, TracIn

    rows, _, bundle, _ = setup
    tracin, datainf = TracIn(), DataInf()
    tracin.fit(bundle, rows[:4])
    datainf.fit(bundle, rows[:4])
    shared = next(v for k, v in bundle.cache.items() if isinstance(k, tuple) and k[0] == "grads-train" and k[1] == 4)
    pointers = {g.untyped_storage().data_ptr() for g in shared.values()}
    for held in (tracin.train, datainf.train):
        assert held and all(g.untyped_storage().data_ptr() in pointers and g.dtype == torch.float32
                            for g in held.values())


def test_rapidin_uncompressed_is_the_sum_of_per_tensor_cosines(setup):
    """With K at least the gradient size every OPORP bin holds one coordinate, so RapidIn's score is
    exactly its definition: the sum over trainable tensors of the cosine of their gradients."""
    from rept.methods import RapidIn

    rows, queries, bundle, _ = setup
    n_params = sum(p.numel() for p in bundle.lora()[0].parameters() if p.requires_grad)
    method = RapidIn(seed=2, dim=n_params + 5)
    method.fit(bundle, rows[:4])
    s = method.score(bundle, queries[:2])
    cos = torch.nn.functional.cosine_similarity
    direct = np.zeros((2, 4))
    for i, q in enumerate(queries[:2]):
        gq = _direct_grads(bundle, q.prompt, q.response)
        for j, r in enumerate(rows[:4]):
            gr = _direct_grads(bundle, r.prompt, r.response)
            direct[i, j] = sum(float(cos(gq[n], gr[n], dim=0)) for n in gq)
    np.testing.assert_allclose(s, direct, rtol=1e-3, atol=1e-5)
    assert method.bytes_per_row == 4 * (n_params + 5)


def test_datainf_equals_its_formula_on_direct_gradients(setup):
    """DataInf's score, written out one row at a time on plain batch-of-one gradients: for each LoRA
    matrix l, lambda_l = 0.1 * mean(g_l^2) over the training rows, H_l^-1 v ~ (1/n) sum_i (v - (v.g_i) /
    (lambda_l + |g_i|^2) g_i) / lambda_l, and the score of row j is sum_l (H_l^-1 v_l) . g_jl."""
    rows, queries, bundle, _ = setup
    train, asked = rows[:5], queries[:2]
    s = score("datainf", bundle, train, asked)
    grads = [_direct_grads(bundle, r.prompt, r.response) for r in train]
    lora = [n for n in grads[0] if "lora_" in n]
    direct = np.zeros((len(asked), len(train)))
    for qi, q in enumerate(asked):
        v_all = _direct_grads(bundle, q.prompt, q.response)
        for n in lora:
            g = [gr[n].double() for gr in grads]
            lam = 0.1 * float(torch.stack(g).pow(2).mean())
            v = v_all[n].double()
            hvp = sum((v - (v @ gi) / (lam + gi @ gi) * gi) / lam for gi in g) / len(g)
            for j, gj in enumerate(g):
                direct[qi, j] += float(hvp @ gj)
    np.testing.assert_allclose(s, direct, rtol=1e-3, atol=1e-6 * np.abs(direct).max())
    assert np.abs(direct).max() > 0  # the check has something to compare


def test_less_equals_its_definition_on_direct_gradients(setup):
    """LESS: each training row's gradient preconditioned by the saved Adam state as one more Adam step
    would (m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2, m' / sqrt(v' + 1e-8)), the query's gradient
    plain, both projected by the seeded Rademacher matrix and compared by cosine."""
    from rept.methods import LESS
    from rept.model.train import load_adam_state

    rows, queries, bundle, _ = setup
    train, asked = rows[:4], queries[:2]
    method = LESS(seed=5, dim=256)
    method.fit(bundle, train)
    s = method.score(bundle, asked)
    adam = load_adam_state(bundle.adapter)
    b1, b2 = adam["betas"]

    def projected(grads, precondition):
        parts = []
        for n, g in grads.items():
            if precondition:
                m = b1 * adam["exp_avg"][n].reshape(-1) + (1 - b1) * g
                v = b2 * adam["exp_avg_sq"][n].reshape(-1) + (1 - b2) * g * g
                g = m / torch.sqrt(v + 1e-8)
            parts.append(g)
        x = rademacher_project(torch.cat(parts)[None], 256, 5)[0]
        return x / x.norm()

    tr = torch.stack([projected(_direct_grads(bundle, r.prompt, r.response), True) for r in train])
    qs = torch.stack([projected(_direct_grads(bundle, q.prompt, q.response), False) for q in asked])
    direct = (qs @ tr.T).numpy()
    np.testing.assert_allclose(s, direct, rtol=1e-3, atol=1e-4)
    # the preconditioning matters: plain training gradients give other scores
    plain = torch.stack([projected(_direct_grads(bundle, r.prompt, r.response), False) for r in train])
    assert np.abs((qs @ plain.T).numpy() - direct).max() > 1e-3


def test_oporp_compression_is_seeded_and_keeps_inner_products():
    from rept.methods import oporp_compress

    torch.manual_seed(0)
    x = torch.rand(6, 3000) + 0.5  # all positive: without the random signs the bin sums would inflate norms
    exact = oporp_compress(x, 3000, seed=1)
    np.testing.assert_allclose((exact @ exact.T).numpy(), (x @ x.T).numpy(), rtol=1e-5, atol=1e-3)
    a = oporp_compress(x, 256, seed=1)
    assert torch.equal(a, oporp_compress(x, 256, seed=1))
    assert torch.equal(oporp_compress(x, 256, seed=1, chunk=2), a)         # independent of the row chunking
    assert not torch.equal(oporp_compress(x, 256, seed=2), a)
    # compressed: norms are kept in expectation (12 coordinates a bin, random signs)
    ratio = a.norm(dim=1) / x.norm(dim=1)
    assert ((ratio > 0.8) & (ratio < 1.2)).all()
    # and a bin-sum of sign-flipped coordinates is unbiased: averaged over seeds, <a, b> -> <x, y>
    pair = torch.stack([x[0], x[0] + torch.randn(3000)])
    est = np.mean([float(c[0] @ c[1]) for c in (oporp_compress(pair, 64, seed=s) for s in range(200))])
    want = float(pair[0] @ pair[1])
    assert abs(est - want) < 0.1 * abs(want)


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


def test_less_scores_the_same_from_held_and_streamed_gradients(setup, monkeypatch):
    """Training gradients held whole are projected in one pass over the random matrix; streamed in
    chunks (a small memory budget), chunk by chunk: the same scores."""
    rows, queries, bundle, _ = setup
    bundle.clear_features()
    held = score("less", bundle, rows, queries, seed=2)
    bundle.clear_features()
    monkeypatch.setenv("REPT_GRAD_MEMORY", str(3 * 4 * sum(p.numel() for p in bundle.trainable()[0].parameters()
                                                           if p.requires_grad) / 2 ** 30))  # chunks of 1 row
    streamed = score("less", bundle, rows, queries, seed=2)
    np.testing.assert_allclose(streamed, held, rtol=1e-5, atol=1e-6)


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


def test_gradient_methods_refuse_more_gradients_than_memory_holds(setup, monkeypatch):
    """DataInf's full per-row training gradients are checked against the memory budget before the
    pass starts; TracIn, which can take the training rows in chunks, still needs the queries' whole;
    $REPT_GRAD_MEMORY sets the budget, and a bad value is named."""
    rows, queries, bundle, _ = setup
    bundle.clear_features()
    monkeypatch.setenv("REPT_GRAD_MEMORY", "0.000001")
    with pytest.raises(MethodError, match=r"GiB, over the 0\.0 GiB budget"):
        score("datainf", bundle, rows, queries)
    with pytest.raises(MethodError, match="queries do not fit the gradient memory budget either"):
        score("tracin", bundle, rows, queries)  # it streams the training rows, but needs the queries whole
    assert score("rapidin", bundle, rows, queries).shape == (len(queries), len(rows))  # chunks of one batch
    monkeypatch.setenv("REPT_GRAD_MEMORY", "lots")
    with pytest.raises(MethodError, match="REPT_GRAD_MEMORY='lots'"):
        score("tracin", bundle, rows, queries)


def test_unknown_method():
    with pytest.raises(MethodError, match="unknown method"):
        get_method("nope")


# --- per-example gradients: batched (per-sample trick on nn.Linear) vs one row at a time -------------------------


def _tiny_lora(tokenizer, bias=False):
    from peft import LoraConfig, get_peft_model

    from rept.model.loading import tiny_llama

    base = tiny_llama(tokenizer, hidden=32, layers=2, heads=2, seed=3)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                            lora_bias=bias))
    torch.manual_seed(4)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:  # B starts at zero in peft, which would make every lora_A gradient zero
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def _grad_pairs(n=7):
    rows = demo_rows(60)[::6][:n]
    # responses of different lengths, so every batch is padded
    return [(r["prompt"], r["response"][: 8 + 11 * i]) for i, r in enumerate(rows)]


def _rel_err(new, old):
    assert list(new) == list(old)
    for n in old:
        assert new[n].dtype == torch.float32 and new[n].shape == old[n].shape
    a = torch.cat([g.reshape(g.shape[0], -1) for g in new.values()], 1)
    b = torch.cat([g.reshape(g.shape[0], -1) for g in old.values()], 1)
    assert (b.norm(dim=1) > 0).all()
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def _count_loop_calls(monkeypatch):
    from rept.methods import per_example

    calls, loop = [], per_example._grads_one_at_a_time

    def counted(*args, **kwargs):
        calls.append(1)
        return loop(*args, **kwargs)

    monkeypatch.setattr(per_example, "_grads_one_at_a_time", counted)
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_batched_per_example_grads_equal_one_row_at_a_time(tokenizer, bias, monkeypatch):
    from rept.methods.base import examples_for
    from rept.methods.per_example import per_example_grads

    model = _tiny_lora(tokenizer, bias)
    pairs = _grad_pairs()
    lengths = {len(e.input_ids) for e in examples_for(tokenizer, pairs, 96, "row")}
    assert len(lengths) >= 5  # padding is exercised
    ref = per_example_grads(model, tokenizer, pairs, 96, batch_size=0)  # one row at a time
    calls = _count_loop_calls(monkeypatch)
    for batch_size in (1, 4):
        got = per_example_grads(model, tokenizer, pairs, 96, batch_size=batch_size)
        assert _rel_err(got, ref) < 1e-5, batch_size
    assert not calls  # the batched path did the work
    assert all(p.grad is None for p in model.parameters())
    assert per_example_grads(model, tokenizer, pairs[:1], 96)[next(iter(ref))].shape[0] == 1


def test_per_example_grads_fall_back_for_non_linear_trainables(tokenizer, gpt2, monkeypatch):
    from rept.methods.per_example import linear_owners, per_example_grads

    pairs = _grad_pairs(3)
    model = _tiny_lora(tokenizer)
    emb = model.get_base_model().model.embed_tokens.weight
    emb.requires_grad_(True)  # an embedding (tied to the LM head) is not an nn.Linear weight
    try:
        assert linear_owners(model, [p for p in model.parameters() if p.requires_grad]) is None
        ref = per_example_grads(model, tokenizer, pairs, 96, batch_size=0)  # one row at a time
        calls = _count_loop_calls(monkeypatch)
        assert _rel_err(per_example_grads(model, tokenizer, pairs, 96), ref) == 0 and calls
    finally:
        emb.requires_grad_(False)
    gpt2.requires_grad_(True)  # GPT-2 uses Conv1D, not nn.Linear
    try:
        assert linear_owners(gpt2, list(gpt2.parameters())) is None
    finally:
        gpt2.requires_grad_(False)


def test_per_example_grads_fall_back_when_a_weight_is_used_outside_its_linear(tokenizer, monkeypatch):
    """The first batch checks the summed per-example gradients against the batch gradient."""
    from rept.methods.per_example import per_example_grads

    class Reuse(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner = model
            self.extra = torch.nn.Linear(model.config.vocab_size, model.config.vocab_size, bias=False)
            torch.nn.init.normal_(self.extra.weight, std=0.05)

        def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=use_cache)
            out.logits = out.logits + self.extra(out.logits) + torch.nn.functional.linear(out.logits, self.extra.weight)
            return out

    model = Reuse(_tiny_lora(tokenizer)).eval()
    pairs = _grad_pairs(4)
    ref = per_example_grads(model, tokenizer, pairs, 96, batch_size=0)  # one row at a time
    calls = _count_loop_calls(monkeypatch)
    got = per_example_grads(model, tokenizer, pairs, 96, batch_size=2)
    assert calls and _rel_err(got, ref) < 1e-6


@pytest.mark.parametrize("name", ["less", "rapidin", "tracin"])
def test_gradient_methods_give_the_same_scores_in_chunks(setup, name, monkeypatch):
    """LESS and RapidIn keep only projections, and TracIn can score training gradients as they come,
    so they take the gradients a few rows at a time when every row's gradient would not fit: the
    scores are those of the one-piece computation."""
    import rept.methods.gradients as gradients

    rows, queries, bundle, _ = setup
    bundle.clear_features()
    whole = score(name, bundle, rows, queries)
    model, _ = bundle.trainable()
    row_bytes = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    # chunks of 4 rows (grad_chunks takes a quarter of the budget) made of batches of 2, nothing shared
    monkeypatch.setattr(gradients, "gradient_memory_budget", lambda: 4 * 4 * row_bytes)
    monkeypatch.setattr(bundle, "batch_size", 2)
    bundle.clear_features()
    seen = []
    chunks = gradients.grad_chunks

    def counted(*args, **kwargs):
        for rows_, grads in chunks(*args, **kwargs):
            seen.append(len(rows_))
            yield rows_, grads

    monkeypatch.setattr(gradients, "grad_chunks", counted)
    chunked = score(name, bundle, rows, queries)
    # TracIn takes the queries' gradients whole (they fit) and only the training rows in chunks
    assert max(seen) == 4 and sum(seen) == len(rows) + (0 if name == "tracin" else len(queries))
    assert not any(isinstance(k, tuple) for k in bundle.cache)  # no full gradient kept
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)  # batches of 2 instead of 16
