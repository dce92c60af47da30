"""torch.distributed set-up from the launcher's environment (torchrun, or srun under SLURM), and gathers.

No launcher of our own: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for its workers
(training/slurm/train.sbatch starts one torchrun per node with a c10d rendezvous); a process started by srun
alone has SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and needs MASTER_ADDR and MASTER_PORT set by its script.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from CLEARLib.errors import CLEARRunError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by the environment; a single process needs nothing set."""
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda", "gpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in os.environ:
            raise CLEARRunError("MASTER_ADDR is not set: launch with torchrun, or srun with the sbatch template")
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
        atexit.register(leave_process_group)
    return DistInfo(rank, world_size, local_rank, dev)


def leave_process_group() -> None:
    """Destroy the process group while the interpreter is still whole (init_distributed registers this with
    atexit, so it runs after errors and preemption stops too). A gloo worker thread still alive at interpreter
    shutdown may be freeing the last collective's tensors, which needs the GIL: the rank aborts ("terminate
    called without an active exception", SIGABRT) after a finished run, and torchrun fails the job
    (pytorch/pytorch#190489). The threads are joined only when nothing else holds the group, which is why
    trainers drop their DistributedDataParallel when fit() ends."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from every rank along dim 0 (rank order); no gradient flows back."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows in rank order; gradients flow back to the rank that made each row."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def any_rank(flag: int, device: torch.device) -> int:
    """The largest of every rank's `flag` (0 when none is set): a decision all ranks take together."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return int(flag)
    value = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable, small), in rank order, on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
