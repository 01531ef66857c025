"""Several processes, one run: d3n under `torchrun` (torch.distributed).

`torchrun --nproc-per-node N -m d3n.cli COMMAND ...` (or `d3n pipeline CONFIG --nproc N`, which
launches exactly that) starts N copies of a command. `init_from_env` joins them into one process
group from the variables torchrun sets (gloo for CPU tensors, NCCL for CUDA ones where torch has
it); the training loops then split each batch across the ranks (DistributedDataParallel) and every
other stage runs on rank 0 while the others wait. Only rank 0 writes: `check_writer` is called by
every atomic write in `d3n.artifacts`, so a write from another rank is an error naming the file
rather than two processes racing on one.

On CPU each process gets its share of the cores (cores / processes on this node): two torch
processes with default threads on one 2-core machine were measured 30x slower per step.

torch is imported only when a process group is asked for, so the edge runtime never imports it.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

# the other ranks wait at a barrier while rank 0 runs a single-process stage (a DDPM, an export):
# long enough for any stage, on a group of its own
WAIT = datetime.timedelta(hours=48)
# every other collective (a gradient all-reduce, the repository build's exchanges): a node that
# dies or hangs without exiting stops the others within this, not two days later (torchrun itself
# stops every rank at once when one exits with an error); D3N_COLLECTIVE_TIMEOUT=SECONDS changes it
STEP_S = 3600.0
_waiting = None  # the process group of the long waits


def collective_timeout() -> datetime.timedelta:
    raw = os.environ.get("D3N_COLLECTIVE_TIMEOUT")
    if raw is None:
        return datetime.timedelta(seconds=STEP_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        from d3n.errors import ConfigError

        raise ConfigError(f"D3N_COLLECTIVE_TIMEOUT={raw!r}: expected a number of seconds above 0")
    return datetime.timedelta(seconds=seconds)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _dist():
    """torch.distributed if this process has joined a group, else None (torch not imported for it)."""
    mod = sys.modules.get("torch.distributed")
    if mod is None or not mod.is_available() or not mod.is_initialized():
        return None
    return mod


def world() -> World:
    dist = _dist()
    if dist is None:
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def init_from_env() -> World:
    """Join the process group torchrun describes in the environment (no-op for a single process)."""
    if not launched() or _dist() is not None:
        return world()
    import torch
    import torch.distributed as dist

    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=collective_timeout())
    global _waiting
    _waiting = dist.new_group(backend="gloo", timeout=WAIT)
    w = world()
    threads = max(1, cpu_cores() // w.local_size)
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.cuda.set_device(w.local_rank)
    log.info("rank %d of %d (local %d of %d), backend %s, %d CPU threads", w.rank, w.size, w.local_rank,
             w.local_size, backend, threads)
    return w


def shutdown() -> None:
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()


def barrier(long: bool = False) -> None:
    """All ranks meet; `long`: the others wait for rank 0's own work (WAIT, not the collective timeout)."""
    dist = _dist()
    if dist is not None:
        dist.barrier(group=_waiting if long else None)


def broadcast(obj, long: bool = False):
    """rank 0's `obj` on every rank (a plain picklable value); `long` as for barrier."""
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_waiting if long else None)
    return box[0]


def gather(obj) -> list | None:
    """Every rank's `obj` on rank 0, in rank order (None elsewhere)."""
    dist = _dist()
    if dist is None:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper: a task's forward goes through the
    wrapper (which syncs the gradients), its loss and other methods are the model's."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def check_writer(path) -> None:
    """Only rank 0 writes run artifacts; anything else is a bug that would race on `path`."""
    w = world()
    if not w.main:
        raise RuntimeError(f"{path}: rank {w.rank} of {w.size} tried to write it; only rank 0 writes")


def torchrun_command(argv: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str | None = None, run_id: str = "d3n") -> list[str]:
    """The torchrun command line that runs `d3n ARGV` on `nproc` processes per node. One node:
    a standalone rendezvous on this machine; several: every node runs the same command with its
    own `node_rank` and the same `rdzv_endpoint` (host:port of one of them)."""
    if nproc < 1 or nnodes < 1:
        raise ValueError("--nproc and --nnodes must be at least 1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise ValueError("several nodes need --rdzv-endpoint HOST:PORT (the same on every node)")
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", run_id]
    return cmd + ["-m", "d3n.cli", *argv]


def launch(argv: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
           rdzv_endpoint: str | None = None) -> int:
    """Run `d3n ARGV` under torchrun and return its exit status. Threads per process are set
    here (cores / processes) so torchrun's default of one thread each does not apply."""
    import subprocess

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_cores() // nproc)))
    cmd = torchrun_command(argv, nproc, nnodes, node_rank, rdzv_endpoint)
    log.info("launching: %s", " ".join(cmd))
    return subprocess.call(cmd, env=env)
