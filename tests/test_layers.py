"""Phase-transition layer choice."""

import torch

from rept.data import Row
from rept.layers import adjacent_similarities, choose_layer, phase_transition_layer


def test_choose_layer_takes_later_layer_of_least_similar_pair():
    # pairs (0,1) (1,2) (2,3) (3,4); the final pair (3,4) is left out even though it is lowest
    layer, _ = choose_layer([0.9, 0.5, 0.8, 0.1])
    assert layer == 2


def test_no_clear_minimum_gives_last_layer():
    layer, reason = choose_layer([0.80, 0.801, 0.802, 0.3])
    assert layer == 4 and "no clear minimum" in reason


def test_similarities_are_cosines_of_prompt_last_token(llama, tokenizer, rows):
    from rept.examples import tokenize_rows

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
    from rept.models import load_model

    data = [Row(i, r["prompt"], r["response"], r["label"]) for i, r in enumerate(rows[:8])]
    choice = phase_transition_layer(load_model(model_dir), data, max_length=64)
    assert 1 <= choice.layer <= 3 and len(choice.similarities) == 3
