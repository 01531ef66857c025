"""The `data` stage: the dataset every later stage reads, imported (VOC / YOLO / COCO) or synthesised."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from d3n.artifacts import fingerprint
from d3n.config import StrictModel, added
from d3n.data import versions


class SynthSpec(StrictModel):
    images: int = 240
    size: int = 256
    seed: int = 0
    val_frac: float = 0.2
    test_frac: float = 0.0  # a held-out split to report on (val chooses checkpoints)
    rare: str | None = added(None)  # a class cut to `rare_keep` of its defects in train (augmentation studies)
    rare_keep: float = added(0.1)


class Config(StrictModel):
    synth: SynthSpec | None = None  # generate the synthetic defect dataset, or
    source: Path | None = None  # import this dataset (VOC / YOLO / COCO)
    format: Literal["voc", "yolo", "coco", "masks"] | None = None
    splits: Path | None = None  # folder with train.txt / val.txt [/ test.txt] stems
    val_frac: float = 0.2
    test_frac: float | None = None  # a seeded held-out test split, when the source has none
    seed: int = 0
    skip_bad: bool = False


def from_pipeline(pcfg, inputs: dict[str, Path]) -> Config:
    return pcfg.data


def external(cfg: Config) -> dict:
    """An imported dataset is read from outside the run folder: its content is part of the key."""
    return {"source": fingerprint(cfg.source)} if cfg.source is not None else {}


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    target = out / "dataset"
    if target.exists():  # an import or synth killed half-way: redo it
        shutil.rmtree(target)
    if cfg.synth is not None:
        from d3n.data.synth import generate

        s = cfg.synth
        generate(target, images=s.images, size=s.size, seed=s.seed, val_frac=s.val_frac, test_frac=s.test_frac,
                 rare=s.rare, rare_keep=s.rare_keep)
    else:
        from d3n.data.importer import import_dataset

        # with split files the files decide; a val fraction next to them would contradict them
        val_frac = None if cfg.splits is not None else cfg.val_frac
        import_dataset(cfg.source, target, fmt=cfg.format, splits=cfg.splits, val_frac=val_frac,
                       test_frac=cfg.test_frac, seed=cfg.seed, skip_bad=cfg.skip_bad)
    # version 1; `d3n data add` appends versions, which the stages downstream take incrementally
    versions.record_initial(target, str(cfg.source) if cfg.source is not None else "synth")
    return {"data_version": 1}
