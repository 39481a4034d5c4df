"""Rank and world size for builds launched by torchrun (one process per rank), and no-ops
when run as a single process.

A rank that fails must not leave the others waiting: each step between two collectives runs inside
`step(...)`, which ends in one all-gather of "did this rank fail, and why". A rank that failed re-raises its
own error; every other rank raises `RankFailed` naming the failed rank and its error, so all ranks exit
non-zero at the same point, and what was written before (whole shards, an atomic manifest) stays on disk.

REPT_DIST_TIMEOUT (seconds) sets the process group's timeout (torch's default otherwise: 30 min for
gloo, 10 min for nccl). It bounds how long a rank waits for a peer that died without reaching a step's end;
an error raised in Python never needs it. Raise it when ranks have very unequal work (a resumed build
where one rank's shards were already done).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from rept.errors import ReptError

TIMEOUT_ENV = "REPT_DIST_TIMEOUT"


class RankFailed(ReptError):
    """Another rank failed; this one stops too (its own work so far is kept)."""


def _timeout() -> timedelta | None:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise ReptError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ReptError(f"{TIMEOUT_ENV}={value!r} must be a positive number of seconds")
    return timedelta(seconds=seconds)


def rank_and_world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = _timeout()
        dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout else {}))
        # Tear the group down at exit so ranks leave cleanly (and torch does not warn).
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device() -> str | None:
    """The device this rank should use, or None to let the caller decide."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return text if isinstance(exc, ReptError) else f"{type(exc).__name__}: {text}"


@contextmanager
def step(what: str, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Run the body on every rank, then meet: a barrier that also shares each rank's error.

    Single process: just the body. With several ranks, the body's exception (if any) is held while this
    rank waits for the others to finish their part of the step; then every rank learns who failed. The
    failing rank re-raises its own exception; the others raise RankFailed("rank r failed while <what>: ...").
    `log` (optional) reports a failure at once, before the wait. KeyboardInterrupt and SystemExit are not
    held (the launcher stops the other ranks).
    """
    error = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - held, shared with the other ranks, then re-raised below
        error = exc
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    if error is not None and log is not None:
        log(f"rank {rank}: failed while {what} ({_one_line(error)}); waiting for the other ranks to stop")
    messages: list[str | None] = [None] * world
    dist.all_gather_object(messages, None if error is None else _one_line(error))
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, msg = failed[0]
        more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise RankFailed(f"rank {r} failed while {what}: {msg}{more}; this rank ({rank}) stopped too, "
                         "keeping what it wrote (rerun the same command to resume)")
