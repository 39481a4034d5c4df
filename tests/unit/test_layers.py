"""Phase-transition layer choice."""

import torch

from rept.data.datasets import Row
from rept.signatures.layers import adjacent_similarities, choose_layer, phase_transition_layer


def test_choose_layer_takes_later_layer_of_least_similar_pair():
    # pairs (0,1) (1,2) (2,3) (3,4); the final pair (3,4) is left out even though it is lowest
    layer, _ = choose_layer([0.9, 0.5, 0.8, 0.1])
    assert layer == 2


def test_a_deep_model_leaves_out_its_first_two_pairs():
    """SmolLM2-135M's curve on 32 backdoor rows (`rept layers`, docs/results.md): the embeddings-to-block
    pairs are the least similar on any pretrained model; the dip inside the network is 24 -> 25."""
    curve = [0.018, 0.686, 0.976, 0.958, 0.961, 0.957, 0.971, 0.948, 0.932, 0.936, 0.941, 0.959, 0.951, 0.953,
             0.95, 0.944, 0.95, 0.961, 0.941, 0.943, 0.906, 0.932, 0.943, 0.95, 0.844, 0.99, 0.982, 0.961, 0.949,
             0.297]
    layer, reason = choose_layer(curve)
    assert layer == 25 and "first 2 pairs left out" in reason
    # below DEEP_MODEL_BLOCKS blocks every pair but the last counts, as before
    assert choose_layer([0.1, 0.5, 0.8, 0.3])[0] == 1


def test_no_clear_minimum_gives_last_layer():
    layer, reason = choose_layer([0.80, 0.801, 0.802, 0.3])
    assert layer == 4 and "no clear minimum" in reason


def test_similarities_are_cosines_of_prompt_last_token(llama, tokenizer, rows):
    from rept.data.examples import tokenize_rows

    data = [Row(i, r["prompt"], r["response"], r["label"]) for i, r in enumerate(rows[:6])]
    examples, _ = tokenize_rows(tokenizer, data, max_length=64)
    sims = adjacent_similarities(llama, examples, tokenizer.pad_token_id, batch_size=4)
    expected = torch.zeros(3)
    for e in examples:
        with torch.no_grad():
            hs = llama(torch.tensor([e.input_ids[: e.prompt_len]]), output_hidden_states=True).hidden_states
        expected += torch.stack([torch.cosine_similarity(hs[i][0, -1], hs[i + 1][0, -1], dim=0) for i in range(3)])
    assert torch.allclose(torch.tensor(sims), expected / len(examples), atol=1e-5)


def test_phase_transition_layer_in_range(model_dir, rows):
    from rept.model.loading import load_model

    data = [Row(i, r["prompt"], r["response"], r["label"]) for i, r in enumerate(rows[:8])]
    choice = phase_transition_layer(load_model(model_dir), data, max_length=64)
    assert 1 <= choice.layer <= 3 and len(choice.similarities) == 3
