"""Load an ultralytics detection checkpoint (the baseline's or the student's best.pt) for export."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from d3n.artifacts import sha256_file
from d3n.errors import ArtifactError


@dataclass
class Checkpoint:
    path: Path
    yolo: object  # ultralytics.YOLO
    names: list[str]
    strides: list[int]
    sha256: str

    @property
    def nc(self) -> int:
        return len(self.names)

    def torch_model(self):
        """A fused fp32 eval copy of the detector: what the exporter traces."""
        m = copy.deepcopy(self.yolo.model).float().eval()
        for p in m.parameters():
            p.requires_grad_(False)
        return m.fuse(verbose=False) if hasattr(m, "fuse") else m


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: checkpoint not found")
    if path.suffix != ".pt":
        raise ArtifactError(f"{path}: expected an ultralytics .pt checkpoint")
    from d3n.offline import ultralytics

    ul = ultralytics()
    try:
        yolo = ul.YOLO(str(path), task="detect")
    except Exception as exc:  # corrupt pickle, wrong file: name it
        raise ArtifactError(f"{path}: not a loadable ultralytics checkpoint ({exc})") from None
    if yolo.task != "detect":
        raise ArtifactError(f"{path}: a '{yolo.task}' model; d3n exports detection models only")
    names = yolo.names
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    strides = [int(s) for s in yolo.model.stride.tolist()]
    return Checkpoint(path=path, yolo=yolo, names=names, strides=strides, sha256=sha256_file(path))
