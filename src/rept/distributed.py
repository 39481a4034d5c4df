"""Rank and world size for builds launched by torchrun (one process per rank), and no-ops
when run as a single process."""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
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
