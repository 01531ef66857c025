"""Run an experiment's cells (variants x seeds), each a pipeline run folder under OUT/cells/, with
stages shared across cells by key (d3n/experiment/share.py). Every cell resumes like the pipeline;
`cells` selects a subset, so cells can run on several machines or sessions and be gathered later.
A cell is run under a lock: processes started on the same folder (`--jobs N`, or another session)
each take the cells no other process holds."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from d3n.artifacts import read_json, write_json, write_text
from d3n.errors import ConfigError
from d3n.experiment.share import StageShare, try_exclusive
from d3n.experiment.spec import ExperimentConfig, cell_config, cell_name, variant_stages

log = logging.getLogger(__name__)
CELL = "cell.json"
CELL_LOCK = ".cell.lock"  # held while a process runs the cell


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


def run_cell(exp: ExperimentConfig, variant: str, seed: int, share: StageShare, device: str | None = None) -> dict:
    from d3n.pipeline import STATE, Pipeline, load_config

    name = cell_name(variant, seed)
    folder = exp.out / "cells" / name
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "pipeline.yaml"
    raw = cell_config(exp, variant, seed)
    if device is not None:  # where this process runs; never part of a stage key
        raw["device"] = device
    write_text(cfg_path, yaml.safe_dump(raw, sort_keys=False))
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


def run_experiment(exp: ExperimentConfig, cells: list[str] | None = None, device: str | None = None) -> dict:
    """Run the cells (all, or `cells`) in order, skipping any another process is running."""
    exp.out.mkdir(parents=True, exist_ok=True)
    share = StageShare(exp.out / "cells")
    records, pending, first = [], select(exp, cells), True
    while pending:
        held = []
        for v, s in pending:
            folder = cell_folder(exp, v, s)
            if not first and (folder / CELL).exists():
                continue  # finished by the process that held it
            with try_exclusive(folder / CELL_LOCK) as mine:
                if mine:
                    records.append(run_cell(exp, v, s, share, device))
                else:
                    held.append((v, s))
        if held == pending:  # every cell left is another process's
            break
        pending, first = held, False  # a lock seen held only for a moment (--status) is tried again
    elsewhere = [cell_name(v, s) for v, s in pending if not (cell_folder(exp, v, s) / CELL).exists()]
    for name in elsewhere:
        print(f"cell {name}: another process is running it; left to that one", flush=True)
    log.info("experiment: %d cells, %d stages shared between cells", len(records), share.copied)
    return {"cells": records, "elsewhere": elsewhere, "shared_stages": share.copied}


def run_jobs(config: Path, exp: ExperimentConfig, jobs: int, cells: list[str] | None = None,
             devices: list[str] | None = None) -> int:
    """`jobs` processes on one experiment folder, each taking the next cell no other one holds (a
    cell that needs a stage another is making waits for it and shares it). On CPU each process gets
    its share of the cores (OMP_NUM_THREADS = cores / jobs); `devices` are dealt out round-robin.
    Each process logs to OUT/worker-<i>.log. Returns the first non-zero exit status, else 0."""
    from d3n.distributed import cpu_cores

    exp.out.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, cpu_cores() // jobs))
    procs = []

    def stop(signum, frame):  # a SIGTERM to this process stops the workers too (finally below)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for i in range(jobs):
            cmd = [sys.executable, "-m", "d3n.cli", "experiment", str(config), "--out", str(exp.out), "--worker"]
            if cells:
                cmd += ["--cells", ",".join(cells)]
            if devices:
                cmd += ["--device", devices[i % len(devices)]]
            env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            logfile = exp.out / f"worker-{i}.log"
            print(f"worker {i}: {threads} threads{', ' + devices[i % len(devices)] if devices else ''}; "
                  f"log {logfile}", flush=True)
            with open(logfile, "ab") as fh:
                procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env))
        codes = [p.wait() for p in procs]
    finally:  # interrupted: stop the workers (their cells resume on the next run)
        signal.signal(signal.SIGTERM, previous)
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
    codes = [128 - rc if rc < 0 else rc for rc in codes]  # killed by signal N: 128 + N, as a shell says
    for i, rc in enumerate(codes):
        if rc:
            print(f"worker {i} failed (exit {rc}); see {exp.out / f'worker-{i}.log'}", file=sys.stderr)
    return next((rc for rc in codes if rc), 0)


def finished_cells(exp: ExperimentConfig) -> dict[str, dict]:
    """The cells that have completed, from their cell.json (whichever machine or session ran them)."""
    out = {}
    for v, s in all_cells(exp):
        path = exp.out / "cells" / cell_name(v, s) / CELL
        if path.exists():
            out[cell_name(v, s)] = read_json(path)
    return out


def cell_states(exp: ExperimentConfig) -> list[dict]:
    """Where every cell stands, read from its folder: `done` (with its seconds), `running` (a process
    holds it; the stage it is in), `stopped` (begun, not finished: it resumes at that stage) or
    `waiting` (nothing made yet)."""
    from d3n.artifacts import MANIFEST
    from d3n.pipeline import STATE
    from d3n.stages import NAMES

    out = []
    for v, s in all_cells(exp):
        name, folder = cell_name(v, s), cell_folder(exp, v, s)
        with try_exclusive(folder / CELL_LOCK) if folder.exists() else contextlib.nullcontext(True) as free:
            running = not free
        if (folder / CELL).exists() and not running:
            rec = read_json(folder / CELL)
            out.append({"cell": name, "state": "done", "seconds": rec.get("seconds")})
            continue
        begun = [st for st in NAMES if (folder / st / STATE).exists()]
        at = next((st for st in begun if not (folder / st / MANIFEST).exists()), None)
        state = "running" if running else "stopped" if begun else "waiting"
        out.append({"cell": name, "state": state, "stage": at or (begun[-1] if begun else None),
                    "made": [st for st in begun if (folder / st / MANIFEST).exists()]})
    return out


def cell_folder(exp: ExperimentConfig, variant: str, seed: int) -> Path:
    return exp.out / "cells" / cell_name(variant, seed)
