"""RepT signature throughput of a ~1B-parameter Llama on one GPU (random bf16 weights).

Speed does not need trained weights: a Llama config of about 1.1B parameters (hidden 2048,
16 layers, 32 heads, intermediate 5632, vocab 32000) is initialised at random, and synthetic
rows of random tokens (a prompt part and a response part) are pushed through
  - rept.signatures.extract.extract at the middle layer (one forward, backward down to layer L), and
  - a forward-only pass over the same batches (torch.inference_mode), the floor to compare with.
Prints the device name, samples/s and tokens/s of each, and their ratio.

    python benchmarks/gpu_throughput.py                     # on the GPU machine
    python benchmarks/gpu_throughput.py --tiny              # CPU smoke test (a few seconds)
    python benchmarks/gpu_throughput.py --rows 512 --batch-size 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from rept.data.examples import Example
from rept.signatures.extract import collate, extract, length_sorted_batches

FULL = dict(hidden=2048, layers=16, heads=32, kv_heads=32, intermediate=5632, vocab=32000)
TINY = dict(hidden=64, layers=4, heads=4, kv_heads=4, intermediate=256, vocab=512)


def synthetic_examples(n: int, vocab: int, prompt_len: int, response_len: int, seed: int = 0) -> list[Example]:
    """Rows of random tokens; lengths vary by +-25% so batching meets real padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = max(2, int(prompt_len * (0.75 + 0.5 * torch.rand(1, generator=g).item())))
        r = max(1, int(response_len * (0.75 + 0.5 * torch.rand(1, generator=g).item())))
        ids = torch.randint(3, vocab, (p + r,), generator=g).tolist()
        out.append(Example(row=i, input_ids=ids, prompt_len=p, text="", offsets=[]))
    return out


def build_model(cfg: dict, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["kv_heads"], max_position_embeddings=4096, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval().requires_grad_(False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_only(model, examples, batch_size, max_tokens, device):
    with torch.inference_mode():
        for chunk in length_sorted_batches(examples, batch_size, max_tokens):
            b = collate(chunk, 0, device=device)
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False)


def run_extract(model, examples, layer, batch_size, max_tokens):
    n = 0
    for part in extract(model, examples, layer, 0, batch_size=batch_size, max_tokens=max_tokens):
        n += len(part.rows)
    return n


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny model and few rows: a CPU smoke test")
    p.add_argument("--rows", type=int, default=None, help="synthetic rows (default 1024; 16 with --tiny)")
    p.add_argument("--prompt-len", type=int, default=None, help="mean prompt tokens (default 128; 16 with --tiny)")
    p.add_argument("--response-len", type=int, default=None, help="mean response tokens (default 256; 24 with --tiny)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=None, help="token budget per batch")
    p.add_argument("--layer", type=int, default=None, help="hidden_states index (default: layers // 2)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--json", help="also write the results here as JSON")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = TINY if args.tiny else FULL
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    rows = args.rows or (16 if args.tiny else 1024)
    prompt_len = args.prompt_len or (16 if args.tiny else 128)
    response_len = args.response_len or (24 if args.tiny else 256)
    layer = args.layer if args.layer is not None else cfg["layers"] // 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    model = build_model(cfg, dtype, device)
    n_params = sum(p.numel() for p in model.parameters())
    examples = synthetic_examples(rows, cfg["vocab"], prompt_len, response_len)
    n_tokens = sum(len(e.input_ids) for e in examples)
    print(f"device: {name}; model: Llama {n_params / 1e9:.2f}B params, hidden {cfg['hidden']}, {cfg['layers']} layers, "
          f"{dtype}; layer {layer}; {rows} rows, {n_tokens} tokens; batch {args.batch_size}, max_tokens {args.max_tokens}",
          flush=True)

    warm = examples[: max(2, min(len(examples), 2 * args.batch_size))]
    run_extract(model, warm, layer, args.batch_size, args.max_tokens)
    forward_only(model, warm, args.batch_size, args.max_tokens, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    t_sig = timed(lambda: run_extract(model, examples, layer, args.batch_size, args.max_tokens), device)
    peak_sig = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    t_fwd = timed(lambda: forward_only(model, examples, args.batch_size, args.max_tokens, device), device)

    result = {"device": name, "params": n_params, "dtype": str(dtype), "layer": layer, "rows": rows, "tokens": n_tokens,
              "batch_size": args.batch_size, "max_tokens": args.max_tokens,
              "extract": {"seconds": t_sig, "samples_per_s": rows / t_sig, "tokens_per_s": n_tokens / t_sig,
                          "peak_gib": peak_sig},
              "forward_only": {"seconds": t_fwd, "samples_per_s": rows / t_fwd, "tokens_per_s": n_tokens / t_fwd},
              "extract_over_forward": t_sig / t_fwd, "command": "python benchmarks/gpu_throughput.py " + " ".join(
                  argv if argv is not None else sys.argv[1:])}
    print("| pass | samples/s | tokens/s | seconds |")
    print("|---|---:|---:|---:|")
    for key, label in (("extract", "rept signatures (extract)"), ("forward_only", "forward only (inference_mode)")):
        r = result[key]
        print(f"| {label} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['seconds']:.2f} |")
    print(f"extract / forward-only time: {result['extract_over_forward']:.2f}"
          + (f"; peak GPU memory during extract {peak_sig:.1f} GiB" if peak_sig is not None else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
