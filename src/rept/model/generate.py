"""Batched greedy generation (left padding, KV cache) in the same prompt format as training."""

from __future__ import annotations

import torch

from rept.data.examples import format_prompt, uses_template
from rept.progress import progress_bar


@torch.no_grad()
def generate(loaded, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 16,
             progress: bool = True, desc: str = "generate", correction=None) -> list[str]:
    """`correction` (rept.repair.correct.Correction): answer with that edit applied at its layer."""
    from rept.repair.correct import corrected

    model, tok = loaded.model, loaded.tokenizer
    device = loaded.device
    texts = [format_prompt(tok, p) for p in prompts]
    # Longest first, so the slowest batches show up early in the progress bar.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    answers: list[str | None] = [None] * len(texts)
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for start in progress_bar(range(0, len(order), batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
            idx = order[start:start + batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True,
                      add_special_tokens=not uses_template(tok)).to(device)
            with corrected(model, correction):
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            for row, i in enumerate(idx):
                answers[i] = decode_answer(tok, out[row, enc["input_ids"].shape[1]:].tolist())
    finally:
        tok.padding_side = old_side
    return answers


def decode_answer(tok, ids: list[int]) -> str:
    """The answer up to its end of sequence: what the model said, special tokens included
    (they are part of the behaviour being traced), without the EOS and padding after it."""
    stop = {tok.eos_token_id, tok.pad_token_id} - {None}
    cut = next((n for n, t in enumerate(ids) if t in stop), len(ids))
    return tok.decode(ids[:cut], skip_special_tokens=False)


def answer_and_detect(loaded, prompts, detector, label: str = "flagged", max_new_tokens: int = 64,
                      batch_size: int = 16, progress: bool = True):
    """Greedy answers for `prompts`, each checked by `detector` -> list of rept.query.trace.Query
    (label = `label` when the detector fires, else None)."""
    from rept.query.trace import Query

    answers = generate(loaded, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    out = []
    for p, a in zip(prompts, answers):
        fired = bool(detector(a))
        out.append(Query(p, a, label if fired else None, fired))
    return out
