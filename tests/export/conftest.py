"""Fixtures for the export tests: a small ultralytics detector checkpoint made once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, synth_small) -> Path:
    """An untrained YOLOv5s (ultralytics v5u head) with the synthetic dataset's classes, saved as a
    plain ultralytics checkpoint. Freshly initialised, its activations shrink layer by layer until
    the outputs no longer depend on the image; setting the BatchNorm statistics from a batch of the
    dataset's images (and a milder class prior) makes it a live, image-dependent detector, so
    parity, NMS and INT8 checks compare real, varied outputs."""
    import torch

    from d3n.data.layout import DatasetLayout
    from d3n.export.calib import batches, read_image
    from d3n.offline import ultralytics

    ul = ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    layout = DatasetLayout.open(synth_small)
    torch.manual_seed(0)
    model = DetectionModel("yolov5s.yaml", nc=layout.nc, verbose=False)
    images = [read_image(p) for p in layout.images("train")[:8]]
    x = torch.from_numpy(np.concatenate(list(batches(images, (128, 128)))))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the batch
        model.train()
        model(x)
        model.eval()
        for branch in model.model[-1].cv3:
            branch[-1].bias.fill_(-3.0)
    model.names = dict(enumerate(layout.names))
    yolo = ul.YOLO("yolov5s.yaml")
    yolo.model = model
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    yolo.save(str(path))
    return path
