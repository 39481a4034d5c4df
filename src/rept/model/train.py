"""Fine-tuning with the loss on response tokens only.

The from-scratch recipe (a locally trained tokenizer and a tiny Llama) is what the demo and
the tests use; the recipe is written beside the weights so the model can be retrained."""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rept.progress import progress_bar

from rept.errors import ReptError
from rept.data.examples import tokenize_rows
from rept.model.loading import LoadedModel, prepare_tokenizer, tiny_llama, train_tokenizer
from rept.store.safefile import UnsafeFileError, load_tensors, refuse_pickle, save_tensors
from rept.signatures.extract import collate

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


def train_step(model, tokenizer, examples, params, optimizer, schedule) -> float:
    """One optimizer step on a batch, loss on response tokens only; returns the loss."""
    batch = collate(examples, tokenizer.pad_token_id, "right", next(model.parameters()).device)
    labels = batch.input_ids.clone()
    for j, e in enumerate(batch.examples):
        labels[j, : batch.starts[j] + e.prompt_len] = -100
        labels[j, batch.starts[j] + len(e.input_ids):] = -100
    loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids, labels=labels, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    """Optimizer steps of one epoch: one per batch (the last one may be short)."""
    return -(-n_examples // batch_size)


def total_steps(cfg: TrainConfig, n_examples: int) -> int:
    """Optimizer steps of a whole training."""
    return cfg.epochs * steps_per_epoch(n_examples, cfg.batch_size)


def optimizer_and_schedule(params, cfg: TrainConfig, n_examples: int):
    """AdamW and the learning-rate schedule every rept training uses: linear warm-up over
    cfg.warmup_steps, then linear decay to 5% of the peak at the last step."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps = total_steps(cfg, n_examples)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * max(0.05, 1 - s / max(1, steps)))
    return optimizer, schedule


def run_epochs(model, tokenizer, examples, cfg: TrainConfig, params, optimizer, schedule, shuffle, bar,
               epochs: range, after_epoch=None) -> list[float]:
    """The training loop: for each epoch in `epochs`, the examples in the order `shuffle(epoch, order)`
    leaves them, one optimizer step per batch of cfg.batch_size; `after_epoch(epoch, losses)` runs after
    each (a checkpoint; returning True stops). Returns the mean loss of each epoch run."""
    losses = []
    for epoch in epochs:
        order = examples[:]
        shuffle(epoch, order)
        total, n = 0.0, 0
        for i in range(0, len(order), cfg.batch_size):
            loss = train_step(model, tokenizer, order[i:i + cfg.batch_size], params, optimizer, schedule)
            total, n = total + loss, n + 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")
        losses.append(total / max(1, n))
        if after_epoch is not None and after_epoch(epoch, losses):
            break
    return losses


def train_causal_lm(model, tokenizer, rows, cfg: TrainConfig, progress: bool = True, desc: str = "train") -> list[float]:
    """Train `model` in place on `rows` (no checkpoints: the from-scratch stage of `rept demo` and the
    tests' miniatures); returns the mean loss of each epoch. The epochs share one shuffling stream,
    seeded once, where train_model seeds each epoch on its own (so that it can resume)."""
    set_seed(cfg.seed)
    examples, _ = tokenize_rows(tokenizer, rows, max_length=cfg.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = optimizer_and_schedule(params, cfg, len(examples))
    rng = random.Random(cfg.seed)
    model.train()
    bar = progress_bar(total=total_steps(cfg, len(examples)), desc=desc, disable=not progress, dynamic_ncols=True)
    epoch_losses = run_epochs(model, tokenizer, examples, cfg, params, optimizer, schedule,
                              lambda epoch, order: rng.shuffle(order), bar, range(cfg.epochs))
    bar.close()
    model.eval()
    return epoch_losses


def train_from_scratch(rows, out: str | Path, cfg: TrainConfig, progress: bool = True,
                       data_source: str | None = None, extra: dict | None = None, desc: str = "train") -> LoadedModel:
    """Tokenizer + tiny Llama trained from nothing on `rows`, saved to `out`."""
    set_seed(cfg.seed)
    tokenizer = train_tokenizer([r.prompt + "\n" + r.response for r in rows], vocab_size=cfg.vocab_size)
    prepare_tokenizer(tokenizer)
    model = tiny_llama(tokenizer, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                       max_positions=max(512, cfg.max_length), seed=cfg.seed)
    losses = train_causal_lm(model, tokenizer, rows, cfg, progress=progress, desc=desc)
    save_trained(model, tokenizer, out, {"recipe": "from-scratch", "config": asdict(cfg), "data": data_source,
                                         "epoch_losses": losses, **(extra or {})})
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, str(out), weights_source=str(out))


def save_trained(model, tokenizer, out: str | Path, recipe: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")


def _weights_fingerprint(model_dir: str | Path) -> str | None:
    """Names, sizes and modification times of a local model folder's weight files: a base model
    retrained in place changes it, so what was fine-tuned from the old one is not reused."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return None
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def read_recipe(model_dir: str | Path) -> dict | None:
    path = Path(model_dir) / RECIPE_FILE
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------- recipes: from-scratch, LoRA, full
#
# `train_model` is the one entry point behind `rept train`. Every recipe trains with the loss on
# response tokens only, saves a checkpoint after each epoch (out/checkpoint/) and resumes from it,
# and writes beside the final weights: the recipe (RECIPE_FILE: data path and fingerprint,
# settings, seed) and the Adam state of every trainable parameter by name (OPTIMIZER_FILE), which
# LESS needs to precondition gradients as its authors do. Both state files are safetensors with a
# JSON part (rept.store.safefile): nothing here is a pickle, so reading a folder never runs code.

OPTIMIZER_FILE = "optimizer.safetensors"
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.safetensors"
LEGACY_PICKLES = ("optimizer.pt", "state.pt")  # what older versions wrote: never loaded
RECIPES = ("from-scratch", "lora", "full")


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    target_modules: str = "all-linear"   # comma-separated module names, or "all-linear"
    dropout: float = 0.0

    def targets(self):
        names = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        return "all-linear" if names == ["all-linear"] else names


class TrainError(ReptError):
    """A user-facing problem with a training run (one line)."""


def _trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def adam_state_by_name(model, optimizer) -> dict:
    """{"exp_avg": {name: tensor}, "exp_avg_sq": {...}, "step": int, "betas", "eps", "lr"} for every
    trainable parameter (the format LESS reads)."""
    group = optimizer.param_groups[0]
    out = {"exp_avg": {}, "exp_avg_sq": {}, "step": 0, "betas": tuple(group["betas"]), "eps": group["eps"],
           "lr": group["lr"], "weight_decay": group["weight_decay"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        st = optimizer.state.get(p, {})
        if "exp_avg" in st:
            out["exp_avg"][name] = st["exp_avg"].detach().cpu().clone()
            out["exp_avg_sq"][name] = st["exp_avg_sq"].detach().cpu().clone()
            out["step"] = int(st["step"])
    return out


def save_adam_state(adam: dict, path: Path) -> None:
    tensors = {f"{part}/{name}": t for part in ("exp_avg", "exp_avg_sq") for name, t in adam[part].items()}
    save_tensors(path, tensors, {k: adam[k] for k in ("step", "betas", "eps", "lr", "weight_decay")})


def load_adam_state(model_dir: str | Path) -> dict:
    path = Path(model_dir) / OPTIMIZER_FILE
    if not path.exists():
        refuse_pickle(Path(model_dir) / "optimizer.pt", "Train the model again with `rept train` to write "
                      f"{OPTIMIZER_FILE}.")
        raise TrainError(f"no Adam state in {model_dir} ({OPTIMIZER_FILE} missing; train it with `rept train`)")
    tensors, info = load_tensors(path)
    adam = {"exp_avg": {}, "exp_avg_sq": {}, **info}
    adam["betas"] = tuple(adam.get("betas", (0.9, 0.999)))
    for key, t in tensors.items():
        part, _, name = key.partition("/")
        if part not in ("exp_avg", "exp_avg_sq") or not name:
            raise UnsafeFileError(f"{path} holds an unexpected tensor {key!r}: write it again with `rept train`")
        adam[part][name] = t
    return adam


def _save_checkpoint(path: Path, settings: dict, epoch: int, losses: list, model, optimizer, schedule) -> None:
    """The state to resume from after `epoch`: trainable weights, the optimizer's per-parameter
    tensors and its settings, the schedule and the RNG, in one safetensors file."""
    opt = optimizer.state_dict()
    tensors = {f"param/{n}": t for n, t in _trainable_state(model).items()}
    for i, st in opt["state"].items():
        for key, value in st.items():
            tensors[f"opt/{i}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng"] = torch.get_rng_state()
    save_tensors(path, tensors, {"settings": settings, "epoch": epoch, "losses": losses,
                                 "param_groups": opt["param_groups"], "schedule": schedule.state_dict()})


def _load_checkpoint(path: Path) -> dict:
    tensors, info = load_tensors(path)
    params, opt_state = {}, {}
    for key, t in tensors.items():
        part, _, rest = key.partition("/")
        if part == "param":
            params[rest] = t
        elif part == "opt":
            i, _, name = rest.partition("/")
            opt_state.setdefault(int(i), {})[name] = t
    return {**info, "params": params, "rng": tensors["rng"],
            "optimizer": {"state": opt_state, "param_groups": info["param_groups"]}}


def _load_base(base: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rept.model.gguf import resolve_model_source
    from rept.model.loading import ModelError, check_model_source

    base = resolve_model_source(base)  # a GGUF file or a known name: its converted folder
    check_model_source(base, "base model")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if os.path.isdir(base) and not any(os.path.exists(os.path.join(base, f)) for f in tokenizer_files):
        raise ModelError(f"base model folder {base} has no tokenizer (tokenizer.json / tokenizer_config.json missing)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except Exception as exc:
        raise ModelError(f"cannot load a tokenizer from {base}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"cannot load a causal LM from {base}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    prepare_tokenizer(tokenizer)
    return model, tokenizer


def _build(recipe: str, rows, cfg: TrainConfig, base: str | None, lora: LoraSettings | None, ckpt: Path):
    """Model and tokenizer at their initial state (trainable parameters marked)."""
    set_seed(cfg.seed)
    if recipe == "from-scratch":
        if (ckpt / "tokenizer.json").exists():  # resume: the tokenizer the run started with
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(ckpt)
        else:
            tokenizer = train_tokenizer([r.prompt + "\n" + r.response for r in rows], vocab_size=cfg.vocab_size)
        prepare_tokenizer(tokenizer)
        model = tiny_llama(tokenizer, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                           max_positions=max(512, cfg.max_length), seed=cfg.seed)
        model.requires_grad_(True)
        return model, tokenizer
    if not base:
        raise TrainError(f"the {recipe} recipe needs --base MODEL_FOLDER")
    model, tokenizer = _load_base(base)
    if recipe == "full":
        model.requires_grad_(True)
        return model, tokenizer
    from peft import LoraConfig, get_peft_model

    lora = lora or LoraSettings()
    set_seed(cfg.seed)
    from rept.model.loading import quiet_peft

    try:
        with quiet_peft():
            model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=lora.targets(), task_type="CAUSAL_LM"))
    except ValueError as exc:
        raise TrainError(f"cannot put LoRA on {base}: {str(exc).splitlines()[0]}") from None
    return model, tokenizer


def train_model(recipe: str, rows, out: str | Path, cfg: TrainConfig, base: str | None = None,
                lora: LoraSettings | None = None, data_source: str | None = None,
                data_fingerprint: str | None = None, resume: bool = True, progress: bool = True,
                log=None, extra: dict | None = None, stop_after_epochs: int | None = None,
                device: str | None = None, desc: str | None = None) -> dict:
    """Train with `recipe` ("from-scratch", "lora" or "full") on `rows` and save to `out`.

    Returns the recipe written to out/RECIPE_FILE. With resume, a finished run with the same recipe
    is reused as is, and an interrupted one continues from its last per-epoch checkpoint.
    `stop_after_epochs` stops after that many epochs in total (checkpoint kept), as an interruption would.
    `device` (default: cuda when available, else cpu) is not part of the recipe: a run may resume elsewhere.
    """
    if recipe not in RECIPES:
        raise TrainError(f"unknown recipe '{recipe}' (choose from {', '.join(RECIPES)})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise TrainError(f"bad --device '{device}' (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {device}: no CUDA device on this machine")
    log = log or (lambda msg: None)
    out = Path(out)
    ckpt = out / CHECKPOINT_DIR
    # a local base is recorded by its absolute path, a Hub id as it is
    settings = {"recipe": recipe, "base": (str(Path(base).resolve()) if os.path.exists(base) else base) if base else None,
                "base_weights": _weights_fingerprint(base) if base else None,
                "lora": asdict(lora or LoraSettings()) if recipe == "lora" else None, "config": asdict(cfg),
                "data": data_source, "data_fingerprint": data_fingerprint, "seed": cfg.seed}
    done = read_recipe(out)
    if resume and done and done.get("settings") == settings and not ckpt.exists():
        log(f"model: {out} is already trained with this recipe; reusing it")
        return done
    model, tokenizer = _build(recipe, rows, cfg, base, lora, ckpt)
    model.to(device)
    examples, cut = tokenize_rows(tokenizer, rows, max_length=cfg.max_length)
    if not examples:
        raise TrainError("no training row keeps a response token within --max-length")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = optimizer_and_schedule(params, cfg, len(examples))
    per_epoch = steps_per_epoch(len(examples), cfg.batch_size)
    start_epoch, losses = 0, []
    state_file = ckpt / STATE_FILE
    if (ckpt / "state.pt").exists():  # an older rept's pickle: never loaded, so never a way to run code
        log(f"{ckpt / 'state.pt'} is a pickle from an older rept and is not read; starting over")
        (ckpt / "state.pt").unlink()
    if resume and state_file.exists():
        try:
            state = _load_checkpoint(state_file)
        except (UnsafeFileError, KeyError, ValueError):
            log(f"{state_file} is damaged; starting over")
            state = {"settings": None}
        if state["settings"] == settings:
            trainable = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in state["params"].items():
                    trainable[name].copy_(value)
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            torch.set_rng_state(state["rng"])
            start_epoch, losses = state["epoch"], state["losses"]
            log(f"resuming from {state_file} after epoch {start_epoch}")
        else:
            log(f"{state_file} is from other settings; starting over")
    elif not resume and ckpt.exists():
        import shutil

        shutil.rmtree(ckpt)
    model.train()
    bar = progress_bar(total=cfg.epochs * per_epoch, initial=start_epoch * per_epoch, desc=desc or f"train ({recipe})",
                       disable=not progress, dynamic_ncols=True)

    def checkpoint(epoch: int, new_losses: list) -> bool:
        """After each epoch: save the state to resume from; True stops early (stop_after_epochs)."""
        ckpt.mkdir(parents=True, exist_ok=True)
        if recipe == "from-scratch" and not (ckpt / "tokenizer.json").exists():
            tokenizer.save_pretrained(ckpt)
        _save_checkpoint(state_file, settings, epoch + 1, losses + new_losses, model, optimizer, schedule)
        return stop_after_epochs is not None and epoch + 1 >= stop_after_epochs and epoch + 1 < cfg.epochs

    # each epoch's order stands alone (seeded by the epoch), so a resumed run shuffles as an unbroken one
    losses = losses + run_epochs(model, tokenizer, examples, cfg, params, optimizer, schedule,
                                 lambda epoch, order: random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order),
                                 bar, range(start_epoch, cfg.epochs), after_epoch=checkpoint)
    if len(losses) < cfg.epochs:
        bar.close()
        log(f"stopped after epoch {len(losses)}; rerun to resume")
        return {"settings": settings, "epoch_losses": losses, "stopped_after_epoch": len(losses)}
    bar.close()
    model.eval()
    from rept import __version__

    record = {"recipe": recipe, "config": asdict(cfg), "data": data_source, "data_fingerprint": data_fingerprint,
              "base": settings["base"], "lora": settings["lora"], "seed": cfg.seed, "epoch_losses": losses,
              "rows": len(examples), "rows_cut_off": len(cut), "rept_version": __version__, "settings": settings,
              **(extra or {})}
    save_trained(model, tokenizer, out, record)
    save_adam_state(adam_state_by_name(model, optimizer), out / OPTIMIZER_FILE)
    for name in LEGACY_PICKLES:  # an older run's pickle beside the new state would only mislead
        if (out / name).exists():
            (out / name).unlink()
    import shutil

    shutil.rmtree(ckpt, ignore_errors=True)
    return record


def train_from_recipe(recipe: dict, rows, out: str | Path, progress: bool = True, desc: str | None = None) -> LoadedModel:
    """Train again, on `rows`, with a recipe read from a model folder (RECIPE_FILE): the same
    recipe, base, LoRA settings, configuration and seed. Returns the trained model ready to
    generate (a LoRA adapter is loaded on its base and merged)."""
    from rept.model.loading import load_model

    kind = recipe.get("recipe")
    if kind not in RECIPES:
        raise TrainError(f"cannot retrain: unknown recipe '{kind}' in the model's {RECIPE_FILE}")
    cfg = TrainConfig(**recipe["config"])
    if kind == "from-scratch" and "settings" not in recipe:  # written by train_from_scratch (the demo)
        return train_from_scratch(rows, out, cfg, progress=progress, desc=desc or "train")
    base = recipe.get("base")
    from rept.model.loading import model_source_exists

    if kind != "from-scratch" and not (base and model_source_exists(base)):
        raise TrainError(f"cannot retrain: the recipe's base model {base} is not there any more")
    lora = LoraSettings(**recipe["lora"]) if recipe.get("lora") else None
    train_model(kind, rows, out, cfg, base=base, lora=lora, data_source=recipe.get("data"), resume=False,
                progress=progress, desc=desc)
    if kind == "lora":
        return load_model(base, adapter=str(out))
    return load_model(str(out))
