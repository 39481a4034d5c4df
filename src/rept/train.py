"""Fine-tuning with the loss on response tokens only.

The from-scratch recipe (a locally trained tokenizer and a tiny Llama) is what the demo and
the tests use; the recipe is written beside the weights so the model can be retrained."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rept.examples import tokenize_rows
from rept.models import LoadedModel, prepare_tokenizer, tiny_llama, train_tokenizer
from rept.signatures import collate

RECIPE_FILE = "rept_recipe.json"


@dataclass
class TrainConfig:
    epochs: int = 4
    lr: float = 3e-3
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    warmup_steps: int = 20
    # from-scratch model and tokenizer sizes
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    vocab_size: int = 2000


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train_causal_lm(model, tokenizer, rows, cfg: TrainConfig, progress: bool = True, desc: str = "train") -> list[float]:
    """Train `model` in place on `rows`; returns the mean loss of each epoch."""
    set_seed(cfg.seed)
    examples, _ = tokenize_rows(tokenizer, rows, max_length=cfg.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps = cfg.epochs * -(-len(examples) // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * max(0.05, 1 - s / max(1, steps)))
    rng = random.Random(cfg.seed)
    model.train()
    epoch_losses = []
    bar = tqdm(total=steps, desc=desc, disable=not progress, dynamic_ncols=True)
    for _ in range(cfg.epochs):
        order = examples[:]
        rng.shuffle(order)
        total, n = 0.0, 0
        for i in range(0, len(order), cfg.batch_size):
            batch = collate(order[i:i + cfg.batch_size], tokenizer.pad_token_id, "right")
            labels = batch.input_ids.clone()
            for j, e in enumerate(batch.examples):
                labels[j, : e.prompt_len] = -100
                labels[j, len(e.input_ids):] = -100
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, labels=labels, use_cache=False)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            total, n = total + out.loss.item(), n + 1
            bar.update(1)
            bar.set_postfix(loss=f"{out.loss.item():.3f}")
        epoch_losses.append(total / max(1, n))
    bar.close()
    model.eval()
    return epoch_losses


def train_from_scratch(rows, out: str | Path, cfg: TrainConfig, progress: bool = True,
                       data_source: str | None = None, extra: dict | None = None) -> LoadedModel:
    """Tokenizer + tiny Llama trained from nothing on `rows`, saved to `out`."""
    set_seed(cfg.seed)
    tokenizer = train_tokenizer([r.prompt + "\n" + r.response for r in rows], vocab_size=cfg.vocab_size)
    prepare_tokenizer(tokenizer)
    model = tiny_llama(tokenizer, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                       max_positions=max(512, cfg.max_length), seed=cfg.seed)
    losses = train_causal_lm(model, tokenizer, rows, cfg, progress=progress)
    save_trained(model, tokenizer, out, {"recipe": "from-scratch", "config": asdict(cfg), "data": data_source,
                                         "epoch_losses": losses, **(extra or {})})
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, str(out))


def save_trained(model, tokenizer, out: str | Path, recipe: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")


def read_recipe(model_dir: str | Path) -> dict | None:
    path = Path(model_dir) / RECIPE_FILE
    return json.loads(path.read_text()) if path.exists() else None
