"""The sidecar JSON that travels with every exported model (`model.onnx` -> `model.json`).

Written by `d3n export`, read and enforced by the runtime: the runtime refuses a model whose
sidecar does not match it (hash, input size). Core module, no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from d3n.artifacts import sha256_file, write_json
from d3n.errors import ArtifactError

SCHEMA_VERSION = 1


class Preprocess(BaseModel):
    model_config = ConfigDict(extra="forbid")
    letterbox: bool = True
    pad_value: int = 114
    color: Literal["rgb", "bgr"] = "rgb"
    scale: float = 1.0 / 255.0
    layout: Literal["nchw"] = "nchw"
    dtype: Literal["float32", "float16"] = "float32"


class OutputLayout(BaseModel):
    """Raw head: (batch, 4 + nc, anchors) with xywh in input pixels then class scores (sigmoid).
    With NMS in the graph: (batch, max_det, 6) rows of x1, y1, x2, y2, score, class."""
    model_config = ConfigDict(extra="forbid")
    kind: Literal["raw", "nms"] = "raw"
    shape: list[int | str]
    box_format: Literal["xywh", "xyxy"] = "xywh"


class Sidecar(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    format: Literal["onnx", "onnx-int8", "engine"]
    model_file: str  # file name beside the sidecar
    model_sha256: str
    names: list[str]
    imgsz: list[int] = Field(min_length=2, max_length=2)  # [h, w]
    strides: list[int]
    batch: int | Literal["dynamic"] = 1
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    preprocess: Preprocess = Preprocess()
    output: OutputLayout
    source_checkpoint: str = ""
    source_sha256: str = ""
    d3n_version: str = ""
    extra: dict = Field(default_factory=dict)  # tool versions, build settings, calibration info


def sidecar_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


def save(sidecar: Sidecar, model_path: str | Path) -> Path:
    return write_json(sidecar_path(model_path), sidecar.model_dump(mode="json"))


def load(model_path: str | Path, verify_hash: bool = True) -> Sidecar:
    """Load and check the sidecar of `model_path`; raises ArtifactError naming the file."""
    model_path = Path(model_path)
    path = sidecar_path(model_path)
    if not model_path.exists():
        raise ArtifactError(f"{model_path}: model file not found")
    if not path.exists():
        raise ArtifactError(f"{path}: sidecar missing for {model_path.name} (export with `d3n export`)")
    try:
        sc = Sidecar.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ArtifactError(f"{path}: invalid sidecar ({exc})") from None
    if sc.model_file != model_path.name:
        raise ArtifactError(f"{path}: sidecar is for '{sc.model_file}', not '{model_path.name}'")
    if verify_hash and sha256_file(model_path) != sc.model_sha256:
        raise ArtifactError(f"{path}: sha256 of {model_path.name} does not match the sidecar "
                            "(model replaced or corrupt; re-export it)")
    return sc
