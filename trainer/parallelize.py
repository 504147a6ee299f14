"""Process group, device and FSDP2 (``fully_shard``) over the model's blocks and root."""

from __future__ import annotations

import contextlib
import gc
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

from trainer.model import GPT


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank, the world, its device and the 1-D data-parallel mesh."""

    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Runtime:
    """Join the process group torchrun set up (or make a one-rank group when run without it).

    NCCL for CUDA tensors (plus gloo for CPU objects) on a GPU host, gloo on CPU. The CUDA
    device is ``LOCAL_RANK``.
    """
    if "RANK" not in os.environ:  # plain `python -m trainer`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("cuda:nccl,cpu:gloo", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    world = dist.get_world_size()
    return Runtime(rank=dist.get_rank(), world_size=world, device=device,
                   mesh=init_device_mesh(device.type, (world,), mesh_dim_names=("dp",)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shutdown_distributed() -> None:
    """Leave the process group together (every rank calls it after its last collective)."""
    if dist.is_initialized():
        gc.collect()  # drop FSDP's references to pending work before the group goes away
        dist.barrier()
        dist.destroy_process_group()


def shard_model(model: GPT, mesh: DeviceMesh) -> GPT:
    """``fully_shard`` each block, then the root (embeddings, final norm and head).

    Parameters stay fp32; on GPU the forward runs under bf16 autocast (see ``autocast``).
    """
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA; full precision on CPU."""
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
