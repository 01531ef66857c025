"""Fixtures for the export tests: a small ultralytics detector checkpoint made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, synth_small) -> Path:
    """An untrained YOLOv5s (ultralytics v5u head) with the synthetic dataset's classes, saved as a
    plain ultralytics checkpoint: export and parity need a real architecture, not trained weights."""
    from d3n.data.layout import DatasetLayout
    from d3n.offline import ultralytics

    ul = ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    names = DatasetLayout.open(synth_small).names
    yolo = ul.YOLO("yolov5s.yaml")
    yolo.model = DetectionModel("yolov5s.yaml", nc=len(names), verbose=False)
    yolo.model.names = dict(enumerate(names))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    yolo.save(str(path))
    return path
