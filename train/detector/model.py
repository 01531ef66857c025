"""The plain detector: ultralytics' YOLOv5s ("v5u" anchor-free head) and its checkpoint format.

Baseline and student are both this model; they are saved as ordinary ultralytics checkpoints so
`ultralytics.YOLO("best.pt")` loads, predicts, validates and exports them.
"""

from __future__ import annotations

import copy
import logging
from datetime import datetime, timezone
from pathlib import Path

import torch

from d3n.artifacts import load_torch, save_with
from d3n.distributed import unwrap
from d3n.errors import ArtifactError
from d3n.offline import configure_ultralytics

ARCH = "yolov5s.yaml"  # paper: YOLOv5s baseline and same-size student
log = logging.getLogger(__name__)


def build(nc: int, names: list[str], arch: str = ARCH) -> torch.nn.Module:
    """A fresh YOLOv5s for `nc` classes, with ultralytics' default hyperparameters attached (the
    loss reads box/cls/dfl gains from `model.args`)."""
    configure_ultralytics()
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(arch, nc=nc, verbose=False)
    model.names = dict(enumerate(names))
    model.args = get_cfg()
    return model


def load(path: str | Path) -> torch.nn.Module:
    """Load a detector checkpoint (ours or any ultralytics detection .pt) as a float DetectionModel."""
    configure_ultralytics()
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    path = Path(path)
    # weights_only=False: an ultralytics checkpoint pickles the model object itself (its class,
    # not only tensors); only open checkpoints you trust
    ckpt = load_torch(path, "detector checkpoint", weights_only=False)
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(model, DetectionModel):
        raise ArtifactError(f"{path}: holds no detection model (keys: {list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt)})")
    model = model.float()
    model.args = get_cfg()
    return model


def weights_from(path: str | Path, model: torch.nn.Module) -> torch.nn.Module:
    """Initialise `model` from a checkpoint's weights where names and shapes match (e.g. pretrained
    weights with another class count: all but the class convs). A file that shares no tensor with
    the model is an error, not a silent start from scratch."""
    src = load(path).state_dict()
    own = model.state_dict()
    picked = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    if not picked:
        raise ArtifactError(f"{path}: no weight matches the model by name and shape (not a YOLOv5s checkpoint?)")
    model.load_state_dict(picked, strict=False)
    log.info("initial weights from %s: %d of %d tensors", path, len(picked), len(own))
    return model


def save(model: torch.nn.Module, path: str | Path, train_args: dict, metrics: dict) -> Path:
    """Write an ultralytics-format checkpoint (fp16 model, no optimizer)."""
    import ultralytics

    m = copy.deepcopy(model).half()
    for attr in ("criterion",):
        if hasattr(m, attr):
            delattr(m, attr)
    ckpt = {
        "date": datetime.now(timezone.utc).isoformat(),
        "version": ultralytics.__version__,
        "epoch": -1,
        "best_fitness": None,
        "model": m,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": {"task": "detect", "mode": "train", **train_args},
        "train_metrics": {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))},
    }
    return save_with(path, lambda p: torch.save(ckpt, p))


class DetectorTask:
    """The plain-detector Task for `loop.train` (baseline)."""

    def __init__(self, model: torch.nn.Module, train_args: dict):
        self.model = model
        self.train_args = train_args

    def loss(self, model, batch):
        # the forward through `model` (a DDP wrapper under torchrun), the loss on the detector
        loss, items = unwrap(model).loss(batch, model(batch["img"]))  # items: box/cls/dfl_loss
        return loss.sum(), {k.removesuffix("_loss"): float(v) for k, v in items.items()}

    def predict(self, model, batch):
        return model(batch["img"])[0]

    def save(self, model, path: Path, metrics: dict) -> None:
        save(model, path, self.train_args, metrics)
