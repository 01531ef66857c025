"""Detection metrics shared by every model d3n trains (baseline, teacher, student) and `d3n val`.

One code path for all three, so their numbers compare: letterboxed val images, NMS at conf 0.001 /
IoU 0.7 (ultralytics' val settings, its torch NMS on the model's device), then `d3n.metrics`:
matching at IoU 0.50:0.95 and 101-point AP, fractions under its KEYS.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

from d3n.boxes import xywh2xyxy
from d3n.metrics import DetectionStats


@torch.no_grad()
def evaluate(predict: Callable[[dict], torch.Tensor], loader, names: list[str], conf: float = 0.001,
             iou: float = 0.7, desc: str = "val") -> dict:
    """Score `predict(batch) -> (B, 4 + nc, N)` decoded head outputs over `loader`."""
    from d3n.offline import configure_ultralytics

    configure_ultralytics()
    from ultralytics.utils.nms import non_max_suppression

    stats = DetectionStats()
    for batch in tqdm(loader, desc=desc, leave=False):
        out = non_max_suppression(predict(batch), conf_thres=conf, iou_thres=iou, max_det=300,
                                  max_time_img=10.0)
        size = batch["img"].shape[-1]
        for i, det in enumerate(out):
            sel = batch["batch_idx"] == i
            true_xyxy = xywh2xyxy(batch["bboxes"][sel].numpy() * size)  # labels are normalised xywh
            det = det.cpu().numpy()
            stats.add(det[:, :4], det[:, 4], det[:, 5], true_xyxy, batch["cls"][sel, 0].numpy())
    return stats.summary(names)


def fitness(metrics: dict) -> float:
    """ultralytics' model-selection fitness: 0.1 x mAP50 + 0.9 x mAP50-95."""
    return 0.1 * metrics["mAP50"] + 0.9 * metrics["mAP50-95"]
