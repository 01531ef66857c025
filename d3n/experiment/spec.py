"""The experiment file: a base pipeline config, variants (config overrides) and seeds.

    base: ../configs/neu-det-cpu.yaml     # a pipeline config, relative to this file
    out: ../runs/study                    # default: runs/<file stem>
    seeds: [0, 1, 2]                      # the detectors' seeds (train.seed); stage 1 keeps the base's
    common: {teacher: {init: baseline}}   # overrides every cell shares
    variants:                             # name -> overrides; a cell is one variant at one seed
      d3n: {}
      no-ddpm: {teacher: {fusion: {use_ddpm: false}}}
      long-baseline: {train: {epochs: 24}, stages: [data, baseline]}   # `stages`: only these run
    reference: baseline                   # the row every other row is compared with (paired by seed)
    compare: [[d3n teacher, long-baseline baseline]]   # further pairs of rows, A - B
    classes: [crazing]                    # classes whose AP50 is paired too

A cell's pipeline config is base <- common <- variant <- {train: {seed: s}}, merged key by key.
Stages whose config and inputs are the same in several cells (data, DDPM, repository, compressor,
a baseline that several variants compare against) have the same stage key and run once.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import Field

from d3n.config import StrictModel, load_yaml, validate
from d3n.errors import ConfigError


class ExperimentConfig(StrictModel):
    base: Path
    out: Path | None = None
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    common: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(min_length=1)
    reference: str = "baseline"
    # the pipeline stages each cell runs (default: every stage its config turns on); e.g. an
    # augmentation study compares baselines: [data, generator, augment, baseline]
    stages: list[str] | None = None
    # further paired comparisons [A, B] of report rows ("baseline", "<variant> baseline|teacher|student")
    compare: list[tuple[str, str]] = Field(default_factory=list)
    # classes whose AP50 is paired too, beside mAP50, mAP50-95 and recall (an augmentation study's
    # rare class: its gain is lost in the mean over classes)
    classes: list[str] = Field(default_factory=list)




def merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`, mappings key by key, everything else replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_experiment(path: Path) -> ExperimentConfig:
    path = Path(path)
    cfg = validate(ExperimentConfig, load_yaml(path), str(path))
    here = path.resolve().parent
    cfg.base = cfg.base if cfg.base.is_absolute() else (here / cfg.base).resolve()
    if not cfg.base.is_file():
        raise ConfigError(f"{path}: base config {cfg.base} not found")
    cfg.out = (here / cfg.out).resolve() if cfg.out is not None else (Path("runs") / path.stem).resolve()
    bad = [v for v in cfg.variants if not v.replace("-", "").replace("_", "").isalnum()]
    if bad:
        raise ConfigError(f"{path}: variant names must be letters, digits, '-' or '_': {bad}")
    from d3n.stages import NAMES

    for v in cfg.variants:
        own = cfg.variants[v].get("stages", ...)
        if own is not ... and (not isinstance(own, list) or not own or not all(isinstance(x, str) for x in own)):
            raise ConfigError(f"{path}: variant {v}: stages must be a non-empty list of stage names, got {own!r}")
        unknown = [s for s in (variant_stages(cfg, v) or []) if s not in NAMES]
        if unknown:
            raise ConfigError(f"{path}: variant {v}: unknown stages {unknown}; the stages are {list(NAMES)}")
    if cfg.stages is not None and not cfg.stages:
        raise ConfigError(f"{path}: stages must name at least one stage (leave it out to run them all)")
    rows = possible_rows(cfg)
    unknown = [r for pair in cfg.compare for r in pair if r not in rows]
    if unknown:
        raise ConfigError(f"{path}: compare names rows {unknown} that no variant makes; the rows can be "
                          f"{sorted(rows)}")
    return cfg


def possible_rows(exp: ExperimentConfig) -> set[str]:
    """The report rows the variants can make: "baseline" (the first variant's), "<variant> baseline"
    for a later variant whose baseline differs, and "<variant> teacher|student" where it trains them."""
    rows = {"baseline"}
    for i, v in enumerate(exp.variants):
        stages = variant_stages(exp, v)
        for model, stage in (("baseline", "baseline"), ("teacher", "teacher"), ("student", "distill")):
            if (stages is None or stage in stages) and not (model == "baseline" and i == 0):
                rows.add(f"{v} {model}")
    return rows


def variant_stages(exp: ExperimentConfig, variant: str) -> list[str] | None:
    """The stages a variant's cells run: its own `stages:`, else the experiment's, else all (None)."""
    return exp.variants[variant].get("stages", exp.stages)


def cell_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def cell_config(exp: ExperimentConfig, variant: str, seed: int) -> dict:
    """The pipeline config (as a mapping) of one cell; relative paths in the base stay relative to it."""
    raw = load_yaml(exp.base)
    for key in ("source", "splits"):  # make the base's own relative paths absolute before it moves
        value = (raw.get("data") or {}).get(key)
        if value and not Path(value).is_absolute():
            raw["data"][key] = str((exp.base.parent / value).resolve())
    if raw.get("weights") and not Path(raw["weights"]).is_absolute():
        raw["weights"] = str((exp.base.parent / raw["weights"]).resolve())
    # stage 1 keeps the base's seed in every cell (one DDPM, one compressor); the detectors get the cell's
    raw.setdefault("seed", (raw.get("train") or {}).get("seed", 0))
    over = {k: v for k, v in exp.variants[variant].items() if k != "stages"}  # stages: the runner's, not the config's
    raw = merge(merge(merge(raw, exp.common), over), {"train": {"seed": seed}})
    raw["out"] = str(exp.out / "cells" / cell_name(variant, seed))
    return raw
