"""The `compress` stage: every split's repository written as latents of the fitted compressor."""

from __future__ import annotations

from pathlib import Path

from d3n.config import StrictModel, placement
from d3n.train.device import Device
from d3n.train.repository.compress import compress_run
from d3n.train.repository.store import INDEX, FeatureStore


class Config(StrictModel):
    splits: list[str] = ["train", "val"]
    batch: int = placement(32)
    device: Device = "cpu"


def from_pipeline(pcfg, inputs: dict[str, Path]) -> Config:
    """Every split the raw repository holds."""
    splits = [s for s in ("train", "val", "test") if (inputs["repo"] / s).is_dir()]
    return Config(splits=splits, device=pcfg.device)


def writes(cfg: Config) -> list[str]:
    return [f"{s}/manifest.json" for s in cfg.splits]


def update(cfg: Config, inputs: dict[str, Path], out: Path, spec, previous: Path) -> dict:
    """After `d3n data add`: each split's latents extended with those of its new images only."""
    metrics = {}
    for split in cfg.splits:
        src, dst = inputs["repo"] / split, out / split
        if (dst / INDEX).exists() and FeatureStore.open(src, verify=False).image_ids == FeatureStore.open(
                dst, verify=False).image_ids:
            metrics[split] = {"reused": True}
            continue
        metrics[split] = compress_run(src, inputs["resvae"], dst, batch=cfg.batch, device=cfg.device)
    return metrics


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    return {split: compress_run(inputs["repo"] / split, inputs["resvae"], out / split, batch=cfg.batch,
                                device=cfg.device) for split in cfg.splits}
