"""The `augment` stage: when the pipeline config has an `augment:` section, the dataset every later
stage reads is this stage's `dataset/`: the imported one with generated defect images added to
its train split (val and test untouched)."""

from __future__ import annotations

from pathlib import Path

from d3n.config import StrictModel
from d3n.data.layout import DatasetLayout
from d3n.train.augment.augment import augment, plan_counts
from d3n.train.augment.params import GENERATIVE, Params
from d3n.train.device import Device


class Config(StrictModel):
    method: str
    counts: dict[str, int]
    masks: str = "random"
    strength: float = Params.strength
    guidance: float = Params.guidance
    steps: int = Params.steps
    transition: float = Params.transition
    check_model: Path | None = None
    min_conf: float = 0.25
    seed: int = 0
    device: Device = "cpu"


def external(cfg: Config) -> dict:
    """A folder of user masks is read from outside the run: its content is part of the key."""
    from d3n.artifacts import fingerprint

    out = {} if cfg.masks in ("random", "boxes") else {"masks": fingerprint(cfg.masks)}
    if cfg.check_model is not None:  # the quality check's detector decides what is kept
        out["check_model"] = fingerprint(cfg.check_model)
    return out


def enabled(pcfg) -> bool:
    return pcfg.augment is not None


def wants(cfg: Config, inputs: dict[str, Path]) -> set[str]:
    return {"generator"} if cfg.method in GENERATIVE else set()


def from_pipeline(pcfg, inputs: dict[str, Path]) -> Config:
    a = pcfg.augment
    counts = plan_counts(DatasetLayout.open(inputs["data"]), a.classes, a.count, a.balance)
    return Config(method=a.method, counts=counts, masks=a.masks, strength=a.strength, guidance=a.guidance,
                  steps=a.steps, transition=a.transition, check_model=a.check_model, min_conf=a.min_conf,
                  seed=pcfg.seed or 0, device=pcfg.device or "cpu")


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    params = Params(strength=cfg.strength, guidance=cfg.guidance, steps=cfg.steps, transition=cfg.transition)
    return augment(inputs["data"], out / "dataset", cfg.method, cfg.counts, masks=cfg.masks,
                   generator=inputs.get("generator"), params=params, seed=cfg.seed, device=cfg.device,
                   check_model=cfg.check_model, min_conf=cfg.min_conf, progress=True)
