"""Gradient-based baselines on the fine-tuned (trainable) parameters.

- TracIn: dot product of per-example loss gradients (final checkpoint).
- LESS (Xia et al. 2024): training gradients preconditioned by the saved Adam state as the
  authors do (m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2, m' / sqrt(v' + eps)), query gradients
  plain; both projected to 8192 dims by a seeded Rademacher matrix generated block by block;
  cosine similarity.
- DataInf (Kwon et al. 2024): closed-form inverse-Hessian-vector product on LoRA gradients, each
  LoRA matrix a layer with damping lambda_l = 0.1 * mean(g_l^2) over training rows; the score is
  sum_l (H_l^-1 v_l) . g_l, so rows whose gradient helps the query score high.
- RapidIn (Lin et al. 2024): each trainable tensor's gradient L2-normalised on its own (the
  authors' layer-wise normalisation), concatenated, compressed to K = 65536 dims by OPORP (one
  seeded permutation, random signs, the coordinates summed in K equal bins); the score is the
  inner product of the compressed vectors, i.e. about the sum over tensors of their cosines.

DataInf needs every training row's full gradient at once and keeps it in memory (refused before
the pass when that is over the gradient memory budget: half the free memory, or $REPT_GRAD_MEMORY
GiB). LESS and RapidIn keep only each row's projection, and TracIn, when the full gradients do not
fit, scores the training rows' gradients against the queries' as they come: all three take the
gradients in chunks that fit (`grad_chunks`), so they run on any number of rows of any model,
with the same figures as in one piece.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rept.methods.base import Method, MethodError, query_rows
from rept.methods.per_example import flatten, iter_per_example_grads, per_example_grads
from rept.query.search import unit_tensor


GRAD_MEMORY_ENV = "REPT_GRAD_MEMORY"


def gradient_memory_budget() -> int:
    """Bytes the per-row gradients may take (kept on the CPU side, one float32 per trainable
    parameter per row): $REPT_GRAD_MEMORY GiB when set (a cap on a shared machine), else half the
    memory free now."""
    import os

    import psutil

    given = os.environ.get(GRAD_MEMORY_ENV)
    if given:
        try:
            gib = float(given)
        except ValueError:
            gib = -1.0
        if gib <= 0:
            raise MethodError(f"{GRAD_MEMORY_ENV}={given!r}: give the gradient memory budget in GiB, e.g. 8")
        return int(gib * 2 ** 30)
    return psutil.virtual_memory().available // 2


def _train_key(train_rows) -> tuple:
    return ("grads-train", len(train_rows), hash(tuple((r.prompt, r.response) for r in train_rows)))


def _row_bytes(bundle) -> int:
    """Bytes of one row's full gradient: one float32 per trainable parameter."""
    model, _ = bundle.trainable()
    return 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def _fits(bundle, n_rows: int, key=None) -> bool:
    """Whether n_rows full gradients fit the gradient memory budget (or are held already)."""
    return (key is not None and key in bundle.cache) or _row_bytes(bundle) * n_rows <= gradient_memory_budget()


def _train_grads(bundle, train_rows, what="training row"):
    key = _train_key(train_rows)
    if not _fits(bundle, len(train_rows), key):  # refuse before the pass rather than be killed halfway
        _refuse_every_row(bundle, len(train_rows))
    return _every_row(bundle, [(r.prompt, r.response) for r in train_rows], what, key)


def _refuse_every_row(bundle, n_rows: int):
    n_params, budget = _row_bytes(bundle) // 4, gradient_memory_budget()
    need = 4 * n_params * n_rows
    raise MethodError(f"per-row gradients of {n_rows} rows x {n_params:,} trainable parameters need "
                      f"{need / 2 ** 30:.1f} GiB, over the {budget / 2 ** 30:.1f} GiB budget (half the free memory, "
                      f"or ${GRAD_MEMORY_ENV}): use fewer "
                      "LoRA targets or a lower rank, fewer rows (--rows), or leave datainf out "
                      "(tracin, less and rapidin take the gradients in chunks)")


def _every_row(bundle, pairs, what: str, key) -> dict:
    """Every row's gradient at once, kept in the bundle under `key` for the next method."""
    if key not in bundle.cache:
        model, tok = bundle.trainable()
        bundle.cache[key] = per_example_grads(model, tok, pairs, bundle.max_length, what, progress=bundle.progress,
                                              batch_size=bundle.batch_size)
    return bundle.cache[key]


def _rows_per_chunk(bundle) -> int:
    """Rows of full gradients in one chunk: a quarter of the gradient memory budget, at least one."""
    return max(1, gradient_memory_budget() // 4 // max(1, _row_bytes(bundle)))


def row_chunks(grads: dict, rows_per_chunk: int):
    """(positions [c], {name: [c, *shape]} views) of gradients held whole, `rows_per_chunk` rows at a time."""
    n_rows = len(next(iter(grads.values())))
    for start in range(0, n_rows, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_rows)
        yield torch.arange(start, stop), {n: g[start:stop] for n, g in grads.items()}


def grad_chunks(bundle, pairs, what: str, cache_key=None):
    """Per-row gradients of `pairs` in chunks of whole rows: yields (positions [c], {name: [c, *shape]}
    float32 on CPU). A chunk holds at most a quarter of the gradient memory budget or one batch,
    whichever is more, so only one chunk is in memory at a time. With a `cache_key`, rows that fit
    in one chunk are computed in one piece and kept in the bundle for the next method
    (`--share-features`), and a bundle that holds them already is sliced."""
    model, tok = bundle.trainable()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rows_per_chunk = _rows_per_chunk(bundle)
    if cache_key is not None and (cache_key in bundle.cache or len(pairs) <= rows_per_chunk):
        yield from row_chunks(_every_row(bundle, pairs, what, cache_key), rows_per_chunk)
        return
    pending, size = [], 0

    def gathered():
        rows = torch.cat([r for r, _ in pending])
        return rows, {n: torch.cat([g[n].cpu() for _, g in pending]) for n in names}

    for rows, grads in iter_per_example_grads(model, tok, pairs, bundle.max_length, what, bundle.progress,
                                              bundle.batch_size):
        if pending and size + len(rows) > rows_per_chunk:
            yield gathered()
            pending, size = [], 0
        pending.append((rows, grads))
        size += len(rows)
    if pending:
        yield gathered()


def _rows_through(bundle, pairs, what: str, dim: int, transform, cache_key=None) -> torch.Tensor:
    """[len(pairs), dim] float32: `transform` (a projection) applied to each chunk of per-row
    gradients from grad_chunks, so only projections outlive their chunk."""
    out = torch.empty((len(pairs), dim), dtype=torch.float32)
    for rows, grads in grad_chunks(bundle, pairs, what, cache_key):
        out[rows] = transform(grads)
    return out


def gradient_dot(queries: dict, train: dict) -> torch.Tensor:
    """[q, n] dot products of the queries' and the training rows' full gradients, both
    {name: [rows, *shape]} by parameter, summed parameter by parameter so that no concatenated copy
    of the training gradients is made."""
    return sum(queries[n].reshape(len(queries[n]), -1) @ g.reshape(len(g), -1).T for n, g in train.items())


def by_parameter(flat: torch.Tensor, bundle) -> dict:
    """{name: [n, numel]} column views of [n, P] gradients, in the trainable parameters' order
    (the order `flatten` concatenates them in)."""
    model, _ = bundle.trainable()
    out, at = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = flat[:, at: at + p.numel()]
            at += p.numel()
    if at != flat.shape[1]:
        raise MethodError(f"the stored gradients have {flat.shape[1]:,} columns, the model's trainable "
                          f"parameters {at:,}: not this model's index")
    return out


def _query_grads(bundle, queries):
    model, tok = bundle.trainable()
    return per_example_grads(model, tok, query_rows(queries), bundle.max_length, "query", progress=bundle.progress,
                             batch_size=bundle.batch_size)


class TracIn(Method):
    """Dot products of full gradients. When every training row's gradient does not fit in memory,
    fit keeps nothing and score streams the training gradients past the queries' (which must fit)."""

    name = "tracin"
    per_row_gradients = True

    def fit(self, bundle, train_rows):
        self.key = _train_key(train_rows)
        self.pairs = [(r.prompt, r.response) for r in train_rows]
        self.n_rows, self.stored = len(train_rows), None
        # the gradients by parameter as the bundle holds them for the next method: concatenating them
        # into one matrix would be a second copy as large (what the memory budget did not count)
        self.train = _train_grads(bundle, train_rows) if _fits(bundle, len(train_rows), self.key) else None
        self.bytes_per_row = _row_bytes(bundle) if self.train is not None else 0

    def _train_chunks(self, bundle):
        """(positions, [c, P] gradients) of the training rows, when they are not held whole: from
        the index on disk when restored from one, else computed again."""
        if self.stored is not None:
            for rows, tensors in self.stored.chunks():
                yield rows, tensors["grad"]
            return
        for rows, grads in grad_chunks(bundle, self.pairs, "training row", self.key):
            yield rows, flatten(grads)

    def score(self, bundle, queries) -> np.ndarray:
        if self.train is None and not _fits(bundle, len(queries)):
            raise MethodError(f"tracin: the gradients of {len(queries)} queries do not fit the gradient memory "
                              f"budget either (${GRAD_MEMORY_ENV}); trace fewer queries at a time")
        q = _query_grads(bundle, queries)
        if self.train is not None:
            return gradient_dot(q, self.train).numpy()
        q = flatten(q)
        out = torch.empty((len(queries), self.n_rows), dtype=torch.float32)
        for rows, grads in self._train_chunks(bundle):
            out[:, rows] = q @ grads.T
        return out.numpy()

    def state_floats_per_row(self, bundle) -> int:
        return _row_bytes(bundle) // 4  # kept in memory or not, an index stores every gradient

    def state_chunks(self, bundle):
        if self.train is not None:  # held by parameter: concatenated a chunk of rows at a time
            for rows, grads in row_chunks(self.train, _rows_per_chunk(bundle)):
                yield rows, {"grad": flatten(grads)}
        else:
            for rows, grads in self._train_chunks(bundle):
                yield rows, {"grad": grads}

    def restore(self, stored, bundle) -> None:
        # the training gradients are read from disk whole when they fit, else shard by shard at score time
        self.n_rows, self.stored = stored.n_rows, stored
        self.train = None
        if _fits(bundle, stored.n_rows):
            flat = stored.load_all()["grad"]
            self.bytes_per_row = 4 * flat.shape[1]
            self.train = by_parameter(flat, bundle)  # views: scored as fit scores, to the last bit
        else:
            self.bytes_per_row = 0


def rademacher_project(x: torch.Tensor, dim: int = 8192, seed: int = 0, block: int = 1024) -> torch.Tensor:
    """x [n, P] @ R [P, dim] with R = +-1/sqrt(dim), generated block by block of `block` input
    dimensions from (seed, block index): the same seed gives the same R whatever n is, and R is
    never held whole in memory."""
    return project_columns(lambda start, stop: x[:, start:stop], x.shape[0], x.shape[1], dim, seed, block)


def project_columns(columns, n_rows: int, width: int, dim: int = 8192, seed: int = 0,
                    block: int = 1024) -> torch.Tensor:
    """rademacher_project of the [n_rows, width] matrix whose columns start..stop `columns(start, stop)`
    returns: each block of R is generated once for every row, so rows held whole are projected in one
    pass over R (generating R is most of the cost on a wide gradient)."""
    out = torch.zeros((n_rows, dim), dtype=torch.float32)
    scale = 1.0 / math.sqrt(dim)
    for b, start in enumerate(range(0, width, block)):
        stop = min(start + block, width)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + b)
        r = torch.randint(0, 2, (stop - start, dim), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
        out.addmm_(columns(start, stop).float(), r, alpha=scale)
    return out


def flat_columns(grads: dict, transform=None):
    """columns(start, stop) of flatten(grads) [n, P] without building it: the pieces of the parameters
    the range crosses, each passed through `transform(name, g, lo, hi)` when given (an elementwise map
    of a parameter's columns lo..hi) and joined."""
    pieces, at = [], 0
    for name, g in grads.items():
        flat = g.reshape(g.shape[0], -1)
        pieces.append((at, at + flat.shape[1], name, flat))
        at += flat.shape[1]

    def columns(start: int, stop: int) -> torch.Tensor:
        parts = []
        for a, b, name, flat in pieces:
            lo, hi = max(start, a) - a, min(stop, b) - a
            if lo < hi:
                parts.append(transform(name, flat[:, lo:hi], lo, hi) if transform else flat[:, lo:hi])
        return torch.cat(parts, 1)

    return columns, at


class _Projected(Method):
    """A method that keeps one `dim`-sized vector per training row in `self.train` (LESS, RapidIn):
    stored in a method index as the tensor `stored_as`."""

    stored_as = "projection"
    per_row_gradients = True

    def __init__(self, seed: int = 0, dim: int = 8192):
        super().__init__(seed)
        self.dim = dim

    def settings(self, bundle) -> dict:
        return {"seed": self.seed, "dim": self.dim}

    def state_chunks(self, bundle):
        yield torch.arange(len(self.train)), {self.stored_as: self.train}

    def restore(self, stored, bundle) -> None:
        self.dim = stored.manifest["method_settings"]["dim"]
        self.train = stored.load_all()[self.stored_as]
        self.bytes_per_row = 4 * self.dim


class LESS(_Projected):
    name = "less"
    needs_lora = True

    def fit(self, bundle, train_rows):
        from rept.model.train import load_adam_state

        self.check(bundle)
        adam = load_adam_state(bundle.adapter)
        model, _ = bundle.trainable()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in adam["exp_avg"]]
        if missing:
            raise MethodError(f"the Adam state in {bundle.adapter} lacks {len(missing)} trainable parameters "
                              f"(e.g. {missing[0]}); was the adapter trained by `rept train --lora`?")
        b1, b2 = adam["betas"]
        eps = 1e-8  # as in the LESS code

        def precondition(name, g, lo=None, hi=None):  # Adam's update direction for this gradient
            m, v = adam["exp_avg"][name], adam["exp_avg_sq"][name]
            if lo is not None:
                m, v = m.reshape(-1)[lo:hi], v.reshape(-1)[lo:hi]
            return (b1 * m + (1 - b1) * g) / torch.sqrt(b2 * v + (1 - b2) * g * g + eps)

        pairs, key = [(r.prompt, r.response) for r in train_rows], _train_key(train_rows)
        if key in bundle.cache or len(pairs) <= _rows_per_chunk(bundle):
            # the gradients are held whole (shared with the other methods): one pass over R for all rows
            columns, width = flat_columns(_every_row(bundle, pairs, "training row", key), precondition)
            self.train = unit_tensor(project_columns(columns, len(pairs), width, self.dim, self.seed))
        else:
            self.train = _rows_through(bundle, pairs, "training row", self.dim,
                                       lambda grads: self._project({n: precondition(n, g) for n, g in grads.items()}))
        self.bytes_per_row = 4 * self.dim

    def _project(self, grads: dict) -> torch.Tensor:
        return unit_tensor(rademacher_project(flatten(grads), self.dim, self.seed))

    def score(self, bundle, queries) -> np.ndarray:
        q = _rows_through(bundle, query_rows(queries), "query", self.dim, self._project)
        return (q @ self.train.T).numpy()


class DataInf(Method):
    name = "datainf"
    needs_lora = True
    per_row_gradients = True

    def __init__(self, seed: int = 0, damping_scale: float = 0.1):
        super().__init__(seed)
        self.damping_scale = damping_scale

    def fit(self, bundle, train_rows):
        self.check(bundle)
        grads = _train_grads(bundle, train_rows)
        self._keep({n: g.reshape(g.shape[0], -1) for n, g in grads.items() if "lora_" in n})

    def _keep(self, grads: dict) -> None:
        """Hold the LoRA matrices' per-row gradients (float32 [n, d] each: views of the bundle's, not
        copies) and their damping terms. The float64 arithmetic happens one matrix at a time (score):
        a float64 copy of every gradient would be twice the memory the budget allowed for them."""
        self.train = dict(grads)
        if not self.train:
            raise MethodError("DataInf found no LoRA weights among the trainable parameters")
        self.sq = {n: (g.double() ** 2).sum(1) for n, g in self.train.items()}  # |g_i|^2 per row
        # lambda_l = scale * mean(g_l^2) over every entry: the rows' |g_i|^2 summed, over the entries
        self.lam = {n: self.damping_scale * float(self.sq[n].sum()) / g.numel() for n, g in self.train.items()}
        self.bytes_per_row = 4 * sum(g.shape[1] for g in self.train.values())

    def settings(self, bundle) -> dict:
        return {"seed": self.seed, "damping_scale": self.damping_scale}

    def state_chunks(self, bundle):
        # one tensor per LoRA matrix, stored as the float32 gradients they were computed as
        yield torch.arange(len(next(iter(self.train.values())))), {n: g.float() for n, g in self.train.items()}

    def restore(self, stored, bundle) -> None:
        self.damping_scale = stored.manifest["method_settings"]["damping_scale"]
        if not _fits(bundle, stored.n_rows):
            _refuse_every_row(bundle, stored.n_rows)  # the same one-line refusal as at fit time
        self._keep(stored.load_all())

    def score(self, bundle, queries) -> np.ndarray:
        qg = _query_grads(bundle, queries)
        total = None
        for n, G in self.train.items():
            G = G.double()                                       # this matrix only
            v = qg[n].reshape(qg[n].shape[0], -1).double()     # [q, d]
            lam, count = self.lam[n], G.shape[0]
            c = (v @ G.T) / (lam + self.sq[n])                   # [q, n]
            hvp = (count * v - c @ G) / (count * lam)            # (1/n) sum_i (v - c_i g_i) / lam
            part = hvp @ G.T
            total = part if total is None else total + part
        return total.float().numpy()


def oporp_compress(x: torch.Tensor, k: int, seed: int = 0, chunk: int = 256) -> torch.Tensor:
    """OPORP (one permutation, one random projection; Li and Li 2023), the compression RapidIn caches
    gradients with: x [n, D] -> [n, k]. The D coordinates are permuted and sign-flipped by a seeded
    draw, zero-padded to a multiple of k, and summed in k bins of consecutive coordinates. Inner
    products are kept in expectation, and exactly when k >= D (every bin holds one coordinate)."""
    n, dim = x.shape
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(dim, generator=gen)
    signs = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
    step = -(-dim // k)
    out = torch.empty((n, k), dtype=torch.float32)
    for start in range(0, n, chunk):  # rows a chunk at a time: the permuted copy is as big as x
        part = x[start:start + chunk, perm].float() * signs
        part = torch.nn.functional.pad(part, (0, step * k - dim))
        out[start:start + chunk] = part.view(part.shape[0], k, step).sum(-1)
    return out


class RapidIn(_Projected):
    name = "rapidin"
    stored_as = "compressed"

    def __init__(self, seed: int = 0, dim: int = 65536):
        super().__init__(seed, dim)

    def _compress(self, grads: dict) -> torch.Tensor:
        # each tensor's gradient unit-normalised on its own before the tensors are concatenated
        return oporp_compress(torch.cat([unit_tensor(g.reshape(g.shape[0], -1)) for g in grads.values()], 1),
                              self.dim, self.seed)

    def fit(self, bundle, train_rows):
        self.train = _rows_through(bundle, [(r.prompt, r.response) for r in train_rows], "training row", self.dim,
                                   self._compress, _train_key(train_rows))
        self.bytes_per_row = 4 * self.dim

    def score(self, bundle, queries) -> np.ndarray:
        q = _rows_through(bundle, query_rows(queries), "query", self.dim, self._compress)
        return (q @ self.train.T).numpy()
