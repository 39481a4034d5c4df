"""The proving ground: train the two-stage CPU model on a poisoned dataset, make it misbehave,
and score every attribution method on tracing the misbehaviour back to the poisoned rows.

Stage 1: a tiny Llama (and its tokenizer) trained from scratch on the clean rows — or, with
`base`, a given Hugging Face causal LM (a real model, on a GPU) in its place.
Stage 2: a LoRA fine-tune of it on the whole (poisoned) set, Adam state saved for LESS.
Then: greedy answers to the test prompts (and, with `trigger`, to the same prompts without it,
as controls), a detector flags the behaviour, and each method ranks the training rows for every
flagged answer. A training row is relevant when its label is the behaviour's label; the methods
never see labels. Control queries (answers the detector did not flag) measure whether a method
traces the behaviour or merely the topic: their P@10 should be low.
"""

from rept.evaluate.bench.config import ALL_METHODS, COST, QUALITY, VARIANTS, BenchConfig, BenchError
from rept.evaluate.bench.results import results_markdown, seeds_markdown
from rept.evaluate.bench.run import run_bench, run_bench_seeds
from rept.evaluate.bench.stages import sample_rows, train_two_stage

__all__ = ["ALL_METHODS", "COST", "QUALITY", "VARIANTS", "BenchConfig", "BenchError", "results_markdown",
           "run_bench", "run_bench_seeds", "sample_rows", "seeds_markdown", "train_two_stage"]
