"""`rept train`: fine-tune with the loss on response tokens only (from scratch, LoRA or full)."""

from __future__ import annotations

import sys

HELP = "train a model on a dataset: --from-scratch (tiny Llama), --lora --base B, or --full --base B (resumable)"

DEFAULT_LR = {"from-scratch": 3e-3, "lora": 1e-3, "full": 1e-4}


def add_arguments(p) -> None:
    p.add_argument("--data", required=True, help="training set: HF save_to_disk folder, .jsonl, .json, .csv or .parquet")
    p.add_argument("--prompt-column", help="column holding the prompt (default: prompts/prompt/instruction)")
    p.add_argument("--response-column", help="column holding the response (default: response/output/completion)")
    p.add_argument("--out", required=True, help="folder for the weights (or adapter), recipe and Adam state")
    recipe = p.add_mutually_exclusive_group(required=True)
    recipe.add_argument("--from-scratch", dest="recipe", action="store_const", const="from-scratch",
                        help="train a BPE tokenizer and a tiny Llama from nothing")
    recipe.add_argument("--lora", dest="recipe", action="store_const", const="lora",
                        help="LoRA fine-tune of --base (saves the adapter)")
    recipe.add_argument("--full", dest="recipe", action="store_const", const="full",
                        help="fine-tune every weight of --base")
    p.add_argument("--base", help="base model for --lora / --full: a folder (HF causal LM with its tokenizer) or a Hub id")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 3e-3 from scratch, "
                   "1e-3 LoRA, 1e-4 full)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128, help="tokens per row (longer rows are cut)")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("from-scratch sizes")
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--vocab-size", type=int, default=2000)
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--alpha", type=float, default=16.0)
    g.add_argument("--target-modules", default="all-linear",
                   help="comma-separated module names (e.g. q_proj,v_proj) or all-linear")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")


def run(args) -> int:
    from rept.data.datasets import load_dataset
    from rept.model.train import LoraSettings, TrainConfig, TrainError, train_model

    if args.recipe != "from-scratch" and not args.base:
        raise TrainError(f"--{args.recipe} needs --base MODEL_FOLDER")
    if args.recipe == "from-scratch" and args.base:
        raise TrainError("--from-scratch takes no --base")
    for name in ("epochs", "batch_size", "max_length", "hidden", "layers", "heads", "vocab_size", "rank"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1")
    data = load_dataset(args.data, args.prompt_column, args.response_column)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr or DEFAULT_LR[args.recipe], batch_size=args.batch_size,
                      max_length=args.max_length, seed=args.seed, warmup_steps=args.warmup_steps,
                      hidden=args.hidden, layers=args.layers, heads=args.heads, vocab_size=args.vocab_size)
    lora = LoraSettings(args.rank, args.alpha, args.target_modules, args.lora_dropout)
    from rept.cli.options import record_settings

    record_settings(args, train=cfg, **({"lora": lora} if args.recipe == "lora" else {}))
    record = train_model(args.recipe, data.rows, args.out, cfg, base=args.base, lora=lora, data_source=data.source,
                         data_fingerprint=data.fingerprint, resume=not args.no_resume, progress=not args.quiet,
                         log=lambda m: print(m, file=sys.stderr), device=args.device,
                         extra={"command": "rept " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("rept") else None})
    losses = ", ".join(f"{x:.3f}" for x in record.get("epoch_losses", []))
    print(f"trained ({args.recipe}) on {record.get('rows', len(data.rows))} rows -> {args.out}; epoch losses: {losses}")
    return 0
