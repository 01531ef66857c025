"""`d3n val` for a fusion teacher: scored like any detector, on any split or folder of images.

Its DDPM features come from a repository that holds the split (`--repo`) or, by default, are
computed on the fly from the DDPM and compressor the teacher was trained with (train/teacher/live.py),
so a test split or new images need no repository build.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from d3n.data.layout import DatasetLayout
from d3n.errors import ArtifactError, DataError
from d3n.train.detector.data import DetectionDataset, collate
from d3n.train.detector.evaluate import evaluate
from d3n.train.detector.profile import count_params
from d3n.train.repository.store import FeatureStore
from d3n.train.teacher.features import FeatureProvider
from d3n.train.teacher.live import LiveRepository
from d3n.train.teacher.model import FusionTeacher


def recorded_run(extra: dict, key: str, model_path: Path) -> Path | None:
    """The DDPM or compressor run a teacher checkpoint records: at its place relative to the
    checkpoint (the same run folder, wherever it was copied), else where it was when trained, which
    the error that follows names when it is not there either."""
    if not extra.get(key):
        return None
    where = Path(extra[key])
    moved = (Path(model_path).resolve().parent / extra.get("relative", {}).get(key, where)).resolve()
    return moved if moved.exists() else where


def feature_source(teacher: FusionTeacher, model_path: Path, images: dict[str, Path], repo: Path | None,
                   ddpm: Path | None, resvae: Path | None, device: str):
    """(source, compressor, description): the repository asked for, else the on-the-fly source built
    from the DDPM run and compressor the checkpoint records (or those given)."""
    compressor = resvae or recorded_run(teacher.extra, "compressor", model_path)
    if repo is not None:
        return FeatureStore.open(repo), compressor, f"repository {repo}"
    ddpm = ddpm or recorded_run(teacher.extra, "ddpm", model_path)
    if ddpm is None or not Path(ddpm).exists():
        raise ArtifactError(f"{model_path}: its DDPM run ({ddpm}) is not here; pass --ddpm RUN (and --resvae RUN) "
                            "or --repo with features of this split")
    if compressor is not None and not Path(compressor).exists():
        raise ArtifactError(f"{model_path}: its compressor run ({compressor}) is not here; pass --resvae RUN")
    live = LiveRepository(Path(ddpm), teacher.extra.get("timesteps") or [100, 150, 250], images, compressor, device)
    return live, compressor, f"computed on the fly from {ddpm}" + (f" and {compressor}" if compressor else "")


def run(model_path: Path, data: Path, imgsz: int = 640, batch: int = 16, device: str = "cpu", split: str = "val",
        repo: Path | None = None, ddpm: Path | None = None, resvae: Path | None = None) -> dict:
    layout = DatasetLayout.open(data)
    teacher = FusionTeacher.load(model_path).to(device).eval()
    if teacher.config.nc != layout.nc:
        raise DataError(f"{layout.yaml_path}: {layout.nc} classes, but {model_path} predicts {teacher.config.nc}")
    images = {p.stem: p for p in layout.images(split)}
    source, compressor, how = feature_source(teacher, Path(model_path), images, repo, ddpm, resvae, device)
    features = FeatureProvider([source], compressor, device=device, shuffle_seed=teacher.extra.get("shuffle_seed"))
    if features.channels != teacher.config.ddpm_channels:
        raise ArtifactError(f"features ({how}) decode to {features.channels} channels; {model_path} was trained "
                            f"on {teacher.config.ddpm_channels}")
    loader = DataLoader(DetectionDataset(layout.root, split, imgsz), batch_size=batch, shuffle=False,
                        collate_fn=collate)

    def predict(b):
        with torch.no_grad():
            return teacher(b["img"].to(device).float() / 255, features(b["pieces"], imgsz))[0]

    metrics = evaluate(predict, loader, list(layout.names), desc=f"val {Path(model_path).name}")
    metrics.update({"model": str(model_path), "data": str(layout.yaml_path), "split": split, "imgsz": imgsz,
                    "params": count_params(teacher), "features": how})
    return metrics
