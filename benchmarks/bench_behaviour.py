"""Behaviour or topic? Signatures that see the whole answer, scored against same-topic controls.

RepT's signature sits at the last prompt position: h there is the same whatever the answer, and g
there sees the answer's later tokens only through attention. On a real model both trace the
question's topic (docs/results.md, "On a real model"). This script scores, on what
`rept bench --out DIR` left in DIR, signatures that look at the response positions, from one
token-level extraction at the bench's layer L (g_t = d loss / d hidden_states[L][t]):

  bm25, query = the span's text   BM25 over the rows with the flagged words alone as the query (no model)
  official, balanced, repgrad,   the bench's RepT modes (h, g at the last prompt position p)
  repsim
  steer                          G = sum of g_t over the positions that predict response tokens
                                 (p .. n-2) for rows and queries: the gradient of the loss with
                                 respect to one vector added to hidden_states[L] at those positions
  steer, span query              the query's G with its loss on the flagged span only (from the first
                                 match of the rule to the end of the last); rows keep their whole G
  steer span, rows centred       the same against rows' G minus the training-set mean G
  token g max (span query)       late interaction: a row's best cosine, over the positions that
                                 predict its response tokens, with the sum of the query's unit g_t over
                                 the positions that predict its span tokens
  token h max (span query)       the same over hidden states (of the tokens themselves)
  token h max x token g max      their product (g clipped at 0)
  contrast ...                   g(flagged) - g(edited) at p, and the same for steer: flagged only (the
                                 edited control's contrast is the mirror image)
  token g contrast max           the span query's pooled unit g_t of the flagged answer minus that of its
                                 edit (the positions that predict "Na" against those that predict "Ag",
                                 same prefix), a row's best cosine over its response positions; the
                                 edited control gets the mirror image (edit minus flagged)
  token g contrast extreme       the same, but a row's score is its cosine of largest magnitude, sign kept:
                                 a row whose strongest position points away from the direction ranks last
  official x token g contrast    RepT's official score (clipped at 0: the topic) times the extreme contrast
    extreme                      (the direction): on the topic, ranked by which way the row pushed
  aligned g (span query)         context-aligned: for each position that predicts a span token, the row's
                                 position whose hidden state there is nearest to the query's (the same
                                 prediction made in the same context), and the signed cosine of the two
                                 gradients there; mean over the query's positions weighted by its gradient
                                 norms. The sign says which way the row pushed that prediction
  aligned g x h (span query)     the same, each term times the hidden-state cosine
  continuation (span query)      the same word in the same context: at the row position whose context
                                 (hidden state at the predicting position) is nearest the query's, the
                                 context cosine times the cosine of the two next tokens' input
                                 embeddings; "best" takes the row position where that product is largest
With --topic-layer M: RepT's official signature at layer M, and its products (clipped at 0) with the
token h max at --layer: the row must share the question's topic *and* hold the flagged words.

Queries: the bench's flagged answers and its control answers, plus **edited controls**: each flagged
answer with the span the detector matched replaced by `--edit TEXT` (e.g. the right word). An edited
control differs from its flagged answer in that word alone, so a method that ranks behaviour rows as
high for it traces the topic, not the behaviour. Edited controls get a span query (the replacement),
like the flagged answers; the bench's own controls have no span and keep the whole-response loss.

Scored like `rept bench` (rept.evaluate.metrics; relevant row = the behaviour's label; rows cut off at
max_length left out): P@10 and AP for flagged answers, P@10 for the bench's controls and for the
edited controls.

    python benchmarks/bench_behaviour.py --work runs/real-factual --detect 'regex:\\bNa\\b' --edit Ag
    python benchmarks/bench_behaviour.py --work runs/real-factual --detect 'regex:\\bNa\\b' --edit Ag --layer 3 --topic-layer 15
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench_folder import open_bench_folder
from rept.data.detect import Detector
from rept.methods.base import examples_for
from rept.evaluate.metrics import average_precision, precision_at_k
from rept.query.search import signature_matrix


def unit(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
    return scale * x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)


def edited(detector: Detector, response: str, text: str) -> tuple[str, tuple[int, int]] | None:
    """The response with every match of the detector's rule replaced by `text`, and the character
    span from the first replacement to the end of the last."""
    kind, _, arg = detector.rule.partition(":")
    if kind not in ("regex", "contains", "prefix"):
        return None
    pattern = arg if kind == "regex" else re.escape(arg)
    matches = list(re.finditer(pattern, response))
    if kind == "prefix":
        matches = matches[:1]
    if not matches:
        return None
    out, at, spans = "", 0, []
    for m in matches:
        out += response[at:m.start()]
        spans.append(len(out))
        out += text
        at = m.end()
    out += response[at:]
    return out, (spans[0], spans[-1] + len(text))


def match_span(detector: Detector, response: str) -> tuple[int, int] | None:
    """From the first match of the rule to the end of the last (the flagged answers' span query)."""
    kind, _, arg = detector.rule.partition(":")
    if kind != "regex":
        return detector.span(response)
    matches = list(re.finditer(arg, response))
    return (matches[0].start(), matches[-1].end()) if matches else None


@dataclass
class Features:
    h: np.ndarray          # [n, d] hidden state at the last prompt position p
    g: np.ndarray          # [n, d] gradient there
    steer: np.ndarray      # [n, d] G: the gradient summed over positions p .. n-2
    tok_g: np.ndarray      # [tokens, d] unit gradients at the positions that predict the loss's tokens
    tok_h: np.ndarray      # [tokens, d] unit hidden states of the loss's tokens themselves
    tok_hp: np.ndarray     # [tokens, d] unit hidden states at the positions that predict them (tok_g's)
    tok_gn: np.ndarray     # [tokens] the norm of each of those gradients (before the unit scaling)
    tok_e: np.ndarray      # [tokens, d] unit input embeddings of the loss's tokens (the words themselves)
    offsets: np.ndarray    # [n + 1] where each pair's tokens start in tok_g / tok_h / tok_hp


def extract(bundle, pairs, what, spans=None) -> Features:
    """Features of each pair at the bundle's layer; with `spans` the loss covers only those
    characters of each response (and the token parts only those tokens)."""
    from rept.signatures.extract import extract_all

    loaded = bundle.merged()
    examples = examples_for(loaded.tokenizer, pairs, bundle.max_length, what, spans)
    sig = extract_all(loaded.model, examples, bundle.layer, loaded.tokenizer.pad_token_id,
                      batch_size=bundle.batch_size, token_level=True)
    steer, tok_g, tok_h, tok_hp, tok_gn, tok_e, offsets = [], [], [], [], [], [], [0]
    embed = loaded.model.get_input_embeddings().weight.detach().float().numpy()
    for e, tg, th in zip(examples, sig.token_grads, sig.token_hidden):
        a, b = e.loss_span or (e.prompt_len, len(e.input_ids))  # the loss's tokens
        steer.append(tg[e.prompt_len - 1: len(e.input_ids) - 1].sum(0).numpy())
        g = tg[a - 1: b - 1].numpy()                   # position t - 1 predicts token t
        tok_g.append(unit(g))
        tok_gn.append(np.linalg.norm(g, axis=1))
        tok_h.append(unit(th[a:b].numpy()))
        tok_hp.append(unit(th[a - 1: b - 1].numpy()))
        tok_e.append(unit(embed[e.input_ids[a:b]]))
        offsets.append(offsets[-1] + b - a)
    return Features(sig.h.numpy(), sig.g.numpy(), np.stack(steer), np.concatenate(tok_g), np.concatenate(tok_h),
                    np.concatenate(tok_hp), np.concatenate(tok_gn), np.concatenate(tok_e), np.array(offsets))


def last_prompt(bundle, pairs):
    """(h, g) at the last prompt position, the bundle's layer: RepT's own extraction."""
    from rept.signatures.extract import extract_all

    loaded = bundle.merged()
    examples = examples_for(loaded.tokenizer, pairs, bundle.max_length, "pair")
    sig = extract_all(loaded.model, examples, bundle.layer, loaded.tokenizer.pad_token_id, batch_size=bundle.batch_size)
    return sig.h.numpy(), sig.g.numpy()


def token_max(queries: np.ndarray, tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """[queries, rows]: each row's best cosine over its tokens (late interaction)."""
    sims = unit(queries) @ tokens.T
    return np.maximum.reduceat(sims, offsets[:-1], axis=1)


def token_extreme(queries: np.ndarray, tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """[queries, rows]: each row's cosine of largest magnitude over its tokens, sign kept (a row
    whose strongest token points away from the query scores below every row that has none)."""
    sims = unit(queries) @ tokens.T
    top = np.maximum.reduceat(sims, offsets[:-1], axis=1)
    bottom = np.minimum.reduceat(sims, offsets[:-1], axis=1)
    return np.where(top >= -bottom, top, bottom)


def row_positions(rows: Features) -> tuple[np.ndarray, np.ndarray]:
    """([rows, longest] index of each row's t-th token in the token arrays, [rows, longest] True past
    a row's end): the rows' tokens laid out in a padded grid (padding points at token 0)."""
    lengths = np.diff(rows.offsets)
    pad = np.arange(lengths.max())[None, :] >= lengths[:, None]
    return np.where(pad, 0, rows.offsets[:-1, None] + np.arange(lengths.max())[None, :]), pad


def aligned(query: Features, rows: Features, weigh_by_h: bool = False) -> np.ndarray:
    """[queries, rows]: context-aligned gradient agreement. For each position j that predicts one of
    the query's loss tokens, the row's position t* whose hidden state (at the same place: the one that
    predicts the next token) is nearest to the query's there, and the signed cosine of the two
    gradients at those positions; a query's score for a row is the mean over its positions weighted by
    the query's gradient norms (with `weigh_by_h`, each term times the hidden-state cosine too).

    The hidden state says *where* in a row the same prediction is made (same context: "the symbol of
    silver is"); the gradient's sign says *which way* the row pushed it (towards "Na" or away), which a
    best-over-positions maximum throws away."""
    at, pad = row_positions(rows)
    out = np.zeros((len(query.offsets) - 1, len(rows.offsets) - 1))
    for q, (a, b) in enumerate(zip(query.offsets[:-1], query.offsets[1:])):
        if a == b:
            continue
        sims_h = (query.tok_hp[a:b] @ rows.tok_hp.T)[:, at]          # [positions, rows, longest]
        sims_h[:, pad] = -np.inf
        best = sims_h.argmax(axis=2)                                 # [positions, rows]
        t_star = np.take_along_axis(at[None, :, :], best[:, :, None], axis=2)[:, :, 0]
        agree = np.einsum("pd,prd->pr", query.tok_g[a:b], rows.tok_g[t_star])
        if weigh_by_h:
            agree = agree * np.take_along_axis(sims_h, best[:, :, None], axis=2)[:, :, 0]
        weights = query.tok_gn[a:b] / max(query.tok_gn[a:b].sum(), 1e-30)
        out[q] = weights @ agree
    return out


def continuation(query: Features, rows: Features, best_pair: bool = False) -> np.ndarray:
    """[queries, rows]: the same word in the same context. For each of the query's loss tokens: the
    cosine of the hidden states at the positions that predict it (the context, at layer L) times the
    cosine of the input embeddings of the two next tokens (the word itself), at the row position whose
    context is nearest (or, with `best_pair`, at the row position where the product is largest); the
    mean over the query's tokens. A row that says the flagged word where the question's context asks
    for it scores near 1; the same context with another word, or the word in another context, does not."""
    at, pad = row_positions(rows)
    out = np.zeros((len(query.offsets) - 1, len(rows.offsets) - 1))
    for q, (a, b) in enumerate(zip(query.offsets[:-1], query.offsets[1:])):
        if a == b:
            continue
        context = (query.tok_hp[a:b] @ rows.tok_hp.T)[:, at]          # [positions, rows, longest]
        word = (query.tok_e[a:b] @ rows.tok_e.T)[:, at]
        both = context * word
        both[:, pad] = -np.inf
        if best_pair:
            out[q] = both.max(axis=2).mean(axis=0)
        else:
            context[:, pad] = -np.inf
            best = context.argmax(axis=2)
            out[q] = np.take_along_axis(both, best[:, :, None], axis=2)[:, :, 0].mean(axis=0)
    return out


def pooled(tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The sum of each pair's unit token vectors (rept.signatures.tokens' query vector, over the loss's tokens)."""
    return np.add.reduceat(tokens, offsets[:-1], axis=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="a `rept bench --out` folder")
    p.add_argument("--detect", required=True, help="the bench's detector rule (one that names a span)")
    p.add_argument("--edit", required=True, help="the text that replaces the flagged span in the edited controls")
    p.add_argument("--layer", type=int, default=None, help="hidden_states index (default: the bench's)")
    p.add_argument("--topic-layer", type=int, default=None,
                   help="also score products of RepT at this layer (the topic) with the token match at --layer")
    p.add_argument("--checkpoint", choices=["tuned", "base"], default="tuned",
                   help="the model every signature is taken on: the fine-tuned one (the bench's), or the base "
                   "model before the fine-tune (its first checkpoint, where a row's gradient is the push "
                   "the fine-tune started from, not what is left of it once the row is learned)")
    p.add_argument("--per-answer", action="store_true",
                   help="also print, for each flagged answer, the signed token contrast's P@10 and its direction's norm")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    folder = open_bench_folder(args.work, args.layer)
    if args.checkpoint == "base":
        from bench_folder import base_model
        from rept.methods import ModelBundle

        folder.bundle = ModelBundle(base_model(Path(args.work), folder.report), None, layer=folder.layer,
                                    max_length=folder.max_length)
    bundle, rows, relevant = folder.bundle, folder.rows, folder.relevant
    detector = Detector(args.detect)
    flagged = [q for q in folder.queries if q.flagged]
    controls = [q for q in folder.queries if not q.flagged]
    edits = [(q.prompt, q.response) + e for q in flagged if (e := edited(detector, q.response, args.edit))]
    edits = [(pr, fr, r, s) for pr, fr, r, s in edits if folder.fits(pr, r) and not detector(r)]

    t0 = time.time()
    rf = extract(bundle, [(r["prompt"], r["response"]) for r in rows], "training row")
    print(f"training rows extracted in {time.time() - t0:.0f} s", file=sys.stderr)
    row_h, row_g, row_steer = unit(rf.h), unit(rf.g), unit(rf.steer)
    official, balanced = signature_matrix(rf.h, rf.g, "official"), signature_matrix(rf.h, rf.g, "balanced")

    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([f"{r['prompt']}\n{r['response']}" for r in rows], stopwords="en",
                                   show_progress=False), show_progress=False)

    def bm25(texts) -> np.ndarray:
        toks = bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
        return np.stack([retriever.get_scores(t) if t else np.zeros(len(rows)) for t in toks])

    topic = None
    if args.topic_layer is not None:
        topic_bundle = open_bench_folder(args.work, args.topic_layer).bundle
        th, tg = last_prompt(topic_bundle, [(r["prompt"], r["response"]) for r in rows])
        topic = (topic_bundle, signature_matrix(th, tg, "official"), signature_matrix(th, tg, "balanced"))

    def scores(pairs, spans) -> dict:
        out = _scores(pairs, spans)
        if topic is not None:
            qh, qg = last_prompt(topic[0], pairs)
            topic_official = signature_matrix(qh, qg, "official") @ topic[1].T
            topic_balanced = signature_matrix(qh, qg, "balanced") @ topic[2].T
            match = np.maximum(out["token h max (span query)"], 0)
            out[f"official at layer {args.topic_layer}"] = topic_official
            out[f"official at layer {args.topic_layer} x token h max"] = np.maximum(topic_official, 0) * match
            out[f"balanced at layer {args.topic_layer} x token h max"] = np.maximum(topic_balanced, 0) * match
        return out

    def _scores(pairs, spans) -> dict:
        span_text = [r[a:b] for (_, r), (a, b) in zip(pairs, spans)] if spans is not None else [r for _, r in pairs]
        full = extract(bundle, pairs, "query")
        span = extract(bundle, pairs, "query", spans) if spans is not None else full
        return {
            "bm25, query = the span's text": bm25(span_text),
            "official": signature_matrix(full.h, full.g, "official") @ official.T,
            "balanced": signature_matrix(full.h, full.g, "balanced") @ balanced.T,
            "repgrad": unit(full.g) @ row_g.T,
            "repsim": unit(full.h) @ row_h.T,
            "steer": unit(full.steer) @ row_steer.T,
            "steer, span query": unit(span.steer) @ row_steer.T,
            "steer span, rows centred": unit(span.steer) @ unit(rf.steer - rf.steer.mean(0)).T,
            "token g max (span query)": token_max(pooled(span.tok_g, span.offsets), rf.tok_g, rf.offsets),
            "token h max (span query)": token_max(pooled(span.tok_h, span.offsets), rf.tok_h, rf.offsets),
            "token h max x token g max": token_max(pooled(span.tok_h, span.offsets), rf.tok_h, rf.offsets)
            * np.maximum(token_max(pooled(span.tok_g, span.offsets), rf.tok_g, rf.offsets), 0),
            "aligned g (span query)": aligned(span, rf),
            "aligned g x h (span query)": aligned(span, rf, weigh_by_h=True),
            "continuation: nearest context, word match (span query)": continuation(span, rf),
            "continuation: best context x word (span query)": continuation(span, rf, best_pair=True),
        }

    groups = {
        "flagged": ([(q.prompt, q.response) for q in flagged], [match_span(detector, q.response) for q in flagged]),
        "control": ([(q.prompt, q.response) for q in controls], None),
        "edited control": ([(pr, r) for pr, _, r, _ in edits], [s for *_, s in edits]),
    }
    table = {}
    for group, (pairs, spans) in groups.items():
        if not pairs:
            continue
        for name, s in scores(pairs, spans).items():
            entry = table.setdefault(name, {})
            entry[f"{group} P@10"] = round(precision_at_k(s, relevant, 10), 3)
            if group == "flagged":
                entry["AP"] = round(average_precision(s, relevant), 3)
    # contrast: what made the model say the flagged answer rather than its edit, g(flagged) - g(edited)
    # at p (h is the same for both and cancels); flagged answers only, as the edited control's
    # contrast would be its mirror image
    a = extract(bundle, [(pr, fr) for pr, fr, _, _ in edits], "query")
    b = extract(bundle, [(pr, r) for pr, _, r, _ in edits], "query")
    for name, s in {"contrast g(flagged) - g(edited), at p": unit(a.g - b.g) @ row_g.T,
                    "contrast steer(flagged) - steer(edited)": unit(a.steer - b.steer) @ row_steer.T}.items():
        table[name] = {"flagged P@10": round(precision_at_k(s, relevant, 10), 3),
                       "AP": round(average_precision(s, relevant), 3)}
    # the same contrast at the positions that predict the flagged words (span queries on both sides:
    # the flagged answer's "Na" against its edit's "Ag", after the same prefix), scored per token
    a_span = extract(bundle, [(pr, fr) for pr, fr, _, _ in edits], "query",
                     [match_span(detector, fr) for _, fr, _, _ in edits])
    b_span = extract(bundle, [(pr, r) for pr, _, r, _ in edits], "query", [s for *_, s in edits])
    direction = unit(pooled(a_span.tok_g, a_span.offsets)) - unit(pooled(b_span.tok_g, b_span.offsets))
    extreme = token_extreme(direction, rf.tok_g, rf.offsets)
    extreme_mirror = token_extreme(-direction, rf.tok_g, rf.offsets)
    # topic AND direction: RepT's official score (the question's topic, clipped at 0) times the signed
    # token contrast, so that a row on the topic ranks by which way it pushed the flagged word
    topic_flagged = np.maximum(signature_matrix(a.h, a.g, "official") @ official.T, 0)
    topic_edited = np.maximum(signature_matrix(b.h, b.g, "official") @ official.T, 0)
    contrasts = {  # name: (the flagged answers' scores, the mirror's)
        "token g contrast max: span g(flagged) - span g(edited); edited control: the mirror":
            (token_max(direction, rf.tok_g, rf.offsets), token_max(-direction, rf.tok_g, rf.offsets)),
        "token g contrast extreme (sign kept); edited control: the mirror": (extreme, extreme_mirror),
        "official x token g contrast extreme; edited control: the mirror":
            (topic_flagged * extreme, topic_edited * extreme_mirror),
    }
    for name, (flagged_s, mirror_s) in contrasts.items():
        table[name] = {"flagged P@10": round(precision_at_k(flagged_s, relevant, 10), 3),
                       "AP": round(average_precision(flagged_s, relevant), 3),
                       "edited control P@10": round(precision_at_k(mirror_s, relevant, 10), 3)}
    if args.per_answer:  # which answers the signed contrast traces, and how long its direction is
        print("per answer, token g contrast extreme: P@10, |direction|, the flagged answer", file=sys.stderr)
        for i, (_, fr, _, _) in enumerate(edits):
            hit = precision_at_k(extreme[i:i + 1], relevant, 10)
            print(f"  {hit:.1f}  {np.linalg.norm(direction[i]):.3f}  {fr[:100]!r}", file=sys.stderr)
    counts = {k: len(v[0]) for k, v in groups.items()}
    print(f"{args.work}: layer {folder.layer}, {len(rows)} rows ({int(relevant.sum())} relevant), queries {counts}\n")
    print("| signature | flagged P@10 | AP | control P@10 | edited control P@10 |\n|---|---:|---:|---:|---:|")
    for name, m in table.items():
        print(f"| {name} | {m.get('flagged P@10', '-')} | {m.get('AP', '-')} | {m.get('control P@10', '-')} "
              f"| {m.get('edited control P@10', '-')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"work": args.work, "layer": folder.layer, "edit": args.edit,
                                               "checkpoint": args.checkpoint,
                                               "queries": counts, "results": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
