"""Data parallelism across processes (torchrun / accelerate launch): which rank this process is,
the process group, and the few collectives the trainer needs.

The trainer does not wrap the model in `DistributedDataParallel`: it runs the decoder through
`get_decoder()` (never the wrapper's `forward`) and only the small LoRA tensors train, so after a
step's micro-batches it sums every gradient across ranks in one flattened all-reduce (what DDP
does with `no_sync` over gradient accumulation, in one bucket). With a single process every
function here is a no-op and torch.distributed is never initialized.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tca.errors import TcaError

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one data-parallel job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # rank on this machine: picks the GPU

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and outputs."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "World":
        """From the variables torchrun and accelerate launch set; a plain process is rank 0 of 1."""
        if "WORLD_SIZE" not in os.environ:
            return cls()
        try:
            rank, size, local = (int(os.environ.get(name, "0")) for name in LAUNCH_VARS)
        except ValueError:
            raise TcaError(f"{', '.join(LAUNCH_VARS)} must be integers (they are set by torchrun / accelerate launch); "
                           f"got {[os.environ.get(n) for n in LAUNCH_VARS]}") from None
        if not 0 <= rank < size or local < 0:
            raise TcaError(f"RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local}: need 0 <= RANK < WORLD_SIZE")
        return cls(rank, size, local)

    def device(self, device: str) -> str:
        """A bare "cuda" becomes this rank's own GPU (cuda:LOCAL_RANK)."""
        return f"cuda:{self.local_rank}" if self.size > 1 and device == "cuda" else device


GOLDEN = 0x9E3779B9  # odd, so rank -> rank * GOLDEN is one-to-one modulo 2**32


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of rank `rank`: (seed + rank * 0x9E3779B9) mod 2**32 (torch's CPU generator reads
    only a seed's low 32 bits). Rank 0 (and a single process) uses `seed` itself (below 2**32); the
    ranks of a run get distinct seeds, so LoRA dropout and LLaRA's curriculum draw differently on each.
    The LoRA init drawn from it is rank 0's everywhere (`sync_parameters`), and checkpoints keep
    each rank's RNG state, so a resumed run stays exact."""
    return (seed + rank * GOLDEN) % 2**32


def init(world: World, device: str) -> None:
    """Join the process group (nccl on GPUs, gloo on the CPU); the launcher's MASTER_ADDR / MASTER_PORT rendezvous."""
    if world.size == 1 or torch.distributed.is_initialized():
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(world.device(device))
    torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=world.rank, world_size=world.size)


def close(world: World) -> None:
    if world.size > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def broadcast(obj, world: World):
    """Rank 0's `obj` on every rank (any picklable object)."""
    if world.size == 1:
        return obj
    box = [obj if world.main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, world: World) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    torch.distributed.all_gather_object(out, obj)
    return out


def sum_gradients(params: list[torch.Tensor], extra: list, world: World) -> list:
    """Sum the gradients of `params` (None counts as zeros) and the numbers `extra` (floats or 0-d
    tensors) over all ranks, in place, in one all-reduce; returns the summed `extra` as 0-d float64
    tensors on the gradients' device (unread: reading them waits for the all-reduce)."""
    if world.size == 1:
        return extra
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    device = grads[0].device
    numbers = torch.stack([torch.as_tensor(x, dtype=torch.float64).to(device) for x in extra])
    flat = torch.cat([g.reshape(-1).to(torch.float64) for g in grads] + [numbers])
    torch.distributed.all_reduce(flat)
    at = 0
    for p, g in zip(params, grads):
        p.grad = flat[at : at + g.numel()].view_as(g).to(g.dtype)
        at += g.numel()
    return list(flat[at:])


def sync_parameters(params: list[torch.Tensor], world: World) -> None:
    """Rank 0's values of `params` on every rank (as DDP does when it wraps a model)."""
    if world.size == 1:
        return
    for p in params:
        torch.distributed.broadcast(p.data, src=0)


def split(n: int, world: World) -> slice:
    """This rank's contiguous share of n items (the first n % size ranks take one more)."""
    return slice(world.rank * n // world.size, (world.rank + 1) * n // world.size)
