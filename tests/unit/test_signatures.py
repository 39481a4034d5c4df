"""Batched signatures equal the plain definition of RepT, whatever the batching."""

import pytest
import torch
import torch.nn.functional as F

from rept.data.examples import tokenize_pair
from rept.signatures.extract import ExtractionSettings, extract_all


def plain_signature(model, example, layer):
    """The definition, the slow way: h from a forward pass over the prompt alone; g from a
    batch-of-one forward over the whole text with parameter gradients on, backward through
    everything, gradient read off hidden_states[layer] at the last prompt position (g) and at the
    first response position (g_next, the `lookahead` mode's third part)."""
    model.requires_grad_(True)
    try:
        prompt = torch.tensor([example.input_ids[: example.prompt_len]])
        with torch.no_grad():
            h = model(prompt, output_hidden_states=True).hidden_states[layer][0, -1]
        ids = torch.tensor([example.input_ids])
        out = model(ids, output_hidden_states=True)
        labels = ids.clone()
        labels[0, : example.prompt_len] = -100
        loss = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
        hidden = out.hidden_states[layer]
        (grad,) = torch.autograd.grad(loss, hidden)
        g, g_next = grad[0, example.prompt_len - 1], grad[0, example.prompt_len]
    finally:
        model.requires_grad_(False)
    return h, g, g_next


def _examples(tok, rows, n=10):
    out = []
    for i, r in enumerate(rows[:n]):
        # Vary the lengths so batches need real padding.
        ex = tokenize_pair(tok, r["prompt"], r["response"][: 40 + 37 * i], row=i, max_length=128)
        assert ex is not None
        out.append(ex)
    return out


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# every extraction switch on each side: the prompt prefix through the KV cache (default), the whole
# text in one pass (where the padding side matters), with full logits, without the padding mask
SWITCHES = [ExtractionSettings(), ExtractionSettings(prompt_prefix_cache=False),
            ExtractionSettings(prompt_prefix_cache=False, response_logits_only=False),
            ExtractionSettings(prompt_prefix_cache=False, causal_only_for_right_padding=True)]


@pytest.mark.parametrize("settings", SWITCHES, ids=["default", "one-pass", "full-logits", "no-mask"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_signatures_equal_plain_definition(request, tokenizer, rows, arch, layer, settings):
    """Every extraction path and switch against the definition, at batch sizes 1 and 8, padded on
    either side."""
    model = request.getfixturevalue(arch)
    examples = _examples(tokenizer, rows)
    expected = [plain_signature(model, ex, layer) for ex in examples]
    for batch_size in (1, 8):
        for side in ("right", "left"):
            sig = extract_all(model, examples, layer, tokenizer.pad_token_id, batch_size=batch_size, padding_side=side,
                              settings=settings)
            for i, (h, g, g_next) in enumerate(expected):
                assert _rel(sig.h[i], h) < 1e-5, (batch_size, side, i)
                assert _rel(sig.g[i], g) < 1e-5, (batch_size, side, i)
                assert _rel(sig.g_next[i], g_next) < 1e-5, (batch_size, side, i)


def test_negative_layer_addresses_from_the_end(llama, tokenizer, rows):
    examples = _examples(tokenizer, rows, 3)
    a = extract_all(llama, examples, -1, tokenizer.pad_token_id)
    b = extract_all(llama, examples, 3, tokenizer.pad_token_id)
    assert torch.equal(a.h, b.h) and torch.equal(a.g, b.g)


def test_parameters_get_no_gradient(llama, tokenizer, rows):
    extract_all(llama, _examples(tokenizer, rows, 4), 1, tokenizer.pad_token_id, batch_size=4)
    assert all(p.grad is None for p in llama.parameters())


def test_token_gradients_match_plain_per_position(llama, tokenizer, rows):
    ex = _examples(tokenizer, rows, 3)
    sig = extract_all(llama, ex, 2, tokenizer.pad_token_id, batch_size=3, token_level=True)
    for i, e in enumerate(ex):
        assert sig.token_grads[i].shape == (len(e.input_ids), 64)
        # the gradient at the last prompt position is g itself, the one after it g_next
        assert torch.allclose(sig.token_grads[i][e.prompt_len - 1], sig.g[i])
        assert torch.allclose(sig.token_grads[i][e.prompt_len], sig.g_next[i])


def test_loss_span_restricts_the_loss_to_the_flagged_tokens(llama, tokenizer, rows):
    """A query's loss restricted to a character span of its response: g equals the gradient of the
    mean loss over exactly the response tokens overlapping that span, whatever the batching."""
    layer = 1
    examples = []
    for i, r in enumerate(rows[:6]):
        response = r["response"][: 60 + 20 * i]
        span = (5, 5 + 12)  # characters 5..16 of the response
        ex = tokenize_pair(tokenizer, r["prompt"], response, row=i, max_length=128, loss_chars=span)
        a, b = ex.loss_span
        assert ex.prompt_len <= a < b <= len(ex.input_ids)
        start = ex.text.find(response)
        covered = ex.text[ex.offsets[a][0]: ex.offsets[b - 1][1]]
        assert start >= 0 and response[5:17] in covered
        examples.append(ex)
    expected = []
    for ex in examples:
        a, b = ex.loss_span
        ids = torch.tensor([ex.input_ids])
        llama.requires_grad_(True)
        try:
            out = llama(ids, output_hidden_states=True)
            loss = F.cross_entropy(out.logits[0, a - 1: b - 1], ids[0, a:b])
            (grad,) = torch.autograd.grad(loss, out.hidden_states[layer])
        finally:
            llama.requires_grad_(False)
        expected.append(grad[0, ex.prompt_len - 1])
    whole = extract_all(llama, [tokenize_pair(tokenizer, rows[0]["prompt"], rows[0]["response"][:60], row=0,
                                              max_length=128)], layer, tokenizer.pad_token_id)
    for batch_size in (1, 4):
        sig = extract_all(llama, examples, layer, tokenizer.pad_token_id, batch_size=batch_size)
        for i, g in enumerate(expected):
            assert _rel(sig.g[i], g) < 1e-5, (batch_size, i)
    # restricting the loss changes g (the span is a strict part of the response)
    assert _rel(sig.g[0], whole.g[0]) > 1e-3


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_one_token_prompts_and_both_extraction_paths(llama, tokenizer, rows, prefix_cache):
    """Rows whose prompt is a single token (nothing before the last prompt token to cache) batched
    with ordinary rows; the prompt-prefix-cache path and the one-pass path both equal the plain
    definition."""
    from dataclasses import replace

    settings = ExtractionSettings(prompt_prefix_cache=prefix_cache)
    ordinary = _examples(tokenizer, rows, 4)
    short = [replace(e, row=10 + i, input_ids=e.input_ids[e.prompt_len - 1:], prompt_len=1,
                     offsets=e.offsets[e.prompt_len - 1:]) for i, e in enumerate(ordinary[:2])]
    examples = ordinary + short
    for layer in (1, 3):
        expected = [plain_signature(llama, ex, layer) for ex in examples]
        mixed = extract_all(llama, examples, layer, tokenizer.pad_token_id, batch_size=6, settings=settings)
        only_short = extract_all(llama, short, layer, tokenizer.pad_token_id, batch_size=2,  # no prefix at all
                                 settings=settings)
        for sig, want in ((mixed, expected), (only_short, expected[len(ordinary):])):
            for i, (h, g, g_next) in enumerate(want):
                assert _rel(sig.h[i], h) < 1e-5 and _rel(sig.g[i], g) < 1e-5, (layer, sig.rows[i])
                assert _rel(sig.g_next[i], g_next) < 1e-5, (layer, sig.rows[i])


def test_a_model_that_returns_no_cache_gets_the_one_pass_path(llama, tokenizer, rows, monkeypatch):
    """If the prefix forward hands back no cache (here: the cache is looked up under a name the
    model's output does not have), the batch runs in one pass instead of tracing the rest of the
    text without its prompt."""
    import rept.signatures.extract as signatures

    monkeypatch.setattr(signatures, "_cache_arg", lambda model: "no_such_cache")
    examples = _examples(tokenizer, rows, 4)
    sig = extract_all(llama, examples, 2, tokenizer.pad_token_id, batch_size=4)
    for i, ex in enumerate(examples):
        h, g, _ = plain_signature(llama, ex, 2)
        assert _rel(sig.h[i], h) < 1e-5 and _rel(sig.g[i], g) < 1e-5
