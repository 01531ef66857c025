"""`d3n promote`: the gate between a retrained model and the one deployed on the line.

Both models are scored the way the line would run them (the exported ONNX through the runtime's
letterbox, decode and NMS, `export.evaluate.evaluate_onnx`) on the same fixed split, and the
candidate ships only if no gated metric and no class's AP50 falls by more than its tolerance.
A checkpoint is exported first, with parity on, so a `.pt` and an `.onnx` are judged alike.
A promoted candidate becomes a release folder (model + sidecar + report), written atomically.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from d3n import __version__
from d3n import sidecar as sidecar_mod
from d3n.artifacts import atomic_dir, write_json, write_text
from d3n.data.layout import DatasetLayout
from d3n.errors import ArtifactError, ConfigError, DataError

log = logging.getLogger(__name__)

REFUSED = 3  # exit status of a refused promotion (1 stays "error", 2 "usage")
HIGHER_IS_BETTER = ("mAP50", "mAP50-95", "precision", "recall", "recall@0.25")
LOWER_IS_BETTER = ("miss_rate", "overkill_rate")  # image-level, at the line's threshold
GATES = {"mAP50": 0.005, "mAP50-95": 0.005, "recall@0.25": 0.01}
CLASS_TOLERANCE = 0.05
RATE_KEYS = ("miss_rate", "overkill_rate", "missed_images", "overkill_images")
REPORT = "promotion"  # promotion.md + promotion.json
EPS = 1e-9  # metrics are rounded to 5 decimals; a delta equal to -tolerance must pass
VAL_NOTE = ("split val chose the checkpoints (best.pt), so it flatters both models; "
            "import a held-out test split for a fair gate")


@dataclass
class PromoteOptions:
    candidate: Path
    deployed: Path
    data: Path
    split: str | None = None  # None: test, which must exist; "val" only when asked for
    release: Path | None = None  # default releases/<candidate sha256[:12]> in the working folder
    tolerance: dict[str, float] = field(default_factory=lambda: dict(GATES))
    class_tolerance: float = CLASS_TOLERANCE
    imgsz: tuple[int, int] | None = None  # for exporting checkpoints only


@dataclass
class Scored:
    """One side of the comparison: what the user gave and the ONNX model that was scored."""

    role: str
    given: Path
    onnx: Path | None = None
    sidecar: sidecar_mod.Sidecar | None = None

    @property
    def label(self) -> str:
        """The file to name in messages: the sidecar the user has, or the checkpoint they gave."""
        if self.given.suffix == ".pt":
            return str(self.given)
        return str(sidecar_mod.sidecar_path(self.onnx)) if self.onnx else str(self.given)

    def describe(self) -> dict:
        sc = self.sidecar
        return {"given": str(self.given), "model_file": self.onnx.name, "sha256": sc.model_sha256,
                "source_sha256": sc.source_sha256, "format": sc.format, "precision": sc.precision,
                "imgsz": list(sc.imgsz), "exported_here": self.given.suffix == ".pt"}


@dataclass
class PromotionResult:
    promoted: bool
    report: dict
    markdown: str
    release: Path | None  # the release folder, when promoted
    report_files: list[Path]


# --- options ---------------------------------------------------------------------------------

def parse_tolerance(text: str | None) -> dict[str, float]:
    """'mAP50=0.01,miss_rate=0.02,mAP50-95=off' on top of GATES; 'off' drops a gate."""
    out = dict(GATES)
    known = HIGHER_IS_BETTER + LOWER_IS_BETTER
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, value = part.rpartition("=")
        name = name.strip()
        if not sep or name not in known:
            raise ConfigError(f"--tolerance: '{part}' is not METRIC=T with METRIC one of {', '.join(known)}")
        if value.strip().lower() == "off":
            out.pop(name, None)
            continue
        out[name] = _finite(value, f"--tolerance {name}")
    return out


def _finite(value: str | float, what: str) -> float:
    try:
        v = float(value)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise ConfigError(f"{what}: '{value}' is not a number")
    return v


# --- the split -------------------------------------------------------------------------------

def choose_split(layout: DatasetLayout, split: str | None) -> str:
    """test unless val was asked for: val chose the checkpoints, so it is never the default."""
    split = split or "test"
    if split not in ("test", "val"):
        raise ConfigError(f"--split must be test or val, not '{split}'")
    if not layout.has(split):
        hint = ("import one with `d3n data import SRC --out DATA --splits DIR` (DIR/test.txt) or "
                "`--test-frac F`, or pass `--split val` to gate on the split that chose the checkpoints")
        raise DataError(f"{layout.yaml_path}: no {split} split to gate on; "
                        + (hint if split == "test" else "the dataset lists none"))
    if not layout.images(split):
        raise DataError(f"{layout.splits[split]}: the {split} split has no images")
    return split


def label_stats(layout: DatasetLayout, split: str) -> dict:
    """Images with and without boxes and boxes per class: what the image rates and the per-class
    gate can be measured on."""
    per_class = np.zeros(layout.nc, np.int64)
    defect = clean = 0
    for path in layout.images(split):
        cls = layout.labels(path)[:, 0].astype(np.int64)
        per_class += np.bincount(cls[(cls >= 0) & (cls < layout.nc)], minlength=layout.nc)
        defect, clean = defect + bool(len(cls)), clean + (not len(cls))
    return {"defect_images": defect, "clean_images": clean,
            "instances": dict(zip(layout.names, per_class.tolist(), strict=True))}


def _check_measurable(tolerance: dict, stats: dict, layout: DatasetLayout, split: str) -> None:
    """A gate on a rate the split cannot measure would pass silently; refuse it up front."""
    need = {"miss_rate": "defect_images", "overkill_rate": "clean_images"}
    for rate, count in need.items():
        if rate in tolerance and not stats[count]:
            what = "image with a box" if rate == "miss_rate" else "image without boxes"
            raise DataError(f"{layout.yaml_path}: --tolerance {rate} given, but the {split} split has "
                            f"no {what} to measure it on")


# --- the models ------------------------------------------------------------------------------

def locate(path: Path, role: str) -> Scored:
    """Check what the user gave exists and is a kind we can score; a release folder -> its model."""
    if path.is_dir():
        return Scored(role, path, onnx=_release_model(path))
    if not path.exists():
        raise ArtifactError(f"{path}: {role} model not found")
    if path.suffix not in (".onnx", ".pt"):
        raise ArtifactError(f"{path}: {role} must be an exported .onnx (with its sidecar), a checkpoint "
                            ".pt or a release folder written by `d3n promote`")
    return Scored(role, path, onnx=path if path.suffix == ".onnx" else None)


def _release_model(folder: Path) -> Path:
    report = folder / f"{REPORT}.json"
    if not report.is_file():
        raise ArtifactError(f"{folder}: a folder, but not a release written by `d3n promote` "
                            f"(no {report.name})")
    try:
        name = json.loads(report.read_text())["candidate"]["model_file"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{report}: not a promotion report ({exc!r})") from None
    model = folder / name
    if not model.is_file():
        raise ArtifactError(f"{model}: the release's model file is missing")
    return model


def _trained_imgsz(pt: Path) -> tuple[int, int] | None:
    """The input size a checkpoint was trained at: a student trained at 128 px finds nothing at 640."""
    from d3n.export.checkpoint import load_checkpoint

    ckpt = load_checkpoint(pt).yolo.ckpt or {}
    size = (ckpt.get("train_args") or {}).get("imgsz")
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


def export_checkpoint(side: Scored, data: Path, scratch: Path, imgsz: tuple[int, int]) -> None:
    """Export a .pt the way `d3n export` does (ONNX, parity on) into scratch, so it is scored like
    an export; parity uses DATA's train images when there are any, else synthetic frames."""
    from d3n.export.exporter import ExportOptions, export_model

    layout = DatasetLayout.open(data)
    calib = data if layout.has("train") and layout.images("train") else None
    log.info("exporting %s %s at %s for scoring", side.role, side.given, imgsz)
    res = export_model(ExportOptions(model=side.given, format="onnx", imgsz=imgsz, calib=calib,
                                     parity=True, out=scratch / side.role / "model.onnx"))
    side.onnx = res.model


def load_sidecar(side: Scored) -> None:
    """The sidecar, hash-checked, and refused if ONNX Runtime cannot score it as a raw head."""
    sc = sidecar_mod.load(side.onnx)
    where = sidecar_mod.sidecar_path(side.onnx)
    if sc.format == "engine" or side.onnx.suffix != ".onnx":
        raise ArtifactError(f"{where}: {side.role} is a TensorRT engine; promote the .onnx it was built from")
    if sc.output.kind != "raw":
        raise ArtifactError(f"{where}: {side.role} was exported with --nms; promote scores the raw head "
                            "(export it without --nms)")
    side.sidecar = sc


def check_names(cand: Scored, dep: Scored, layout: DatasetLayout) -> None:
    if cand.sidecar.names != dep.sidecar.names:
        raise ArtifactError(f"class names differ: {cand.label} has {cand.sidecar.names}, {dep.label} has "
                            f"{dep.sidecar.names}; a promotion compares models of the same classes")
    if list(layout.names) != cand.sidecar.names:
        raise DataError(f"{layout.yaml_path}: class names {list(layout.names)} are not the models' "
                        f"{cand.sidecar.names} ({cand.label})")


# --- scoring ---------------------------------------------------------------------------------

def score(side: Scored, layout: DatasetLayout, split: str) -> dict:
    from d3n.export.evaluate import evaluate_onnx

    imgsz = tuple(side.sidecar.imgsz)
    log.info("scoring %s %s on %s (%s) at %s", side.role, side.onnx.name, split, layout.yaml_path, imgsz)
    # one pass: the summary holds the image-level counts and rates at the line's threshold (d3n.metrics)
    return evaluate_onnx(side.onnx, layout.root, imgsz, split)


# --- the decision ----------------------------------------------------------------------------

def metric_rows(dep: dict, cand: dict, tolerance: dict) -> list[dict]:
    rows = []
    for key in HIGHER_IS_BETTER + LOWER_IS_BETTER:
        d, c, tol = dep.get(key), cand.get(key), tolerance.get(key)
        delta = None if d is None or c is None else round(c - d, 5)
        ok = None  # not gated, or not measurable on this split
        if tol is not None and delta is not None:
            worse_by = delta if key in LOWER_IS_BETTER else -delta
            ok = worse_by <= tol + EPS
        rows.append({"metric": key, "deployed": d, "candidate": c, "delta": delta, "tolerance": tol,
                     "lower_is_better": key in LOWER_IS_BETTER, "pass": ok})
    return rows


def class_rows(dep: dict, cand: dict, instances: dict, tolerance: float) -> list[dict]:
    """AP50 per class; a class without boxes in the split scores 0 for both and is not gated."""
    rows = []
    for name, n in instances.items():
        d, c = dep["per_class_AP50"][name], cand["per_class_AP50"][name]
        delta = round(c - d, 5)
        rows.append({"class": name, "instances": n, "deployed": d, "candidate": c, "delta": delta,
                     "tolerance": tolerance, "pass": (-delta <= tolerance + EPS) if n else None})
    return rows


def failures(metrics: list[dict], classes: list[dict]) -> list[str]:
    return ([r["metric"] for r in metrics if r["pass"] is False]
            + [f"AP50 {r['class']}" for r in classes if r["pass"] is False])


def build_report(opts: PromoteOptions, layout: DatasetLayout, split: str, stats: dict,
                 cand: Scored, dep: Scored, cand_m: dict, dep_m: dict) -> dict:
    metrics = metric_rows(dep_m, cand_m, opts.tolerance)
    classes = class_rows(dep_m, cand_m, stats["instances"], opts.class_tolerance)
    failed = failures(metrics, classes)
    notes = [VAL_NOTE] if split == "val" else []
    if cand.sidecar.model_sha256 == dep.sidecar.model_sha256:
        notes.append("candidate and deployed are the same model")
    if cand.sidecar.imgsz != dep.sidecar.imgsz:
        notes.append(f"input sizes differ: candidate {cand.sidecar.imgsz}, deployed {dep.sidecar.imgsz} "
                     "(each is scored at its own)")
    return {
        "decision": "refused" if failed else "promoted", "failed": failed, "notes": notes,
        "data": str(layout.yaml_path), "split": split, "images": cand_m["images"],
        "instances": cand_m["instances"], "defect_images": stats["defect_images"],
        "clean_images": stats["clean_images"],
        "candidate": cand.describe(), "deployed": dep.describe(),
        "tolerance": opts.tolerance, "class_tolerance": opts.class_tolerance,
        "metrics": metrics, "per_class_AP50": classes,
        "image_rates": {"deployed": {k: dep_m[k] for k in RATE_KEYS},
                        "candidate": {k: cand_m[k] for k in RATE_KEYS}},
        "d3n_version": __version__,
    }


# --- the report ------------------------------------------------------------------------------

def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _verdict(ok: bool | None, gated: bool) -> str:
    if ok is None:
        return "n/a (no boxes)" if gated else "not gated"
    return "pass" if ok else "**FAIL**"


def _rate_cell(rate, count, total) -> str:
    return "n/a" if rate is None else f"{rate:.4f} ({count}/{total})"


def _side_line(role: str, side: dict) -> str:
    how = "exported here, scored" if side["exported_here"] else "scored"
    size = "x".join(map(str, side["imgsz"]))
    return (f"- {role}: `{side['given']}` ({how} as {side['model_file']}, {side['precision']}, {size} px; "
            f"sha256 {side['sha256']})")


def render_markdown(r: dict) -> str:
    verdict = "PROMOTED" if r["decision"] == "promoted" else f"REFUSED: {', '.join(r['failed'])} failed"
    lines = [f"# Promotion: {verdict}", "", _side_line("candidate", r["candidate"]),
             _side_line("deployed", r["deployed"]),
             f"- data: `{r['data']}`, split **{r['split']}**, {r['images']} images, {r['instances']} boxes "
             f"({r['defect_images']} images with boxes, {r['clean_images']} without)"]
    lines += [f"- note: {n}" for n in r["notes"]]
    lines += ["", "| metric | deployed | candidate | delta | tolerance | pass |",
              "|---|---:|---:|---:|---:|---|"]
    rates = r["image_rates"]
    for row in r["metrics"]:
        name, d, c = row["metric"], _num(row["deployed"]), _num(row["candidate"])
        if row["lower_is_better"]:
            key = "missed_images" if name == "miss_rate" else "overkill_images"
            total = r["defect_images"] if name == "miss_rate" else r["clean_images"]
            name += " (lower is better)"
            d = _rate_cell(row["deployed"], rates["deployed"][key], total)
            c = _rate_cell(row["candidate"], rates["candidate"][key], total)
        tol = "–" if row["tolerance"] is None else f"{row['tolerance']:g}"
        lines.append(f"| {name} | {d} | {c} | {_num(row['delta'])} | {tol} | "
                     f"{_verdict(row['pass'], row['tolerance'] is not None)} |")
    lines += ["", f"Per-class AP50 (a drop of more than {r['class_tolerance']:g} fails):", "",
              "| class | boxes | deployed | candidate | delta | pass |", "|---|---:|---:|---:|---:|---|"]
    for row in r["per_class_AP50"]:
        lines.append(f"| {row['class']} | {row['instances']} | {_num(row['deployed'])} | "
                     f"{_num(row['candidate'])} | {_num(row['delta'])} | {_verdict(row['pass'], True)} |")
    lines += ["", "Miss rate: images with a box where no detection at conf 0.25 overlaps a true box at "
              "IoU 0.5. Overkill rate: images without boxes that get a detection at conf 0.25.", ""]
    return "\n".join(lines)


def write_report(folder: Path, report: dict, markdown: str, stem: str = REPORT) -> list[Path]:
    return [write_text(folder / f"{stem}.md", markdown), write_json(folder / f"{stem}.json", report)]


def write_release(dst: Path, cand: Scored, report: dict, markdown: str) -> None:
    """Model + sidecar + report, built beside dst and renamed into place: a release folder that
    exists is complete, and its model is re-checked against its sidecar before it appears."""
    side = sidecar_mod.sidecar_path(cand.onnx)
    with atomic_dir(dst) as tmp:
        shutil.copy2(cand.onnx, tmp / cand.onnx.name)
        shutil.copy2(side, tmp / side.name)
        write_report(tmp, report, markdown)
        sidecar_mod.load(tmp / cand.onnx.name)


# --- the command -----------------------------------------------------------------------------

def _prepare_models(opts: PromoteOptions, scratch: Path) -> tuple[Scored, Scored]:
    cand, dep = locate(opts.candidate, "candidate"), locate(opts.deployed, "deployed")
    for side in (cand, dep):  # exported models first: a checkpoint may borrow their input size
        if side.onnx is not None:
            load_sidecar(side)
    for side, other in ((cand, dep), (dep, cand)):
        if side.onnx is None:
            size = (opts.imgsz or _trained_imgsz(side.given)
                    or (tuple(other.sidecar.imgsz) if other.sidecar else None) or (640, 640))
            export_checkpoint(side, opts.data, scratch, size)
            load_sidecar(side)
    return cand, dep


def promote(opts: PromoteOptions) -> PromotionResult:
    layout = DatasetLayout.open(opts.data)
    split = choose_split(layout, opts.split)  # before any export: a missing split fails at once
    opts.class_tolerance = _finite(opts.class_tolerance, "--class-tolerance")
    stats = label_stats(layout, split)
    _check_measurable(opts.tolerance, stats, layout, split)
    with tempfile.TemporaryDirectory(prefix="d3n-promote-") as tmp:
        cand, dep = _prepare_models(opts, Path(tmp))
        check_names(cand, dep, layout)
        dep_m = score(dep, layout, split)
        cand_m = score(cand, layout, split)
        report = build_report(opts, layout, split, stats, cand, dep, cand_m, dep_m)
        release = opts.release or Path("releases") / cand.sidecar.model_sha256[:12]
        return _finish(report, cand, release)


def _finish(report: dict, cand: Scored, release: Path) -> PromotionResult:
    """Promoted: the release folder. Refused: no release, the report beside where it would be."""
    promoted = report["decision"] == "promoted"
    report["release"] = str(release) if promoted else None
    markdown = render_markdown(report)
    refused_stem = f"{release.name}.refused"
    if promoted:
        write_release(release, cand, report, markdown)
        for suffix in (".md", ".json"):  # an earlier refusal of this candidate is now stale
            (release.parent / f"{refused_stem}{suffix}").unlink(missing_ok=True)
        files = [release / f"{REPORT}.md", release / f"{REPORT}.json"]
        return PromotionResult(True, report, markdown, release, files)
    release.parent.mkdir(parents=True, exist_ok=True)
    files = write_report(release.parent, report, markdown, stem=refused_stem)
    return PromotionResult(False, report, markdown, None, files)
