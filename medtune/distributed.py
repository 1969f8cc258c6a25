"""Which process this is among those a launcher started, in one place for every verb that runs in several.

torchrun, ``accelerate launch`` and the DeepSpeed launcher all describe a process by the same environment
variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), which is also what accelerate's ``PartialState`` reads; this
module reads them without starting a process group, so sharded evaluation and image tokenizing (independent
processes that never talk to each other) and the training pre-flight checks ask the same question the same way.
"""
from __future__ import annotations

import os

from medtune.errors import UserError


def launched_distributed() -> bool:
    """Whether a launcher (torchrun, accelerate launch, deepspeed) started this process, at any world size."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def shard_from_env(num_shards: int = 1, shard_index: int = 0) -> tuple[int, int]:
    """``(num_shards, shard_index)``: the launcher's ``WORLD_SIZE`` / ``RANK`` when it started several processes,
    else the ``--num-shards`` / ``--shard-index`` given; an index outside the shards is a :class:`UserError`."""
    world_size = os.environ.get("WORLD_SIZE")
    if world_size and int(world_size) > 1:
        num_shards, shard_index = int(world_size), int(os.environ.get("RANK", "0"))
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise UserError(f"--shard-index {shard_index} is not in 0..{num_shards - 1}")
    return num_shards, shard_index


def process_device(device: str = "auto") -> str:
    """``device`` as given, or for ``auto`` this process's GPU (``cuda:LOCAL_RANK``) when there is one, else
    ``cpu``."""
    if device != "auto":
        return device
    import torch

    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def process_state():
    """Accelerate's view of this process (rank, main process, barrier); the process group it sets up under
    torchrun is the one Trainer then uses."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    return process_state().is_main_process


def barrier() -> None:
    process_state().wait_for_everyone()
