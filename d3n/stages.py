"""The registry: every stage of the D3N chain, in the order the pipeline runs them.

One line per stage: its module (config, `run`), the artifacts it reads from earlier stages and the
files it writes. `d3n pipeline`, the per-stage commands and the report read this list only.
"""

from __future__ import annotations

from d3n.artifacts import METRICS
from d3n.stage import Input, Stage

DATASET = Input("data", "dataset", "dataset folder (with data.yaml)")

STAGES: tuple[Stage, ...] = (
    Stage("data", "d3n.data.stage", {}, ("dataset/data.yaml", "dataset/versions.json"), help="import or synthesise the dataset"),
    # optional (the pipeline's `augment:` section): a defect generator, and the dataset with its images
    # added to train, which every later stage then reads in place of data/dataset
    Stage("generator", "d3n.train.generator.stage", {"data": DATASET}, ("generator.pt", METRICS),
          help="the class-conditional defect generator (augment: sdedit, inpaint, blend)"),
    Stage("augment", "d3n.train.augment.stage",
          {"data": DATASET, "generator": Input("generator", ".", "defect generator run folder", optional=True)},
          ("dataset/data.yaml", "dataset/augment.json"), help="generated defect images added to train"),
    Stage("ddpm", "d3n.train.ddpm.stage", {"data": DATASET}, ("ddpm.pt", METRICS),
          help="pre-train the DDPM on the train images (paper §III-B)"),
    Stage("repo", "d3n.train.repository.build_stage", {"ddpm": Input("ddpm", ".", "DDPM run folder"), "data": DATASET},
          ("train/manifest.json", "val/manifest.json"), help="DDPM decoder features per split (Eq. 2)"),
    Stage("resvae", "d3n.train.repository.fit_stage", {"repo": Input("repo", "train", "raw train-split repository")},
          ("compressor.pt",), help="fit the ResVAE (or PCA) compressor"),
    Stage("compress", "d3n.train.repository.compress_stage",
          {"repo": Input("repo", ".", "raw repository folder (train/, val/)"),
           "resvae": Input("resvae", ".", "compressor run folder")},
          ("train/manifest.json", "val/manifest.json"), help="latents of every split"),
    Stage("baseline", "d3n.train.detector.baseline", {"data": DATASET}, ("best.pt", METRICS), model="baseline",
          help="the plain YOLOv5s"),
    Stage("teacher", "d3n.train.teacher.stage",
          {"data": DATASET, "repo": Input("compress", "train", "compressed repository of the train split"),
           "val_repo": Input("compress", "val", "compressed repository of the val split"),
           "test_repo": Input("compress", "test", "compressed repository of the test split, when the dataset "
                                                  "has one", optional=True),
           "baseline": Input("baseline", "best.pt", "trained baseline to start the detector from (init: baseline)",
                             optional=True)},
          ("best.pt", METRICS), model="teacher", help="YOLOv5s fused with DDPM features (Fig. 4)"),
    Stage("distill", "d3n.distill.trainer",
          {"teacher": Input("teacher", "best.pt", "teacher run's best.pt", optional=True), "data": DATASET,
           "repo": Input("compress", "train", "compressed repository of the train split"),
           "baseline": Input("baseline", "best.pt", "trained baseline, to distil instead of the teacher "
                             "(the self-distillation control)", optional=True)},
          ("best.pt", METRICS), model="student", help="the student distilled from the teacher (Eqs. 6-7)"),
    Stage("export", "d3n.export.stage", {"model": Input("distill", "best.pt", "student checkpoint"), "data": DATASET},
          (), help="the student as ONNX (and INT8) with sidecars"),
)

BY_NAME = {s.name: s for s in STAGES}
NAMES = tuple(BY_NAME)


def get(name: str) -> Stage:
    from d3n.errors import ConfigError

    if name not in BY_NAME:
        raise ConfigError(f"unknown stage '{name}'; choose from {list(NAMES)}")
    return BY_NAME[name]
