"""The stage contract: what every step of the D3N chain declares, and the one runner that executes it.

A stage is one module that defines

- `Config`: its typed config (a pydantic model; placement fields such as `device` and `workers`
  are marked with `d3n.config.placement` or the `Device` type and never enter its key);
- `from_pipeline(pcfg, inputs) -> Config`: its config built from the pipeline config;
- `run(config, inputs, out) -> dict`: reads the artifacts named in `inputs`, writes its own into
  the run folder `out`, returns its metrics;
- optionally `external(config) -> dict`: fingerprints of files outside the run folder that it
  reads (a dataset to import), so that a change of them reruns it;
- optionally `writes(config) -> list[str]`: its outputs when they depend on the config;
- optionally `wants(config, inputs) -> set[str]`: the optional inputs this run reads (a baseline to
  start from, a test split's repository), so an unused one neither is required nor enters the key;
- optionally `OWN_MANIFEST = True`: its run writes `config.yaml` and a complete manifest itself
  (the resumable stage-1 tools, which check their own with `is_complete` to resume or skip);
- optionally `DISTRIBUTED = True`: under torchrun every rank runs it (a training loop that splits
  its batches across them, rank 0 writing); any other stage runs on rank 0 while the others wait;
- optionally `enabled(pcfg) -> bool`: a stage the pipeline runs only when its config asks for it
  (the defect generator and augmentation);
- optionally `update(config, inputs, out, spec, previous)`: how a finished run catches up when
  the only change upstream is images added to the dataset (`d3n data add`). It returns metrics
  (brought up to date in place: a repository extended, a DDPM reused), a config (run afresh
  starting from the previous run's best.pt, which the pipeline keeps in the new run folder as
  `previous`: a detector fine-tuned), or None (declined: the stage reruns from scratch). `spec` is the pipeline's
  `update:` section.

The registry (`d3n/stages.py`) lists the stages in chain order with the artifacts each reads
(`Input`: another stage's file or folder) and writes. `d3n pipeline`, the per-stage commands and
the report all go through it, and `execute` below writes every stage's `config.yaml` and manifest,
so adding a stage is one module and one registry line.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from d3n.artifacts import CONFIG, MANIFEST, Manifest, fingerprint, is_complete, write_yaml
from d3n.config import identity
from d3n.errors import ArtifactError


@dataclass(frozen=True)
class Input:
    """An artifact a stage reads: `path` inside the run folder of `stage` ("." for the folder)."""

    stage: str
    path: str = "."
    help: str = ""
    optional: bool = False  # read only when the stage's `wants(config, inputs)` names it


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # imported only when the stage runs: the registry stays light (no torch)
    reads: dict[str, Input] = field(default_factory=dict)
    writes: tuple[str, ...] = ()  # files the manifest fingerprints, relative to the run folder
    model: str | None = None  # the report's column for a stage that trains a detector
    help: str = ""

    def impl(self) -> ModuleType:
        return importlib.import_module(self.module)

    def upstream(self, inputs: dict[str, Path] | None = None, root: Path | None = None) -> list[str]:
        """The stages it reads: all of its required inputs' and, given `inputs`, the optional ones there.
        Given the run folder `root` too, the stage folders the inputs really lie in (the pipeline may
        give a stage the augmented dataset where it declares the imported one)."""
        if inputs is not None and root is not None:
            base = Path(root).resolve()
            return sorted({Path(p).resolve().relative_to(base).parts[0] for p in inputs.values()
                           if Path(p).resolve().is_relative_to(base)})
        return sorted({i.stage for n, i in self.reads.items() if not i.optional or (inputs and n in inputs)})

    def wanted(self, config: Any, inputs: dict[str, Path]) -> set[str]:
        impl = self.impl()
        return set(impl.wants(config, inputs)) if hasattr(impl, "wants") else set()


def portable(value: Any, root: Path) -> Any:
    """Paths inside the run folder written relative to it, so a moved or copied run keeps its keys
    (the content of those paths is in the key already, through the upstream manifests)."""
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v, root) for v in value]
    if isinstance(value, str | Path) and Path(value).is_absolute():
        path, base = Path(value).resolve(), root.resolve()
        if path.is_relative_to(base):
            return "$OUT/" + path.relative_to(base).as_posix()
    return value


def stage_keys(stage: Stage, config: Any, root: Path, inputs: dict[str, Path]) -> tuple[str, str]:
    """The one place stage keys are computed: (key, own key). The key holds the config's identity
    (no placement fields), the fingerprints of the external files it reads and the manifests of the
    stages it reads; the own key the first two only (equal own keys and a grown dataset are what make
    an incremental update possible)."""
    impl = stage.impl()
    own = {"stage": stage.name, "config": portable(identity(config, mode="json"), root),
           "external": impl.external(config) if hasattr(impl, "external") else {}}
    upstream = {s: fingerprint(root / s / MANIFEST) for s in stage.upstream(inputs, root)}
    return _digest({**own, "upstream": upstream}), _digest(own)


def stage_key(stage: Stage, config: Any, root: Path, inputs: dict[str, Path]) -> str:
    return stage_keys(stage, config, root, inputs)[0]


def _digest(blob: dict) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _writes(stage: Stage, impl: ModuleType, config: Any) -> list[str]:
    return list(impl.writes(config)) if hasattr(impl, "writes") else list(stage.writes)


def _manifest(stage: Stage, config: Any, inputs: dict[str, Path], out: Path) -> Manifest:
    """The stage's manifest, its config.yaml written beside it (the manifest itself comes last)."""
    write_yaml(Path(out) / CONFIG, config)
    return Manifest(out, stage.name, {k: str(v) for k, v in inputs.items()}, identity(config, mode="json"))


def execute(stage: Stage, config: Any, inputs: dict[str, Path], out: Path) -> dict:
    """Run one stage into `out`: its resolved config, the run, the manifest written last. Under
    torchrun, all ranks return together and only rank 0 writes (d3n.distributed)."""
    from d3n import distributed

    w = distributed.world()
    if not w.distributed:
        return _execute(stage, config, inputs, out)
    every_rank = getattr(stage.impl(), "DISTRIBUTED", False)
    # a failure on one rank ends them all (torchrun stops the group), so no barrier on the way out
    metrics = _execute(stage, config, inputs, out, write=w.main) if every_rank or w.main else None
    distributed.barrier(long=not every_rank)  # the others wait here for rank 0's single-process stage
    return metrics if every_rank else distributed.broadcast(metrics)


def _execute(stage: Stage, config: Any, inputs: dict[str, Path], out: Path, write: bool = True) -> dict:
    missing = [f"{name} ({path})" for name, path in inputs.items() if not Path(path).exists()]
    if missing:
        raise ArtifactError(f"stage '{stage.name}': input(s) not found: {', '.join(missing)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    impl = stage.impl()
    inputs = {k: Path(v) for k, v in inputs.items()}
    if getattr(impl, "OWN_MANIFEST", False):
        metrics = impl.run(config, inputs, out)
        if write and not is_complete(out):
            raise ArtifactError(f"{out}: stage '{stage.name}' finished without a complete {MANIFEST}")
        return metrics
    if not write:  # a rank other than 0 of a distributed stage: it trains, rank 0 writes
        return impl.run(config, inputs, out)
    manifest = _manifest(stage, config, inputs, out)
    with manifest.timed("run"):
        metrics = impl.run(config, inputs, out)
    manifest.complete(_writes(stage, impl, config))
    return metrics


def update(stage: Stage, config: Any, inputs: dict[str, Path], out: Path, spec: Any, previous: Path):
    """Bring a finished run up to date after the dataset grew (the stage's `update` hook, see the
    module doc): returns its metrics, a config to run afresh, or None. An in-place update gets a
    new manifest (rank 0 alone runs it: stages that update in place are single-process)."""
    impl = stage.impl()
    if not hasattr(impl, "update"):
        return None
    result = impl.update(config, {k: Path(v) for k, v in inputs.items()}, Path(out), spec, previous)
    if isinstance(result, dict) and not getattr(impl, "OWN_MANIFEST", False):
        _manifest(stage, config, inputs, out).complete(_writes(stage, impl, config))
    return result


def add_inputs(parser: argparse.ArgumentParser, stage: Stage) -> None:
    """One required `--NAME PATH` option per artifact the stage reads (the per-stage commands)."""
    for name, inp in stage.reads.items():
        where = f"{inp.stage} run folder" if inp.path == "." else f"{inp.stage}'s {inp.path}"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=not inp.optional,
                            help=(inp.help or f"the {where}") + (" (optional)" if inp.optional else ""))


def inputs_from_args(stage: Stage, args: argparse.Namespace) -> dict[str, Path]:
    return {name: Path(v) for name in stage.reads if (v := getattr(args, name, None)) is not None}
