"""The one interface every attribution method implements, and the model bundle they share.

A method is fitted on the training rows (`fit`: the train-side work, e.g. one gradient or
signature per row) and then scores queries (`score`: a float matrix [n_queries, n_train_rows],
higher = more responsible). `rept.metrics.evaluate` scores every method from that matrix.
No method ever sees a label.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from rept.errors import ReptError


class MethodError(ReptError):
    """A user-facing problem with an attribution method (one line)."""


@dataclass
class ModelBundle:
    """What the methods may look at: a model folder, an optional PEFT adapter (LoRA methods need
    one; its folder also holds the Adam state when trained by `rept train`), the RepT layer."""

    model: str
    adapter: str | None = None
    layer: int | str = "auto"
    max_length: int = 128
    batch_size: int = 16
    device: str | None = None
    seed: int = 0
    cache: dict = field(default_factory=dict, repr=False)

    def merged(self):
        """The model (adapter merged in) for RepT and generation; eval mode, no parameter grads."""
        if "merged" not in self.cache:
            from rept.models import load_model

            self.cache["merged"] = load_model(self.model, self.adapter, device=self.device)
        return self.cache["merged"]

    def lora(self):
        """(PEFT model with only the LoRA weights trainable, tokenizer) for gradient methods."""
        if not self.adapter:
            raise MethodError("this method needs a LoRA adapter (--adapter), but the model is a full model; "
                              "use tracin, the RepT family, bm25 or random, or fine-tune with `rept train --lora`")
        if "lora" not in self.cache:
            from rept.models import attach_adapter, load_model

            loaded = load_model(self.model, None, device=self.device)
            model = attach_adapter(loaded.model, self.adapter, merge=False, trainable=True)
            model.eval()
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
            if not any(p.requires_grad for p in model.parameters()):
                raise MethodError(f"the adapter in {self.adapter} has no LoRA weights")
            self.cache["lora"] = (model, loaded.tokenizer)
        return self.cache["lora"]

    def trainable(self):
        """(model, tokenizer) whose trainable parameters are those fine-tuned: the LoRA weights
        with an adapter, every weight without one."""
        if self.adapter:
            return self.lora()
        if "full" not in self.cache:
            from rept.models import load_model

            loaded = load_model(self.model, None, device=self.device)
            loaded.model.requires_grad_(True)
            self.cache["full"] = (loaded.model, loaded.tokenizer)
        return self.cache["full"]

    def clear_features(self) -> None:
        """Forget cached per-row features (signatures, gradients) but keep the loaded models, so
        that the next method pays for its own train-side work."""
        for key in [k for k in self.cache if isinstance(k, tuple)]:
            del self.cache[key]

    def resolved_layer(self, rows) -> int:
        if "layer" not in self.cache:
            if self.layer == "auto":
                from rept.layers import phase_transition_layer

                self.cache["layer"] = phase_transition_layer(self.merged(), rows[:64], max_length=self.max_length).layer
            else:
                from rept.models import resolve_layer

                self.cache["layer"] = resolve_layer(self.merged().model, int(self.layer))
        return self.cache["layer"]


class Method:
    """Base class: set `name`, implement `fit` and `score`."""

    name = "method"
    needs_lora = False

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.bytes_per_row = 0   # bytes of train-side state kept per training row

    def check(self, bundle: ModelBundle) -> None:
        if self.needs_lora and not bundle.adapter:
            raise MethodError(f"{self.name} needs LoRA gradients: give a LoRA adapter (the model "
                              f"{bundle.model} has none); fine-tune with `rept train --lora`")

    def fit(self, bundle: ModelBundle, train_rows) -> None:
        raise NotImplementedError

    def score(self, bundle: ModelBundle, queries) -> np.ndarray:
        raise NotImplementedError


def query_rows(queries):
    """Queries (rept.trace.Query or rows) as (prompt, response) pairs."""
    return [(q.prompt, q.response) for q in queries]


def examples_for(tokenizer, pairs, max_length: int, what: str):
    from rept.examples import tokenize_pair

    out = []
    for i, (prompt, response) in enumerate(pairs):
        ex = tokenize_pair(tokenizer, prompt, response, row=i, max_length=max_length)
        if ex is None:
            raise MethodError(f"{what} {i + 1}: no response token left within max_length {max_length}")
        out.append(ex)
    return out


def per_example_grads(model, tokenizer, pairs, max_length: int, what: str = "row", progress: bool = False):
    """Gradient of each example's mean response-token loss w.r.t. the trainable parameters:
    ({name: [n, *shape]} float32 on CPU, names in model order)."""
    from tqdm.auto import tqdm

    from rept.signatures import collate, response_losses

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    device = next(model.parameters()).device
    examples = examples_for(tokenizer, pairs, max_length, what)
    out = {n: torch.empty((len(examples), *p.shape), dtype=torch.float32) for n, p in named}
    params = [p for _, p in named]
    for i, ex in enumerate(tqdm(examples, desc=f"gradients ({what}s)", disable=not progress, dynamic_ncols=True)):
        batch = collate([ex], tokenizer.pad_token_id, "right", device)
        with torch.enable_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False).logits
            loss = response_losses(logits, batch)[0]
            grads = torch.autograd.grad(loss, params)
        for (n, _), gr in zip(named, grads):
            out[n][i] = gr.float().cpu()
    return out


def flatten(grads: dict) -> torch.Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], 1)
