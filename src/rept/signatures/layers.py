"""Choosing the layer: the "phase transition" where the representation of the last prompt
token changes most between adjacent layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rept.errors import ReptError
from rept.data.examples import tokenize_rows
from rept.signatures.extract import collate, length_sorted_batches


@dataclass
class LayerChoice:
    layer: int                 # chosen hidden_states index
    similarities: list[float]  # similarities[i] = mean cosine(hidden_states[i], hidden_states[i+1]) at p
    reason: str

    def as_dict(self) -> dict:
        return {"layer": self.layer, "similarities": self.similarities, "reason": self.reason}


@torch.no_grad()
def adjacent_similarities(model, examples, pad_id: int, batch_size: int = 16) -> list[float]:
    """Mean over examples of the cosine between adjacent layers' hidden states at the last prompt position."""
    device = next(model.parameters()).device
    total, count = None, 0
    for chunk in length_sorted_batches(examples, batch_size):
        # Only the prompt is needed: under a causal mask position p does not see the response.
        prompts = [type(e)(e.row, e.input_ids[: e.prompt_len], e.prompt_len, e.text, e.offsets[: e.prompt_len])
                   for e in chunk]
        batch = collate(prompts, pad_id, "right", device)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, output_hidden_states=True, use_cache=False)
        p = torch.tensor([e.prompt_len - 1 for e in prompts], device=device)
        idx = torch.arange(len(prompts), device=device)
        states = torch.stack([hs[idx, p].float() for hs in out.hidden_states])  # [layers+1, B, H]
        cos = torch.nn.functional.cosine_similarity(states[:-1], states[1:], dim=-1)  # [layers, B]
        total = cos.sum(1) if total is None else total + cos.sum(1)
        count += len(prompts)
    return (total / count).tolist()


# From this many blocks on, the first two adjacent pairs are left out too: on a pretrained model the
# embeddings, the first block's output and the second's are nearly orthogonal whatever the input
# (SmolLM2-135M, 30 blocks: cosine 0.02 and 0.69, against 0.84-0.99 for every later pair), a change
# every such model makes, not this data's transition. Shallower models (the tiny ones rept trains)
# keep every pair but the last.
DEEP_MODEL_BLOCKS = 8
SKIPPED_FIRST_PAIRS = 2


def choose_layer(similarities: list[float], min_gap: float = 0.01) -> tuple[int, str]:
    """The later layer of the least similar adjacent pair, leaving out the final pair (the final
    norm always changes the representation a lot) and, on a model of DEEP_MODEL_BLOCKS blocks or
    more, the first SKIPPED_FIRST_PAIRS pairs. No clear minimum -> the last layer."""
    last = len(similarities)  # hidden_states index of the final output
    skip = SKIPPED_FIRST_PAIRS if last >= DEEP_MODEL_BLOCKS else 0
    candidates = similarities[skip:-1]
    if not candidates:
        return last, "only one block: using the last layer"
    best = min(range(len(candidates)), key=lambda i: candidates[i])
    others = [s for i, s in enumerate(candidates) if i != best]
    if others and sum(others) / len(others) - candidates[best] < min_gap:
        return last, f"no clear minimum (gap < {min_gap}): using the last layer"
    best += skip
    note = f" (the first {skip} pairs left out on a {last}-block model)" if skip else ""
    return best + 1, (f"least similar adjacent pair is ({best}, {best + 1}), cosine {similarities[best]:.3f}"
                      + note)


def phase_transition_layer(loaded, rows, max_length: int = 512, batch_size: int = 16) -> LayerChoice:
    examples, _ = tokenize_rows(loaded.tokenizer, rows, max_length=max_length)
    if not examples:
        raise ReptError("no probe row has a response token left after truncation (raise --max-length)")
    sims = adjacent_similarities(loaded.model, examples, loaded.tokenizer.pad_token_id, batch_size)
    layer, reason = choose_layer(sims)
    return LayerChoice(layer, sims, reason)
