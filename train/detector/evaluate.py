"""Detection metrics shared by every model d3n trains (baseline, teacher, student) and `d3n val`.

One code path for all three, so their numbers compare: letterboxed val images, NMS at conf 0.001 /
IoU 0.7 (ultralytics' val settings), greedy matching at IoU 0.50:0.95 and ultralytics' AP
(`ap_per_class`, 101-point COCO interpolation).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def _match(pred_cls: np.ndarray, true_cls: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """(D, 10) correctness of detections (sorted by confidence) at each IoU threshold."""
    correct = np.zeros((len(pred_cls), len(IOU_THRESHOLDS)), bool)
    if not len(true_cls) or not len(pred_cls):
        return correct
    iou = iou * (true_cls[:, None] == pred_cls[None, :])
    claimed = np.zeros((len(true_cls), len(IOU_THRESHOLDS)), bool)
    for j in range(len(pred_cls)):
        avail = np.where(claimed, 0.0, iou[:, j, None])
        k = avail.argmax(0)
        hit = avail[k, range(len(IOU_THRESHOLDS))] >= IOU_THRESHOLDS
        correct[j] = hit
        claimed[k, range(len(IOU_THRESHOLDS))] |= hit
    return correct


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9)


@torch.no_grad()
def evaluate(predict: Callable[[dict], torch.Tensor], loader, names: list[str], conf: float = 0.001,
             iou: float = 0.7, desc: str = "val") -> dict:
    """Score `predict(batch) -> (B, 4 + nc, N)` decoded head outputs over `loader`."""
    from d3n.offline import configure_ultralytics

    configure_ultralytics()
    from ultralytics.utils.nms import non_max_suppression

    stats = {"tp": [], "conf": [], "pred_cls": [], "target_cls": []}
    n_images = 0
    for batch in tqdm(loader, desc=desc, leave=False):
        out = non_max_suppression(predict(batch), conf_thres=conf, iou_thres=iou, max_det=300,
                                  max_time_img=10.0)
        size = batch["img"].shape[-1]
        for i, det in enumerate(out):
            n_images += 1
            sel = batch["batch_idx"] == i
            tcls = batch["cls"][sel, 0].numpy()
            tb = batch["bboxes"][sel].numpy() * size
            tbox = np.concatenate([tb[:, :2] - tb[:, 2:] / 2, tb[:, :2] + tb[:, 2:] / 2], 1)
            det = det.cpu().numpy()
            pbox, pconf, pcls = det[:, :4], det[:, 4], det[:, 5]
            stats["tp"].append(_match(pcls, tcls, box_iou(tbox, pbox)))
            stats["conf"].append(pconf)
            stats["pred_cls"].append(pcls)
            stats["target_cls"].append(tcls)
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in stats.items()}
    return summarise(cat, names, n_images)


def summarise(cat: dict, names: list[str], n_images: int) -> dict:
    from ultralytics.utils.metrics import ap_per_class

    n_boxes = int(len(cat["target_cls"]))
    if not len(cat["conf"]) or not n_boxes:
        per_class = {n: 0.0 for n in names}
        return {"mAP50": 0.0, "mAP50-95": 0.0, "precision": 0.0, "recall": 0.0, "per_class_AP50": per_class,
                "images": n_images, "instances": n_boxes}
    tp, conf = cat["tp"].reshape(-1, len(IOU_THRESHOLDS)), cat["conf"]
    res = ap_per_class(tp, conf, cat["pred_cls"], cat["target_cls"], names=dict(enumerate(names)))
    p, r, ap, classes = res[2], res[3], res[5], res[6]
    per_class = {n: 0.0 for n in names}
    for k, c in enumerate(classes):
        per_class[names[int(c)]] = round(float(ap[k, 0]), 5)
    return {"mAP50": round(float(ap[:, 0].mean()), 5), "mAP50-95": round(float(ap.mean()), 5),
            "precision": round(float(p.mean()), 5), "recall": round(float(r.mean()), 5),
            "per_class_AP50": per_class, "images": n_images, "instances": n_boxes}


def fitness(metrics: dict) -> float:
    """ultralytics' model-selection fitness: 0.1 x mAP50 + 0.9 x mAP50-95."""
    return 0.1 * metrics["mAP50"] + 0.9 * metrics["mAP50-95"]
