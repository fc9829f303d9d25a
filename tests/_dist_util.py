"""Launch a function on N CPU ranks (gloo) the way torchrun would, for multi-rank tests.

    from _dist_util import run_ranks
    run_ranks(worker, world_size=2, args=(str(tmp_path),))   # worker(rank, *args) in each process

Each process gets torchrun's env vars (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a
free port) and one intra-op thread, so `fsdp_setup.init_distributed()` picks the torchrun path.
A failure on any rank re-raises here with that rank's traceback and stops the others; a rank that
hangs (e.g. one rank waiting in a collective the other never joins) is killed after `timeout_s`.
The worker must be a module-level function of an importable module (spawn pickles it by name).
"""

from __future__ import annotations

import os
import socket
import sys
import time

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    # Two ranks on a small shared machine: more threads only fight each other.
    torch.set_num_threads(1)
    fn(rank, *args)
    # Done, results written: leave without interpreter finalization. Gloo's worker threads can still hold
    # work objects whose tensors need the GIL while the interpreter is torn down, which on rare runs
    # aborts the process (SIGABRT, "terminate called without an active exception") after all went well.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world_size: int = 2, args: tuple = (), timeout_s: float = 180.0) -> None:
    """Run fn(rank, *args) on `world_size` fresh processes; raise if any fails or all do not finish in time."""
    context = mp.start_processes(
        _entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):  # join() raises with the rank's traceback if one failed
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{fn.__name__} did not finish on {world_size} ranks within {timeout_s:.0f} s (hang?)")


def exit_code_of_rank(fn, rank: int, world_size: int = 2, args: tuple = (), timeout_s: float = 90.0) -> int | None:
    """Start fn(rank, *args) on `world_size` processes, wait for process `rank` to end (a rank that fails
    alone must end by itself, while the others wait for it in a collective), kill the rest, and return
    that process's exit code (None if it was still running after timeout_s)."""
    context = mp.start_processes(
        _entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=False, start_method="spawn"
    )
    try:
        context.processes[rank].join(timeout=timeout_s)
        return context.processes[rank].exitcode
    finally:
        for process in context.processes:
            process.kill()
            process.join()
