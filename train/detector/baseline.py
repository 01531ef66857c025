"""`d3n train baseline`: the plain YOLOv5s on a dataset, the reference every D3N stage is compared to."""

from __future__ import annotations

from pathlib import Path

from d3n import distributed
from d3n.artifacts import METRICS, write_json
from d3n.config import StrictModel
from d3n.data.layout import DatasetLayout
from d3n.train.detector import model as detector
from d3n.train.detector.loop import TrainConfig, finetune, summary, train, weights_key
from d3n.train.detector.plots import plot_history, plot_per_class
from d3n.train.detector.profile import complexity

DISTRIBUTED = True  # under torchrun every rank trains (d3n.distributed)


class Config(StrictModel):
    train: TrainConfig = TrainConfig()  # train.weights: start from these weights instead of scratch


def from_pipeline(pcfg, inputs: dict[str, Path]) -> Config:
    return Config(train=pcfg.train)


def external(cfg: Config) -> dict:
    return weights_key(cfg.train)


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    layout = DatasetLayout.open(inputs["data"])
    model = detector.build(layout.nc, list(layout.names))
    if cfg.train.weights:
        detector.weights_from(cfg.train.weights, model)
    best = train(detector.DetectorTask(model, train_args(layout, cfg.train)), cfg.train, layout.root, out,
                 list(layout.names))
    if not distributed.world().main:  # rank 0 writes the run's files
        return {}
    return finish(out, best, model, cfg.train, "baseline")


def update(cfg: Config, inputs: dict[str, Path], out: Path, spec, previous: Path):
    """After `d3n data add`: fine-tuned from the previous baseline (or retrained, `update.detectors`)."""
    tcfg = finetune(cfg.train, previous, spec)
    return None if tcfg is None else cfg.model_copy(update={"train": tcfg})


def train_args(layout: DatasetLayout, tcfg: TrainConfig) -> dict:
    """What an ultralytics checkpoint records of its training (baseline and student alike)."""
    return {"model": detector.ARCH, "data": str(layout.yaml_path), "imgsz": tcfg.imgsz, "epochs": tcfg.epochs,
            "batch": tcfg.batch, "seed": tcfg.seed}


def finish(out: Path, best: dict, model, tcfg: TrainConfig, title: str) -> dict:
    """metrics.json and plots, shared by the plain-detector stages (baseline, student)."""
    history = best.get("history", [])
    metrics = summary(best) | {k: best.get(k) for k in ("images", "instances")}
    metrics.update(complexity(model, tcfg.imgsz))
    metrics.update({"imgsz": tcfg.imgsz, "epochs": tcfg.epochs, "seed": tcfg.seed})
    write_json(out / METRICS, metrics)
    if history:
        plot_history(history, out / "results.png", title)
    shown = metrics.get(metrics["report_split"]) or metrics
    plot_per_class(shown["per_class_AP50"] or {}, out / "per_class_ap50.png",
                   f"{title}: AP50 per class ({metrics['report_split']})")
    return metrics
