"""`d3n val`: score any plain detector checkpoint exactly as training scores it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from d3n.data.layout import DatasetLayout
from d3n.errors import DataError
from d3n.train.detector import model as detector
from d3n.train.detector.data import DetectionDataset, collate
from d3n.train.detector.evaluate import evaluate
from d3n.train.detector.profile import count_params


def run(model_path: Path, data: Path, imgsz: int = 640, batch: int = 16, device: str = "cpu",
        split: str = "val", workers: int = 0) -> dict:
    layout = DatasetLayout.open(data)
    model = detector.load(model_path).to(device).eval()
    names = [model.names[i] for i in sorted(model.names)] if isinstance(model.names, dict) else list(model.names)
    if len(names) != layout.nc:
        raise DataError(f"{layout.yaml_path}: {layout.nc} classes, but {model_path} predicts {len(names)}")
    ds = DetectionDataset(layout.root, split, imgsz)
    loader = DataLoader(ds, batch_size=batch, shuffle=False, collate_fn=collate, num_workers=workers)

    def predict(b):
        with torch.no_grad():
            return model(b["img"].to(device).float() / 255)[0]

    metrics = evaluate(predict, loader, list(layout.names), desc=f"val {Path(model_path).name}")
    metrics.update({"model": str(model_path), "data": str(layout.yaml_path), "split": split, "imgsz": imgsz,
                    "params": count_params(model)})
    return metrics


def format_table(rows: dict[str, dict], names: list[str]) -> str:
    """A plain-text table: one column per model, mAPs then per-class AP50."""
    cols = list(rows)
    keys = ["mAP50", "mAP50-95", "precision", "recall"]
    width = max(12, *(len(c) for c in cols)) + 2
    lines = ["".ljust(18) + "".join(c.rjust(width) for c in cols)]
    for k in keys:
        lines.append(k.ljust(18) + "".join(f"{rows[c].get(k, float('nan')):.3f}".rjust(width) for c in cols))
    for n in names:
        lines.append(f"AP50 {n}"[:18].ljust(18)
                     + "".join(f"{rows[c].get('per_class_AP50', {}).get(n, float('nan')):.3f}".rjust(width) for c in cols))
    for k in ("miss_rate", "overkill_rate"):  # image level, at conf 0.25; only where the split has such images
        if any(rows[c].get(k) is not None for c in cols):
            lines.append(k.ljust(18) + "".join((f"{rows[c][k]:.3f}" if rows[c].get(k) is not None else "-").rjust(width)
                                               for c in cols))
    for k in ("params", "gflops"):
        if all(k in rows[c] for c in cols):
            lines.append(k.ljust(18) + "".join(f"{rows[c][k]:,}".rjust(width) for c in cols))
    return "\n".join(lines)
