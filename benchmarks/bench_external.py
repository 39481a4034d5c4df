"""External attribution libraries on a `rept bench` working folder: same model, rows and queries.

Runs an outside library through its own API on what `rept bench --out DIR` left in DIR (base/ the
tiny Llama and tokenizer, adapter/ the PEFT LoRA adapter, train_rows.jsonl, queries.jsonl and
results.json) and scores it exactly like `rept bench`: `rept.evaluate.metrics.evaluate` on the flagged
queries with relevant row = (label == the behaviour's label), control_P@10 on the unflagged ones,
rows with no response token within max_length ranked last. Prints one Markdown row in the columns
of `rept.evaluate.bench.QUALITY` plus build_s (factors) and query_s (scores), and writes a JSON.

    PYTHONPATH=/tmp/kdeps python benchmarks/bench_external.py --work runs/backdoor-full \\
        --method kronfluence --json kronfluence.json [--rows N]

Methods
  kronfluence    Kronfluence (EK-FAC influence functions; Grosse et al. 2023): Analyzer.fit_all_factors
                 with strategy "ekfac" on every (kept) training row, then compute_pairwise_scores for
                 every query, tracking only the LoRA lora_A / lora_B Linear modules (the weights that
                 were fine-tuned). Train loss: summed response-token cross-entropy (labels sampled from
                 the model for the true Fisher, as Kronfluence expects); measurement: the query's
                 summed response-token loss (`--reduction mean`: rept's per-row mean loss instead).
  bergson-ekfac  Bergson's own EK-FAC pipeline (`python -m bergson ekfac`, KFAC + eigenvalue
                 correction, one score column per query) on the adapter folder, fed rept's tokens.
  bergson        Bergson's gradient collector (InMemoryCollector) on the LoRA modules; score =
                 cosine of train and query gradients (Bergson's "gradient cosine similarity").

Installing them without breaking the environment
  `pip install kronfluence` pulls in torchvision (besides the harmless einconv and opt_einsum);
  `pip install bergson` pulls in torchvision, torchaudio and bitsandbytes. The only torchvision wheel
  available here is built for a different torch than the pinned 2.13.0 CPU build, and once it is in
  the venv `import transformers` fails. Neither library imports torchvision, torchaudio or
  bitsandbytes on these paths, so install them beside the venv, not into it, without dependencies:

      pip install --no-deps --target /tmp/kdeps kronfluence einconv opt_einsum einops
      pip install --no-deps --target /tmp/bdeps bergson torchopt simple-parsing docstring-parser natsort petname \
          jaxtyping wadler-lindig ml_dtypes optree graphviz   # torchopt (and its graphviz): Bergson's CLI imports it
      PYTHONPATH=/tmp/kdeps python benchmarks/bench_external.py ... --method kronfluence
      PYTHONPATH=/tmp/bdeps python benchmarks/bench_external.py ... --method bergson-ekfac

  The second half of each line is the pure-Python packages they import that rept's install does not
  bring; the rest (torch, transformers, peft, accelerate, datasets, safetensors) is the venv's.

`--rows N` (for a quick run) scores a seeded sample of N of the folder's training rows that keeps
the poisoned share (`rept.evaluate.bench.sample_rows`, seed 0, folder order kept); the model is unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

QUALITY = ("P@10", "auPRC@10", "P@50", "auPRC@50", "P@100", "auPRC@100", "recall@100", "AP", "control_P@10")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_work(work: Path, rows_limit: int | None, seed: int = 0):
    from rept.evaluate.bench import sample_rows
    from rept.data.datasets import Row
    from rept.query.trace import Query

    report = json.loads((work / "results.json").read_text())
    rows = read_jsonl(work / "train_rows.jsonl")
    if rows_limit and rows_limit < len(rows):
        # rept bench's own seeded sample keeping the poisoned share (folder order kept)
        keyed = [Row(i, r["prompt"], r["response"], r["label"]) for i, r in enumerate(rows)]
        rows = [rows[r.index] for r in sample_rows(keyed, rows_limit, report["behaviour"]["label"], seed)]
    queries = [Query(q["prompt"], q["response"], q.get("label"), q.get("flagged")) for q in read_jsonl(work / "queries.jsonl")]
    return report, rows, queries


# ----------------------------------------------------------------------------- Kronfluence


def _collate_fn(pad_id):
    """Examples -> dict batch: input_ids, attention_mask, position_ids, labels (-100 off the response)."""
    from rept.signatures.extract import collate

    def fn(examples):
        b = collate(examples, pad_id, "right", None)
        labels = torch.full_like(b.input_ids, -100)
        for i, e in enumerate(examples):
            lo, hi = e.loss_span or (e.prompt_len, len(e.input_ids))
            labels[i, lo:hi] = b.input_ids[i, lo:hi]
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask,
                "position_ids": b.position_ids, "labels": labels}

    return fn


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def make_task(tracked: list[str], reduction: str):
    from kronfluence.task import Task

    def token_losses(batch, model, sample=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits.float()
        logits = logits[:, :-1]
        labels = batch["labels"][:, 1:]
        if sample:  # labels drawn from the model's own distribution: the true Fisher
            with torch.no_grad():
                probs = torch.softmax(logits.detach(), -1)
                drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(labels.shape)
                labels = torch.where(labels == -100, labels, drawn)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                               reduction="none").reshape(labels.shape)
        return loss, (labels != -100)

    def reduce(loss, mask):
        per_row = loss.sum(1)
        if reduction == "mean":
            per_row = per_row / mask.sum(1).clamp(min=1)
        return per_row.sum()

    class LoraLMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return reduce(*token_losses(batch, model, sample))

        def compute_measurement(self, batch, model):
            return reduce(*token_losses(batch, model))

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LoraLMTask()


def run_kronfluence(bundle, train_examples, query_examples, args, log):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    model, tokenizer = bundle.trainable()
    model = model.float().eval()
    tracked = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and (".lora_A." in n or ".lora_B." in n)]
    if not tracked:
        raise SystemExit("no LoRA lora_A / lora_B Linear modules found in the adapter")
    log(f"kronfluence: tracking {len(tracked)} LoRA Linear modules, e.g. {tracked[0]}")
    task = make_task(tracked, args.reduction)
    model = prepare_model(model, task)
    out_dir = args.output_dir or tempfile.mkdtemp(prefix="kronfluence-")
    analyzer = Analyzer(analysis_name="rept_bench", model=model, task=task, cpu=True, output_dir=out_dir,
                        disable_tqdm=not args.progress)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0, collate_fn=_collate_fn(tokenizer.pad_token_id)))
    train_ds, query_ds = _ListDataset(train_examples), _ListDataset(query_examples)
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=args.empirical_fisher)
    t0 = time.perf_counter()
    analyzer.fit_all_factors(factors_name="ekfac", dataset=train_ds, per_device_batch_size=args.batch_size,
                             factor_args=factor_args, overwrite_output_dir=True)
    t1 = time.perf_counter()
    score_args = ScoreArguments(damping_factor=args.damping)
    analyzer.compute_pairwise_scores(scores_name="pairwise", factors_name="ekfac", query_dataset=query_ds,
                                     train_dataset=train_ds, per_device_query_batch_size=args.query_batch_size,
                                     per_device_train_batch_size=args.batch_size, score_args=score_args,
                                     overwrite_output_dir=True)
    scores = analyzer.load_pairwise_scores("pairwise")["all_modules"].float().numpy()
    t2 = time.perf_counter()
    # Kronfluence's score approximates the change in the measurement (the query's loss) when the
    # training row is up-weighted... its sign convention: positive = helpful (lowers the loss), the
    # same orientation rept uses ("higher = more responsible"), as in Kronfluence's own examples.
    return scores, t1 - t0, t2 - t1, out_dir


# ----------------------------------------------------------------------------- Bergson


def run_bergson(bundle, train_examples, query_examples, args, log):
    """Bergson's own gradient collector (InMemoryCollector + CollectorComputer, no projection unless
    --projection-dim) on the LoRA lora_A / lora_B Linear modules, for the training rows and for the
    queries; score = cosine similarity of the two (Bergson's "gradient cosine similarity", what
    `bergson query --unit_norm` ranks by), or the plain dot product with --bergson-score dot."""
    from datasets import Dataset
    from bergson import CollectorComputer, GradientProcessor, IndexConfig, InMemoryCollector

    model, _ = bundle.trainable()
    model = model.float().eval()
    inner = model.base_model  # Bergson hooks the PEFT model's inner model, as its collect_gradients does
    tracked = {n for n, m in inner.named_modules()
               if isinstance(m, torch.nn.Linear) and (".lora_A." in n or ".lora_B." in n)}
    if not tracked:
        raise SystemExit("no LoRA lora_A / lora_B Linear modules found in the adapter")
    log(f"bergson: tracking {len(tracked)} LoRA Linear modules")
    out_dir = args.output_dir or tempfile.mkdtemp(prefix="bergson-")

    def collect(examples, name):
        ds = Dataset.from_dict({"input_ids": [e.input_ids for e in examples],
                                "labels": [[-100] * e.prompt_len + e.input_ids[e.prompt_len:] for e in examples]})
        cfg = IndexConfig(run_path=os.path.join(out_dir, name), loss_reduction=args.reduction)
        os.makedirs(cfg.partial_run_path, exist_ok=True)
        processor = GradientProcessor(projection_dim=args.projection_dim or None, projection_seed=0)
        collector = InMemoryCollector(model=inner, cfg=cfg, processor=processor, target_modules=tracked, data=ds)
        bs = args.batch_size
        batches = [list(range(i, min(i + bs, len(ds)))) for i in range(0, len(ds), bs)]
        CollectorComputer(model=model, data=ds, collector=collector, batches=batches,
                          cfg=cfg).run_with_collector_hooks(desc=f"{name} gradients")
        # by module, not concatenated: on a real model every row's LoRA gradient is 18.6 MiB, and a
        # concatenated copy of 400 rows' would double the 7.3 GiB the collector already holds
        return {k: collector.gradients[k].float().reshape(len(ds), -1) for k in sorted(collector.gradients)}

    def dot(a: dict, b: dict) -> torch.Tensor:
        return sum(a[k] @ b[k].T for k in a)

    def norms(g: dict) -> torch.Tensor:
        return torch.sqrt(sum((v * v).sum(1) for v in g.values())).clamp_min(1e-12)

    import contextlib
    import logging

    # Bergson's loggers write to stdout; send them to stderr so stdout holds only the table
    for lg in [logging.getLogger()] + [v for v in logging.root.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stdout:
                h.setStream(sys.stderr)

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Bergson logs to stdout; keep stdout for the table
        train = collect(train_examples, "train")
    train_norm = norms(train)
    t1 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        query = collect(query_examples, "query")
    scores = dot(query, train)
    if args.bergson_score == "cos":
        scores = scores / norms(query)[:, None] / train_norm[None, :]
    scores = scores.numpy()
    t2 = time.perf_counter()
    return scores, t1 - t0, t2 - t1, out_dir


def run_bergson_ekfac(bundle, train_examples, query_examples, args, log):
    """Bergson's own EK-FAC pipeline (`python -m bergson ekfac RUN --method kfac
    --hessian_cfg.ev_correction true --query.aggregation none`: KFAC factors on the training rows,
    eigenvalue-corrected, inverse applied to each query gradient, every training row scored
    against each) on the adapter folder (Bergson loads base + LoRA itself and tracks the LoRA
    Linear modules). The rows and queries are handed over pre-tokenized by rept (input_ids,
    labels = -100 off the response), so the tokens and the response-only loss are rept's; Bergson
    skips its own tokenization when a dataset has input_ids. Needs torchopt (its CLI imports it)."""
    import subprocess

    out_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="bergson-ekfac-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    def dump(examples, name):
        path = out_dir / f"{name}.jsonl"
        with open(path, "w") as f:
            for e in examples:
                f.write(json.dumps({"input_ids": e.input_ids,
                                    "labels": [-100] * e.prompt_len + e.input_ids[e.prompt_len:]}) + "\n")
        return str(path)

    train_path, query_path = dump(train_examples, "train"), dump(query_examples, "query")
    run = out_dir / "run"
    cmd = [sys.executable, "-m", "bergson", "ekfac", str(run), "--overwrite", "true",
           "--model", str(bundle.adapter), "--method", "kfac", "--hessian_cfg.ev_correction", "true",
           "--data.dataset", train_path, "--query.dataset", query_path, "--query.aggregation", "none",
           "--token_batch_size", str(args.token_batch_size), "--loss_reduction", args.reduction]
    log("bergson-ekfac: " + " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    total = time.perf_counter() - t0
    (out_dir / "bergson.log").write_text(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"bergson ekfac failed (exit {proc.returncode}); last lines:\n" + proc.stdout[-2000:])
    import re

    fit = re.search(r"'step2_fit_hessian': ([0-9.]+)", proc.stdout)
    build_s = float(fit.group(1)) if fit else float("nan")
    info = json.loads((run / "scores" / "info.json").read_text())
    dtype = np.dtype({k: info["dtype"][k] for k in ("names", "formats", "offsets", "itemsize")})
    table = np.memmap(run / "scores" / "scores.bin", dtype=dtype, mode="r", shape=(info["num_items"],))
    assert info["num_items"] == len(train_examples) and info["num_scores"] == len(query_examples), info
    scores = np.stack([np.asarray(table[f"score_{j}"], dtype=np.float64) for j in range(info["num_scores"])])
    if not all(bool(np.all(table[f"written_{j}"])) for j in range(info["num_scores"])):
        raise SystemExit("bergson left some scores unwritten")
    # build_s: fitting the factors (Bergson's step 2); query_s: the rest of the pipeline (query
    # gradients, applying the inverse, scoring every row against every query)
    return scores, build_s, total - build_s, str(out_dir)


# ----------------------------------------------------------------------------- common


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="a `rept bench --out` folder")
    p.add_argument("--method", default="kronfluence", choices=["kronfluence", "bergson", "bergson-ekfac"])
    p.add_argument("--json", help="write the result here")
    p.add_argument("--rows", type=int, help="a seeded sample of N training rows keeping the poisoned share")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--query-batch-size", type=int, default=50)
    p.add_argument("--damping", type=float, default=None,
                   help="EK-FAC damping (default: Kronfluence's heuristic, 0.1 x mean eigenvalue)")
    p.add_argument("--reduction", choices=["sum", "mean"], default="sum",
                   help="per-row loss: summed over response tokens (Kronfluence's convention) or their mean (rept's)")
    p.add_argument("--empirical-fisher", action="store_true", help="fit the factors on the true labels")
    p.add_argument("--output-dir", help="where Kronfluence keeps factors and scores (default: a temp folder)")
    p.add_argument("--bergson-score", choices=["cos", "dot"], default="cos",
                   help="bergson: cosine (gradient cosine similarity, default) or dot product of the gradients")
    p.add_argument("--projection-dim", type=int, default=0, help="bergson: random projection per module (0: none)")
    p.add_argument("--token-batch-size", type=int, default=512, help="bergson-ekfac: tokens per batch")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    from rept.data.examples import tokenize_pair
    from rept.methods import ModelBundle
    from rept.evaluate.metrics import evaluate, precision_at_k

    work = Path(args.work)
    report, rows, queries = load_work(work, args.rows)
    label = report["behaviour"]["label"]
    max_length = int(report["config"]["max_length"])
    from bench_folder import base_model

    bundle = ModelBundle(base_model(work, report), str(work / "adapter"), layer=report["model"]["layer"],
                         max_length=max_length, seed=int(report["config"].get("seed", 0)), device="cpu")
    _, tokenizer = bundle.trainable()

    train_examples, trained_pos = [], []
    for i, r in enumerate(rows):
        ex = tokenize_pair(tokenizer, r["prompt"], r["response"], row=i, max_length=max_length)
        if ex is not None:
            train_examples.append(ex)
            trained_pos.append(i)
    trained_pos = np.array(trained_pos)
    q_examples, flagged, unflagged = [], [], []
    for q in queries:
        ex = tokenize_pair(tokenizer, q.prompt, q.response, max_length=max_length)
        if ex is None:
            continue  # rept bench leaves such answers out of the queries too
        (flagged if q.flagged else unflagged).append(ex)
    q_examples = flagged + unflagged
    relevant_row = np.array([r["label"] == label for r in rows])
    log(f"{len(rows)} rows ({int(relevant_row.sum())} labelled '{label}', {len(rows) - len(trained_pos)} with no "
        f"response token within {max_length}: ranked last); {len(flagged)} flagged + {len(unflagged)} control queries")

    t_start = time.perf_counter()
    run = {"kronfluence": run_kronfluence, "bergson": run_bergson, "bergson-ekfac": run_bergson_ekfac}[args.method]
    scores_trained, build_s, query_s, where = run(bundle, train_examples, q_examples, args, log)
    scores_trained = np.asarray(scores_trained, dtype=np.float64)
    assert scores_trained.shape == (len(q_examples), len(train_examples)), scores_trained.shape
    lowest = scores_trained.min(axis=1, keepdims=True) - 1.0
    scores = np.broadcast_to(lowest, (len(q_examples), len(rows))).copy()
    scores[:, trained_pos] = scores_trained
    metrics = evaluate(scores[: len(flagged)], relevant_row, ks=(10, 50, 100))
    metrics["control_P@10"] = precision_at_k(scores[len(flagged):], relevant_row, 10) if unflagged else None
    metrics.update(build_s=round(build_s, 3), query_s=round(query_s, 3), n_control_queries=len(unflagged))
    name = {"kronfluence": "kronfluence-ekfac", "bergson-ekfac": "bergson-ekfac"}.get(
        args.method, f"bergson-grad{args.bergson_score}")
    result = {"method": name, "metrics": metrics, "work": str(work), "rows": len(rows),
              "poisoned": int(relevant_row.sum()), "reduction": args.reduction, "damping": args.damping,
              "empirical_fisher": args.empirical_fisher,
              "bergson_score": args.bergson_score, "projection_dim": args.projection_dim, "threads": torch.get_num_threads(),
              "total_s": round(time.perf_counter() - t_start, 1), "output_dir": where}
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    print("| method | " + " | ".join(QUALITY) + " | build_s | query_s |")
    print("|---|" + "---:|" * (len(QUALITY) + 2))
    print(f"| {name} | " + " | ".join(fmt(metrics.get(k)) for k in QUALITY)
          + f" | {build_s:.1f} | {query_s:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
