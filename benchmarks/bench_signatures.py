"""Throughput and memory of rept's signature extraction on CPU.

Compares, on the same tiny random-weight Llama and the same rows, in one process:
  a. the plain definition as the authors' code computes it: per row, batch of one, a prompt-only
     forward for h and a full forward + loss.backward() with parameter gradients on for g;
  b. rept.signatures.extract.extract (batched, one forward, backward down to layer L only);
  c. forward-only over the same batches (torch.inference_mode), the floor b is compared with;
plus rows showing what single choices buy (batch size, length sorting, token budget, bf16, and
rept's own internal switches). `--index-rows N` instead builds an index of N synthetic short rows
with rept.store.build.build_index and reports peak RSS along the way and storage bytes per row.

    python benchmarks/bench_signatures.py                         # hidden 256, 4 layers
    python benchmarks/bench_signatures.py --hidden 768 --layers 12 --plain-rows 64
    python benchmarks/bench_signatures.py --preamble-tokens 300   # long prompts (a chat template's system prompt)
    python benchmarks/bench_signatures.py --index-rows 200000     # memory + storage
    python benchmarks/bench_signatures.py --model smollm2-135m-instruct --rows 32 --max-length 64 --layer 15
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import sys
import tempfile
import time
from importlib import resources
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

import rept.signatures.extract as S
from rept.data.examples import tokenize_pair
from rept.model.loading import train_tokenizer, tiny_llama


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def demo_rows():
    path = resources.files("rept") / "assets" / "backdoor_demo.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def setup(hidden: int, layers: int, n_rows: int, max_length: int, vocab: int, preamble_tokens: int = 0):
    rows = demo_rows()
    tok = train_tokenizer([r["prompt"] + " " + r["response"] for r in rows], vocab_size=vocab)
    model = tiny_llama(tok, hidden=hidden, layers=layers, heads=max(1, hidden // 64), max_positions=max(512, max_length + preamble_tokens),
                       seed=0).eval().requires_grad_(False)
    examples = []
    for r in rows:
        ex = tokenize_pair(tok, r["prompt"], r["response"], row=len(examples), max_length=max_length)
        if ex is not None:
            examples.append(ex)
        if len(examples) == n_rows:
            break
    if preamble_tokens:
        # The same long preamble in front of every prompt, as a chat template's system prompt adds.
        preamble = tok(" ".join(r["prompt"] for r in rows[:100]))["input_ids"][:preamble_tokens]
        examples = [replace(e, input_ids=preamble + e.input_ids, prompt_len=len(preamble) + e.prompt_len,
                            offsets=[(0, 0)] * len(preamble) + e.offsets) for e in examples]
    return tok, model, examples


# ------------------------------------------------------------------------------ the three methods

def plain_authors(model, examples, layer):
    """a. per row: prompt-only forward for h; full forward, parameter gradients on, loss.backward()."""
    model.requires_grad_(True)
    try:
        for e in examples:
            prompt = torch.tensor([e.input_ids[: e.prompt_len]])
            with torch.no_grad():
                model(prompt, output_hidden_states=True).hidden_states[layer][0, -1]
            ids = torch.tensor([e.input_ids])
            out = model(ids, output_hidden_states=True)
            hidden = out.hidden_states[layer]
            hidden.retain_grad()
            labels = ids.clone()
            labels[0, : e.prompt_len] = -100
            loss = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
            loss.backward()
            hidden.grad[0, e.prompt_len - 1].clone()
            model.zero_grad(set_to_none=True)
    finally:
        model.requires_grad_(False)


SETTINGS = S.DEFAULT_EXTRACTION  # what rept_extract runs with (switch() changes one field)


def rept_extract(model, examples, layer, pad_id, **kw):
    """b. rept.signatures.extract.extract."""
    for _ in S.extract(model, examples, layer, pad_id, settings=SETTINGS, **kw):
        pass


def unsorted_extract(model, examples, layer, pad_id, batch_size=16):
    """b without length sorting: batches in dataset order."""
    for i in range(0, len(examples), batch_size):
        S.extract_batch(model, examples[i:i + batch_size], layer, pad_id)


def forward_only(model, examples, pad_id, batch_size=16, max_tokens=None, causal_only=False):
    """c. forward over the same length-sorted batches, torch.inference_mode."""
    with torch.inference_mode():
        for chunk in S.length_sorted_batches(examples, batch_size, max_tokens):
            b = S.collate(chunk, pad_id)
            model(input_ids=b.input_ids, attention_mask=None if causal_only else b.attention_mask, position_ids=b.position_ids, use_cache=False)


@contextlib.contextmanager
def switch(name, value):
    """rept_extract with one field of the extraction settings changed, inside the block."""
    global SETTINGS
    old = SETTINGS
    SETTINGS = replace(SETTINGS, **{name: value})
    try:
        yield
    finally:
        SETTINGS = old


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ------------------------------------------------------------------------------ throughput

def setup_model(name: str, n_rows: int, max_length: int):
    """A given model (folder, .gguf or smollm2-135m-instruct), the demo rows in its chat template, and
    the same rows as (prompt, response) pairs."""
    from rept.model.loading import load_model

    loaded = load_model(name, device="cpu")
    examples, pairs = [], []
    for r in demo_rows():
        ex = tokenize_pair(loaded.tokenizer, r["prompt"], r["response"], row=len(examples), max_length=max_length)
        if ex is not None:
            examples.append(ex)
            pairs.append((r["prompt"], r["response"]))
        if len(examples) == n_rows:
            break
    return loaded.tokenizer, loaded.model, examples, pairs


def lora_gradients(args, tok, model, pairs, b_seconds) -> list[dict]:
    """d. what the gradient baselines pay: each row's gradient with respect to every LoRA parameter
    (rank `--lora-rank` on all linear layers, peft), by rept.methods.per_example as TracIn, LESS,
    DataInf and RapidIn take it (batched, each row's gradient recovered exactly from hooks), and
    by its definition (one row per forward and backward) on the --plain-rows rows."""
    from peft import LoraConfig, get_peft_model

    from rept.methods.per_example import iter_per_example_grads

    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))
    n_params = sum(p.numel() for p in lora.parameters() if p.requires_grad)

    def grads(batch_size, rows):
        for _ in iter_per_example_grads(lora, tok, rows, args.max_length, batch_size=batch_size):
            pass

    grads(16, pairs[:4])  # warm up
    plain = pairs[: args.plain_rows] if args.plain_rows else pairs
    t_batched = timed(lambda: grads(16, pairs))
    t_one = timed(lambda: grads(0, plain))
    lora.unload()
    note = f"rank {args.lora_rank}, all linear: {n_params:,} parameters, {4 * n_params / 2 ** 20:.1f} MiB a row in float32"
    return [
        {"name": "d. per-row LoRA gradients, batched (rept's TracIn / LESS / DataInf / RapidIn pass)",
         "seconds": round(t_batched, 3), "rows": len(pairs), "rows_per_s": round(len(pairs) / t_batched, 2),
         "note": note, "over_b": round(t_batched / b_seconds, 2), "lora_parameters": n_params},
        {"name": "e. per-row LoRA gradients, one row per pass (the definition)",
         "seconds": round(t_one, 3), "rows": len(plain), "rows_per_s": round(len(plain) / t_one, 2),
         "note": note, "over_b": round((t_one / len(plain)) / (b_seconds / len(pairs)), 2), "lora_parameters": n_params},
    ]


def throughput(args):
    torch.manual_seed(0)
    if args.model:
        tok, model, examples, pairs = setup_model(args.model, args.rows, args.max_length)
        args.hidden, args.layers = model.config.hidden_size, model.config.num_hidden_layers
        args.quick = True  # the other rows rebuild the tiny model
    else:
        tok, model, examples = setup(args.hidden, args.layers, args.rows, args.max_length, args.vocab,
                                     args.preamble_tokens)
    pad = tok.pad_token_id
    layer = args.layer if args.layer is not None else args.layers // 2
    n = len(examples)
    n_tokens = sum(len(e.input_ids) for e in examples)
    n_resp = sum(e.n_response for e in examples)
    plain_examples = examples[: args.plain_rows] if args.plain_rows else examples
    log(f"{n} rows, {n_tokens} tokens ({n_resp / n_tokens:.0%} response), layer {layer}, threads {torch.get_num_threads()}")

    # Warm up every code path once on a few rows.
    warm = examples[:8]
    plain_authors(model, warm[:2], layer)
    rept_extract(model, warm, layer, pad)
    forward_only(model, warm, pad)

    results = []

    def add(name, seconds, rows, note=""):
        results.append({"name": name, "seconds": round(seconds, 3), "rows": rows,
                        "rows_per_s": round(rows / seconds, 2), "note": note})
        log(f"  {name}: {rows / seconds:.2f} rows/s ({seconds:.2f} s)")

    r = args.repeat
    add("a. plain (authors): per row, 2 forwards + full backward", timed(lambda: plain_authors(model, plain_examples, layer), 1),
        len(plain_examples), "batch 1, parameter grads on" + (f"; first {len(plain_examples)} rows" if len(plain_examples) < n else ""))
    add("b. rept extract (batch 16, sorted)", timed(lambda: rept_extract(model, examples, layer, pad, batch_size=16), r), n)
    add("c. forward only (batch 16, sorted, inference_mode)", timed(lambda: forward_only(model, examples, pad, 16), r), n)
    if not args.quick:
        add("b, batch size 1", timed(lambda: rept_extract(model, examples, layer, pad, batch_size=1), 1), n)
        add("b, batch size 64", timed(lambda: rept_extract(model, examples, layer, pad, batch_size=64), r), n)
        add("b, batch 16 unsorted (dataset order)", timed(lambda: unsorted_extract(model, examples, layer, pad, 16), r), n)
        add("b, batch 256 + max_tokens 4096", timed(lambda: rept_extract(model, examples, layer, pad, batch_size=256,
                                                                          max_tokens=4096), r), n)
        add("c, batch 256 + max_tokens 4096", timed(lambda: forward_only(model, examples, pad, 256, 4096), r), n)
        add("c, batch 16, no padding mask (right padding)",
            timed(lambda: forward_only(model, examples, pad, 16, causal_only=True), r), n)
        # The prefix-cache path computes logits for the response window only and keeps the mask as it
        # is, so the other two switches only act on the one-pass path: they are measured there.
        with switch("prompt_prefix_cache", False):
            rept_extract(model, warm, layer, pad)
            add("b, one pass (prompt_prefix_cache=False; default True)",
                timed(lambda: rept_extract(model, examples, layer, pad, batch_size=16), r), n)
            for name in ("response_logits_only", "causal_only_for_right_padding"):
                flipped = not getattr(SETTINGS, name)
                with switch(name, flipped):
                    rept_extract(model, warm, layer, pad)
                    add(f"b, one pass, {name}={flipped} (default {not flipped})",
                        timed(lambda: rept_extract(model, examples, layer, pad, batch_size=16), r), n)
        for lyr, label in ((1, "layer 1 (low)"), (args.layers - 1, f"layer {args.layers - 1} (high)")):
            if lyr != layer:
                add(f"b at {label}", timed(lambda: rept_extract(model, examples, lyr, pad, batch_size=16), r), n)
        if args.bf16:
            model_bf = tiny_llama(tok, hidden=args.hidden, layers=args.layers, heads=max(1, args.hidden // 64),
                                  max_positions=max(512, args.max_length), seed=0).eval().requires_grad_(False)
            model_bf.to(torch.bfloat16)
            rept_extract(model_bf, warm, layer, pad)
            forward_only(model_bf, warm, pad)
            add("b, bf16 weights (CPU)", timed(lambda: rept_extract(model_bf, examples, layer, pad, batch_size=16), r), n)
            add("c, bf16 weights (CPU)", timed(lambda: forward_only(model_bf, examples, pad, 16), r), n)

    if args.lora_rank:
        b_seconds = next(x["seconds"] for x in results if x["name"].startswith("b."))
        for row in lora_gradients(args, tok, model, pairs, b_seconds):
            results.append(row)
            log(f"  {row['name']}: {row['rows_per_s']:.2f} rows/s, {row['over_b']}x rept's time per row")

    by = {x["name"][:2]: x for x in results}
    ratio_ba = by["b."]["rows_per_s"] / by["a."]["rows_per_s"]
    ratio_bc = by["b."]["seconds"] / by["c."]["seconds"]
    paired = None
    if args.pairs:
        # b and c timed back to back, N times: on a machine whose speed drifts, the median of the
        # per-pair ratios is steadier than the ratio of two separate best-of timings.
        ratios = []
        for _ in range(args.pairs):
            tb = timed(lambda: rept_extract(model, examples, layer, pad, batch_size=16))
            tc = timed(lambda: forward_only(model, examples, pad, 16))
            ratios.append(tb / tc)
        ratios.sort()
        paired = {"pairs": args.pairs, "median": round(ratios[len(ratios) // 2], 2),
                  "min": round(ratios[0], 2), "max": round(ratios[-1], 2)}
        log(f"  b / c over {args.pairs} back-to-back pairs: median {paired['median']} "
            f"(min {paired['min']}, max {paired['max']})")
    summary = {"machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "model": args.model, "hidden": args.hidden, "layers": args.layers, "layer": layer, "rows": n, "tokens": n_tokens,
               "max_length": args.max_length, "vocab": len(tok), "preamble_tokens": args.preamble_tokens,
               "speedup_b_vs_a": round(ratio_ba, 2), "cost_b_over_c": round(ratio_bc, 2),
               "cost_b_over_c_paired": paired, "results": results}

    print(f"\nRepT signature throughput: Llama hidden {args.hidden}, {args.layers} layers, layer {layer}, "
          f"{n} rows / {n_tokens} tokens (max_length {args.max_length}), {cpu_name()}, {torch.get_num_threads()} threads\n")
    print("| method | rows/s | seconds | rows | note |")
    print("|---|---:|---:|---:|---|")
    for x in results:
        print(f"| {x['name']} | {x['rows_per_s']:.2f} | {x['seconds']:.2f} | {x['rows']} | {x['note']} |")
    print(f"\nb vs a (speed-up): {ratio_ba:.1f}x (target >= 5x)   b / c (time over forward-only): {ratio_bc:.2f} (target <= 1.6)")
    if paired:
        print(f"b / c over {paired['pairs']} back-to-back pairs: median {paired['median']} "
              f"(min {paired['min']}, max {paired['max']})")
    return summary


# ------------------------------------------------------------------------------ memory and storage

def rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory(args):
    import rept.store.build as B
    from rept.store.build import IndexSettings, build_index
    from rept.data.datasets import load_dataset
    from rept.model.loading import LoadedModel

    words = ("alpha beta gamma delta river mountain table window green quiet fast slow bright cold warm "
             "paper stone cloud music garden").split()
    rows = [demo_rows()[i]["prompt"] + " " + demo_rows()[i]["response"] for i in range(200)]
    tok = train_tokenizer(rows + [" ".join(words)], vocab_size=args.vocab)
    model = tiny_llama(tok, hidden=args.index_hidden, layers=2, heads=max(1, args.index_hidden // 32),
                       seed=0).eval().requires_grad_(False)
    loaded = LoadedModel(model, tok, "tiny-llama-bench")
    marks = [("start", rss_mb(), peak_rss_mb())]
    report = {"machine": cpu_name(), "index_rows": args.index_rows, "hidden": args.index_hidden, "stores": []}

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        with data.open("w") as f:
            for i in range(args.index_rows):
                w = [words[(i * 7 + j * 3) % len(words)] for j in range(4)]
                f.write(json.dumps({"prompt": f"item {i}: " + " ".join(w[:2]), "response": " ".join(w[2:]) + f" {i % 97}"}) + "\n")
        dataset = load_dataset(str(data))
        marks.append(("dataset loaded", rss_mb(), peak_rss_mb()))

        for store in args.store_dtypes:
            out = Path(tmp) / f"index-{store}"
            trace = []
            original = B.save_shard

            def save_and_mark(folder, k, *a, **kw):
                original(folder, k, *a, **kw)
                trace.append((k, rss_mb(), peak_rss_mb()))

            B.save_shard = save_and_mark
            t = time.perf_counter()
            try:
                manifest = build_index(loaded, dataset, out, IndexSettings(layer=1, batch_size=args.index_batch,
                                                                           shard_size=args.shard_size, store_dtype=store),
                                       progress=False, log=log)
            finally:
                B.save_shard = original
            seconds = time.perf_counter() - t
            files = sorted(out.glob("shard-*.safetensors"))
            shard_bytes = sum(p.stat().st_size for p in files)
            n = manifest["rows"]
            itemsize = torch.finfo(B.STORE_DTYPES[store]).bits // 8
            picks = sorted({0, 1, len(trace) // 4, len(trace) // 2, 3 * len(trace) // 4, len(trace) - 1})
            entry = {"store_dtype": store, "rows": n, "seconds": round(seconds, 1), "rows_per_s": round(n / seconds, 1),
                     "shards": len(files), "shard_bytes": shard_bytes, "bytes_per_row": round(shard_bytes / n, 1),
                     "payload_bytes_per_row": 2 * args.index_hidden * itemsize + 8,
                     "rss_after_shard": [{"shard": trace[i][0], "rss_mb": round(trace[i][1], 1),
                                          "peak_mb": round(trace[i][2], 1)} for i in picks if 0 <= i < len(trace)]}
            report["stores"].append(entry)
            marks.append((f"after {store} build", rss_mb(), peak_rss_mb()))
            log(f"  {store}: {n} rows in {seconds:.1f} s, {entry['bytes_per_row']} bytes/row")
    report["marks"] = [{"at": a, "rss_mb": round(b, 1), "peak_mb": round(c, 1)} for a, b, c in marks]

    print(f"\nIndex build memory: {args.index_rows} synthetic rows, Llama hidden {args.index_hidden} x 2 layers, "
          f"shard size {args.shard_size}, batch {args.index_batch}, {cpu_name()}\n")
    print("| point | RSS MB | peak RSS MB |")
    print("|---|---:|---:|")
    for m in report["marks"][:2]:
        print(f"| {m['at']} | {m['rss_mb']} | {m['peak_mb']} |")
    for s in report["stores"]:
        for m in s["rss_after_shard"]:
            print(f"| {s['store_dtype']} build, after shard {m['shard']} | {m['rss_mb']} | {m['peak_mb']} |")
    for m in report["marks"][2:]:
        print(f"| {m['at']} | {m['rss_mb']} | {m['peak_mb']} |")
    print("\n| store dtype | rows | rows/s | shards | bytes/row on disk | h+g+row payload bytes/row |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in report["stores"]:
        print(f"| {s['store_dtype']} | {s['rows']} | {s['rows_per_s']} | {s['shards']} | {s['bytes_per_row']} | "
              f"{s['payload_bytes_per_row']} |")
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="time a given model instead of a random tiny Llama (a folder, a .gguf file or "
                   "smollm2-135m-instruct; implies --quick; rows: the demo rows in its chat template)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--layer", type=int, default=None, help="hidden_states index (default: layers // 2)")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2000, help="tokenizer vocabulary trained on the demo rows")
    p.add_argument("--preamble-tokens", type=int, default=0,
                   help="put the same N-token preamble in front of every prompt (a chat template's system prompt)")
    p.add_argument("--plain-rows", type=int, default=0, help="time (a) on the first N rows only (0: all)")
    p.add_argument("--repeat", type=int, default=1, help="time each batched variant this many times, keep the best")
    p.add_argument("--quick", action="store_true", help="only a, b and c")
    p.add_argument("--pairs", type=int, default=0, help="also time b and c back to back N times, report the "
                   "median ratio")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="with --model: also time per-row gradients of a rank-R LoRA on every linear layer "
                   "(what TracIn / LESS / DataInf / RapidIn pay), against b")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--index-rows", type=int, default=0, help="instead: build an index of N synthetic rows, report memory")
    p.add_argument("--index-hidden", type=int, default=64)
    p.add_argument("--index-batch", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=8192)
    p.add_argument("--store-dtypes", nargs="+", default=["float32", "float16"])
    p.add_argument("--json", help="also write the results here as JSON")
    args = p.parse_args(argv)
    if args.lora_rank and not args.model:
        p.error("--lora-rank times a LoRA on a given model: use it with --model")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = memory(args) if args.index_rows else throughput(args)
    result["command"] = "python benchmarks/bench_signatures.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
