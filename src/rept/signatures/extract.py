"""Batched extraction of RepT signatures.

For every example, at layer L (hidden_states[L]: 0 = embeddings, i = output of block i,
num_layers = final normed output) and the last prompt position p:
    h = hidden_states[L][p]
    g = d(mean response-token loss of this example) / d hidden_states[L][p]
and, from the same backward, g_next = d(the same loss) / d hidden_states[L][p + 1], the gradient at
the first response position (where the answer's second token is predicted; `lookahead` mode).

One forward pass per batch. The hidden state entering layer L is replaced by a detached leaf
that requires grad, and no parameter requires grad, so the backward pass stops at L and
computes no parameter gradients. The loss that is back-propagated is the sum of the
per-example mean losses: examples do not interact in a causal LM, so the gradient at each
example's positions is that of its own loss, whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from rept.data.examples import Example
from rept.model.loading import decoder_layers, final_norm, resolve_layer


@dataclass(frozen=True)
class ExtractionSettings:
    """How the signatures are computed. Each switch gives the same signatures (the tests check both
    sides against the plain definition); they trade speed only, and benchmarks/bench_signatures.py
    measures each (docs/performance.md).

    response_logits_only: compute logits (and the loss's backward through the LM head) only over the
    window of positions that predict response tokens, through the model's own `logits_to_keep`
    argument, so any soft-capping or scaling the model applies to its logits still applies. Models
    whose forward has no such argument get full logits.

    causal_only_for_right_padding: with right padding, a causal model's real tokens never attend to
    the pads that follow them and the pads' outputs feed no loss, so the padding mask can be dropped:
    attention then runs as plain causal attention (the fused kernel) with identical results at every
    real position. Left padding keeps the mask. Off: on the CPU benchmark it bought nothing.

    prompt_prefix_cache: run the prompt before its last token once without autograd and keep its keys
    and values (the model's own KV cache); only the last prompt token and the response then go through
    the forward that the backward retraces. Positions before the last prompt token cannot influence g
    (attention is causal: nothing above L at those positions depends on hidden_states[L][p]), so the
    backward over them was wasted work. Used for sequence-level signatures of models whose forward
    takes a cache (`cache`, or `past_key_values` in older transformers).
    """

    response_logits_only: bool = True
    causal_only_for_right_padding: bool = False
    prompt_prefix_cache: bool = True


DEFAULT_EXTRACTION = ExtractionSettings()
_FORWARD_ARGS: dict[type, frozenset[str]] = {}


def _forward_args(model) -> frozenset[str]:
    """Names the model's forward takes (for a peft wrapper, those of the model it wraps)."""
    inner = getattr(model, "get_base_model", lambda: model)()
    kind = type(inner)
    if kind not in _FORWARD_ARGS:
        import inspect

        try:
            names = frozenset(inspect.signature(inner.forward).parameters)
        except (TypeError, ValueError):
            names = frozenset()
        _FORWARD_ARGS[kind] = names
    return _FORWARD_ARGS[kind]


def _cache_arg(model) -> str | None:
    """The name under which the model's forward takes and returns its KV cache, if it does."""
    names = _forward_args(model)
    return next((name for name in ("cache", "past_key_values") if name in names), None)


def accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in _forward_args(model)


@dataclass
class SignatureBatch:
    rows: list[int]                          # source-dataset row of each example
    h: torch.Tensor                          # [B, hidden] float32, on CPU
    g: torch.Tensor                          # [B, hidden] float32, on CPU
    token_grads: list[torch.Tensor] | None = None   # per example [n_tokens, hidden]: d loss / d hidden_states[L][t]
    token_hidden: list[torch.Tensor] | None = None  # per example [n_tokens, hidden]: hidden_states[L][t]
    losses: torch.Tensor | None = None       # [B] mean response loss of each example
    g_next: torch.Tensor | None = None       # [B, hidden] float32: d loss / d hidden_states[L][p + 1]


@contextmanager
def layer_tap(model, layer: int):
    """Within the block, hidden_states[layer] is a fresh leaf tensor (requires grad) that the
    tap holds in `.value` after each forward; nothing below the layer is on the autograd graph."""

    class Tap:
        value: torch.Tensor | None = None

    tap = Tap()
    n = len(decoder_layers(model))
    layer = resolve_layer(model, layer)

    def make_leaf(hidden):
        leaf = hidden.detach().requires_grad_(torch.is_grad_enabled())
        tap.value = leaf
        return leaf

    if layer < n:
        def pre_hook(module, args, kwargs):
            if args:
                return (make_leaf(args[0]),) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = make_leaf(kwargs["hidden_states"])
            return args, kwargs

        handle = decoder_layers(model)[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def post_hook(module, args, output):
            return make_leaf(output)

        handle = final_norm(model).register_forward_hook(post_hook)
    try:
        yield tap
    finally:
        handle.remove()


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor    # [B, T]
    starts: list[int]             # where each example's first token sits in the padded row
    examples: list[Example]


def collate(examples: list[Example], pad_id: int, padding_side: str = "right", device=None) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    starts = []
    for i, e in enumerate(examples):
        start = width - len(e.input_ids) if padding_side == "left" else 0
        ids[i, start:start + len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, start:start + len(e.input_ids)] = 1
        starts.append(start)
    # Positions count real tokens only, so left padding does not shift RoPE/absolute positions.
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return Batch(ids.to(device), mask.to(device), positions.to(device), starts, examples)


def response_losses(logits: torch.Tensor, batch: Batch, offset: int = 0) -> torch.Tensor:
    """Mean next-token loss over each example's response tokens, [B]. `logits[:, j]` holds the
    logits of position offset + j (offset > 0 when only a window of positions was computed).

    One cross-entropy over the whole [B, W] window with the positions outside each example's
    span ignored: slicing the logits once per example instead would make the backward of every
    slice fill a zero tensor the size of all the logits, a cost quadratic in the batch size."""
    width = logits.shape[1]
    targets = torch.full((logits.shape[0], width), -100, dtype=torch.long, device=logits.device)
    for i, e in enumerate(batch.examples):
        s = batch.starts[i] - offset
        a, b = e.loss_span or (e.prompt_len, len(e.input_ids))
        # logits at positions a-1 .. b-2 predict the tokens a .. b-1 (by default every response token)
        targets[i, s + a - 1: s + b - 1] = batch.input_ids[i, s + offset + a: s + offset + b]
    token_losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                   reduction="none").view_as(targets)
    return token_losses.sum(1) / (targets != -100).sum(1)


def response_logit_window(batch: Batch) -> tuple[int, torch.Tensor]:
    """(offset, positions): the positions offset .. hi-1 whose logits predict every response token
    of every example in the batch, as `logits_to_keep` takes them; `response_losses` reads the
    window with that offset."""
    offset = min(s + e.prompt_len - 1 for s, e in zip(batch.starts, batch.examples))
    hi = max(s + len(e.input_ids) - 1 for s, e in zip(batch.starts, batch.examples))
    return offset, torch.arange(offset, hi, device=batch.input_ids.device)


def length_sorted_batches(examples: list[Example], batch_size: int, max_tokens: int | None = None,
                          length=None) -> list[list[Example]]:
    """Group examples of similar length so little compute goes to padding. `length(example)` is
    the length to sort by (default: all its tokens). With max_tokens, a batch holds at most that
    many padded tokens (but always at least one example)."""
    length = length or (lambda e: len(e.input_ids))
    order = sorted(examples, key=lambda e: (length(e), len(e.input_ids), e.row))
    batches, current, width = [], [], 0
    for e in order:
        grown = max(width, len(e.input_ids))
        if current and (len(current) >= batch_size or (max_tokens and grown * (len(current) + 1) > max_tokens)):
            batches.append(current)
            current, grown = [], len(e.input_ids)
        current.append(e)
        width = grown
    if current:
        batches.append(current)
    return batches


def _uses_prefix_cache(model, token_level: bool, settings: ExtractionSettings) -> bool:
    return settings.prompt_prefix_cache and not token_level and _cache_arg(model) is not None


def _split_at_last_prompt_token(examples: list[Example], pad_id: int, device) -> tuple[Batch, Batch]:
    """(prefix, rest): the tokens before each example's last prompt token, left-padded so every
    prefix ends in the same column, and the tokens from the last prompt token on, right-padded.
    Side by side they form one padded batch; `rest` carries examples re-based so that its
    column 0 is the last prompt token (prompt_len 1, loss spans shifted), so `response_losses`
    reads its logits unchanged."""
    cut = [e.prompt_len - 1 for e in examples]
    prefix = collate([replace(e, input_ids=e.input_ids[:c], prompt_len=0, loss_span=None)
                      for e, c in zip(examples, cut)], pad_id, "left", device)
    rest_examples = [replace(e, input_ids=e.input_ids[c:], prompt_len=1,
                             loss_span=None if e.loss_span is None else (e.loss_span[0] - c, e.loss_span[1] - c))
                     for e, c in zip(examples, cut)]
    rest = collate(rest_examples, pad_id, "right", device)
    # The rest's positions continue from each prefix's real length; its mask is the whole row's.
    rest.position_ids = rest.position_ids + torch.tensor(cut, device=rest.position_ids.device)[:, None]
    rest.attention_mask = torch.cat([prefix.attention_mask, rest.attention_mask], dim=1)
    return prefix, rest


def _extract_with_prefix_cache(model, batch_examples: list[Example], layer: int, pad_id: int, device):
    """(h, g, g_next, losses) at layer L: h and g at the last prompt token of every example
    (column 0 of the rest), g_next at the first response token (column 1; every example has one),
    the prompt prefix run once without autograd; None when the model returned no cache for the
    prefix (the caller then runs the whole text in one pass)."""
    prefix, rest = _split_at_last_prompt_token(batch_examples, pad_id, device)
    name, cache = _cache_arg(model), {}
    if prefix.input_ids.shape[1]:
        # Only the keys and values are wanted: one logit column instead of one per prefix token.
        head = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        with torch.no_grad():
            out = model(input_ids=prefix.input_ids, attention_mask=prefix.attention_mask,
                        position_ids=prefix.position_ids, use_cache=True, **head)
            cache[name] = getattr(out, name, None)
        if cache[name] is None:
            return None
    with torch.enable_grad(), layer_tap(model, layer) as tap:
        out = model(input_ids=rest.input_ids, attention_mask=rest.attention_mask, position_ids=rest.position_ids,
                    use_cache=bool(cache), **cache)
        losses = response_losses(out.logits, rest)
        (grad,) = torch.autograd.grad(losses.sum(), tap.value)
    return tap.value.detach()[:, 0], grad[:, 0], grad[:, 1], losses


def extract_batch(model, batch_examples: list[Example], layer: int, pad_id: int, padding_side: str = "right",
                  token_level: bool = False, settings: ExtractionSettings = DEFAULT_EXTRACTION) -> SignatureBatch:
    device = next(model.parameters()).device
    rows = [e.row for e in batch_examples]
    split = _extract_with_prefix_cache(model, batch_examples, layer, pad_id, device) \
        if _uses_prefix_cache(model, token_level, settings) else None
    if split is not None:
        h, g, g_next, losses = split
        return SignatureBatch(rows, h.float().cpu(), g.float().cpu(), None, None, losses.detach().float().cpu(),
                              g_next.float().cpu())
    batch = collate(batch_examples, pad_id, padding_side, device)
    extra, offset = {}, 0
    if settings.response_logits_only and not token_level and accepts_logits_to_keep(model):
        offset, extra["logits_to_keep"] = response_logit_window(batch)
    mask = batch.attention_mask
    if settings.causal_only_for_right_padding and padding_side == "right":
        mask = None
    with torch.enable_grad(), layer_tap(model, layer) as tap:
        out = model(input_ids=batch.input_ids, attention_mask=mask,
                    position_ids=batch.position_ids, use_cache=False, **extra)
        losses = response_losses(out.logits, batch, offset)
        (grad,) = torch.autograd.grad(losses.sum(), tap.value)
    hidden = tap.value.detach()
    p = [s + e.prompt_len - 1 for s, e in zip(batch.starts, batch_examples)]
    idx = torch.arange(len(batch_examples), device=device)
    h = hidden[idx, p].float().cpu()
    g = grad[idx, p].float().cpu()
    g_next = grad[idx, [q + 1 for q in p]].float().cpu()  # p + 1 is a response token: there is always one
    token_grads = token_hidden = None
    if token_level:
        spans = [(s, s + len(e.input_ids)) for s, e in zip(batch.starts, batch_examples)]
        token_grads = [grad[i, a:b].float().cpu() for i, (a, b) in enumerate(spans)]
        token_hidden = [hidden[i, a:b].float().cpu() for i, (a, b) in enumerate(spans)]
    return SignatureBatch(rows, h, g, token_grads, token_hidden, losses.detach().float().cpu(), g_next)


def extract(model, examples: Iterable[Example], layer: int, pad_id: int, batch_size: int = 16,
            max_tokens: int | None = None, padding_side: str = "right", token_level: bool = False,
            progress=None, settings: ExtractionSettings = DEFAULT_EXTRACTION) -> Iterator[SignatureBatch]:
    """Signatures for `examples` in length-sorted batches; `progress(n)` is called after each batch."""
    # With the prefix cache only the tokens from the last prompt token on go through the backward:
    # batch by that length, the bulk of the cost.
    rest = (lambda e: len(e.input_ids) - e.prompt_len) if _uses_prefix_cache(model, token_level, settings) else None
    for chunk in length_sorted_batches(list(examples), batch_size, max_tokens, length=rest):
        yield extract_batch(model, chunk, layer, pad_id, padding_side, token_level, settings)
        if progress is not None:
            progress(len(chunk))


def extract_all(model, examples: list[Example], layer: int, pad_id: int, **kwargs) -> SignatureBatch:
    """All signatures in one batch object, in the order of `examples`."""
    parts = list(extract(model, examples, layer, pad_id, **kwargs))
    by_row = {}
    for part in parts:
        for i, row in enumerate(part.rows):
            by_row[row] = (part, i)
    order = [by_row[e.row] for e in examples]
    h = torch.stack([p.h[i] for p, i in order]) if order else torch.empty(0)
    g = torch.stack([p.g[i] for p, i in order]) if order else torch.empty(0)
    tg = [p.token_grads[i] for p, i in order] if parts and parts[0].token_grads is not None else None
    th = [p.token_hidden[i] for p, i in order] if parts and parts[0].token_hidden is not None else None
    losses = torch.stack([p.losses[i] for p, i in order]) if order else torch.empty(0)
    g_next = torch.stack([p.g_next[i] for p, i in order]) if order else torch.empty(0)
    return SignatureBatch([e.row for e in examples], h, g, tg, th, losses, g_next)
