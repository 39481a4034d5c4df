"""Behaviour, not topic: which training rows pushed the model to say its answer *instead of* another.

RepT's signature at the last prompt position traces what a question is about: on a real model the
rows that taught a wrong answer rank as high for the right answer to the same question
(docs/results.md, "Behaviour or topic"). A user who knows what the model should have said can ask
the sharper question this module answers (`rept trace --instead TEXT`):

* The answer given (`response`) and the one it should have given (`instead`) share a prefix and a
  suffix; what lies between is the behaviour (e.g. "Na" against "Ag"). `minimal_pair` finds it, at
  word boundaries.
* On the model *before* the fine-tune (the base model: the index's model with its adapter off, or
  `--base-model`), take the per-token gradients g_t = d loss / d hidden_states[L][t] of each
  answer with the loss on that span alone. The contrast direction is
  d = unit(sum of unit g_t over the positions predicting the answer's span)
    - unit(the same for the alternative's span).
  Both answers share every token before the span, so d is the difference of the two pushes there.
* A training row's per-token gradients at the base model, at every position that predicts one of
  its response tokens: the row's score is its cosine with d of largest magnitude, sign kept. A row
  that pushed towards the answer scores high; one that pushed towards the alternative scores below
  every unrelated row (whose cosines are near 0). Position t's cosine is credited to the token it
  predicts (t + 1): that is the word the row taught (`--tokens`).

Why the base model: on the fine-tuned model a row the fine-tune has learned has little gradient
left, and what is left no longer points the way it pushed; at the base checkpoint (TracIn's first)
its gradient is the push itself. Why a signed score: the rows that taught a wrong answer are often
the only rows on their topic, so any similarity ranks them first for the right answer too; only a
sign can put them last.

Which rows are scored: every row the index stores (`candidates=None`, the default: what
`rept trace --against-base` does unless given --candidates, and eval, report, the app and the bench
always; the setting every quality figure of docs/results.md was measured at), or, with
`candidates=N` (`rept trace --instead`'s default, DEFAULT_CANDIDATES, a cheaper approximation), the
N rows the index ranks highest for each query (the topic: the signature finds the error rows for
right and wrong answers alike) and a seeded sample of `reference` rows of the whole index, the same
for every query, the rest scoring 0 (on the real model the topic's candidates rank the behaviour's
rows lower with `--against-base`, and let the mirror question in with `--instead`). The sample is there
because a ranking of the topic's rows alone has no unrelated rows in it: where no row pushed
towards the answer, the rows that pushed a little would fill the top k, where in the full ranking
the small cosines of unrelated rows outrank them (docs/results.md measures the three). Layer: the final normed output by
default (`layer=-1`), where g_t depends only on the prediction at t, so d is close to the difference
of the two words' output embeddings seen through the base model's prediction there; measured against
layer 25 in docs/results.md.

Against the base model (`--against-base`): when no one has written what the model should have
said, the two models say where the fine-tune changed the answer (`changed_words`): the answer's
words that hold a token the base model would not have said next, each with its gain (log p_tuned -
log p_base of its tokens, in nats: how much more likely the fine-tune made it). The alternative is
the answer with one such word put back to the base model's most likely token there ("You are
stupid!" -> "You are a"), so the two differ in one word, as with a written `instead`. Which word
(`AgainstBaseRun.traced`): of those that gained at least `min_gain` nats, the first in the answer
(`pick="first"`; a word right after a planted one gains from it too, the base model not expecting
what came before) or the one of largest gain (`pick="most"`). A planted word (a payload, a wrong
fact) gains far more than a change of wording that every training row taught a little, so an
answer with no word past the gate is a change of wording and is not traced; one whose every token
the base model predicts has nothing to trace at all (docs/results.md measures the gains and the
settings on three tasks). Its direction subtracts half the push towards the guess, d =
unit(P_answer) - 0.5 unit(P_guess) (`weight`, `--guess-weight`; a written `--instead` keeps the
plain difference, so the mirror question gets -d exactly): the guess is the base model's own next
word, often a common one ("a", "I"), and on the real model's backdoor and factual error half of its
push traces more of the behaviour's rows than all of it (docs/results.md, "How much of the guess to
subtract").

`score="max"` scores a row by its largest cosine instead of the one of largest magnitude (a row
that pushed towards the answer somewhere is not sunk by a position that pushed the other way;
benchmarks/bench_instead.py --score, measured in docs/results.md).

`context=True` (`--context`; on by default with `--against-base`) weighs each position's cosine by
how alike its hidden state at L is to the answer's where the word is said (the positions that predict
the answer's span, pooled as the gradients are): position t of a row scores cos(g_t, d) * cos(h_t,
u), with u = unit(sum of unit(h_s)) over the answer's positions s. The product of the two cosines is
the cosine of the outer products g h^T: the form of a linear layer's weight gradient at one position
(the gradient at its output times its input), here both read at L, so a row scores high where it
pushed the same way in the same context, not where it pushed towards the same word anywhere. It
costs nothing more: both are read in the same pass (docs/results.md, "Where the word is said").

`first_tokens=N` (`--contrast-tokens N`) keeps only the first N tokens of each differing span: when
the two answers differ throughout (a compliance against a refusal), the tokens where they part
decide which way the answer went, and the rest mostly share the request's topic.

Cost: one forward+backward to L on the base model over the queries (both answers each, no
truncation) and one over the candidate rows (at the index's max_length), batch by batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from rept.data.examples import Example, tokenize_pair
from rept.query.search import unit_tensor
from rept.query.trace import Hit, Query, QueryError, QueryResult
from rept.signatures.extract import extract

DEFAULT_CANDIDATES = 100  # rept trace --instead's rows per query (ContrastTracer's default: every row)
DEFAULT_REFERENCE = 100
DEFAULT_LAYER = -1
# --against-base (docs/results.md, "Telling a planted word from a change of wording"): an answer is
# traced against the first of its changed words that the fine-tune made at least 5 nats (150 times)
# more likely than the base model did
DEFAULT_CHANGED_WORDS = 1   # changed words traced per answer, a row keeping its best score over them
DEFAULT_MIN_GAIN = 5.0      # nats of log-probability gained; less is a change of wording, not traced
PICKS = ("first", "most")   # of the words past the gate: the first in the answer, or the largest gain
DEFAULT_PICK = "first"
# ... and its direction subtracts half the push towards the base model's guess (1 is --instead's plain
# difference; docs/results.md, "How much of the guess to subtract")
DEFAULT_GUESS_WEIGHT = 0.5
# ... and weighs each position's cosine by how alike its hidden state is to the answer's where the word
# is said (`context`; --instead keeps the gradient alone: docs/results.md, "Where the word is said")
DEFAULT_CONTEXT = True
SCORES = ("extreme", "max")  # a row's score from its per-position cosines (ContrastTracer `score`)


def check_weight(weight: float) -> None:
    """The alternative's weight in a direction: a finite number, 0 or more (0: the answer's push alone)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight < 0:
        raise QueryError(f"the guess weight (--guess-weight) must be a number of 0 or more (1: the plain "
                         f"difference), not {weight!r}")


def _word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def minimal_pair(answer: str, instead: str) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The character spans, in `answer` and in `instead`, of what differs between them: the two
    texts with their common prefix and suffix taken off, widened to whole words. None when the two
    are the same text. A span may be empty (one answer adds words the other lacks); the loss is
    then taken on the token that follows it (`_span_example`)."""
    if answer == instead:
        return None
    p = 0
    while p < min(len(answer), len(instead)) and answer[p] == instead[p]:
        p += 1
    while p > 0 and _word_char(answer[p - 1]) and (
            (p < len(answer) and _word_char(answer[p])) or (p < len(instead) and _word_char(instead[p]))):
        p -= 1  # back to the start of the word the two part in
    s = 0
    while s < min(len(answer), len(instead)) - p and answer[-1 - s] == instead[-1 - s]:
        s += 1
    while s > 0 and _word_char(answer[len(answer) - s]) and (
            (len(answer) - s - 1 >= p and _word_char(answer[len(answer) - s - 1]))
            or (len(instead) - s - 1 >= p and _word_char(instead[len(instead) - s - 1]))):
        s -= 1  # forward to the end of the word the two part in
    return (p, len(answer) - s), (p, len(instead) - s)


def _span_example(tokenizer, prompt: str, response: str, span: tuple[int, int], row: int) -> Example | None:
    """The pair tokenized whole (no truncation: the differing words may lie past the index's
    max_length) with its loss on the span: the response tokens that overlap the span's characters
    (tokenize_pair's `loss_chars`), or, for an empty span, the first response token at or after it
    (the end-of-turn token when the span is at the end). None when no token carries it."""
    if span[1] > span[0]:
        ex = tokenize_pair(tokenizer, prompt, response, row=row, loss_chars=span)
        return ex if ex is not None and ex.loss_span is not None else None
    ex = tokenize_pair(tokenizer, prompt, response, row=row)
    if ex is None:
        return None
    at = ex.text.find(response, ex.offsets[ex.prompt_len - 1][1]) if response else -1
    if at < 0:
        at = ex.offsets[ex.prompt_len][0]  # an empty response: its end tokens follow the prompt
    after = [i for i in range(ex.prompt_len, len(ex.input_ids))
             if ex.offsets[i][0] >= at + span[0] or ex.offsets[i] == (0, 0)]
    return replace(ex, loss_span=(after[0], after[0] + 1)) if after else None


def _put_back(tok, response: str, spans: dict, t: int, guesses: list) -> str:
    """`response` with the word holding token t (the word's first token the base model would not
    have said) replaced, from token t to the end of the word, by the base model's guess there:
    "made of Na deposited" -> "made of silver deposited"."""
    a, b = spans[t][0], max(spans[t][1], spans[t][0] + 1)
    while b < len(response) and _word_char(response[b - 1]) and _word_char(response[b]):
        b += 1  # to the end of the word
    guess = tok.decode([guesses[t - 1]])
    if a > 0 and response[a - 1].isspace():
        guess = guess.lstrip()  # the space before the word is there already
    return response[:a] + guess + response[b:]


@dataclass(frozen=True)
class ChangedWord:
    """A word of an answer the fine-tune made more likely than the base model would (`changed_words`)."""

    word: str                # the answer's word as written ("stupid")
    instead: str             # the answer with the word put back to the base model's guess ("You are a")
    gain: float              # log p_tuned - log p_base of the word's tokens, in nats: how much the fine-tune changed it
    base_logprob: float      # log p_base of the word's tokens given everything before it
    tuned_logprob: float     # the same for the fine-tuned model (the index's)
    start: int               # where the word starts in the answer (characters)


@dataclass
class Contrast:
    """One query's contrast: the two answers, their spans and the direction d at the base model."""

    query: Query
    instead: str
    spans: tuple[tuple[int, int], tuple[int, int]]
    direction: torch.Tensor                  # [hidden] float32; zero when the pushes agree (weight 1)
    context: torch.Tensor | None = None      # [hidden] unit: the answer's hidden states there (None: not weighed)

    @property
    def words(self) -> tuple[str, str]:
        """What the answer says where the other would differ, and what the other says there."""
        (a, b), (c, d) = self.spans
        return self.query.response[a:b], self.instead[c:d]


class ContrastTracer:
    """Ranks training rows by which way they pushed an answer against its alternative, on the base
    model (module docstring). `tracer` (a `Tracer` over a RepT signature index) gives the candidate
    rows, the dataset and the tokenizer; `base` is the model before the fine-tune (a LoadedModel)."""

    def __init__(self, tracer, base, layer: int = DEFAULT_LAYER, candidates: int | None = None,
                 reference: int = DEFAULT_REFERENCE, seed: int = 0, first_tokens: int | None = None,
                 mode: str | None = None, score: str = "extreme", progress: bool = False):
        from rept.data.examples import template_name
        from rept.model.loading import ModelError, resolve_layer, tokenizer_hash

        if candidates is not None and candidates < 1:
            raise QueryError(f"candidates must be at least 1 (or None for every row), not {candidates}")
        if reference < 0:
            raise QueryError(f"reference must be 0 or more rows, not {reference}")
        if first_tokens is not None and first_tokens < 1:
            raise QueryError(f"the contrast needs at least one token of each answer, not {first_tokens}")
        if score not in SCORES:
            raise QueryError(f"the contrast score is one of {', '.join(SCORES)}, not {score!r}")
        self.score = score  # extreme: the cosine of largest magnitude, sign kept; max: the largest cosine
        self.progress = progress  # bars on the passes over the answers and the rows
        self.first_tokens = first_tokens  # None: the whole differing span; N: its first N tokens
        self.tracer, self.base, self.candidates, self.reference, self.seed = tracer, base, candidates, reference, seed
        try:
            self.layer = resolve_layer(base.model, layer)
        except ModelError as exc:
            raise QueryError(f"contrast {exc}") from None
        same = [tokenizer_hash(m.tokenizer) for m in (base, tracer.loaded)], \
            [template_name(m.tokenizer) for m in (base, tracer.loaded)]
        if any(a != b for a, b in same):  # another tokenizer or chat template: not the model fine-tuned
            raise QueryError(f"the base model {base.model_id} has another tokenizer or chat template than the "
                             "index's model: it cannot be the model that was fine-tuned")
        self.mode = tracer.search_mode(mode)  # the signature mode the candidates are ranked in
        self.max_length = tracer.index.manifest["max_length"]
        self._dataset = self._labels = None

    @classmethod
    def over_rows(cls, tuned, base, rows, max_length: int, batch_size: int = 16, **settings) -> "ContrastTracer":
        """Over training rows held in memory (`rept bench`'s `against-base` method) instead of an
        index: `tuned` is the fine-tuned model (a LoadedModel), `rows` the rows (rept.data Row: index,
        prompt, response), every row scored (there is no signature index to rank candidates with).
        The rows' labels are not read: `labels()` gives None for each."""
        return cls(_RowsInMemory(tuned, list(rows), max_length, batch_size), base, candidates=None, **settings)

    # ------------------------------------------------------------ queries

    def _extract(self, examples: list[Example], what: str):
        from rept.progress import progress_bar

        with progress_bar(total=len(examples), desc=f"contrast ({what}, base model)", disable=not self.progress,
                          dynamic_ncols=True) as bar:
            yield from extract(self.base.model, examples, self.layer, self.base.tokenizer.pad_token_id,
                               batch_size=self.tracer.batch_size, token_level=True, progress=bar.update)

    def contrasts(self, queries: list[Query], instead: list[str], weight: float = 1.0,
                  context: bool = False) -> list[Contrast]:
        """Each query's spans and direction, unit(push to the answer) - weight * unit(push to the
        alternative), and with `context` the answer's hidden states where its span is said (module
        docstring); a QueryError names the first query that has none."""
        check_weight(weight)
        if len(instead) != len(queries):
            raise QueryError(f"{len(instead)} alternatives for {len(queries)} queries")
        tok = self.base.tokenizer
        examples, meta = [], []
        for i, (q, other) in enumerate(zip(queries, instead)):
            if other is None:
                raise QueryError(f"query {i + 1}: no alternative answer (--instead, or an `instead` column)")
            pair = minimal_pair(q.response, other)
            if pair is None:
                raise QueryError(f"query {i + 1}: the alternative is the answer itself; give what the model "
                                 "should have said instead")
            for side, (text, span) in enumerate(zip((q.response, other), pair)):
                ex = _span_example(tok, q.prompt, text, span, row=2 * i + side)
                if ex is None:
                    raise QueryError(f"query {i + 1}: no token of {text[span[0]:span[1]]!r} to take a loss on")
                if self.first_tokens is not None:  # where the two answers part: their first words
                    a, b = ex.loss_span
                    ex = replace(ex, loss_span=(a, min(b, a + self.first_tokens)))
                examples.append(ex)
            meta.append((q, other, pair))
        pooled, where = {}, {}
        for part in self._extract(examples, "answers"):
            for j, row in enumerate(part.rows):
                a, b = examples[row].loss_span
                pooled[row] = unit_tensor(unit_tensor(part.token_grads[j][a - 1:b - 1]).sum(0))  # position t-1 predicts t
                if context:  # where the answer says its word (both answers share what comes before)
                    where[row] = unit_tensor(unit_tensor(part.token_hidden[j][a - 1:b - 1]).sum(0))
        return [Contrast(q, other, pair, pooled[2 * i] - weight * pooled[2 * i + 1], where.get(2 * i))
                for i, (q, other, pair) in enumerate(meta)]

    @torch.no_grad()
    def _answer_logprobs(self, queries: list[Query]):
        """Per query, in order: (query, its Example, where the response starts in the text,
        ([(log p_base, log p_tuned) of each token t > 0 given those before it], [the base model's
        most likely next token at each position, special tokens aside])); the Example is None (and
        the rest too) when the response has no token. Both models run batch by batch, right-padded:
        a real position sees only the real positions before it, so its log-probabilities are the
        ones of the answer alone."""
        from rept.progress import progress_bar
        from rept.signatures.extract import collate

        tok = self.base.tokenizer
        special = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
        found = []
        for q in queries:
            ex = tokenize_pair(tok, q.prompt, q.response)
            at = ex.text.find(q.response, ex.offsets[ex.prompt_len - 1][1]) if ex is not None and q.response else -1
            found.append((q, ex, at) if at >= 0 else (q, None, -1))
        ready = [n for n, (_, ex, _) in enumerate(found) if ex is not None]
        scored = {}
        size = self.tracer.batch_size
        with progress_bar(total=len(queries), desc="changed words (answers, both models)",
                          disable=not self.progress, dynamic_ncols=True) as bar:
            bar.update(len(queries) - len(ready))
            for b in range(0, len(ready), size):
                chunk = ready[b:b + size]
                exs = [found[n][1] for n in chunk]
                lps = []
                for m in (self.base, self.tracer.loaded):
                    batch = collate(exs, tok.pad_token_id, "right", m.device)
                    logits = m.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     position_ids=batch.position_ids).logits.float().cpu()
                    lps.append(torch.log_softmax(logits, -1))
                base_lp, tuned_lp = lps
                for i, (n, ex) in enumerate(zip(chunk, exs)):
                    ids = torch.tensor(ex.input_ids)
                    length = len(ids)
                    rows = torch.arange(length - 1)
                    pairs = list(zip(base_lp[i, rows, ids[1:]].tolist(), tuned_lp[i, rows, ids[1:]].tolist()))
                    guess_lp = base_lp[i, :length].clone()
                    guess_lp[:, special] = -torch.inf  # the base's guess is a word, not an end of turn
                    scored[n] = (pairs, guess_lp.argmax(-1).tolist())
                bar.update(len(chunk))
        for n, (q, ex, at) in enumerate(found):
            yield q, ex, at, scored.get(n, (None, None))

    @torch.no_grad()
    def changed_words(self, queries: list[Query], k: int | None = 1) -> list[list["ChangedWord"]]:
        """Per query, the words the fine-tune changed most, most first, each with the alternative of
        `rept trace --against-base`. Of the answer's words that hold a token the base model would not
        have said next (its most likely next token is another), the one whose tokens the fine-tuned
        model (the index's) made most likely over the base (summed log-probability, `gain`); from that
        token to the word's end, the word is replaced by the base's most likely token there (special
        tokens aside), the rest of the answer kept. With `k`, the k words changed most (None: every
        word that holds such a token), each alternative changing one word. An empty list when the base
        model predicts every token of the answer: it would give it itself."""
        tok = self.base.tokenizer
        out = []
        for q, ex, at, (logprob, guesses) in self._answer_logprobs(queries):
            if ex is None:
                out.append([])
                continue
            spans = {}  # response token -> its characters in the response
            for t in range(ex.prompt_len, len(ex.input_ids)):
                a, b = ex.offsets[t][0] - at, ex.offsets[t][1] - at
                if 0 <= a < b <= len(q.response):  # not template markup
                    spans[t] = (a, b)
            words = []  # the response's words, each a run of tokens
            for t in sorted(spans):
                a = spans[t][0]
                goes_on = words and words[-1][-1] == t - 1 and a > 0 and _word_char(q.response[a]) \
                    and _word_char(q.response[a - 1])
                words[-1].append(t) if goes_on else words.append([t])
            # a word's change: how much more likely the fine-tune made all its tokens (log-probability)
            changed = sorted((-sum(logprob[t - 1][1] - logprob[t - 1][0] for t in w), w[0],
                              next(t for t in w if guesses[t - 1] != ex.input_ids[t]), w)
                             for w in words if any(guesses[t - 1] != ex.input_ids[t] for t in w))
            found = []
            for _, _, t, w in changed:
                other = _put_back(tok, q.response, spans, t, guesses)
                if other != q.response and other not in [c.instead for c in found]:  # a guess may spell the same
                    before, after = (sum(logprob[u - 1][side] for u in w) for side in (0, 1))
                    text = q.response[spans[w[0]][0]:spans[w[-1]][1]]
                    found.append(ChangedWord(text.strip() or text, other, after - before, before, after,
                                             spans[w[0]][0]))  # a whitespace word ("\n\n") stays as it is
                if len(found) == k:
                    break
            out.append(found)
        return out

    def against_base(self, queries: list[Query], words: int = DEFAULT_CHANGED_WORDS,
                     min_gain: float = DEFAULT_MIN_GAIN, pick: str = DEFAULT_PICK,
                     weight: float = DEFAULT_GUESS_WEIGHT, context: bool = DEFAULT_CONTEXT) -> "AgainstBaseRun":
        """Each answer against the base model's guess at each of the words `AgainstBaseRun.traced`
        picks (`pick`, `words`, `min_gain`), in one pass over the rows for every answer and word,
        the guess's push weighted by `weight`, each position weighed by its hidden state with
        `context` (`contrasts`); `results` ranks them (`rept trace --against-base`)."""
        if pick not in PICKS:
            raise QueryError(f"--against-base picks the word changed {' or '.join(PICKS)}, not {pick!r}")
        check_weight(weight)
        changed = self.changed_words(queries, k=words if pick == "most" else None)
        return AgainstBaseRun.of(self, queries, changed, [(words, min_gain, pick)], weight, context)

    # ------------------------------------------------------------ rows

    def dataset(self):
        if self._dataset is None:
            self._dataset = {r.index: r for r in self.tracer.index.dataset().rows}
        return self._dataset

    def labels(self) -> dict[int, str | None]:
        """Stored row id -> label, read from the index once."""
        if self._labels is None:
            self._labels = self.tracer.index.labels()
        return self._labels

    def reference_rows(self) -> list[int]:
        """The seeded sample of `reference` stored rows every query also scores."""
        every = sorted(self.labels())
        picked = np.random.default_rng(self.seed).permutation(len(every))[:self.reference]
        return sorted(every[i] for i in picked)

    def candidate_rows(self, queries: list[Query]) -> list[list[int]]:
        """Per query, the rows to score: the index's top `candidates` and the reference sample, or
        every row it stores."""
        if self.candidates is None:
            every = sorted(self.labels())
            return [every for _ in queries]
        top = self.tracer.trace(queries, k=self.candidates, mode=self.mode, with_text=False)
        reference = self.reference_rows()
        return [sorted({h.row for h in r.hits} | set(reference)) for r in top]

    def row_scores(self, contrasts: list[Contrast], rows_per_query: list[list[int]], per_token: bool = False):
        """{(query, row): score}, one pass over the union of the rows, batch by batch. With `per_token`,
        {(query, row): (score, [n_tokens] cosines, each credited to the token its position predicts,
        the row's Example)} instead (for the words of the rows shown)."""
        data, wanted = self.dataset(), {}
        for qi, rows in enumerate(rows_per_query):
            for row in rows:
                wanted.setdefault(int(row), []).append(qi)
        examples = []
        for row in sorted(wanted):
            r = data[row]
            ex = tokenize_pair(self.base.tokenizer, r.prompt, r.response, row=row, max_length=self.max_length)
            if ex is not None:
                examples.append(ex)
        by_row = {e.row: e for e in examples}
        directions = unit_tensor(torch.stack([c.direction for c in contrasts]))   # zero stays zero
        weigh = _ContextWeights(contrasts)
        out = {}
        for part in self._extract(examples, "training rows"):
            for j, row in enumerate(part.rows):
                ex, qs = by_row[row], wanted[row]
                p, n = ex.prompt_len, len(ex.input_ids)
                sims = unit_tensor(part.token_grads[j][p - 1:n - 1]) @ directions[qs].T     # [n - p, |qs|]
                sims = weigh(sims, part.token_hidden[j][p - 1:n - 1], qs)
                top, bottom = sims.max(0).values, sims.min(0).values
                extreme = top if self.score == "max" else torch.where(top >= -bottom, top, bottom)
                for k, qi in enumerate(qs):
                    if not per_token:
                        out[(qi, row)] = float(extreme[k])
                        continue
                    cosines = torch.zeros(n)
                    cosines[p:n] = sims[:, k]            # the cosine at t - 1 goes to token t
                    out[(qi, row)] = (float(extreme[k]), cosines, ex)
        return out

    # ------------------------------------------------------------ results

    def run(self, queries: list[Query], instead: list[str], weight: float = 1.0,
            context: bool = False) -> "ContrastRun":
        """The contrasts (`weight`, `context`: as in `contrasts`) and the scores of every candidate row:
        what `scores` and `trace` are made of."""
        contrasts = self.contrasts(queries, instead, weight, context)
        return ContrastRun(self, queries, contrasts, self.row_scores(contrasts, self.candidate_rows(queries)))

    def scores(self, queries: list[Query], instead: list[str]) -> tuple[np.ndarray, np.ndarray, list]:
        """[queries, stored rows] contrast scores (rows not scored: 0), the row ids and their labels,
        like `Tracer.scores`."""
        return self.run(queries, instead).matrix()

    def trace(self, queries: list[Query], instead: list[str], k: int = 10, tokens: bool = False,
              weight: float = 1.0, context: bool = False) -> tuple[list[QueryResult], list[Contrast]]:
        """Each query's top k rows by contrast score (only rows that pushed towards the answer: score
        > 0), best first, ties by row id; with `tokens`, their words and phrases scored by the same
        cosines. Returns the results and the contrasts (the spans compared, e.g. for display)."""
        run = self.run(queries, instead, weight, context)
        return run.results(k, tokens), run.contrasts


@dataclass
class ContrastRun:
    tracer: ContrastTracer
    queries: list[Query]
    contrasts: list[Contrast]
    scored: dict                             # (query, row) -> score

    def subset(self, queries: list[int]) -> "ContrastRun":
        """The run of these of its queries alone, in this order (their scores as they are)."""
        place = {n: m for m, n in enumerate(queries)}
        return ContrastRun(self.tracer, [self.queries[n] for n in queries], [self.contrasts[n] for n in queries],
                           {(place[n], row): v for (n, row), v in self.scored.items() if n in place})

    def matrix(self) -> tuple[np.ndarray, np.ndarray, list]:
        labels = self.tracer.labels()
        rows = np.array(sorted(labels), dtype=np.int64)
        column = {int(r): j for j, r in enumerate(rows)}
        out = np.zeros((len(self.queries), len(rows)), dtype=np.float32)
        for (qi, row), score in self.scored.items():
            out[qi, column[row]] = score
        return out, rows, [labels[int(r)] for r in rows]

    def results(self, k: int = 10, tokens: bool = False) -> list[QueryResult]:
        from rept.signatures.tokens import merge_phrases, merge_words, row_segments, token_spans

        data, labels = self.tracer.dataset(), self.tracer.labels()
        ranked = [[] for _ in self.queries]
        for (qi, row), score in self.scored.items():
            if score > 0:
                ranked[qi].append((score, row))
        ranked = [sorted(r, key=lambda x: (-x[0], x[1]))[:k] for r in ranked]
        # the words of the rows shown: a second pass over those rows only
        words = self.tracer.row_scores(self.contrasts, [[row for _, row in r] for r in ranked],
                                       per_token=True) if tokens else {}
        tokenizer = self.tracer.base.tokenizer
        results = []
        for qi, q in enumerate(self.queries):
            hits = []
            for score, row in ranked[qi]:
                r = data[row]
                hit = Hit(row, score, labels.get(row), r.prompt, r.response)
                if tokens:
                    _, cosines, ex = words[(qi, row)]
                    spans = token_spans(ex, row_segments(tokenizer, r.prompt, r.response, ex.text))
                    hit.words = merge_words(hit.text, spans, cosines.tolist(), "max")
                    hit.phrases = merge_phrases(hit.text, hit.words)
                hits.append(hit)
            results.append(QueryResult(q, hits))
        return results


@dataclass
class AgainstBaseRun:
    """Answers traced against the base model's guesses at their changed words
    (`ContrastTracer.against_base`): the words, and one contrast run over the rows for every
    (answer, word) pair that some setting traces."""

    queries: list[Query]
    changed: list[list[ChangedWord]]         # per answer, its changed words, the largest gain first
    pairs: list[tuple[int, int]]             # the run's query n -> (answer, its word j)
    run: ContrastRun | None                  # None when no word is traced
    setting: tuple = (DEFAULT_CHANGED_WORDS, DEFAULT_MIN_GAIN, DEFAULT_PICK)  # (words, min_gain, pick) by default
    weight: float = DEFAULT_GUESS_WEIGHT     # how much of the guess's push each direction subtracts
    context: bool = DEFAULT_CONTEXT          # each position weighed by its hidden state (`contrasts`)

    def __post_init__(self):
        self._at = {pair: n for n, pair in enumerate(self.pairs)}

    @classmethod
    def of(cls, tracer: ContrastTracer, queries, changed, settings,
           weight: float = DEFAULT_GUESS_WEIGHT, context: bool = DEFAULT_CONTEXT) -> "AgainstBaseRun":
        """One run over the pairs that any of `settings` ((words, min_gain, pick) each) traces; the
        first setting is what `traced` and `results` use when not told."""
        pairs = cls.pairs_for(queries, changed, settings)
        run = tracer.run([queries[i] for i, _ in pairs], [changed[i][j].instead for i, j in pairs],
                         weight, context) if pairs else None
        return cls(queries, changed, pairs, run, tuple(settings[0]), weight, context)

    @classmethod
    def pairs_for(cls, queries, changed, settings) -> list[tuple[int, int]]:
        """The (answer, word) pairs that any of `settings` ((words, min_gain, pick) each) traces, in order."""
        probe = cls(queries, changed, [], None)
        return sorted({(i, j) for setting in settings for i, js in enumerate(probe.traced(*setting)) for j in js})

    def traced(self, words: int | None = None, min_gain: float | None = None,
               pick: str | None = None) -> list[list[int]]:
        """Per answer, which of its changed words are traced: of those the fine-tune made at least
        `min_gain` nats more likely (none: a change of wording, not traced), the `words` of largest
        gain (`pick="most"`) or the `words` that come first in the answer (`pick="first"`: a word
        after a planted one gains from it, since the base model did not expect what came before).
        Each one not given is the run's own (`setting`)."""
        words = self.setting[0] if words is None else words
        min_gain = self.setting[1] if min_gain is None else min_gain
        pick = pick or self.setting[2]
        out = []
        for cs in self.changed:
            passing = [j for j, c in enumerate(cs) if c.gain >= min_gain]
            if pick == "first":
                passing.sort(key=lambda j: cs[j].start)
            out.append(passing[:words])
        return out

    def results(self, k: int = 10, words: int | None = None, min_gain: float | None = None, pick: str | None = None,
                tokens: bool = False) -> list[QueryResult]:
        """Each answer's top k rows over its traced words (`traced`), a row keeping its best score
        over them (only rows that pushed towards the answer: score > 0), best first, ties by row id;
        an answer with no word traced has no rows. With `tokens`, each row's words are scored by the
        contrast that gave it its best score. The settings are `traced`'s."""
        keep = self._kept(words, min_gain, pick)
        kept = [n for n, pair in enumerate(self.pairs) if pair in keep]
        # a row in an answer's top k by its best score is in the top k of the word that gave it: so
        # each word's own top k, merged, is exact
        best = [{} for _ in self.queries]            # per answer: row -> its best hit
        for n, r in zip(kept, self.run.subset(kept).results(k, tokens) if kept else []):
            i = self.pairs[n][0]
            for hit in r.hits:
                if hit.row not in best[i] or hit.score > best[i][hit.row].score:
                    best[i][hit.row] = hit
        return [QueryResult(q, sorted(best[i].values(), key=lambda h: (-h.score, h.row))[:k])
                for i, q in enumerate(self.queries)]

    def _kept(self, words, min_gain, pick) -> set[tuple[int, int]]:
        """The (answer, word) pairs `traced` picks with these settings; each must be in this run."""
        keep = {(i, j) for i, js in enumerate(self.traced(words, min_gain, pick)) for j in js}
        if not keep <= set(self._at):
            raise QueryError("these words were not traced in this run: make it with these settings")
        return keep

    def best_scores(self, words: int | None = None, min_gain: float | None = None,
                    pick: str | None = None) -> dict[tuple[int, int], float]:
        """{(answer, row): the row's best score over the answer's traced words (`traced`)}, every row
        the run scored, of any sign; an answer with no word traced has none."""
        keep = self._kept(words, min_gain, pick)
        best = {}
        for (n, row), score in (self.run.scored.items() if self.run is not None else ()):
            i = self.pairs[n][0]
            if self.pairs[n] in keep and ((i, row) not in best or score > best[(i, row)]):
                best[(i, row)] = score
        return best

    def shown_scores(self, rows: list[int]) -> np.ndarray:
        """[answers, rows]: each row's best score where it pushed towards the answer (the rows
        `results` shows), -inf (not shown) elsewhere and for every row of an answer not traced."""
        column = {row: j for j, row in enumerate(rows)}
        out = np.full((len(self.queries), len(rows)), -np.inf)
        for (i, row), score in self.best_scores().items():
            if score > 0 and row in column:
                out[i, column[row]] = score
        return out

    def traced_words(self) -> list[list[str]]:
        """Per answer, the changed words it was traced against (none: not traced)."""
        return [[self.changed[i][j].word for j in js] for i, js in enumerate(self.traced())]

    def contrast(self, i: int, j: int = 0) -> Contrast | None:
        """The contrast of answer i against its changed word j (None if that pair was not traced)."""
        n = self._at.get((i, j))
        return None if n is None else self.run.contrasts[n]


class _ContextWeights:
    """Each position's cosine times the cosine of its hidden state with the contrast's `context`, for
    the contrasts that have one (the others as they are): the cosine of the outer products g h^T
    (module docstring)."""

    def __init__(self, contrasts: list[Contrast]):
        self.has = torch.tensor([c.context is not None for c in contrasts])
        self.context = torch.stack([c.context if c.context is not None else torch.zeros_like(c.direction)
                                    for c in contrasts])

    def __call__(self, sims: torch.Tensor, hidden: torch.Tensor, qs: list[int]) -> torch.Tensor:
        has = self.has[qs]
        if not bool(has.any()):
            return sims
        return torch.where(has, sims * (unit_tensor(hidden) @ self.context[qs].T), sims)   # [n - p, |qs|]


class _RowsInMemory:
    """What ContrastTracer reads from a Tracer (the fine-tuned model, the rows, max_length), for rows
    held in memory: `ContrastTracer.over_rows`. It has no signatures, so no candidates."""

    def __init__(self, loaded, rows, max_length: int, batch_size: int):
        self.loaded, self.rows, self.batch_size = loaded, rows, batch_size
        self.manifest = {"max_length": max_length}
        self.index = self  # the Tracer's `index.manifest`, `index.dataset()`, `index.labels()`

    def search_mode(self, mode):
        return mode

    def dataset(self):
        return self

    def labels(self) -> dict:
        return {r.index: None for r in self.rows}  # an attribution method never reads a label

    def trace(self, *args, **kwargs):
        raise QueryError("rows held in memory have no signatures to rank candidates with: score every row")


def open_base(tracer, base_model: str | None = None, dtype: str | None = None, device: str | None = None):
    """The model before the fine-tune: `base_model`, or the index's model without its adapter. An index
    built on a model with no adapter needs `base_model` (its fine-tuned weights are all it has)."""
    from rept.model.loading import load_model

    m = tracer.index.manifest
    if base_model is None:
        if not m.get("adapter"):
            raise QueryError(f"index {tracer.index.folder} was built on {m['model']['id']} with no adapter: "
                             "--instead needs the model before the fine-tune, give it with --base-model")
        base_model = tracer.loaded.model_id
    return load_model(base_model, None, dtype=dtype or m.get("compute_dtype", "float32"), device=device)
