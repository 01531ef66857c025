"""The D3N teacher: YOLOv5s whose neck fuses DDPM features at P3/P4/P5 (paper §III-C, Fig. 4).

`FusionTeacher` wraps a plain ultralytics `DetectionModel` built from 'yolov5s.yaml' and runs its
layers exactly as `DetectionModel._predict_once` does (each layer's `f` inputs, the `save` list),
except that just before the Detect layer each of its inputs x_l (the neck outputs at layers
17/20/23) is replaced by fuse_l(x_l, resize(ddpm_l to x_l's h, w)), with one FreqFilter +
CrossFusion per level (train/teacher/fusion.py). The Detect head is untouched, so the outputs are exactly
DetectionModel's (train: the raw dict {"boxes", "scores", "feats"}; eval: (decoded, raw)), and
ultralytics' v8DetectionLoss and NMS apply unchanged.

With the fusion's zero-initialised output projection a fresh teacher computes exactly what its
detector computes; `detector_state_dict()` gives the detector's weights alone (plain
DetectionModel keys).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from d3n.artifacts import load_torch, save_with
from d3n.config import StrictModel
from d3n.errors import ArtifactError, ConfigError
from d3n.offline import ultralytics
from d3n.train.teacher.fusion import CrossFusion, FusionConfig

LEVELS = ("p3", "p4", "p5")
CHECKPOINT_FORMAT = "d3n-fusion-teacher/1"


class TeacherConfig(StrictModel):
    nc: int = Field(ge=1)
    ddpm_channels: dict[str, int]  # channels of the decoded DDPM features per level p3/p4/p5
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    model: str = "yolov5s.yaml"  # paper: YOLOv5s detector (anchor-free ultralytics head, docs/design.md)

    @model_validator(mode="after")
    def _levels(self) -> TeacherConfig:
        if sorted(self.ddpm_channels) != sorted(LEVELS):
            raise ValueError(f"ddpm_channels needs exactly the levels {list(LEVELS)}, "
                             f"got {sorted(self.ddpm_channels)}")
        if any(c < 1 for c in self.ddpm_channels.values()):
            raise ValueError("ddpm_channels must be positive")
        return self


def build_detector(model: str, nc: int) -> nn.Module:
    """A fresh, plain ultralytics DetectionModel (offline)."""
    ultralytics()
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    det = DetectionModel(model, nc=nc, verbose=False)
    det.args = get_cfg()  # default loss gains (box/cls/dfl); a trainer may replace them
    return det


def _plain(obj: Any) -> Any:
    """JSON-plain copy (numpy/torch scalars -> numbers, Paths -> str) so weights_only loading works."""
    def convert(o: Any) -> Any:
        if hasattr(o, "tolist"):
            return o.tolist()
        if isinstance(o, os.PathLike):
            return str(o)
        raise TypeError(f"teacher checkpoint metadata: cannot store {type(o).__name__}")
    return json.loads(json.dumps(obj, default=convert))


def to_grid(d: torch.Tensor, hw) -> torch.Tensor:
    """DDPM features on the detector level's grid. A larger DDPM map (a DDPM input finer than the
    detector's stride) is averaged over the DDPM cells each detector cell covers, so its detail
    reaches the cell instead of aliasing away as bilinear sampling of every k-th cell would; a
    smaller one is interpolated bilinearly."""
    hw = tuple(hw)
    if tuple(d.shape[-2:]) == hw:
        return d
    if d.shape[-2] >= hw[0] and d.shape[-1] >= hw[1]:
        return F.adaptive_avg_pool2d(d, hw)
    return F.interpolate(d, size=hw, mode="bilinear", align_corners=False)


class FusionTeacher(nn.Module):
    def __init__(self, config: TeacherConfig):
        super().__init__()
        self.config = config
        self.detector = build_detector(config.model, config.nc)
        head = self.detector.model[-1]
        if len(head.f) != len(LEVELS):
            raise ConfigError(f"{config.model}: Detect takes {len(head.f)} levels, the teacher fuses {len(LEVELS)}")
        det_channels = [seq[0].conv.in_channels for seq in head.cv2]
        self.fusions = nn.ModuleDict({
            lvl: CrossFusion(c, config.ddpm_channels[lvl], config.fusion)
            for lvl, c in zip(LEVELS, det_channels, strict=True)
        })

    @property
    def stride(self) -> torch.Tensor:
        return self.detector.stride

    def fuse_levels(self, feats: list[torch.Tensor], ddpm: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """x_l -> fuse_l(x_l, ddpm_l brought to x_l's h, w by to_grid) for P3/P4/P5."""
        missing = [lvl for lvl in LEVELS if lvl not in ddpm]
        if missing:
            raise ValueError(f"DDPM features missing for levels {missing}")
        out = []
        for lvl, x in zip(LEVELS, feats, strict=True):
            out.append(self.fusions[lvl](x, to_grid(ddpm[lvl], x.shape[-2:]).to(x.dtype)))
        return out

    def forward(self, images: torch.Tensor, ddpm: dict[str, torch.Tensor]) -> Any:
        """Same loop as DetectionModel._predict_once, with the fusion spliced in before Detect."""
        y, x = [], images
        head = self.detector.model[-1]
        for m in self.detector.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if m is head:
                x = self.fuse_levels(x, ddpm)
            x = m(x)
            y.append(x if m.i in self.detector.save else None)
        return x

    def loss(self, batch: dict[str, torch.Tensor], preds: Any) -> tuple[torch.Tensor, Any]:
        """ultralytics' detection loss (v8DetectionLoss) on the teacher's predictions."""
        return self.detector.loss(batch, preds)

    def branch_weights(self) -> dict[str, list[float]]:
        """Per level, the (cross, det, ddpm) branch weights, summing to 1 (Fig. 11).

        Levels are left out when the fusion mode has no branch weights (concat)."""
        out = {}
        for lvl, fusion in self.fusions.items():
            w = fusion.branch_weights()
            if w is not None:
                out[lvl] = [float(v) for v in w.detach().cpu()]
        return out

    def detector_state_dict(self) -> dict[str, torch.Tensor]:
        """The wrapped detector's weights alone: loads into a plain DetectionModel of the same yaml/nc."""
        return {k: v.detach().clone() for k, v in self.detector.state_dict().items()}

    def save(self, path: str | os.PathLike, **extra: Any) -> Path:
        """Self-contained checkpoint: format tag, config, state_dict (+ plain `extra` metadata)."""
        ckpt = {"format": CHECKPOINT_FORMAT, "config": self.config.model_dump(mode="json"),
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
                "extra": _plain(extra)}
        return save_with(path, lambda p: torch.save(ckpt, p))

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> FusionTeacher:
        path = Path(path)
        ckpt = load_torch(path, "teacher checkpoint", map_location=map_location)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ArtifactError(f"{path}: not a d3n fusion-teacher checkpoint (expected format {CHECKPOINT_FORMAT})")
        try:
            config = TeacherConfig.model_validate(ckpt["config"])
        except ValueError as exc:
            raise ArtifactError(f"{path}: invalid teacher config in checkpoint ({exc})") from None
        model = cls(config)
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as exc:
            raise ArtifactError(f"{path}: weights do not match the teacher config ({exc})") from None
        model.extra = dict(ckpt.get("extra") or {})  # names, imgsz, where its features came from
        return model


def is_teacher_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a fusion-teacher checkpoint (a plain detector's is an ultralytics pickle)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file is not a teacher; its own loader says why
        return False
    return isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT
