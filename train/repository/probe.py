"""`d3n repo probe`: how much defect-class information a repository's features carry, per level.

A linear probe: each image's features at one level (and each timestep) are average-pooled over
space, standardised on the train split, and a ridge classifier (one-vs-rest, closed form) is fitted
on the train split's images and scored on another split's. An image's class is its most frequent
box class (NEU-DET images hold one defect class each). The same probe on the DDPM's own input -
the image resized to the DDPM size, every pixel a feature - is the control: features that do no
better than their input pixels add nothing a detector could not see itself.

This is the measurement for choosing a stage-1 design (DDPM input size, timesteps): a design whose
features separate the classes better gives the teacher more to learn from.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from d3n.data.layout import DatasetLayout, label_path_for
from d3n.errors import DataError
from d3n.train.ddpm.model import load_image
from d3n.train.repository.store import FeatureStore


def image_classes(layout: DatasetLayout, split: str) -> dict[str, int]:
    """{stem: most frequent box class} for the images of a split that have boxes."""
    out = {}
    for img in layout.images(split):
        label = label_path_for(img)
        rows = [ln.split() for ln in label.read_text().splitlines() if ln.strip()] if label.exists() else []
        if rows:
            out[img.stem] = Counter(int(r[0]) for r in rows).most_common(1)[0][0]
    return out


def pooled(store: FeatureStore, level: str, stems: list[str], t: int | None, decoder=None) -> np.ndarray:
    """(n, D): features averaged over space; one timestep, or all T concatenated (t None). With the
    compressor's `decoder`, latents are first decoded to what the teacher sees."""
    import torch

    rows = []
    for s in stems:
        x = store.get(s)[level].astype(np.float32)  # (T, C, H, W)
        if decoder is not None:
            with torch.no_grad():
                x = decoder[level](torch.from_numpy(x)).numpy()
        x = x.mean(axis=(-2, -1))  # (T, C)
        rows.append(x.reshape(-1) if t is None else x[t])
    return np.stack(rows)


def ridge_accuracy(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, nc: int,
                   lam: float = 1.0) -> float:
    """Accuracy of a one-vs-rest ridge classifier (targets +-1), features standardised on train."""
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    a, b = (x_tr - mu) / sd, (x_te - mu) / sd
    a, b = np.hstack([a, np.ones((len(a), 1))]), np.hstack([b, np.ones((len(b), 1))])
    targets = -np.ones((len(y_tr), nc))
    targets[np.arange(len(y_tr)), y_tr] = 1.0
    w = np.linalg.solve(a.T @ a + lam * len(a) * np.eye(a.shape[1]), a.T @ targets)
    return float(((b @ w).argmax(1) == y_te).mean())


def probe(train_repo: Path, eval_repo: Path, data: Path, eval_split: str = "val") -> dict:
    layout = DatasetLayout.open(data)
    tr, ev = FeatureStore.open(train_repo), FeatureStore.open(eval_repo)
    if tr.kind != ev.kind or tr.levels != ev.levels:
        raise DataError(f"{train_repo} and {eval_repo} are different kinds of repository")
    ytr, yev = image_classes(layout, "train"), image_classes(layout, eval_split)
    s_tr, s_ev = [s for s in tr.image_ids if s in ytr], [s for s in ev.image_ids if s in yev]
    if not s_tr or not s_ev:
        raise DataError(f"{layout.yaml_path}: no labelled images in common with the repositories")
    y_a, y_b = np.array([ytr[s] for s in s_tr]), np.array([yev[s] for s in s_ev])
    nc = layout.nc
    decoder = None
    if tr.kind != "raw":  # probe what the teacher sees: the decoded features
        from d3n.train.repository.compress import load_decoder

        decoder = load_decoder(tr.meta["compressor"])
    result = {"kind": tr.kind, "decoded": decoder is not None, "train_images": len(s_tr), "eval_images": len(s_ev), "eval_split": eval_split,
              "chance": float(np.bincount(y_b, minlength=nc).max() / len(y_b)), "levels": {}}
    for lv in tr.levels:
        per_t = {str(t): ridge_accuracy(pooled(tr, lv, s_tr, i, decoder), y_a, pooled(ev, lv, s_ev, i, decoder),
                                        y_b, nc) for i, t in enumerate(tr.timesteps)}
        result["levels"][lv] = {"all_timesteps": ridge_accuracy(pooled(tr, lv, s_tr, None, decoder), y_a,
                                                                pooled(ev, lv, s_ev, None, decoder), y_b, nc),
                                "per_timestep": per_t}
    size = tr.meta.get("ddpm_size")
    if size:  # the control: the DDPM's own input, pixels as features
        paths = {p.stem: p for sp in ("train", eval_split) for p in layout.images(sp)}
        px = {s: load_image(paths[s], int(size)).reshape(-1) for s in s_tr + s_ev}
        result["pixels"] = {"size": int(size), "accuracy": ridge_accuracy(
            np.stack([px[s] for s in s_tr]), y_a, np.stack([px[s] for s in s_ev]), y_b, nc)}
    return result
