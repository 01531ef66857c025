"""The `d3n augment` run: a copy of the dataset whose train split gains generated defect images.

Val and test are copied untouched: a generated image never reaches a split that chooses or
reports. The plan (which class, how many, with which method and settings) is fixed up front and
stored in `augment.json` with every image made so far (what it was made from: target image,
mask, donor or generator, seed); a killed run resumes at the first image not yet made, and each
image's seed depends only on the run's seed and its index, so a resumed run makes the same
images. Optional quality control (`check_model`) runs a detector on each new image and rejects
those in which it does not find the intended class in the intended box (kept in `rejected/` with
the reason). A contact sheet per class (real crops | generated crops) is written for review.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from d3n.artifacts import atomic_dir, read_json, write_bytes, write_json, write_text
from d3n.data import versions
from d3n.data.check import count
from d3n.data.layout import DatasetLayout
from d3n.data.validate import image_size
from d3n.errors import ConfigError, DataError
from d3n.train.augment import methods
from d3n.train.augment.params import GENERATIVE, METHODS, Params
from d3n.train.augment.placement import Placer
from d3n.train.generator.crops import defect_crops, read_rgb

PLAN = "augment.json"


def plan_counts(layout: DatasetLayout, classes: list[str] | None, count_each: int | None,
                balance: int | None) -> dict[str, int]:
    """How many new images per class: `count_each` of each named class, or enough boxes to bring
    every class of the train split up to `balance` (d3n data check's counts)."""
    if (count_each is None) == (balance is None):
        raise ConfigError("give --count N (with --classes) or --balance N")
    unknown = [c for c in classes or [] if c not in layout.names]
    if unknown:
        raise ConfigError(f"unknown class(es) {unknown}: {layout.yaml_path} has {list(layout.names)}")
    if count_each is not None:
        return {c: count_each for c in classes or layout.names}
    have = count(((("train", layout.labels(p)[:, 0].tolist()) for p in layout.images("train"))),
                  layout.names)["train"]["classes"]
    missing = [n for n in (classes or layout.names) if have[n]["boxes"] == 0]
    if missing:
        raise DataError(f"{layout.yaml_path}: no train box of class(es) {missing}: nothing to balance from")
    return {n: max(0, balance - have[n]["boxes"]) for n in (classes or layout.names)}


def augment(data: str | Path, out: str | Path, method: str, counts: dict[str, int], *, masks: str = "random",
            generator: str | Path | None = None, params: Params = Params(), seed: int = 0,
            check_model: str | Path | None = None, min_conf: float = 0.25, device: str = "cpu",
            progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    if method not in METHODS:
        raise ConfigError(f"--method {method}: choose from {', '.join(METHODS)}")
    if method in GENERATIVE and generator is None:
        raise ConfigError(f"--method {method} draws with the defect generator: pass --generator RUN "
                          "(`d3n generator train`)")
    src, out = DatasetLayout.open(data), Path(out)
    mask_how = "dir" if masks not in ("random", "boxes") else masks
    plan = {"data": str(src.root.resolve()), "method": method, "counts": counts, "masks": masks,
            "generator": str(Path(generator).resolve()) if generator else None, "params": params.__dict__,
            "seed": seed, "check_model": str(check_model) if check_model else None, "min_conf": min_conf}
    placer = Placer(src, mask_how, Path(masks) if mask_how == "dir" else None)
    gen = donors = checker = None
    if method == "paste":
        donors = defect_crops(src, "train", 1.0, 1)
    elif method in GENERATIVE:
        from d3n.train.device import resolve_device
        from d3n.train.generator.model import Generator

        gen = Generator.load(generator, resolve_device(device))
        if gen.names != list(src.names):
            raise DataError(f"{generator}: the generator's classes {gen.names} are not {list(src.names)}")
        for name in counts:
            gen.class_index(name)  # a class it never saw is an error now, not a blank image later
    if check_model:
        checker = _checker(Path(check_model), device, min_conf)
    items = [(name, k) for name in counts for k in range(counts[name])]
    sizes = _Sizes()
    # every place is found once before anything is written, so a split with no room for a class fails
    # here and not half-way; each is found again below from the same seed (cheap beside drawing)
    for i, (name, _) in enumerate(items):
        placer.place(src.names.index(name), np.random.default_rng([seed, i]), sizes)
    state = _open(src, out, plan)  # every check above passed: only now is anything written
    layout = DatasetLayout.open(out)
    done = {it["index"] for it in state["items"]}
    for i, (name, _) in enumerate(tqdm(items, desc=f"augment ({method})", disable=not progress)):
        if i in done:
            continue
        cls = src.names.index(name)
        rng = np.random.default_rng([seed, i])
        target = placer.place(cls, rng, sizes)
        image = read_rgb(target.image)
        if method == "paste":
            new = methods.paste(image, target, cls, rng, donors, params)
        elif method == "noise":
            new = methods.noise(image, target, rng)
        else:
            target = methods.fit_window(gen, target, *image.shape[:2])
            new = getattr(methods, method)(image, target, cls, rng, gen, params)
        stem = f"aug_{method}_{i:05d}"
        h, w = new.shape[:2]
        x0, y0, x1, y1 = target.box
        # the target's own boxes stay; the new defect's box is its mask's box (boxes mode: it replaces one)
        rows = [r for r in layout.labels(target.image).tolist() if mask_how != "boxes" or not _same(r, target.box, w, h)]
        rows.append([cls, (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
        item = {"index": i, "image": f"{stem}.png", "class": name, "box": list(target.box),
                "from": target.image.name, "mask": target.source, "seed": [seed, i]}
        verdict = checker(new, cls, target.box) if checker else None
        where = "train" if verdict is None or verdict["ok"] else "rejected"
        if verdict is not None:
            item["check"] = verdict
        _write(out, where, stem, new, rows)
        item["kept"] = where == "train"
        state["items"].append(item)
        write_json(out / PLAN, state)
    if not state.get("version"):
        kept = [it["image"].removesuffix(".png") for it in state["items"] if it["kept"]]
        history = versions.read(out)
        entry = versions.entry(len(history) + 1, f"d3n augment ({method})", {"train": kept})
        write_json(out / versions.VERSIONS, {"versions": [*history, entry]})
        state["version"] = entry["version"]
        write_json(out / PLAN, state)
    sheets = contact_sheets(src, out, state)
    kept = sum(it["kept"] for it in state["items"])
    return {"made": len(state["items"]), "kept": kept, "rejected": len(state["items"]) - kept,
            "per_class": {n: sum(it["kept"] and it["class"] == n for it in state["items"]) for n in counts},
            "contact_sheets": [str(s) for s in sheets], "out": str(out)}


class _Sizes(dict):
    """(h, w) of an image as the stages read it, from its header the first time it is asked for."""

    def __missing__(self, path: Path) -> tuple[int, int]:
        w, h = image_size(path)
        self[path] = (h, w)
        return self[path]


def _same(row, box, w, h) -> bool:
    c, cx, cy, bw, bh = row
    x0, y0, x1, y1 = box
    return abs(cx * w - (x0 + x1) / 2) <= max(2, (x1 - x0) / 4) and abs(cy * h - (y0 + y1) / 2) <= max(2, (y1 - y0) / 4)


def _open(src: DatasetLayout, out: Path, plan: dict) -> dict:
    """A fresh copy of the dataset (atomically), or the run being resumed (same plan only)."""
    if (out / PLAN).exists():
        state = read_json(out / PLAN)
        if state["plan"] != plan:
            diff = sorted(k for k in plan if state["plan"].get(k) != plan[k])
            raise DataError(f"{out / PLAN}: an augment run with other settings ({', '.join(diff)}) is in this "
                            "folder; use a new --out")
        return state
    if out.exists():
        raise DataError(f"{out}: already exists and is not an augment run; pick another --out")
    with atomic_dir(out) as tmp:
        for name in ("images", "labels"):
            shutil.copytree(src.root / name, tmp / name)
        shutil.copy2(src.yaml_path, tmp / "data.yaml")
        if (src.root / versions.VERSIONS).exists():
            shutil.copy2(src.root / versions.VERSIONS, tmp / versions.VERSIONS)
        else:
            versions.record_initial(tmp, str(src.root))
        write_json(tmp / PLAN, {"plan": plan, "items": []})
    return read_json(out / PLAN)


def _write(out: Path, where: str, stem: str, image: np.ndarray, rows: list) -> None:
    img_dir, lbl_dir = (out / "images/train", out / "labels/train") if where == "train" else (out / "rejected",) * 2
    write_bytes(img_dir / f"{stem}.png", png(image))
    write_text(lbl_dir / f"{stem}.txt", "".join(f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in rows))


def png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise DataError("could not encode a PNG")
    return buf.tobytes()


def _checker(model: Path, device: str, min_conf: float):
    """The quality check: does the detector `model` find class `cls` in `box` (IoU >= 0.5, confidence
    >= min_conf)? ultralytics' predictor at the checkpoint's training size."""
    from d3n.boxes import box_iou
    from d3n.offline import ultralytics

    if not Path(model).is_file():
        raise DataError(f"{model}: no such detector checkpoint (--check-model)")
    yolo = ultralytics().YOLO(str(model))
    imgsz = int((getattr(yolo, "ckpt", None) or {}).get("train_args", {}).get("imgsz", 640))

    def check(image: np.ndarray, cls: int, box) -> dict:
        res = yolo.predict(image[..., ::-1].copy(), imgsz=imgsz, conf=min_conf, verbose=False, device=device)[0].boxes
        xyxy, pc = res.xyxy.cpu().numpy(), res.cls.cpu().numpy().astype(int)
        hit = xyxy[pc == cls]
        iou = float(box_iou(np.array([box], np.float32), hit).max()) if len(hit) else 0.0
        return {"ok": iou >= 0.5, "iou": round(iou, 3),
                "reason": None if iou >= 0.5 else "the detector does not find the intended class in the intended box"}

    return check


def contact_sheets(src: DatasetLayout, out: Path, state: dict, per_row: int = 8, tile: int = 64) -> list[Path]:
    """One PNG per class: a row of real defect crops over rows of generated ones (kept first)."""
    real = defect_crops(src, "train", 1.5, 16)
    sheets = []
    for name in state["plan"]["counts"]:
        cls = src.names.index(name)
        tiles_real = [_tile(read_rgb(c.image), c.window, tile) for c in [c for c in real if c.cls == cls][:per_row]]
        made = [it for it in state["items"] if it["class"] == name][: per_row * 2]
        tiles_gen = []
        for it in made:
            path = out / ("images/train" if it["kept"] else "rejected") / it["image"]
            img = read_rgb(path)
            x0, y0, x1, y1 = it["box"]
            side = max(x1 - x0, y1 - y0, 16) * 1.5
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            h, w = img.shape[:2]
            win = (int(max(cx - side / 2, 0)), int(max(cy - side / 2, 0)), int(min(cx + side / 2, w)),
                   int(min(cy + side / 2, h)))
            t = _tile(img, win, tile)
            if not it["kept"]:
                cv2.line(t, (0, 0), (tile - 1, tile - 1), (255, 0, 0), 2)  # rejected: crossed out
            tiles_gen.append(t)
        rows = [tiles_real] + [tiles_gen[i:i + per_row] for i in range(0, len(tiles_gen), per_row)]
        grid = np.full((tile * len(rows), tile * per_row, 3), 255, np.uint8)
        for r, row in enumerate(rows):
            for c, t in enumerate(row):
                grid[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = t
        path = out / "contact_sheets" / f"{name}.png"
        write_bytes(path, png(grid))
        sheets.append(path)
    return sheets


def _tile(img: np.ndarray, win, size: int) -> np.ndarray:
    x0, y0, x1, y1 = (int(v) for v in win)
    return cv2.resize(img[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)], (size, size), interpolation=cv2.INTER_AREA)
