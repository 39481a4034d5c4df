"""The bench's settings, its names (methods, figures) and its error."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from rept import registry
from rept.errors import ReptError
from rept.model.train import LoraSettings, TrainConfig

ALL_METHODS = registry.bench_methods()  # run by default; the variants on request (--methods)


QUALITY = ("P@10", "auPRC@10", "P@50", "auPRC@50", "P@100", "auPRC@100", "recall@100", "AP", "control_P@10")


VARIANTS = registry.bench_variants()


COST = ("build_s", "query_s", "peak_mem_mb", "bytes_per_row")


class BenchError(ReptError):
    pass


def default_base_stage() -> TrainConfig:
    """The from-scratch base model's training (a tiny Llama and its tokenizer, on the clean rows)."""
    return TrainConfig(epochs=3, lr=3e-3, batch_size=16, hidden=128, layers=2, heads=4, vocab_size=2000)


def default_lora_stage() -> TrainConfig:
    """The LoRA fine-tune on the whole (poisoned) set; its batch size is also every method's."""
    return TrainConfig(epochs=3, lr=2e-3, batch_size=16, warmup_steps=10)


@dataclass
class BenchConfig:
    """One bench run. The two training stages and the LoRA are the library's own settings objects
    (rept.model.train), composed here, not copied: `seed` and `max_length` are the bench's and
    override the stages' own (one seed and one length for the whole run)."""
    data: str
    test_prompts: str
    detect: str
    out: str
    methods: tuple = ALL_METHODS
    rows: int | None = None            # seeded sample of the training set keeping the poisoned share
    share: float | None = None         # ... or with this share of behaviour rows (needs rows)
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
    base_stage: TrainConfig = field(default_factory=default_base_stage)
    lora_stage: TrainConfig = field(default_factory=default_lora_stage)
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(rank=16, alpha=32.0))
    base: str | None = None            # a given base model (folder or Hub id) instead of the from-scratch stage
    device: str | None = None          # training, generation and every method (default: cuda when available)
    share_features: bool = False       # gradient methods (and the RepT modes) share one gradient / signature pass
    save_indexes: bool = False         # each method's fitted state -> DIR/indexes/NAME, for `rept trace` / `rept eval`
    against_base: dict = field(default_factory=dict)  # the against-base method's words, min_gain, pick if given
    extra: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """Rows per step of the fine-tune and per batch of every method."""
        return self.lora_stage.batch_size

    def base_training(self) -> TrainConfig:
        return replace(self.base_stage, seed=self.seed, max_length=self.max_length)

    def lora_training(self) -> TrainConfig:
        return replace(self.lora_stage, seed=self.seed, max_length=self.max_length)

    def record(self) -> dict:
        """The settings as results.json records them. The record keeps the flat shape it had before
        the stages were composed (an earlier run's methods are kept only when its record equals this
        one, so bench folders written before still resume)."""
        base, lora, lora_stage = self.base_stage, self.lora, self.lora_stage
        own = {name: getattr(self, name) for name in self.__dataclass_fields__
               if name not in ("out", "base_stage", "lora_stage", "lora")
               and not (name == "share" and self.share is None)  # recorded only when given
               and not (name == "against_base" and not self.against_base)}
        return {**own, "base_epochs": base.epochs, "hidden": base.hidden, "layers": base.layers, "heads": base.heads,
                "vocab_size": base.vocab_size, "lora_epochs": lora_stage.epochs, "lora_lr": lora_stage.lr,
                "batch_size": lora_stage.batch_size, "lora_rank": lora.rank,
                "lora_alpha": None if lora.alpha == 2.0 * lora.rank else lora.alpha,  # None: "twice the rank"
                "lora_targets": lora.target_modules}
