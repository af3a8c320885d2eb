"""Data-parallel training on CPU (gloo) without DistributedDataParallel.

Data-parallel: ``torchrun --nproc_per_node 2 -m openmm_cgml.cli train CONFIG`` (gloo on
CPU); only rank 0 writes files. Gradients are averaged over ranks (one all-reduce per
step), each rank's loss is the mean over its beads, so with graphs of equal size the
update equals the 1-process one. ``Trainer.close`` (called by ``train`` and the CLI)
destroys the process group and joins gloo's worker threads before the process exits.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from torch import nn


class SkipSampler(torch.utils.data.Sampler):
    """Epoch permutation of a DistributedSampler, starting ``skip`` indices in (resume)."""

    def __init__(self, sampler, skip: int = 0):
        self.sampler, self.skip = sampler, int(skip)

    def __iter__(self):
        return iter(list(self.sampler)[self.skip:])

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


def distributed_setup() -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group) from torchrun's
    environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        # torch._dynamo (which torchmd-net imports) takes references to any process group
        # that exists when it is first imported, so that group is never freed and its
        # worker threads outlive destroy_process_group (see Trainer.close): import it first.
        importlib.import_module("torch._dynamo")
        torch.distributed.init_process_group("gloo")
        return rank, world, True
    return rank, world, False


def broadcast_parameters(net: nn.Module) -> None:
    """Every rank starts from rank 0's parameters and buffers."""
    tensors = [t for t in list(net.parameters()) + list(net.buffers()) if t.is_floating_point()]
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    torch.distributed.broadcast(flat, 0)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def average_gradients(net: nn.Module, world: int) -> None:
    """Data-parallel gradients: the mean over ranks, in one all-reduce. A parameter
    that no rank gave a gradient keeps ``grad=None`` (the optimiser skips it, as in one
    process); one that some ranks did not reach counts as zero there."""
    params = [p for p in net.parameters() if p.requires_grad]
    has_grad = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64)
    grads = [p.grad.detach().reshape(-1).double() if p.grad is not None
             else torch.zeros(p.numel(), dtype=torch.float64) for p in params]
    flat = torch.cat([has_grad] + grads)
    torch.distributed.all_reduce(flat)
    offset = len(params)
    for p, count in zip(params, flat[:len(params)].tolist()):
        chunk = flat[offset:offset + p.numel()]
        offset += p.numel()
        p.grad = (chunk / world).view_as(p).to(p.dtype) if count > 0 else None


def gloo_worker_threads() -> int:
    """Running gloo worker threads of this process (Linux; 0 where /proc is missing)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return 0
    count = 0
    for task in tasks.iterdir():
        try:
            count += (task / "comm").read_text().startswith("pt_gloo")
        except OSError:  # the thread ended while we looked
            pass
    return count
