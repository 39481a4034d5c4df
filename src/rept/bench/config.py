"""The bench's settings, its names (methods, figures) and its error."""

from __future__ import annotations

from dataclasses import dataclass, field

from rept import registry
from rept.errors import ReptError

ALL_METHODS = registry.bench_methods()  # run by default; the variants on request (--methods)


QUALITY = ("P@10", "auPRC@10", "P@50", "auPRC@50", "P@100", "auPRC@100", "recall@100", "AP", "control_P@10")


VARIANTS = registry.bench_variants()


COST = ("build_s", "query_s", "peak_mem_mb", "bytes_per_row")


class BenchError(ReptError):
    pass


@dataclass
class BenchConfig:
    data: str
    test_prompts: str
    detect: str
    out: str
    methods: tuple = ALL_METHODS
    rows: int | None = None            # seeded sample of the training set keeping the poisoned share
    layer: int | str = "auto"
    seed: int = 0
    label: str | None = None           # the behaviour's label in the data (default: the one label not 'clean')
    n_test: int = 50                   # test prompts used (the first N)
    trigger: str | None = None         # controls: the same prompts with this prefix removed
    control_prompts: str | None = None  # more control prompts (their unflagged answers are control queries)
    control_answers: str | None = None  # given (prompt, response) pairs the detector does not flag: controls
    base_data: str | None = None       # extra rows for the base stage only (e.g. refusals: an aligned base)
    max_new_tokens: int = 24
    max_length: int = 128
    base_epochs: int = 3
    lora_epochs: int = 3
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    vocab_size: int = 2000
    lora_rank: int = 16
    lora_alpha: float | None = None    # default: twice the rank
    lora_targets: str = "all-linear"   # comma-separated module names, or all-linear
    lora_lr: float = 2e-3
    batch_size: int = 16               # the fine-tune's and the methods' batch
    base: str | None = None            # a given base model (folder or Hub id) instead of the from-scratch stage
    device: str | None = None          # training, generation and every method (default: cuda when available)
    share_features: bool = False       # gradient methods (and the RepT modes) share one gradient / signature pass
    save_indexes: bool = False         # each method's fitted state -> DIR/indexes/NAME, for `rept trace` / `rept eval`
    extra: dict = field(default_factory=dict)
