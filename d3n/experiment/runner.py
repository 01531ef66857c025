"""Run an experiment's cells (variants x seeds), each a pipeline run folder under OUT/cells/, with
stages shared across cells by key (d3n/experiment/share.py). Every cell resumes like the pipeline;
`cells` selects a subset, so cells can run on several machines or sessions and be gathered later."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import yaml

from d3n.artifacts import read_json, write_json, write_text
from d3n.errors import ConfigError
from d3n.experiment.share import StageShare
from d3n.experiment.spec import ExperimentConfig, cell_config, cell_name, variant_stages

log = logging.getLogger(__name__)
CELL = "cell.json"


def all_cells(exp: ExperimentConfig) -> list[tuple[str, int]]:
    """Variant-major: every seed of the first variant, then the next (the reference first)."""
    return [(v, s) for v in exp.variants for s in exp.seeds]


def select(exp: ExperimentConfig, names: list[str] | None) -> list[tuple[str, int]]:
    cells = all_cells(exp)
    if not names:
        return cells
    known = {cell_name(v, s): (v, s) for v, s in cells}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown cells {unknown}; this experiment has {list(known)}")
    return [known[n] for n in names]


def run_cell(exp: ExperimentConfig, variant: str, seed: int, share: StageShare) -> dict:
    from d3n.pipeline import STATE, Pipeline, load_config

    name = cell_name(variant, seed)
    folder = exp.out / "cells" / name
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "pipeline.yaml"
    write_text(cfg_path, yaml.safe_dump(cell_config(exp, variant, seed), sort_keys=False))
    previous = read_json(folder / CELL) if (folder / CELL).exists() else {}
    print(f"\n==== cell {name} ====", flush=True)
    t0 = time.time()
    pipe = Pipeline(load_config(cfg_path), folder, share=share)
    from d3n.stages import get

    # the variant's (or experiment's) stages that this cell's config turns on (a plain variant has no
    # augment stage)
    stages = variant_stages(exp, variant)
    if stages is not None:
        stages = [s for s in stages if pipe.active(get(s))]
        if not stages:
            raise ConfigError(f"cell {name}: none of the stages {variant_stages(exp, variant)} is turned on by "
                              "its config: nothing to run")
    pipe.run(stages)
    took = round(time.time() - t0, 1)
    ran = {s: pipe.timings.get(s) for s, st in pipe.status.items() if st in ("ran", "resumed")}
    # how each stage folder came to be (ran / resumed / shared), as the pipeline recorded it, and the
    # seconds it took over every attempt (a cell killed and resumed across sessions adds up)
    states = {s: read_json(p) for s in pipe.status if (p := folder / s / STATE).exists()}
    status = {s: st.get("made", pipe.status[s]) for s, st in states.items()}
    earlier = previous.get("stage_seconds", {})
    seconds = {s: states[s].get("seconds", ran.get(s, earlier.get(s))) for s, made in status.items()
               if not made.startswith(("shared", "skipped"))}
    record = {"cell": name, "variant": variant, "seed": seed, "complete": True, "status": status,
              "stage_seconds": seconds, "seconds": round(sum(v for v in seconds.values() if v), 1),
              "wall_seconds_last_run": took}
    write_json(folder / CELL, record)
    return record


def run_experiment(exp: ExperimentConfig, cells: list[str] | None = None) -> dict:
    exp.out.mkdir(parents=True, exist_ok=True)
    share = StageShare(exp.out / "cells")
    records = [run_cell(exp, v, s, share) for v, s in select(exp, cells)]
    log.info("experiment: %d cells, %d stages shared between cells", len(records), share.copied)
    return {"cells": records, "shared_stages": share.copied}


def finished_cells(exp: ExperimentConfig) -> dict[str, dict]:
    """The cells that have completed, from their cell.json (whichever machine or session ran them)."""
    out = {}
    for v, s in all_cells(exp):
        path = exp.out / "cells" / cell_name(v, s) / CELL
        if path.exists():
            out[cell_name(v, s)] = read_json(path)
    return out


def cell_folder(exp: ExperimentConfig, variant: str, seed: int) -> Path:
    return exp.out / "cells" / cell_name(variant, seed)
