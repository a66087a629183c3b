"""Several processes, one job: the little stpm needs from torch.distributed under torchrun.

torchrun starts N copies of a command and tells each its place through environment variables
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, ...). Without them `join` returns
a world of one process and every function here does nothing, so the library and the commands
run unchanged outside torchrun. Collectives carry Python objects where the data is small (file
rows, scores) and tensors where it is per training step. torch is imported only under torchrun:
one process that scores an exported file never loads it.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

from .errors import StpmError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
TIMEOUT = timedelta(minutes=30)  # a rank decoding a large category can keep the others waiting


class EveryRankError(StpmError):
    """A mistake every rank found at once: rank 0 alone needs to print it."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files, logs and the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


ALONE = World()  # one process, no torchrun
_OURS: list = []  # the process group join made, if it made one


def _dist():
    """torch.distributed, imported when a collective is about to run."""
    import torch.distributed

    return torch.distributed


def launched() -> bool:
    """Whether torchrun (or any env:// launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def secondary() -> bool:
    """Whether this process is a rank other than 0: it shows no progress bars and prints no
    warnings (read from the environment, so that any function can ask without a World)."""
    return int(os.environ.get("RANK", "0")) > 0


def join() -> World:
    """Join the launcher's process group, once per process; ALONE without torchrun.

    Where CUDA is present the group speaks NCCL for GPU tensors and gloo for CPU ones (the
    objects gathered here, and a run that trains on the CPU of a GPU machine); gloo alone
    elsewhere.
    """
    if not launched():
        return ALONE
    import torch

    dist = _dist()
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        try:
            dist.init_process_group(backend, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as error:
            raise StpmError(f"cannot join the torchrun process group: {error}") from error
        _OURS.append(dist.group.WORLD)
    return World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )


def local_device(device: torch.device, world: World) -> torch.device:
    """The device this rank computes on: its own GPU (cuda:LOCAL_RANK) when device is 'cuda'
    under torchrun, device itself otherwise."""
    if not world.distributed or device.type != "cuda":
        return device
    import torch

    if device.index is None:
        device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    return device


def backend(device: torch.device, world: World) -> str | None:
    """What carries this rank's gradients: NCCL between GPUs, gloo between CPUs."""
    if not world.distributed:
        return None
    return "nccl" if device.type == "cuda" else "gloo"


def leave() -> None:
    """Leave the process group join made (the commands' last step under torchrun); a group the
    caller's own program made stays."""
    if _OURS and _dist().is_initialized():
        _dist().destroy_process_group()
    _OURS.clear()


def barrier(world: World) -> None:
    """Wait until every rank reaches this point."""
    if world.distributed:
        _dist().barrier()


def shard(count: int, world: World) -> slice:
    """This rank's contiguous share of count items: the first count % size ranks get one more.
    Contiguous, so the shards laid end to end in rank order are the items in their order."""
    per_rank, extra = divmod(count, world.size)
    start = world.rank * per_rank + min(world.rank, extra)
    return slice(start, start + per_rank + (world.rank < extra))


def gather(items: Sequence[T], world: World) -> list[T]:
    """Every rank's items, concatenated in rank order, on every rank."""
    if not world.distributed:
        return list(items)
    parts: list = [None] * world.size
    _dist().all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def gather_to_main(items: Sequence[T], world: World) -> list[T] | None:
    """Every rank's items, concatenated in rank order, on rank 0 alone (None elsewhere): for
    data only rank 0 needs, such as the maps it computes metrics from."""
    if not world.distributed:
        return list(items)
    parts: list | None = [None] * world.size if world.main else None
    _dist().gather_object(list(items), parts, dst=0)
    return [item for part in parts for item in part] if world.main else None


def across(count: int, compute: Callable[[slice], Sequence[T]], world: World) -> list[T]:
    """compute(part) for this rank's shard of count items, the results of all ranks joined in
    order: each rank does 1/size of the work, every rank ends with the whole list. A rank whose
    shard is empty (fewer items than ranks) computes nothing."""
    part = shard(count, world)
    return gather(compute(part) if part.stop > part.start else [], world)


def gather_rows(values: torch.Tensor, world: World) -> torch.Tensor:
    """Tensors whose first dimension may differ between ranks, concatenated in rank order."""
    if not world.distributed:
        return values
    import torch

    dist = _dist()
    counts = torch.zeros(world.size, dtype=torch.long, device=values.device)
    counts[world.rank] = len(values)
    dist.all_reduce(counts)
    padded = values.new_zeros((int(counts.max()), *values.shape[1:]))
    padded[: len(values)] = values
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts.tolist(), strict=True)])


def total(value: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of value over all ranks."""
    if world.distributed:
        value = value.clone()
        _dist().all_reduce(value)
    return value


def broadcast_buffers(module: torch.nn.Module, world: World) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank."""
    if world.distributed:
        for buffer in module.buffers():
            _dist().broadcast(buffer, 0)


def from_main(compute: Callable[[], T], world: World) -> T:
    """compute() on rank 0 alone, its result (or its StpmError) on every rank: reading a file
    that only rank 0's node may have, e.g. the checkpoint to resume."""
    if not world.distributed:
        return compute()
    box: list = [None]
    if world.main:
        try:
            box[0] = compute()
        except StpmError as error:
            box[0] = error
    _dist().broadcast_object_list(box, 0)
    if isinstance(box[0], StpmError):
        raise EveryRankError(str(box[0]))
    return box[0]


def check_everywhere(compute: Callable[[], T], world: World) -> T:
    """compute() on every rank; if it fails on any, every rank raises the same error naming
    the rank and host, instead of one rank dying while the others wait for it forever."""
    if not world.distributed:
        return compute()
    try:
        result, failure = compute(), None
    except (StpmError, OSError) as error:
        result, failure = None, f"rank {world.rank} ({socket.gethostname()}): {error}"
    failures = [message for message in gather([failure], world) if message]
    if failures:
        raise EveryRankError("; ".join(failures))
    return result


def agree_on_files(paths: Sequence[os.PathLike | str], what: str, world: World) -> None:
    """Refuse to go on unless every rank lists the same files (names and sizes): ranks that see
    different data would silently train or score different things. Nothing to do for one
    process."""
    if not world.distributed:
        return
    values = gather([fingerprint(paths)], world)
    if len(set(values)) > 1:
        ranks = ", ".join(f"rank {rank}: {text[:12]}" for rank, text in enumerate(values))
        raise EveryRankError(
            f"the ranks disagree on {what} ({ranks}); every node needs the same files"
        )


def fingerprint(paths: Sequence[os.PathLike | str]) -> str:
    """A short digest of file names and sizes, the same on every node that has the same files
    (mount points may differ, so only the names count, not the full paths)."""
    digest = hashlib.sha256()
    for path in paths:
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        digest.update(f"{os.path.basename(path)}\t{size}\n".encode())
    return digest.hexdigest()
