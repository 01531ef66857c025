"""The `repo` stage: the raw feature repository of every split, from one DDPM (paper §III-B, Eq. 2)."""

from __future__ import annotations

from pathlib import Path

from d3n import distributed
from d3n.config import StrictModel, placement
from d3n.data.layout import DatasetLayout
from d3n.train.device import Device
from d3n.train.repository.build import DEFAULT_TIMESTEPS, RepoBuildConfig, build_repo
from d3n.train.repository.store import INDEX, FeatureStore

DISTRIBUTED = True  # under torchrun the ranks share out the shards; rank 0 writes


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


def update(cfg: Config, inputs: dict[str, Path], out: Path, spec, previous: Path) -> dict:
    """After `d3n data add`: each split's repository extended with its new images only (new shards
    after the old ones, which stay as they are); a split that did not grow is kept. With a
    fine-tuned DDPM the new shards come from it (their provenance is in the repository's plan)."""
    layout = DatasetLayout.open(inputs["data"])
    metrics = {}
    for split in cfg.splits:
        store = out / split / INDEX
        if store.exists() and set(FeatureStore.open(out / split, verify=False).image_ids) == {
                p.stem for p in layout.images(split)}:
            metrics[split] = {"images_built_this_run": 0}
            continue
        rcfg = RepoBuildConfig(ddpm=str(inputs["ddpm"]), data=str(inputs["data"]), split=split,
                               timesteps=cfg.timesteps, batch=cfg.batch, device=cfg.device)
        metrics[split] = build_repo(rcfg, out / split, world=distributed.World())  # rank 0 alone updates
    return metrics


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    metrics = {}
    for split in cfg.splits:
        rcfg = RepoBuildConfig(ddpm=str(inputs["ddpm"]), data=str(inputs["data"]), split=split,
                               timesteps=cfg.timesteps, batch=cfg.batch, device=cfg.device)
        metrics[split] = build_repo(rcfg, out / split)
    return metrics
