"""Run a test worker on W local processes (``torch.distributed`` over gloo or NCCL), bounded.

``spawn_ranks(worker, args, world, what)`` starts ``worker(rank, init_file, out_dir, *args)`` on
``world`` spawned processes and returns what each rank saved with ``save_result``. A rank that
fails raises here; ranks still running after ``deadline_s`` are killed and the test fails with
the stacks every rank wrote at ``stacks_after_s`` (``start_rank`` arms that dump, joins a
loopback-only, file-based rendezvous, and uses one thread).
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RENDEZVOUS_S = 180


def start_rank(rank: int, world: int, init_file: str, out_dir: str, backend: str = "gloo",
               stacks_after_s: float = 120) -> None:
    stacks = open(os.path.join(out_dir, f"rank{rank}.stacks"), "w")  # noqa: SIM115
    faulthandler.dump_traceback_later(stacks_after_s, file=stacks)
    os.environ["GLOO_SOCKET_IFNAME"] = _loopback()  # no host-name lookup can hang the suite
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=RENDEZVOUS_S))
    torch.set_num_threads(1)


def save_result(rank: int, out_dir: str, result) -> None:
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


def spawn_ranks(worker, args: tuple, world: int, what: str, deadline_s: float = 300,
                stacks_after_s: float = 120) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(worker, args=(os.path.join(tmp, "init"), tmp, *args),
                                 nprocs=world, start_method="spawn", join=False)
        deadline = time.monotonic() + deadline_s
        while not ctx.join(timeout=5):  # raises if a rank failed
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                stacks = "\n".join(
                    open(os.path.join(tmp, f"rank{r}.stacks")).read() for r in range(world)
                    if os.path.exists(os.path.join(tmp, f"rank{r}.stacks")))
                pytest.fail(f"the {world} {what} ranks did not finish in {deadline_s} s; their "
                            f"stacks after {stacks_after_s} s:\n{stacks}")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def _loopback() -> str:
    """The loopback interface's name (``lo`` on Linux)."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n.startswith("lo")), names[0])
