"""`d3n pipeline CONFIG.yaml`: the whole D3N chain, one run folder per stage.

The stages and what each reads come from the registry (`d3n/stages.py`); each stage builds its own
typed config from this file's sections and runs through `d3n.stage.execute`. A stage is skipped
when its folder holds a complete manifest and its key (`d3n.stage.stage_keys`: its config without
placement fields, plus the manifests of the stages it reads) is unchanged; a stage whose key
matches but did not finish is re-entered in place and resumes from its own checkpoint; a stage
whose key changed starts afresh.

After `d3n data add` grew the dataset, a rerun brings the chain up to date incrementally (the
`update:` section; `mode: full` retrains instead): a stage whose own config is unchanged and whose
inputs changed only through the new images updates its finished run (`d3n.stage.update`): the
DDPM is reused or fine-tuned, the repositories extended with the new images only, the compressor
reused, the detectors fine-tuned from their previous weights. Every stage folder's `.pipeline.json`
records the data version it saw and how it was made.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import model_validator

from d3n import distributed
from d3n.artifacts import MANIFEST, read_json, write_json
from d3n.config import StrictModel, identity, load_yaml, validate
from d3n.data import versions
from d3n.data.stage import Config as DataSpec  # the data stage's config is the `data:` section
from d3n.distill.loss import DistillConfig
from d3n.errors import ConfigError
from d3n.stage import Stage, execute, stage_keys, update
from d3n.stages import NAMES, STAGES
from d3n.train.augment.params import METHODS
from d3n.train.detector.loop import TrainConfig
from d3n.train.device import Device
from d3n.train.teacher.fusion import FusionConfig

log = logging.getLogger(__name__)

STATE = ".pipeline.json"
PREVIOUS = "previous.pt"  # a fine-tuned detector's starting point: the best.pt of the run before the update


class DDPMSpec(StrictModel):
    preset: Literal["tiny", "paper"] = "tiny"
    size: int = 64  # paper: 64 x 64 DDPM input
    steps: int | None = None
    epochs: int | None = None
    batch: int = 8
    lr: float = 1e-4
    lr_min: float = 0.0  # cosine annealing floor (paper: 5e-6 -> 5e-8)
    ema: float = 0.999
    timesteps: list[int] = [100, 150, 250]  # paper §III-B


class CompressSpec(StrictModel):
    method: Literal["resvae", "pca"] = "resvae"  # paper: ResVAE; pca is the Table III ablation
    latent_channels: int | None = None  # default: widest level / 8 (paper 512 -> 64)
    epochs: int = 10
    steps: int | None = None
    batch: int = 64


class TeacherSpec(StrictModel):
    init: Literal["weights", "baseline"] = "weights"  # baseline: start the teacher's detector from it
    features: Literal["true", "shuffled"] = "true"  # shuffled: the control with another image's features
    fusion: FusionConfig = FusionConfig()


class DistillSpec(DistillConfig):
    teacher: Literal["teacher", "baseline"] = "teacher"  # baseline: the self-distillation control


class UpdateSpec(StrictModel):
    """How a rerun after `d3n data add` brings finished stages up to date; not part of any stage key."""

    mode: Literal["incremental", "full"] = "incremental"  # full: rerun every affected stage from scratch
    ddpm_steps: int = 0  # fine-tune the DDPM this many steps on the grown train split; 0: reuse it as is
    refit_compressor: bool = False  # true: refit the compressor on the grown repository
    detectors: Literal["finetune", "retrain"] = "finetune"  # baseline, teacher, student
    epochs: int | None = None  # fine-tuning epochs (default: a quarter of train.epochs, at least 1)


class GeneratorSpec(StrictModel):
    """The defect generator's training (train/generator): crops around the boxes, at `size`."""

    preset: Literal["tiny", "paper"] = "tiny"
    size: int = 64
    context: float = 1.5
    min_side: int = 32
    p_uncond: float = 0.1
    steps: int | None = None
    epochs: int | None = 50
    batch: int = 8
    lr: float = 1e-4
    lr_min: float = 0.0
    ema: float = 0.999


class AugmentSpec(StrictModel):
    """Generated defect images added to the train split before anything trains (d3n augment)."""

    method: Literal[METHODS]
    classes: list[str] | None = None  # default: every class
    count: int | None = None  # new images per class, or
    balance: int | None = None  # top each class up to this many train boxes
    masks: str = "random"  # random, boxes, or a folder of PNG masks
    strength: float = 0.6
    guidance: float = 3.0
    steps: int = 50
    transition: float = 0.25
    check_model: Path | None = None  # a detector (e.g. the last run's baseline): images it misreads are rejected
    min_conf: float = 0.25
    generator: GeneratorSpec = GeneratorSpec()


class ExportSpec(StrictModel):
    formats: list[Literal["onnx", "onnx-int8"]] = ["onnx"]
    imgsz: int | None = None  # default: the training imgsz


class PipelineConfig(StrictModel):
    out: Path = Path("runs/d3n")
    # One device for the whole chain, and the seed of stage 1 (and of the detectors unless train.seed
    # is set). Unset, they are train.device / train.seed, as in configs written before these keys.
    device: Device | None = None
    seed: int | None = None
    weights: Path | None = None  # initial weights of baseline, teacher detector and student (train.weights)
    data: DataSpec
    ddpm: DDPMSpec = DDPMSpec()
    compress: CompressSpec = CompressSpec()
    train: TrainConfig = TrainConfig()  # shared by baseline, teacher and student
    teacher: TeacherSpec = TeacherSpec()
    distill: DistillSpec = DistillSpec()
    export: ExportSpec = ExportSpec()
    update: UpdateSpec = UpdateSpec()
    augment: AugmentSpec | None = None  # set: the augment stage's dataset replaces data/dataset downstream

    @model_validator(mode="after")
    def _one_device_seed_and_weights(self):
        # device and weights: one for the whole chain. seed: stage 1's (DDPM, compressor) and the
        # detectors' unless train.seed is set itself, so an experiment can vary the detectors' seed
        # over one shared DDPM. Assignments re-run this validator: assign only what changes.
        for name in ("device", "seed", "weights"):
            if getattr(self, name) is None and getattr(self.train, name) is not None:
                setattr(self, name, getattr(self.train, name))
        want = {"device": self.device, "weights": self.weights}
        if "seed" not in self.train.model_fields_set:
            want["seed"] = self.seed
        if any(getattr(self.train, k) != v for k, v in want.items() if v is not None):
            self.train = self.train.model_copy(update={k: v for k, v in want.items() if v is not None})
        return self


def load_config(path: Path) -> PipelineConfig:
    raw = load_yaml(path)
    cfg = validate(PipelineConfig, raw, str(path))
    base = Path(path).resolve().parent  # relative paths in a config are relative to the config file
    d = cfg.data
    if d.synth is None and d.source is None:
        raise ConfigError(f"{path}: data needs either 'synth' or 'source'")
    for attr in ("source", "splits"):
        p = getattr(d, attr)
        if p is not None and not p.is_absolute():
            setattr(d, attr, (base / p).resolve())
    if cfg.weights is not None and not cfg.weights.is_absolute():
        cfg.weights = (base / cfg.weights).resolve()
    if cfg.augment is not None and cfg.augment.masks not in ("random", "boxes"):  # a folder of masks
        cfg.augment.masks = str((base / cfg.augment.masks).resolve())
    if cfg.augment is not None and cfg.augment.check_model is not None and not cfg.augment.check_model.is_absolute():
        cfg.augment.check_model = (base / cfg.augment.check_model).resolve()
    return cfg


def keep_thread_count() -> None:
    """Each stage runs with the CPU threads OMP_NUM_THREADS asks for (d3n experiment --jobs gives each
    process cores / N): ultralytics' device selection, run by the export and by predictions, resets
    torch's thread count to up to 8 for the rest of the process."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))


def spent_before(d: Path, state: dict) -> float:
    """Seconds earlier attempts of a stage spent before they stopped: each attempt records when it
    started; one that was killed ended at the last file it wrote. So a resumed stage reports its
    whole time, not the last attempt's."""
    if "started" not in state:
        return 0.0
    last = max((p.stat().st_mtime for p in d.rglob("*") if p.is_file() and p.name != STATE), default=state["started"])
    return float(state.get("spent", 0.0)) + max(0.0, last - state["started"])


class Pipeline:
    """Runs the registry's stages into one run folder. `share` (used by `d3n experiment`) offers
    finished stage folders of other run folders by stage key: a stage whose key one of them has
    is copied (hard links) instead of recomputed."""

    def __init__(self, cfg: PipelineConfig, out: Path | None = None, share=None):
        self.cfg = cfg
        self.out = Path(out or cfg.out).resolve()  # stage keys hold paths relative to it
        self.share = share
        self.timings: dict[str, float] = {}
        self.status: dict[str, str] = {}

    def dir(self, stage: str) -> Path:
        return self.out / stage

    def inputs(self, stage: Stage, optional: set[str] = frozenset()) -> dict[str, Path]:
        """Where each artifact a stage reads lies; with `augment:` set, the imported dataset is
        replaced by the augmented one for every stage after augmentation."""
        out = {}
        for name, i in stage.reads.items():
            if i.optional and name not in optional:
                continue
            src = i.stage
            if (src, i.path) == ("data", "dataset") and self.cfg.augment is not None \
                    and stage.name not in ("generator", "augment"):
                src = "augment"
            out[name] = self.dir(src) / i.path
        return out

    def active(self, stage: Stage) -> bool:
        impl = stage.impl()
        return not hasattr(impl, "enabled") or impl.enabled(self.cfg)

    def run(self, stages: list[str] | None = None) -> dict:
        unknown = [s for s in stages or () if s not in NAMES]
        if unknown:
            raise ConfigError(f"unknown stages {unknown}; choose from {list(NAMES)}")
        off = [s.name for s in STAGES if (stages is None or s.name in stages) and not self.active(s)]
        if stages and off:
            raise ConfigError(f"stage(s) {off} are off in this config (the augment: section turns them on)")
        wanted = stages or [s.name for s in STAGES if s.name not in off]
        self.out.mkdir(parents=True, exist_ok=True)
        for stage in STAGES:
            for dep in stage.upstream(self.inputs(stage), self.out) if stage.name in wanted else ():
                if dep not in wanted and not (self.dir(dep) / MANIFEST).exists():
                    raise ConfigError(f"stage '{stage.name}' needs '{dep}', which has not run in {self.out}; "
                                      "include it in --stages")
        for stage in STAGES:
            if stage.name in wanted:
                self._run_stage(stage)
        if not distributed.world().main:
            return {}
        from d3n.report import write_report

        return write_report(self.out, self.timings, self.status)

    def _run_stage(self, stage: Stage) -> None:
        d, inputs = self.dir(stage.name), self.inputs(stage)
        config = stage.impl().from_pipeline(self.cfg, inputs)
        inputs = self.inputs(stage, stage.wanted(config, inputs))
        key, own = stage_keys(stage, config, self.out, inputs)
        # with cells running side by side, one makes a shared stage while the others wait, then share it
        making = self.share is not None and distributed.world().main
        with self.share.making(key, stage.name) if making else contextlib.nullcontext():
            self._run_keyed(stage, d, config, inputs, key, own)

    def _run_keyed(self, stage: Stage, d: Path, config, inputs: dict[str, Path], key: str, own: str) -> None:
        state_file = d / STATE
        state = read_json(state_file) if state_file.exists() else {}
        version = self.data_version()
        src = None
        if state.get("key") == key and (d / MANIFEST).exists():
            decision = "skip"
        elif self.share is not None and (src := self.share.lookup(key)) is not None:
            decision = "share"
        elif state.get("updating") == key or (state.get("key") != key
                                              and self._can_update(stage, config, state, own, version)):
            decision = "update"
        else:
            decision = "resume" if state.get("key") == key and d.exists() else "run"
        # under torchrun: rank 0's decision for every rank, taken before anyone changes the folder
        decision = distributed.broadcast(decision, long=True)
        main = distributed.world().main
        if decision == "skip":
            self.status[stage.name] = "skipped (up to date)"
            log.info("stage %s: up to date, skipped", stage.name)
            if main and "own" not in state:  # a folder from before incremental updates: record what they need
                write_json(state_file, {**state, "own": own, "data_version": state.get("data_version", version)})
            return
        if decision == "share":
            self.status[stage.name] = f"shared ({src.parent.name})" if src is not None else "shared"
            if main:
                if d.exists():
                    shutil.rmtree(d)
                self.share.copy(src, d)
                write_json(state_file, {"key": key, "made": self.status[stage.name]})
                log.info("stage %s: same key as %s, shared", stage.name, src)
            distributed.barrier(long=True)  # rank 0 works on files meanwhile
            return
        if decision == "update":
            config, how = self._update(stage, config, inputs, d, key, own, version, main,
                                       resuming=state.get("updating") == key)
            if how == "done":
                return
            decision = "updating" if how == "finetune" else "run"
        elif main:
            if decision == "run" and d.exists():
                log.info("stage %s: inputs or config changed, starting afresh", stage.name)
                shutil.rmtree(d)
            d.mkdir(parents=True, exist_ok=True)
            print(f"\n== {stage.name}{' (resuming)' if decision == 'resume' else ''} ==", flush=True)
        spent = spent_before(d, state) if decision == "resume" else 0.0
        t0 = time.time()
        if main and decision != "updating":  # (a fine-tune's state file says so; it is timed alone)
            write_json(state_file, {"key": key, "started": t0, "spent": spent})
        distributed.barrier(long=True)  # rank 0 works on files meanwhile
        keep_thread_count()
        execute(stage, config, inputs, d)
        self.timings[stage.name] = round(spent + time.time() - t0, 1)
        made = {"resume": "resumed", "updating": f"fine-tuned for data version {version}"}
        self.status[stage.name] = made.get(decision, "ran")
        if main:
            # how this folder came to be, and on which data version
            write_json(state_file, {"key": key, "own": own, "data_version": version, "made": self.status[stage.name],
                                    "seconds": self.timings[stage.name]})
            if self.share is not None:
                self.share.add(key, d)

    def data_version(self) -> int:
        dataset = self.dir("data") / "dataset"
        return versions.current(dataset) if (dataset / "data.yaml").exists() else 1

    def _can_update(self, stage: Stage, config, state: dict, own: str, version: int) -> bool:
        """A finished run can catch up instead of rerunning when its own config is unchanged, the
        dataset grew since it ran (and was not re-imported), and every stage it reads is either
        unchanged or itself caught up in this run."""
        manifest = self.dir(stage.name) / MANIFEST
        if self.cfg.update.mode != "incremental" or not hasattr(stage.impl(), "update") or not manifest.exists():
            return False
        if "own" in state:
            if state["own"] != own:
                return False
        elif read_json(manifest).get("config") != json.loads(json.dumps(identity(config, mode="json"), default=str)):
            return False  # a folder from before incremental updates: its manifest holds the config it ran with
        if state.get("data_version", 1) >= version:
            return False
        ok = ("skipped", "updated", "fine-tuned")
        ups = stage.upstream(self.inputs(stage, set(stage.reads)), self.out)

        def caught_up(s: str) -> bool:  # in this run; or (not run now, --stages) in an earlier one
            if s in self.status:
                return self.status[s].startswith(ok)
            st = self.dir(s) / STATE
            return st.exists() and read_json(st).get("data_version", 1) == version

        return all(caught_up(s) for s in ups if s != "data") and self.status.get("data", "skipped").startswith("skipped")

    def _update(self, stage: Stage, config, inputs, d: Path, key: str, own: str, version: int, main: bool,
                resuming: bool = False):
        """Run the stage's update hook (rank 0); returns (config to run, how): "done" (updated in
        place), "finetune" (run the returned config afresh from the previous best.pt, kept in the
        new folder as previous.pt) or "scratch" (declined: the folder is cleared)."""
        previous = d / PREVIOUS
        result = None
        if main:
            print(f"\n== {stage.name} (updating for data version {version}) ==", flush=True)
            t0 = time.time()
            result = update(stage, config, inputs, d, self.cfg.update, previous)
            if isinstance(result, dict):
                self.timings[stage.name] = round(time.time() - t0, 1)
                write_json(d / STATE, {"key": key, "own": own, "data_version": version,
                                       "made": f"updated for data version {version}",
                                       "seconds": self.timings[stage.name]})
            elif result is None:
                log.info("stage %s: no incremental update, running afresh", stage.name)
                shutil.rmtree(d)
                d.mkdir(parents=True)
                write_json(d / STATE, {"key": key})
            else:
                if not (resuming and previous.exists()):  # a killed fine-tune resumes from its own state
                    best = d.with_name(f".{d.name}.{PREVIOUS}")
                    os.replace(d / "best.pt", best)
                    shutil.rmtree(d)
                    d.mkdir(parents=True)
                    os.replace(best, previous)
                write_json(d / STATE, {"key": key, "updating": key})
        result = distributed.broadcast(result, long=True)  # an update step rank 0 ran alone
        distributed.barrier(long=True)  # rank 0 works on files meanwhile
        if isinstance(result, dict):
            self.status[stage.name] = f"updated for data version {version}"
            return config, "done"
        return (config, "scratch") if result is None else (result, "finetune")
