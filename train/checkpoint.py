"""The one training-state format: what a killed run needs to continue, and which config made it.

Every resumable trainer (the detector loop, the DDPM trainer) saves its state with `save_state` and
reads it back with `load_state`. The file is `{"format", "config", "state"}`: `config` is the
run's config identity (d3n.config.identity: placement fields such as device and workers left out),
so a resume under a different config is refused with the differing fields named, while a run moved
to another device or given more workers resumes. Everything in a state is plain data and CPU
tensors, so it loads with `weights_only=True` (no code runs on load) on any machine.

Also here: the RNG state of the main process in that plain form, and the one weight EMA both
trainers use.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d3n.artifacts import load_torch, save_with
from d3n.config import identity_diff
from d3n.errors import ArtifactError

STATE_FORMAT = "d3n-train-state/1"

_SCALARS = (type(None), bool, int, float, str, torch.dtype, torch.device)


def plain(obj: Any, where: str = "state") -> Any:
    """`obj` as data that `torch.load(weights_only=True)` accepts: tensors detached to the CPU,
    NumPy scalars and arrays converted, paths as strings. Anything else is a TypeError at save
    time naming where it sits, rather than a file that cannot be resumed."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, _SCALARS):
        return obj
    raise TypeError(f"{where}: a {type(obj).__name__} cannot go into a training state (not weights_only data)")


def save_state(path: str | Path, state: dict[str, Any], config_identity: dict[str, Any]) -> Path:
    """Atomically write `state` (made plain, tensors on the CPU) with the identity of its config."""
    blob = {"format": STATE_FORMAT, "config": plain(config_identity, "config"), "state": plain(state)}
    return save_with(path, lambda p: torch.save(blob, p))


def load_state(path: str | Path, config_identity: dict[str, Any], what: str = "training state") -> dict[str, Any]:
    """The state saved at `path`, refused (ArtifactError naming the file and each differing field)
    if it was made under another config identity than `config_identity`."""
    path = Path(path)
    try:
        blob = load_torch(path, what)
    except ArtifactError as exc:
        raise ArtifactError(f"{exc}; delete it to start over") from None
    if not isinstance(blob, dict) or blob.get("format") != STATE_FORMAT:
        raise ArtifactError(f"{path}: not a d3n {what} (expected format {STATE_FORMAT}); delete it to start over")
    diff = identity_diff(blob["config"], plain(config_identity, "config"))
    if diff:
        raise ArtifactError(f"{path}: {what} was made with a different config ({'; '.join(diff)}); "
                            "use a new --out or the same options")
    return blob["state"]


def rng_state() -> dict[str, Any]:
    """The main process's torch, NumPy and Python RNG states as weights_only data."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": [version, list(internal), gauss_next]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class EMA:
    """An exponential moving average of a model's weights, kept as a frozen copy (`.ema`).

    Floating-point entries of the state dict move towards the model's by `1 - rate` per update;
    integer buffers (BatchNorm's batch counters) follow the model. With `tau`, the rate ramps up as
    `decay * (1 - exp(-updates / tau))` (ultralytics' ModelEMA, which the detector recipe
    follows: early weights are not averaged in with a near-1 decay); without it the rate is
    `decay` from the first update.
    """

    def __init__(self, model: torch.nn.Module, decay: float, tau: float | None = None):
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, 0

    def rate(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.tau)) if self.tau else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        weight = 1 - self.rate()
        current = model.state_dict()
        floats, targets = [], []
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                floats.append(v)
                targets.append(current[k])
            else:
                v.copy_(current[k])
        if floats:  # one kernel per op for all tensors (the same arithmetic as a per-tensor lerp_)
            torch._foreach_lerp_(floats, targets, weight)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.ema.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
