"""The `export` stage: the student as ONNX (and ONNX INT8) with sidecars, by calling the exporter."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from d3n.config import StrictModel

FILES = {"onnx": "student.onnx", "onnx-int8": "student-int8.onnx"}


class Config(StrictModel):
    formats: list[Literal["onnx", "onnx-int8"]] = ["onnx"]
    imgsz: int | None = None  # default: the training imgsz


def from_pipeline(pcfg, inputs: dict[str, Path]) -> Config:
    return Config(formats=pcfg.export.formats, imgsz=pcfg.export.imgsz or pcfg.train.imgsz)


def writes(cfg: Config) -> list[str]:
    return [f for fmt in cfg.formats for f in (FILES[fmt], FILES[fmt].replace(".onnx", ".json"))]


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    from d3n.export.exporter import ExportOptions, export_model

    imgsz = cfg.imgsz or 640
    done = {}
    for fmt in cfg.formats:
        res = export_model(ExportOptions(model=inputs["model"], format=fmt, imgsz=(imgsz, imgsz),
                                         calib=inputs["data"], out=out / FILES[fmt]))
        done[fmt] = {"model": res.model.name, "sidecar": res.sidecar.name, **res.extra}
    return done
