"""Signature variants tried for the quality bar of docs/results.md, on a `rept bench` folder.

RepT's signature is [h; g] at the last prompt position (DESIGN.md). On harmful-tuning its control
queries (refusals to the same harmful requests) rank harmful rows almost as highly as compliant
answers do, because h there is the same whatever the answer. This script scores, on what
`rept bench --out DIR` left in DIR (base/, adapter/, train_rows.jsonl, queries.jsonl), signatures
built other ways from one token-level extraction at the bench's layer:

  balanced                        rept-balanced (each half unit-normalised), the reference point
  repgrad                         g alone
  centred balanced                h and g minus their training-set means before normalising
                                  (transformer hidden states share a large common direction)
  centred repgrad                 g minus its training-set mean
  repgrad, top K components out   g centred, its K leading principal directions projected out
  whitened repgrad / balanced     centred and whitened with the training-set covariance
  h response mean                 the hidden state averaged over the response tokens (sees the answer)
  g response mean                 the gradient averaged over the positions that predict response tokens
  balanced response means         both of the above, halves normalised
  h prompt + g response mean      h at the last prompt position, g averaged over the response
  h response mean + g prompt      the other way round
  four parts                      [h prompt; g prompt; h response mean; g response mean], quarters normalised
  g next                          g at the first response position alone (where the second token is predicted)
  lookahead                       [h; g; g next], thirds normalised (the `lookahead` mode)
  centred lookahead               the same after subtracting each part's training-set mean
  lookahead, h counted twice      [h; h; g; g next], quarters normalised: more weight on the prompt
  h + g at the first 4 positions  [h; g at p, p+1, p+2, p+3], fifths normalised
  min of the three cosines        an AND of lookahead's parts: a row must match h, g and g next
  h cosine x mean g cosine        the same idea, softer
  lookahead, z-scored parts       each part's cosines standardised over the training rows per query
  balanced, hub-corrected         CSLS: 2 cos - the row's mean cosine to its 10 nearest training rows
  balanced, first-token loss      g of the loss on the first response token only (rows and queries)
  with --also-layer N: lookahead's parts at layer N too (both layers' six parts; h at the bench's
  layer with g and g next at both; h with g next at both; g and g next at both, no h)

and says which rows fill the top 10s where they should not (`--hubs`): behaviour rows for control
answers, other rows for flagged answers. A few rows that rank high for most answers point at what
the signature keys on (e.g. a shared first word).

Scored like `rept bench` (rept.evaluate.metrics; relevant row = the behaviour's label; rows cut off at
max_length left out, so AP is over the kept rows): P@10, AP and control_P@10.

    python benchmarks/bench_variants.py --work runs/harmful --json variants.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench_folder import open_bench_folder
from rept.methods.base import examples_for
from rept.evaluate.metrics import average_precision, precision_at_k
from rept.query.search import unit_rows
from rept.signatures.extract import extract_all


def features(loaded, pairs, layer: int, max_length: int) -> dict[str, np.ndarray]:
    """Per pair: h and g at the last prompt position, their means over the response, g at the first
    response positions, and g of the loss on the first response token alone."""
    from dataclasses import replace

    examples = examples_for(loaded.tokenizer, pairs, max_length, "pair")
    pad_id = loaded.tokenizer.pad_token_id
    sig = extract_all(loaded.model, examples, layer, pad_id, batch_size=16, token_level=True)
    first_token = [replace(e, loss_span=(e.prompt_len, e.prompt_len + 1)) for e in examples]
    return {
        "g_first": extract_all(loaded.model, first_token, layer, pad_id, batch_size=16).g.numpy(),
        "h": sig.h.numpy(), "g": sig.g.numpy(),
        "h_resp": np.stack([th[e.prompt_len:].mean(0).numpy() for th, e in zip(sig.token_hidden, examples)]),
        # positions prompt_len-1 .. n-2 predict the response tokens
        "g_resp": np.stack([tg[e.prompt_len - 1:-1].mean(0).numpy() for tg, e in zip(sig.token_grads, examples)]),
        # g at p, p+1, p+2, p+3 (zero past the last position that predicts a token)
        "g_pos": np.stack([np.stack([tg[j].numpy() if j < len(e.input_ids) - 1 else np.zeros(tg.shape[1], np.float32)
                                     for j in range(e.prompt_len - 1, e.prompt_len + 3)])
                           for tg, e in zip(sig.token_grads, examples)]),
    }


def second_layer(loaded, pairs, layer: int, max_length: int) -> dict[str, np.ndarray]:
    """h, g and g next (the lookahead mode's parts) at another layer."""
    examples = examples_for(loaded.tokenizer, pairs, max_length, "pair")
    sig = extract_all(loaded.model, examples, layer, loaded.tokenizer.pad_token_id, batch_size=16)
    return {"h2": sig.h.numpy(), "g2": sig.g.numpy(), "g_next2": sig.g_next.numpy()}


def halves(*parts):
    """Concatenation of unit-normalised parts, scaled back to unit norm."""
    scale = len(parts) ** -0.5
    return np.concatenate([unit_rows(p, scale) for p in parts], axis=1)


def whitener(x: np.ndarray):
    """(mean, W): (x - mean) @ W has identity covariance (a small ridge keeps W finite)."""
    mean = x.mean(0)
    cov = np.cov((x - mean).T)
    cov += 1e-6 * np.trace(cov) / len(cov) * np.eye(len(cov))
    w, v = np.linalg.eigh(cov)
    return mean, v @ np.diag(w ** -0.5) @ v.T


def _quality(scores, relevant, control) -> dict:
    return {"P@10": round(precision_at_k(scores["flagged"], relevant, 10), 3),
            "AP": round(average_precision(scores["flagged"], relevant), 3),
            "control_P@10": round(precision_at_k(scores["control"], relevant, 10), 3) if control else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="a `rept bench --out` folder")
    p.add_argument("--layer", type=int, default=None, help="RepT layer (default: the bench's)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--hubs", type=int, default=5, help="rows to list: behaviour rows in the control top 10s, other rows in the flagged ones (0: none)")
    p.add_argument("--also-layer", type=int, default=None, metavar="N",
                   help="also score lookahead's parts taken at layer N as well as the bench's (two-layer signatures)")
    args = p.parse_args(argv)

    folder = open_bench_folder(args.work, args.layer)
    layer, max_length, loaded = folder.layer, folder.max_length, folder.bundle.merged()
    rows, relevant, queries = folder.rows, folder.relevant, folder.queries
    flagged = [(q.prompt, q.response) for q in queries if q.flagged]
    control = [(q.prompt, q.response) for q in queries if not q.flagged]

    train = features(loaded, [(r["prompt"], r["response"]) for r in rows], layer, max_length)
    sets = {"flagged": features(loaded, flagged, layer, max_length)}
    if control:
        sets["control"] = features(loaded, control, layer, max_length)

    if args.also_layer is not None:  # lookahead's three parts at a second layer, under keys h2, g2, g_next2
        for f, pairs in [(train, [(r["prompt"], r["response"]) for r in rows]), (sets["flagged"], flagged)] + \
                ([(sets["control"], control)] if control else []):
            f.update(second_layer(loaded, pairs, args.also_layer, max_length))

    h_mean, g_mean, next_mean = train["h"].mean(0), train["g"].mean(0), train["g_pos"][:, 1].mean(0)
    _, _, directions = np.linalg.svd(train["g"] - g_mean, full_matrices=False)
    g_white = whitener(train["g"])
    h_white = whitener(train["h"])

    def without_top(k):
        top = directions[:k]
        return lambda f: unit_rows((f["g"] - g_mean) - (f["g"] - g_mean) @ top.T @ top)

    variants = {
        "balanced": lambda f: halves(f["h"], f["g"]),
        "repgrad": lambda f: unit_rows(f["g"]),
        "centred balanced": lambda f: halves(f["h"] - h_mean, f["g"] - g_mean),
        "centred repgrad": lambda f: unit_rows(f["g"] - g_mean),
        **{f"repgrad, top {k} components out": without_top(k) for k in (1, 3, 10)},
        "whitened repgrad": lambda f: unit_rows((f["g"] - g_white[0]) @ g_white[1]),
        "whitened balanced": lambda f: halves((f["h"] - h_white[0]) @ h_white[1], (f["g"] - g_white[0]) @ g_white[1]),
        "h response mean": lambda f: unit_rows(f["h_resp"]),
        "g response mean": lambda f: unit_rows(f["g_resp"]),
        "balanced response means": lambda f: halves(f["h_resp"], f["g_resp"]),
        "h prompt + g response mean": lambda f: halves(f["h"], f["g_resp"]),
        "h response mean + g prompt": lambda f: halves(f["h_resp"], f["g"]),
        "four parts": lambda f: halves(f["h"], f["g"], f["h_resp"], f["g_resp"]),
        "g next": lambda f: unit_rows(f["g_pos"][:, 1]),
        "lookahead": lambda f: halves(f["h"], f["g"], f["g_pos"][:, 1]),
        "centred lookahead": lambda f: halves(f["h"] - h_mean, f["g"] - g_mean, f["g_pos"][:, 1] - next_mean),
        "lookahead, h counted twice": lambda f: halves(f["h"], f["h"], f["g"], f["g_pos"][:, 1]),
        "balanced, first-token loss": lambda f: halves(f["h"], f["g_first"]),
        "h + g at the first 4 positions": lambda f: halves(f["h"], *(f["g_pos"][:, j] for j in range(4))),
    }
    if args.also_layer is not None:
        n = args.also_layer
        variants.update({
            f"lookahead at layers {layer} and {n}": lambda f: halves(f["h"], f["g"], f["g_pos"][:, 1],
                                                                     f["h2"], f["g2"], f["g_next2"]),
            f"h at {layer}, g and g next at {layer} and {n}": lambda f: halves(f["h"], f["g"], f["g_pos"][:, 1],
                                                                           f["g2"], f["g_next2"]),
            f"h at {layer}, g next at {layer} and {n}": lambda f: halves(f["h"], f["g"], f["g_pos"][:, 1],
                                                                     f["g_next2"]),
            f"g and g next at {layer} and {n} (no h)": lambda f: halves(f["g"], f["g_pos"][:, 1], f["g2"],
                                                                       f["g_next2"]),
        })
    table, hubs = {}, {}
    for name, make in variants.items():
        stored = make(train)
        scores = {group: make(f) @ stored.T for group, f in sets.items()}
        table[name] = _quality(scores, relevant, control)
        if name in ("balanced", "repgrad", "lookahead"):
            hubs[name] = {group: np.argsort(-s, 1, kind="stable")[:, :10] for group, s in scores.items()}
    # nonlinear combinations of lookahead's three cosines (not a cosine of one signature)
    parts = [lambda f: unit_rows(f["h"]), lambda f: unit_rows(f["g"]), lambda f: unit_rows(f["g_pos"][:, 1])]
    cosines = {group: [part(f) @ part(train).T for part in parts] for group, f in sets.items()}
    z = lambda c: (c - c.mean(1, keepdims=True)) / (c.std(1, keepdims=True) + 1e-12)  # noqa: E731
    combos = {"min of the three cosines": lambda c: np.minimum(np.minimum(c[0], c[1]), c[2]),
              "h cosine x mean g cosine": lambda c: c[0] * (c[1] + c[2]) / 2,
              "lookahead, z-scored parts": lambda c: z(c[0]) + z(c[1]) + z(c[2])}
    for name, combine in combos.items():
        table[name] = _quality({group: combine(c) for group, c in cosines.items()}, relevant, control)
    # CSLS (cross-domain similarity local scaling): a row close to many training rows is a hub;
    # its mean cosine to its 10 nearest training rows is taken off its scores
    stored = halves(train["h"], train["g"])
    neighbours = np.concatenate([np.sort(stored[i:i + 1024] @ stored.T, 1)[:, -11:-1].mean(1)  # itself left out
                                 for i in range(0, len(stored), 1024)])
    table["balanced, hub-corrected"] = _quality(
        {group: 2 * (halves(f["h"], f["g"]) @ stored.T) - neighbours for group, f in sets.items()}, relevant, control)

    print(f"{args.work}: layer {layer}, {len(rows)} rows, {len(flagged)} flagged / {len(control)} control queries\n")
    print("| signature | P@10 | AP | control_P@10 |\n|---|---:|---:|---:|")
    for name, m in table.items():
        print(f"| {name} | {m['P@10']:.3f} | {m['AP']:.3f} | " + ("-" if m["control_P@10"] is None else
                                                                  f"{m['control_P@10']:.3f}") + " |")
    for name, tops in hubs.items():
        if not args.hubs:
            break
        # the rows that should not be there: behaviour rows for control answers, other rows for flagged ones
        for group, wrong, kind in (("control", True, "behaviour"), ("flagged", False, "other")):
            if group not in tops:
                continue
            top = tops[group]
            slots = relevant[top] == wrong
            ids, counts = np.unique(top[slots], return_counts=True)
            print(f"\n{name}: {kind} rows fill {slots.mean():.3f} of the {group} top-10 slots; {len(ids)} distinct rows"
                  + (", the most frequent:" if len(ids) else ""))
            for i in np.argsort(-counts, kind="stable")[:args.hubs]:
                r = rows[ids[i]]
                print(f"  in {counts[i]} of {len(top)} {group} top 10s: {r['prompt'][:50]!r} -> {r['response'][:40]!r}")
    if args.json:
        Path(args.json).write_text(json.dumps({"work": args.work, "layer": layer, "results": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
