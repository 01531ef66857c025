"""`d3n pipeline CONFIG.yaml`: the whole D3N chain, one run folder per stage.

data -> ddpm -> repo (train, val) -> resvae -> compress (train, val) -> baseline -> teacher ->
distill -> export, then a report. Each stage reads the previous stages' artifacts from disk and
writes its own folder. A stage is skipped when its folder holds a complete manifest and its key
(its config plus the manifests of the stages it reads) is unchanged; a stage whose key matches but
did not finish is re-entered in place and resumes from its own checkpoint; a stage whose key
changed starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field

from d3n.artifacts import MANIFEST, fingerprint, read_json, write_json
from d3n.config import StrictModel, load_yaml, validate
from d3n.errors import ConfigError

log = logging.getLogger(__name__)

STAGES = ("data", "ddpm", "repo", "resvae", "compress", "baseline", "teacher", "distill", "export")
# the stages whose artifacts each stage reads
READS = {"data": (), "ddpm": ("data",), "repo": ("ddpm", "data"), "resvae": ("repo",), "compress": ("repo", "resvae"),
         "baseline": ("data",), "teacher": ("data", "compress"), "distill": ("data", "compress", "teacher"),
         "export": ("distill", "data")}
STATE = ".pipeline.json"


class SynthSpec(StrictModel):
    images: int = 240
    size: int = 256
    seed: int = 0
    val_frac: float = 0.2


class DataSpec(StrictModel):
    synth: SynthSpec | None = None  # generate the synthetic defect dataset, or
    source: Path | None = None  # import this dataset (VOC / YOLO / COCO)
    format: Literal["voc", "yolo", "coco"] | None = None
    splits: Path | None = None  # folder with train.txt / val.txt stems
    val_frac: float = 0.2
    seed: int = 0
    skip_bad: bool = False


class DDPMSpec(StrictModel):
    preset: Literal["tiny", "paper"] = "tiny"
    size: int = 64  # paper: 64 x 64 DDPM input
    steps: int | None = None
    epochs: int | None = None
    batch: int = 8
    lr: float = 1e-4
    ema: float = 0.999
    timesteps: list[int] = [100, 150, 250]  # paper §III-B


class CompressSpec(StrictModel):
    method: Literal["resvae", "pca"] = "resvae"  # paper: ResVAE; pca is the Table III ablation
    latent_channels: int | None = None  # default: widest level / 8 (paper 512 -> 64)
    epochs: int = 10
    steps: int | None = None
    batch: int = 64


class ExportSpec(StrictModel):
    formats: list[Literal["onnx", "onnx-int8"]] = ["onnx"]
    imgsz: int | None = None  # default: the training imgsz


class PipelineConfig(StrictModel):
    out: Path = Path("runs/d3n")
    data: DataSpec
    ddpm: DDPMSpec = DDPMSpec()
    compress: CompressSpec = CompressSpec()
    train: dict = Field(default_factory=dict)  # TrainConfig keys, shared by baseline, teacher, student
    teacher: dict = Field(default_factory=dict)  # {"fusion": FusionConfig keys}
    distill: dict = Field(default_factory=dict)  # DistillConfig keys
    export: ExportSpec = ExportSpec()


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
    from d3n.distill.loss import DistillConfig
    from d3n.train.detector.loop import TrainConfig
    from d3n.train.teacher.fusion import FusionConfig

    validate(TrainConfig, cfg.train, f"{path}: train")
    validate(FusionConfig, cfg.teacher.get("fusion", {}), f"{path}: teacher.fusion")
    validate(DistillConfig, cfg.distill, f"{path}: distill")
    return cfg


class Pipeline:
    def __init__(self, cfg: PipelineConfig, out: Path | None = None):
        self.cfg = cfg
        self.out = Path(out or cfg.out)
        self.timings: dict[str, float] = {}
        self.status: dict[str, str] = {}

    def dir(self, stage: str) -> Path:
        return self.out / stage

    # -- stage bookkeeping --------------------------------------------------------------------
    def _key(self, stage: str, spec: dict, reads: tuple[str, ...]) -> str:
        upstream = {s: fingerprint(self.dir(s) / MANIFEST) for s in reads}
        blob = json.dumps({"stage": stage, "spec": self._portable(spec), "upstream": upstream},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _portable(self, value):
        """Paths inside the run folder made relative to it, so a moved or copied run stays up to date
        (its content is already in the key through the upstream manifests)."""
        if isinstance(value, dict):
            return {k: self._portable(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._portable(v) for v in value]
        if isinstance(value, str | Path) and Path(value).is_absolute():
            path, root = Path(value).resolve(), self.out.resolve()
            if path.is_relative_to(root):
                return "$OUT/" + path.relative_to(root).as_posix()
        return value

    def _run_stage(self, stage: str, spec: dict, body: Callable[[Path], None]) -> None:
        d = self.dir(stage)
        key = self._key(stage, spec, READS[stage])
        state_file = d / STATE
        state = read_json(state_file) if state_file.exists() else {}
        if state.get("key") == key and (d / MANIFEST).exists():
            self.status[stage] = "skipped (up to date)"
            log.info("stage %s: up to date, skipped", stage)
            return
        if state.get("key") != key and d.exists():
            log.info("stage %s: inputs or config changed, starting afresh", stage)
            shutil.rmtree(d)
        resumed = d.exists()
        d.mkdir(parents=True, exist_ok=True)
        write_json(state_file, {"key": key, "spec": spec})
        print(f"\n== {stage}{' (resuming)' if resumed else ''} ==", flush=True)
        t0 = time.time()
        body(d)
        self.timings[stage] = round(time.time() - t0, 1)
        if not (d / MANIFEST).exists():
            raise RuntimeError(f"stage {stage} finished without writing {d / MANIFEST}")
        self.status[stage] = "resumed" if resumed else "ran"

    # -- the stages ---------------------------------------------------------------------------
    def run(self, stages: list[str] | None = None) -> dict:
        wanted = stages or list(STAGES)
        unknown = [s for s in wanted if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown stages {unknown}; choose from {list(STAGES)}")
        self.out.mkdir(parents=True, exist_ok=True)
        for stage in wanted:
            for dep in READS[stage]:
                if dep not in wanted and not (self.dir(dep) / MANIFEST).exists():
                    raise ConfigError(f"stage '{stage}' needs '{dep}', which has not run in {self.out}; "
                                      "include it in --stages")
        for stage in STAGES:
            if stage in wanted:
                getattr(self, f"stage_{stage}")()
        from d3n.report import write_report

        report = write_report(self.out, self.timings, self.status)
        return report

    def stage_data(self) -> None:
        spec = self.cfg.data.model_dump(mode="json")
        if self.cfg.data.source is not None:
            spec["source_fingerprint"] = fingerprint(self.cfg.data.source)

        def body(d: Path) -> None:
            from d3n.artifacts import Manifest

            target = d / "dataset"
            if target.exists():  # an import or synth killed half-way: redo it
                shutil.rmtree(target)
            man = Manifest(d, "data", config=spec)
            if self.cfg.data.synth is not None:
                from d3n.data.synth import generate

                s = self.cfg.data.synth
                generate(target, images=s.images, size=s.size, seed=s.seed, val_frac=s.val_frac)
            else:
                from d3n.data.importer import import_dataset

                dd = self.cfg.data
                import_dataset(dd.source, target, fmt=dd.format, splits=dd.splits, val_frac=dd.val_frac,
                               seed=dd.seed, skip_bad=dd.skip_bad)
            man.complete(["dataset/data.yaml"])

        self._run_stage("data", spec, body)

    @property
    def data_dir(self) -> Path:
        return self.dir("data") / "dataset"

    def stage_ddpm(self) -> None:
        from d3n.config import identity
        from d3n.train.ddpm.train import DDPMTrainConfig, train_ddpm

        s = self.cfg.ddpm
        dcfg = DDPMTrainConfig(data=str(self.data_dir), preset=s.preset, size=s.size, steps=s.steps, epochs=s.epochs,
                               batch=s.batch, lr=s.lr, ema=s.ema, seed=self._seed(), device=self._device())
        self._run_stage("ddpm", identity(dcfg, mode="json"), lambda d: train_ddpm(dcfg, d))

    def stage_repo(self) -> None:
        from d3n.artifacts import Manifest
        from d3n.train.repository.build import RepoBuildConfig, build_repo

        def body(d: Path) -> None:
            man = Manifest(d, "repo")
            for split in ("train", "val"):
                rcfg = RepoBuildConfig(ddpm=str(self.dir("ddpm")), data=str(self.data_dir), split=split,
                                       timesteps=self.cfg.ddpm.timesteps, device=self._device())
                with man.timed(split):
                    build_repo(rcfg, d / split)
            man.complete([f"{s}/{MANIFEST}" for s in ("train", "val")])

        self._run_stage("repo", {"timesteps": self.cfg.ddpm.timesteps}, body)

    def stage_resvae(self) -> None:
        from d3n.config import identity
        from d3n.train.repository.fit import CompressorTrainConfig, train_compressor

        c = self.cfg.compress
        # only the train split's features fit the compressor (no leakage into val)
        ccfg = CompressorTrainConfig(repo=str(self.dir("repo") / "train"), method=c.method,
                                     latent_channels=c.latent_channels, epochs=c.epochs, steps=c.steps,
                                     batch=c.batch, seed=self._seed(), device=self._device())
        self._run_stage("resvae", identity(ccfg, mode="json"),
                        lambda d: train_compressor(ccfg, d))

    def stage_compress(self) -> None:
        from d3n.artifacts import Manifest
        from d3n.train.repository.compress import compress_run

        def body(d: Path) -> None:
            man = Manifest(d, "compress")
            for split in ("train", "val"):
                with man.timed(split):
                    compress_run(self.dir("repo") / split, self.dir("resvae"), d / split, device=self._device())
            man.complete([f"{s}/{MANIFEST}" for s in ("train", "val")])

        self._run_stage("compress", {"method": self.cfg.compress.method}, body)

    def _train_cfg(self):
        from d3n.train.detector.loop import TrainConfig

        return TrainConfig(**self.cfg.train)

    def _device(self) -> str:
        # one device for the whole chain; the device never enters a stage key (same artifact on any device)
        return str(self.cfg.train.get("device", "cpu"))

    def _seed(self) -> int:
        return int(self.cfg.train.get("seed", 0))

    def stage_baseline(self) -> None:
        from d3n.train.detector import baseline

        tcfg = self._train_cfg()
        spec = tcfg.model_dump(mode="json")
        self._run_stage("baseline", spec, lambda d: baseline.run(
            baseline.BaselineConfig(data=self.data_dir, out=d, train=tcfg)))

    def stage_teacher(self) -> None:
        from d3n.train.teacher import stage as teacher
        from d3n.train.teacher.fusion import FusionConfig

        tcfg = self._train_cfg()
        fusion = FusionConfig(**self.cfg.teacher.get("fusion", {}))
        spec = {"train": tcfg.model_dump(mode="json"), "fusion": fusion.model_dump(mode="json")}
        comp = self.dir("compress")
        self._run_stage("teacher", spec, lambda d: teacher.run(teacher.TeacherStageConfig(
            data=self.data_dir, repo=comp / "train", val_repo=comp / "val", out=d, fusion=fusion, train=tcfg)))

    def stage_distill(self) -> None:
        from d3n.distill import trainer
        from d3n.distill.loss import DistillConfig

        tcfg = self._train_cfg()
        dcfg = DistillConfig(**self.cfg.distill)
        spec = {"train": tcfg.model_dump(mode="json"), "distill": dcfg.model_dump(mode="json")}
        self._run_stage("distill", spec, lambda d: trainer.run(
            trainer.DistillStageConfig(teacher=self.dir("teacher") / "best.pt", data=self.data_dir,
                                       repo=self.dir("compress") / "train", out=d, distill=dcfg, train=tcfg)))

    def stage_export(self) -> None:
        imgsz = self.cfg.export.imgsz or self._train_cfg().imgsz
        spec = {"formats": self.cfg.export.formats, "imgsz": imgsz}

        def body(d: Path) -> None:
            from d3n.artifacts import Manifest
            from d3n.cli import main as cli

            man = Manifest(d, "export", config=spec)
            outputs = []
            for fmt in self.cfg.export.formats:
                name = "student.onnx" if fmt == "onnx" else "student-int8.onnx"
                args = ["export", str(self.dir("distill") / "best.pt"), "--format", fmt, "--imgsz", str(imgsz),
                        "--out", str(d / name), "--calib", str(self.data_dir)]
                with man.timed(fmt):
                    rc = cli(args)
                if rc != 0:
                    raise RuntimeError(f"d3n {' '.join(args)} failed with exit code {rc}")
                outputs += [name, name.replace(".onnx", ".json")]
            man.complete(outputs)

        self._run_stage("export", spec, body)
