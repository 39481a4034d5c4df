"""Per-example gradients: each row's own gradient of its mean response-token loss with respect to the
trainable parameters, the engine behind TracIn, LESS, DataInf and RapidIn (rept.methods.gradients).

Batched and exact when every trainable parameter belongs to a plain nn.Linear (LoRA's lora_A /
lora_B): see `iter_per_example_grads`. Anything else falls back to one row per backward pass, the
definition, which the tests compare the batched path with.
"""

from __future__ import annotations

import torch

from rept.methods.base import examples_for, plural


def per_example_grads(model, tokenizer, pairs, max_length: int, what: str = "row", progress: bool = False,
                      batch_size: int = 16):
    """Gradient of each example's mean response-token loss w.r.t. the trainable parameters:
    ({name: [n, *shape]} float32 on CPU, names in model order, rows in input order). The batches
    of `iter_per_example_grads` gathered in one place."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {n: torch.empty((len(pairs), *p.shape), dtype=torch.float32) for n, p in named}
    for rows, grads in iter_per_example_grads(model, tokenizer, pairs, max_length, what, progress, batch_size):
        for n, _ in named:
            out[n][rows] = grads[n].cpu()
    return out


def iter_per_example_grads(model, tokenizer, pairs, max_length: int, what: str = "row", progress: bool = False,
                           batch_size: int = 16):
    """Per-example gradients a batch at a time, for callers that keep less than every row's gradient:
    yields (positions in `pairs` [b], {name: [b, *shape]} float32 on the model's device). A row may
    come twice (after a fallback, below); the later gradient is the same one.

    Rows go through the model in length-sorted batches. When every trainable parameter is the
    weight or bias of a plain `nn.Linear` (LoRA's lora_A / lora_B), each row's own gradient is
    recovered exactly from one forward and backward pass per batch: the batch loss is the sum of
    the rows' mean losses, rows do not interact in a causal LM, so the gradient at a Linear's
    output for row b is that of row b's loss alone, and the weight gradient of row b is
    sum_t d[b, t] a[b, t]^T (a: the Linear's input, d: the gradient at its output). Any other
    trainable parameter (an embedding, a DoRA magnitude, ...) falls back to one row at a time, as
    does batch_size 0 (the definition, which the tests compare the batched path with)."""
    from rept.progress import progress_bar

    from rept.signatures.extract import length_sorted_batches

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    owners = linear_owners(model, [p for _, p in named]) if named else None
    examples = examples_for(tokenizer, pairs, max_length, what)
    bar = progress_bar(total=len(examples), desc=f"gradients ({plural(what)})", disable=not progress, dynamic_ncols=True)
    try:
        if owners is not None and batch_size >= 1:
            for k, chunk in enumerate(length_sorted_batches(examples, batch_size)):
                grads = _batch_grads(model, tokenizer.pad_token_id, chunk, named, owners, check=k == 0)
                if grads is None:  # some trainable weight is used outside its Linear's forward
                    bar.reset()
                    break
                yield torch.tensor([e.row for e in chunk]), grads
                bar.update(len(chunk))
            else:
                return
        yield from _grads_one_at_a_time(model, tokenizer.pad_token_id, examples, named, bar)
    finally:
        bar.close()


def _grads_one_at_a_time(model, pad_id, examples, named, bar):
    """Per-example gradients by their definition, one row per forward and backward pass: the
    reference for the batched path and its fallback for models whose trainable parameters are not
    all nn.Linear weights."""
    from rept.signatures.extract import collate, response_losses

    device = next(model.parameters()).device
    params = [p for _, p in named]
    for ex in examples:
        batch = collate([ex], pad_id, "right", device)
        with torch.enable_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False).logits
            loss = response_losses(logits, batch)[0]
            grads = torch.autograd.grad(loss, params)
        yield torch.tensor([ex.row]), {n: g.float()[None] for (n, _), g in zip(named, grads)}
        bar.update(1)


def linear_owners(model, params):
    """{id(param): [(module, "weight" | "bias"), ...]} when every trainable parameter belongs only
    to plain nn.Linear modules (as their weight or bias), else None."""
    wanted = {id(p) for p in params}
    owners: dict[int, list] = {}
    for module in dict.fromkeys(m for _, m in model.named_modules(remove_duplicate=False)):
        for attr, p in module._parameters.items():
            if p is None or id(p) not in wanted:
                continue
            if not (isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward
                    and attr in ("weight", "bias")):
                return None
            owners.setdefault(id(p), []).append((module, attr))
    if set(owners) != wanted:  # a trainable parameter held outside any module's _parameters
        return None
    return owners


class _Unsupported(Exception):
    """A hooked Linear saw an input whose first dimension is not the batch."""


class _Tap(torch.autograd.Function):
    """Identity on a Linear's output that hands the gradient at that output to `sink`. The extra
    `anchor` input (a leaf that requires grad) puts every tap on the path of one autograd.grad
    call, which then computes activation gradients only, no parameter gradient."""

    @staticmethod
    def forward(ctx, output, anchor, sink):
        ctx.sink = sink
        return output.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.sink(grad)
        return grad, None, None


def _batch_grads(model, pad_id, chunk, named, owners, check: bool = False):
    """Per-example gradients of one batch ({name: [B, *shape]} float32 on the model's device, in
    `chunk` order), or None when `check` finds that their sum misses part of the batch gradient."""
    from rept.signatures.extract import accepts_logits_to_keep, collate, response_logit_window, response_losses

    device = next(model.parameters()).device
    batch = collate(chunk, pad_id, "right", device)
    B, T = batch.input_ids.shape
    pad = ~batch.attention_mask.bool()
    pad = pad if bool(pad.any()) else None
    acc = {id(p): torch.zeros((B, *p.shape), dtype=torch.float32, device=device) for _, p in named}
    modules = {}
    for key, pairs in owners.items():
        for module, attr in pairs:
            modules.setdefault(module, []).append((attr, key))
    anchor = torch.zeros((), device=device, requires_grad=True)

    def as_rows(x):
        # [B, ..., features] -> [B, positions, features]
        if x.dim() < 2 or x.shape[0] != B:
            raise _Unsupported
        return x.reshape(B, -1, x.shape[-1])

    def masked(x):
        # padding positions zeroed (where the positions are the tokens): they feed no loss, so
        # their output gradient is zero already; this makes sure of it
        return x.masked_fill(pad[:, :, None], 0.0) if pad is not None and x.shape[1] == T else x

    def hook(module, args, kwargs, output):
        a = as_rows(args[0] if args else kwargs["input"])
        targets = modules[module]
        small_a = a.shape[-1] <= output.shape[-1]
        if small_a:  # masking one factor of each product is enough: mask the narrower one
            a = masked(a)

        def sink(d):
            # in float32 (the input is kept in the model's dtype until here)
            d = as_rows(d).float()
            if not small_a:
                d = masked(d)
            for attr, key in targets:
                if attr == "weight":
                    acc[key].baddbmm_(d.transpose(1, 2), a.float())
                else:
                    acc[key].add_((masked(d) if small_a else d).sum(1))

        return _Tap.apply(output, anchor, sink)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    extra, offset = {}, 0
    # a PEFT wrapper passes extra keyword arguments on to the model it wraps
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if accepts_logits_to_keep(base):
        offset, extra["logits_to_keep"] = response_logit_window(batch)
    params = [p for _, p in named] if check else []
    try:
        with torch.enable_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False, **extra).logits
            loss = response_losses(logits, batch, offset).sum()
            total = torch.autograd.grad(loss, [anchor, *params], allow_unused=True)[1:]
    except _Unsupported:
        return None
    finally:
        for h in handles:
            h.remove()
    if check:
        # The summed per-example gradients must give the batch gradient: a trainable weight used
        # outside its Linear's forward (e.g. read directly by an adapter variant) would be missed.
        wants = [torch.zeros(p.shape, device=device) if g is None else g.float() for (_, p), g in zip(named, total)]
        scale = float(torch.stack([w.norm() for w in wants]).norm()) if wants else 0.0
        for (_, p), want in zip(named, wants):
            tol = 1e-2 if p.dtype in (torch.float32, torch.float64) else 1e-1  # TF32 / half matmuls
            if float((acc[id(p)].sum(0) - want).norm()) > tol * (float(want.norm()) + 1e-4 * scale) + 1e-12:
                return None
    return {n: acc[id(p)] for n, p in named}


def flatten(grads: dict) -> torch.Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], 1)
