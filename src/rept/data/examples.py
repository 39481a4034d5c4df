"""Turning (prompt, response) rows into token ids with the prompt/response boundary.

The prompt is everything up to and including the generation prompt; every token after it is
a response token (end-of-turn tokens included). The boundary is found on the tokenization of
the whole text through character offsets, never by tokenizing the prompt alone, because BPE
merges across the boundary would otherwise shift it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# Used when the tokenizer has no chat template.
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass(frozen=True)
class Example:
    row: int                 # index of the row in the source dataset
    input_ids: list[int]     # prompt + response tokens (truncated to max_length)
    prompt_len: int          # number of prompt tokens; position prompt_len-1 predicts the first response token
    text: str                # the formatted text the ids come from
    offsets: list[tuple[int, int]]  # character span of every token in `text`
    # Token range [a, b) whose prediction carries the loss; None = every response token. Set to
    # restrict a query's loss to the part of the answer a detector flagged.
    loss_span: tuple[int, int] | None = None

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.prompt_len


def template_name(tokenizer) -> str:
    """What formatting is used, recorded in the index manifest."""
    chat = getattr(tokenizer, "chat_template", None)
    if chat:
        return "chat:" + hashlib.sha256(chat.encode()).hexdigest()[:12]
    return "plain:" + hashlib.sha256(PLAIN_TEMPLATE.encode()).hexdigest()[:12]


def format_prompt(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(prompt=prompt)


def format_pair(tokenizer, prompt: str, response: str) -> tuple[str, int]:
    """The full text and the character length of its prompt part."""
    prompt_text = format_prompt(tokenizer, prompt)
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prompt_text):
            # Some templates render the assistant turn differently from the generation prompt;
            # fall back to what the model sees when it generates.
            full = prompt_text + response + (tokenizer.eos_token or "")
        return full, len(prompt_text)
    return prompt_text + response + (tokenizer.eos_token or ""), len(prompt_text)


def uses_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def tokenize_pair(tokenizer, prompt: str, response: str, row: int = 0, max_length: int | None = None,
                  loss_chars: tuple[int, int] | None = None) -> Example | None:
    """Tokenize one row; None when truncation leaves no response token. `loss_chars`, a character
    range of `response`, restricts the loss to the response tokens that overlap it."""
    text, prompt_chars = format_pair(tokenizer, prompt, response)
    # A chat template writes its own BOS into the text; the plain format relies on the tokenizer's.
    enc = tokenizer(text, add_special_tokens=not uses_template(tokenizer), return_offsets_mapping=True,
                    truncation=max_length is not None, max_length=max_length)
    ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    # A token belongs to the prompt when it starts inside the prompt text. Special tokens added by
    # the tokenizer (offset (0, 0)) sit before the text and count as prompt too.
    prompt_len = 0
    for start, _ in offsets:
        if start >= prompt_chars:
            break
        prompt_len += 1
    if prompt_len == 0 or prompt_len >= len(ids):
        return None
    loss_span = None
    if loss_chars is not None:
        # where the response sits in the text (a chat template may put markup before it)
        at = text.find(response, prompt_chars) if response else -1
        if at >= 0:
            a, b = at + loss_chars[0], at + loss_chars[1]
            hit = [i for i in range(prompt_len, len(ids)) if offsets[i][0] < b and offsets[i][1] > a]
            if hit:  # a span cut off by truncation leaves the loss on the whole response
                loss_span = (hit[0], hit[-1] + 1)
    return Example(row=row, input_ids=list(ids), prompt_len=prompt_len, text=text, offsets=offsets,
                   loss_span=loss_span)


def tokenize_rows(tokenizer, rows, max_length: int | None = None) -> tuple[list[Example], list[int]]:
    """Examples for rows with at least one response token left, and the indices of rows cut off."""
    examples, cut = [], []
    for r in rows:
        ex = tokenize_pair(tokenizer, r.prompt, r.response, row=r.index, max_length=max_length)
        (examples.append(ex) if ex is not None else cut.append(r.index))
    return examples, cut
