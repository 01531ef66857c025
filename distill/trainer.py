"""`d3n distill`: power transfer from the fusion teacher into a plain YOLOv5s (paper §III-D, Fig. 7).

The student is exactly the baseline's architecture and trains with the baseline's loop, schedule
and seed; the only difference is Eq. 7's teacher terms added to its ground-truth loss. The
teacher is frozen in eval mode (BatchNorm statistics fixed: a teacher left in train mode under no_grad drifts), runs in the same step on
the same augmented batch (its DDPM features warped with that batch's augmentation), and is never
part of the student's checkpoint. The student is evaluated on the plain dataloader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from d3n import distributed
from d3n.artifacts import METRICS, read_json, sha256_file, write_json
from d3n.config import StrictModel, identity
from d3n.data.layout import DatasetLayout
from d3n.distill.loss import DistillConfig, DistillLoss
from d3n.distributed import unwrap
from d3n.errors import ArtifactError
from d3n.train.detector import model as detector
from d3n.train.detector.baseline import finish, train_args
from d3n.train.detector.loop import TrainConfig, finetune, train, weights_key
from d3n.train.detector.profile import complexity
from d3n.train.device import resolve_device
from d3n.train.teacher.features import FeatureProvider
from d3n.train.teacher.model import FusionTeacher

DISTRIBUTED = True  # under torchrun every rank trains (d3n.distributed)


class Config(StrictModel):
    # "teacher": the fusion teacher (the method); "baseline": the control that distils the trained
    # baseline into a fresh student (self-distillation: distillation with no DDPM anywhere)
    teacher: Literal["teacher", "baseline"] = "teacher"
    resvae: Path | None = None  # compressor run; default: the one recorded in the repository
    distill: DistillConfig = DistillConfig()
    train: TrainConfig = TrainConfig()


def from_pipeline(pcfg, inputs: dict[str, Path]) -> Config:
    loss = DistillConfig(**pcfg.distill.model_dump(exclude={"teacher"}))
    return Config(teacher=pcfg.distill.teacher, distill=loss, train=pcfg.train)


def wants(cfg: Config, inputs: dict[str, Path]) -> set[str]:
    return {cfg.teacher}


class DistillTask:
    def __init__(self, student, teacher, features: FeatureProvider | None, imgsz: int,
                 loss: DistillLoss, train_args: dict, ident: dict):
        self.model = student
        self.ident = ident
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.features = features
        self.imgsz = imgsz
        self.distill_loss = loss
        self.train_args = train_args

    def identity(self) -> dict:
        """The distill config and the teacher's hash: a resume with another teacher is refused."""
        return self.ident

    def loss(self, model, batch):
        preds = model(batch["img"])
        gt, items = unwrap(model).loss(batch, preds)
        self.teacher.eval()  # never let BatchNorm statistics drift
        with torch.no_grad():
            if self.features is None:  # a plain detector as the teacher (self-distillation control)
                t_preds = self.teacher(batch["img"])
            else:
                t_preds = self.teacher(batch["img"], self.features(batch["pieces"], self.imgsz))
        total, terms = self.distill_loss(preds, t_preds, gt_loss=gt)
        out = {k.removesuffix("_loss"): float(v) for k, v in items.items()}
        out.update({k: float(v) for k, v in terms.items() if k != "gt"})
        return total, out

    def predict(self, model, batch):
        return model(batch["img"])[0]

    def save(self, model, path: Path, metrics: dict) -> None:
        detector.save(model, path, self.train_args, metrics)


def update(cfg: Config, inputs: dict[str, Path], out: Path, spec, previous: Path):
    """After `d3n data add`: the student fine-tuned from the previous student (or retrained)."""
    tcfg = finetune(cfg.train, previous, spec)
    return None if tcfg is None else cfg.model_copy(update={"train": tcfg})


def external(cfg: Config) -> dict:
    return weights_key(cfg.train)


def load_teacher(cfg: Config, inputs: dict[str, Path], layout: DatasetLayout, device):
    """(teacher, features, checkpoint): the fusion teacher with its features (shuffled as it was
    trained), or the trained baseline, which needs none."""
    if cfg.teacher not in inputs:
        raise ArtifactError(f"distill from the {cfg.teacher} needs its best.pt (--{cfg.teacher})")
    ckpt = inputs[cfg.teacher]
    if cfg.teacher == "baseline":
        teacher = detector.load(ckpt).to(device)
        nc = len(teacher.names)
        features = None
    else:
        teacher = FusionTeacher.load(ckpt).to(device)
        nc = teacher.config.nc
        features = FeatureProvider([inputs["repo"]], cfg.resvae, device=str(device),
                                   shuffle_seed=teacher.extra.get("shuffle_seed"))
        if features.channels != teacher.config.ddpm_channels:
            raise ArtifactError(f"{inputs['repo']}: decodes to {features.channels} channels, teacher {ckpt} "
                                f"was trained on {teacher.config.ddpm_channels}")
    if nc != layout.nc:
        raise ArtifactError(f"{ckpt}: teacher has {nc} classes, {layout.yaml_path} has {layout.nc}")
    return teacher, features, ckpt


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    layout = DatasetLayout.open(inputs["data"])
    device = resolve_device(cfg.train.device)
    teacher, features, teacher_ckpt = load_teacher(cfg, inputs, layout, device)
    student = detector.build(layout.nc, list(layout.names))
    if cfg.train.weights:  # the same initial weights as the baseline and the teacher's detector
        detector.weights_from(cfg.train.weights, student)
    args = train_args(layout, cfg.train)
    task = DistillTask(student, teacher, features, cfg.train.imgsz, DistillLoss(cfg.distill), args,
                        {"config": identity(cfg, mode="json"), "teacher": sha256_file(teacher_ckpt)})
    best = train(task, cfg.train, layout.root, out, list(layout.names))
    if not distributed.world().main:  # rank 0 writes the run's files
        return {}
    metrics = finish(out, best, student, cfg.train, "student")
    metrics.update(same_size_check(student, layout, cfg.train.imgsz))
    metrics["teacher"] = _teacher_summary(teacher_ckpt)
    metrics["distill"] = cfg.distill.model_dump()
    write_json(out / METRICS, metrics)
    return metrics


def same_size_check(student, layout: DatasetLayout, imgsz: int) -> dict:
    """The student must be exactly the baseline's architecture: compare with a fresh YOLOv5s."""
    ref = complexity(detector.build(layout.nc, list(layout.names)), imgsz)
    own = complexity(student, imgsz)
    return {"baseline_params": ref["params"], "baseline_gflops": ref["gflops"],
            "same_params_and_flops_as_baseline": ref["params"] == own["params"] and ref["gflops"] == own["gflops"]}


def _teacher_summary(path: Path) -> dict:
    metrics = Path(path).parent / METRICS
    m = read_json(metrics) if metrics.exists() else {}
    return {"checkpoint": str(path), **{k: m.get(k) for k in ("mAP50", "mAP50-95")}}
