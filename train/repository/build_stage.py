"""The `repo` stage: the raw feature repository of every split, from one DDPM (paper §III-B, Eq. 2)."""

from __future__ import annotations

from pathlib import Path

from d3n.config import StrictModel, placement
from d3n.data.layout import DatasetLayout
from d3n.train.device import Device
from d3n.train.repository.build import DEFAULT_TIMESTEPS, RepoBuildConfig, build_repo


class Config(StrictModel):
    timesteps: list[int] = list(DEFAULT_TIMESTEPS)
    splits: list[str] = ["train", "val"]
    batch: int = placement(8)  # images per UNet call: speed only
    device: Device = "cpu"


def from_pipeline(pcfg, inputs: dict[str, Path]) -> Config:
    """Every split the dataset has: train fits the compressor, val chooses checkpoints, test reports."""
    layout = DatasetLayout.open(inputs["data"])
    splits = [s for s in ("train", "val", "test") if layout.has(s) and layout.images(s)]
    return Config(timesteps=pcfg.ddpm.timesteps, splits=splits, device=pcfg.device)


def writes(cfg: Config) -> list[str]:
    return [f"{s}/manifest.json" for s in cfg.splits]


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    metrics = {}
    for split in cfg.splits:
        rcfg = RepoBuildConfig(ddpm=str(inputs["ddpm"]), data=str(inputs["data"]), split=split,
                               timesteps=cfg.timesteps, batch=cfg.batch, device=cfg.device)
        metrics[split] = build_repo(rcfg, out / split)
    return metrics
