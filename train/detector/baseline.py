"""`d3n train baseline`: the plain YOLOv5s on a dataset, the reference every D3N stage is compared to."""

from __future__ import annotations

from pathlib import Path

from d3n.artifacts import CONFIG, METRICS, Manifest, write_json, write_yaml
from d3n.config import StrictModel
from d3n.data.layout import DatasetLayout
from d3n.train.detector import model as detector
from d3n.train.detector.loop import TrainConfig, train
from d3n.train.detector.plots import plot_history, plot_per_class
from d3n.train.detector.profile import complexity


class BaselineConfig(StrictModel):
    data: Path
    out: Path
    weights: Path | None = None  # start from these weights instead of scratch
    train: TrainConfig = TrainConfig()


def run(cfg: BaselineConfig) -> dict:
    layout = DatasetLayout.open(cfg.data)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dump = cfg.model_dump(mode="json")
    write_yaml(out / CONFIG, cfg_dump)
    inputs = {"data": str(layout.root)} | ({"weights": str(cfg.weights)} if cfg.weights else {})
    manifest = Manifest(out, "baseline", inputs, cfg_dump)
    model = detector.build(layout.nc, list(layout.names))
    if cfg.weights:
        detector.weights_from(cfg.weights, model)
    train_args = {"model": detector.ARCH, "data": str(layout.yaml_path), "imgsz": cfg.train.imgsz,
                  "epochs": cfg.train.epochs, "batch": cfg.train.batch, "seed": cfg.train.seed}
    with manifest.timed("train"):
        best = train(detector.DetectorTask(model, train_args), cfg.train, layout.root, out, list(layout.names))
    metrics = finish(out, best, model, cfg.train, "baseline")
    manifest.complete(["best.pt", METRICS])
    return metrics


def finish(out: Path, best: dict, model, tcfg: TrainConfig, title: str) -> dict:
    """metrics.json and plots, shared by the plain-detector stages (baseline, student)."""
    history = best.pop("history", [])
    metrics = {k: best.get(k) for k in ("mAP50", "mAP50-95", "precision", "recall", "per_class_AP50",
                                         "epoch", "images", "instances")}
    metrics["best_epoch"] = metrics.pop("epoch")
    metrics.update(complexity(model, tcfg.imgsz))
    metrics.update({"imgsz": tcfg.imgsz, "epochs": tcfg.epochs, "seed": tcfg.seed,
                    "train_seconds": round(sum(r["seconds"] for r in history), 1)})
    write_json(out / METRICS, metrics)
    if history:
        plot_history(history, out / "results.png", title)
    plot_per_class(metrics["per_class_AP50"] or {}, out / "per_class_ap50.png", f"{title}: AP50 per class")
    return metrics
