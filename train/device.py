"""The `--device` option shared by every training command: cpu, cuda, cuda:N or auto.

The spelling is checked when a config is validated; whether a GPU exists is decided where the run
happens, with a clear error instead of torch's lazy CUDA-init traceback. `to_cpu` keeps
checkpoints loadable on any device; a `Device` field is a placement field (d3n.config.placement).
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, Field

from d3n import distributed
from d3n.config import PLACEMENT
from d3n.errors import ConfigError

log = logging.getLogger(__name__)

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto (cuda if available, else cpu)"


def check_device(name: str) -> str:
    """Check the spelling only: whether a GPU exists is decided where the run happens."""
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", name):
        raise ValueError(f"expected {DEVICE_CHOICES}, got '{name}'")
    return name


# a plain str field, spelling checked; a placement field, so it never enters a stage key or a resume check
Device = Annotated[str, AfterValidator(check_device), Field(json_schema_extra=PLACEMENT)]


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if available else cpu; a CUDA device that is not there is a ConfigError
    (a clear message instead of torch's lazy-init traceback on the first `.to()`)."""
    try:
        check_device(name)
    except ValueError as exc:
        raise ConfigError(f"device: {exc}") from None
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    w = distributed.world()
    if dev.type == "cuda" and w.distributed and dev.index != w.local_rank:  # under torchrun: this rank's GPU
        if dev.index is not None:
            log.warning("device %s under torchrun: rank %d uses cuda:%d (its local rank)", name, w.rank, w.local_rank)
        dev = torch.device("cuda", w.local_rank)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device '{name}' is not available: torch sees no CUDA device "
                              "(no GPU, no driver, or a CPU-only torch build); use --device cpu or auto")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device '{name}' is not available: torch sees {n} CUDA device(s), "
                              f"cuda:0 to cuda:{n - 1}")
    return dev


def to_cpu(obj: Any) -> Any:
    """Tensors of a nested state (dicts, lists) moved to the CPU, so a checkpoint loads anywhere."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
