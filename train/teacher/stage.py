"""`d3n teacher train`: the cross-model fusion teacher (paper §III-C, Fig. 4).

YOLOv5s whose neck fuses DDPM features at P3/P4/P5, trained with the same loop, schedule and
augmentation as the baseline; the features are decoded from the compressed repository and warped
with each sample's augmentation (train/teacher/features.py). The fusion's branch weights are logged every
epoch and plotted (Fig. 11).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from d3n import distributed
from d3n.artifacts import METRICS, atomic_path, write_json
from d3n.config import StrictModel, added, identity
from d3n.data.layout import DatasetLayout
from d3n.distributed import unwrap
from d3n.errors import ArtifactError
from d3n.train.detector import model as detector
from d3n.train.detector.loop import TrainConfig, finetune, summary, train, weights_key
from d3n.train.detector.plots import plot_history, plot_per_class
from d3n.train.detector.profile import count_params, teacher_complexity
from d3n.train.device import resolve_device
from d3n.train.teacher.features import FeatureProvider
from d3n.train.teacher.fusion import FusionConfig
from d3n.train.teacher.model import FusionTeacher, TeacherConfig

DISTRIBUTED = True  # under torchrun every rank trains (d3n.distributed)


class Config(StrictModel):
    # the detector's start: "weights" = train.weights (scratch without them); "baseline" = the trained
    # baseline, so with the zero-initialised fusion the teacher starts exactly as the baseline and
    # whatever it gains comes from the DDPM branches
    init: Literal["weights", "baseline"] = "weights"
    start: Path | None = added(None)  # a teacher's best.pt to continue from (an incremental update); overrides init
    resvae: Path | None = None  # compressor run; default: the one recorded in the repository
    # "shuffled": the control that keeps every parameter and removes the information -- each image gets
    # the DDPM features of another image of its split (a seeded derangement); its student sees the same
    features: Literal["true", "shuffled"] = "true"
    fusion: FusionConfig = FusionConfig()
    train: TrainConfig = TrainConfig()


def from_pipeline(pcfg, inputs: dict[str, Path]) -> Config:
    return Config(init=pcfg.teacher.init, features=pcfg.teacher.features, fusion=pcfg.teacher.fusion,
                  train=pcfg.train)


def wants(cfg: Config, inputs: dict[str, Path]) -> set[str]:
    """The baseline when starting from it; the test split's repository when the dataset has one."""
    layout = DatasetLayout.open(inputs["data"])
    return ({"baseline"} if cfg.init == "baseline" else set()) | (
        {"test_repo"} if layout.has("test") and layout.images("test") else set())


def external(cfg: Config) -> dict:
    key = weights_key(cfg.train.model_copy(update={"weights": None}))  # the loader's version
    return weights_key(cfg.train) if cfg.init == "weights" and cfg.start is None else key


def update(cfg: Config, inputs: dict[str, Path], out: Path, spec, previous: Path):
    """After `d3n data add`: the whole teacher (detector and fusion) fine-tuned from the previous one."""
    tcfg = finetune(cfg.train, previous, spec)
    if tcfg is None:
        return None
    return cfg.model_copy(update={"start": Path(previous), "train": tcfg.model_copy(update={"weights": None})})


class TeacherTask:
    # under DDP: an ablation (Tables I-III) can leave a branch's parameters out of the loss
    unused_parameters = True

    def __init__(self, model: FusionTeacher, features: FeatureProvider, imgsz: int, extra: dict, ident: dict):
        self.model = model
        self.features = features
        self.imgsz = imgsz
        self.extra = extra
        self.ident = ident

    def identity(self) -> dict:
        """The stage config (fusion, compressor) besides TrainConfig: a resume under another is refused."""
        return self.ident

    def loss(self, model, batch):
        ddpm = self.features(batch["pieces"], self.imgsz)
        preds = model(batch["img"], ddpm)
        loss, items = unwrap(model).loss(batch, preds)  # forward via the DDP wrapper, loss on the model
        return loss.sum(), {k.removesuffix("_loss"): float(v) for k, v in items.items()}

    def predict(self, model, batch):
        return model(batch["img"], self.features(batch["pieces"], self.imgsz))[0]

    def save(self, model, path: Path, metrics: dict) -> None:
        model.save(path, metrics={k: v for k, v in metrics.items() if k != "history"}, **self.extra)


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    layout = DatasetLayout.open(inputs["data"])
    repo, val_repo = inputs["repo"], inputs["val_repo"]
    splits = ["train", "val"] + (["test"] if layout.has("test") and layout.images("test") else [])
    if "test" in splits and "test_repo" not in inputs:
        raise ArtifactError(f"{layout.yaml_path} has a test split: pass its compressed repository (--test-repo) "
                            "so the teacher's held-out numbers are measured")
    repos = [repo, val_repo] + ([inputs["test_repo"]] if "test" in splits else [])
    shuffle = cfg.train.seed if cfg.features == "shuffled" else None
    features = FeatureProvider(repos, cfg.resvae, device=str(resolve_device(cfg.train.device)), shuffle_seed=shuffle)
    _check_coverage(features, layout, splits)
    model = FusionTeacher(TeacherConfig(nc=layout.nc, ddpm_channels=features.channels, fusion=cfg.fusion))
    start = inputs["baseline"] if cfg.init == "baseline" else cfg.train.weights
    if cfg.init == "baseline" and "baseline" not in inputs:
        raise ArtifactError("teacher init: baseline needs the baseline's best.pt (--baseline)")
    if cfg.start is not None:
        previous = FusionTeacher.load(cfg.start)
        if previous.config != model.config:
            raise ArtifactError(f"{cfg.start}: a teacher of another configuration ({previous.config}) cannot be "
                                "continued with this one")
        model.load_state_dict(previous.state_dict())
    elif start is not None:
        detector.weights_from(start, model.detector)
    store = features.stores[0]  # what `d3n val` needs to compute the same features for new images
    extra = {"names": list(layout.names), "imgsz": cfg.train.imgsz, "repo": str(Path(repo).resolve()),
             "compressor": str(features.compressor or ""), "ddpm": store.meta.get("ddpm_run"),
             "timesteps": store.timesteps, "shuffle_seed": shuffle}
    # the same runs relative to the teacher's folder: a run folder copied elsewhere still finds them
    extra["relative"] = {k: os.path.relpath(extra[k], Path(out).resolve()) for k in ("compressor", "ddpm") if extra[k]}
    task = TeacherTask(model, features, cfg.train.imgsz, extra, identity(cfg, mode="json"))

    def log_branches(m, epoch):
        return {f"w_{lv}_{name}": w for lv, ws in m.branch_weights().items()
                for name, w in zip(("cross", "det", "ddpm"), ws, strict=True)}

    best = train(task, cfg.train, layout.root, out, list(layout.names), on_epoch=log_branches)
    if not distributed.world().main:  # rank 0 writes the run's files
        return {}
    history = best.get("history", [])
    metrics = summary(best)
    metrics.update({"params": count_params(model), "detector_params": count_params(model.detector),
                    "imgsz": cfg.train.imgsz, "epochs": cfg.train.epochs, "seed": cfg.train.seed,
                    "ddpm_channels": features.channels, "fusion": cfg.fusion.model_dump(),
                    "branch_weights": model.branch_weights(),
                    **teacher_complexity(model, cfg.train.imgsz, features.channels)})
    write_json(out / METRICS, metrics)
    plot_history([{k: v for k, v in r.items() if not k.startswith("w_")} for r in history],
                 out / "results.png", "teacher")
    plot_per_class(metrics["per_class_AP50"] or {}, out / "per_class_ap50.png", "teacher: AP50 per class")
    plot_branch_weights(history, out / "branch_weights.png")
    return metrics


def _check_coverage(features: FeatureProvider, layout: DatasetLayout, splits: list[str]) -> None:
    """Every image of the splits must have features; say which are missing rather than fail later."""
    have = {i for s in features.stores for i in s.image_ids}
    missing = [p.name for split in splits for p in layout.images(split) if p.stem not in have]
    if missing:
        raise ArtifactError(f"{len(missing)} images of {layout.yaml_path} have no DDPM features in the given "
                            f"repositories (first: {missing[:5]}); build them with `d3n repo build --split ...`")


def plot_branch_weights(history: list[dict], path: Path) -> Path | None:
    """Fig. 11: the learned weights of the cross / detector / DDPM branches per level, per epoch."""
    keys = [k for k in (history[0] if history else {}) if k.startswith("w_")]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({k.split("_")[1] for k in keys})
    fig, axes = plt.subplots(1, len(levels), figsize=(3.2 * len(levels), 2.8), squeeze=False)
    for ax, lv in zip(axes[0], levels, strict=True):
        for name in ("cross", "det", "ddpm"):
            k = f"w_{lv}_{name}"
            if k in history[0]:
                ax.plot([r["epoch"] for r in history], [r[k] for r in history], marker=".", label=name)
        ax.set_title(f"{lv} branch weights", fontsize=9)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path
