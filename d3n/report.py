"""The pipeline's closing report: baseline vs teacher vs student, as markdown, a plot and a table."""

from __future__ import annotations

import json
from pathlib import Path

from d3n.artifacts import MANIFEST, METRICS, atomic_path, write_json, write_text
from d3n.stages import STAGES

ROWS = ("mAP50", "mAP50-95", "precision", "recall")


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def reported(m: dict) -> dict:
    """A model's numbers on the split its metrics.json says to quote (test when the dataset has one:
    val chose the checkpoint), with its size and cost."""
    split = m.get("report_split", "val")
    return {**m, **(m.get(split) or {}), "split": split}


def collect(out: Path) -> dict:
    """The detectors' metrics (the registry's stages that train one) and every stage's time."""
    models = {s.model: reported(m) for s in STAGES if s.model and (m := _load(out / s.name / METRICS))}
    stages = {s.name: man.get("seconds") for s in STAGES if (man := _load(out / s.name / MANIFEST))}
    return {"models": models, "stage_seconds": stages}


def table(models: dict[str, dict]) -> str:
    cols = list(models)
    names = list(next(iter(models.values())).get("per_class_AP50") or {}) if models else []
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for k in ROWS:
        lines.append(f"| {k} | " + " | ".join(_fmt(models[c].get(k)) for c in cols) + " |")
    for k in ("miss_rate", "overkill_rate"):  # image level at conf 0.25, where the split has such images
        if any(models[c].get(k) is not None for c in cols):
            lines.append(f"| {k} | " + " | ".join(_fmt(models[c].get(k)) for c in cols) + " |")
    for n in names:
        lines.append(f"| AP50 {n} | " + " | ".join(_fmt((models[c].get("per_class_AP50") or {}).get(n)) for c in cols) + " |")
    lines.append("| params | " + " | ".join(_fmt(models[c].get("params"), ",") for c in cols) + " |")
    lines.append("| GFLOPs | " + " | ".join(_fmt(models[c].get("gflops"), ".2f") for c in cols) + " |")
    return "\n".join(lines)


def _fmt(v, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def plot(models: dict[str, dict], path: Path) -> Path | None:
    if not models:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = ["mAP50", "mAP50-95", *[f"AP50 {n}" for n in next(iter(models.values())).get("per_class_AP50") or {}]]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.9), 3.2))
    w = 0.8 / len(models)
    for i, (label, m) in enumerate(models.items()):
        vals = [m.get("mAP50") or 0, m.get("mAP50-95") or 0, *((m.get("per_class_AP50") or {}).values())]
        ax.bar(x + i * w, vals, w, label=label)
    ax.set_xticks(x + w * (len(models) - 1) / 2, names, rotation=30, fontsize=8, ha="right")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("baseline vs teacher vs student")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


def write_report(out: Path, timings: dict | None = None, status: dict | None = None) -> dict:
    data = collect(out)
    models = data["models"]
    md = ["# D3N pipeline report", "", f"Run folder: `{out}`", ""]
    if models:
        splits = sorted({m["split"] for m in models.values()})
        where = (f"{splits[0]} split" if len(splits) == 1 else "splits " + ", ".join(
            f"{k}: {m['split']}" for k, m in models.items()))
        chosen = " (checkpoints chosen on val)" if "test" in splits else " (the split that also chose the checkpoints)"
        md += [f"## Detection ({where}{chosen})", "", table(models), ""]
        if "baseline" in models and "student" in models:
            d = (models["student"]["mAP50"] or 0) - (models["baseline"]["mAP50"] or 0)
            md += [f"Student vs baseline mAP50: {d:+.3f} (paper, NEU-DET 512 px, 100 epochs: +0.024).", ""]
            same = models["student"].get("same_params_and_flops_as_baseline")
            md += [f"Student params/FLOPs identical to the baseline's: {same}.", ""]
        if plot(models, out / "report.png"):
            md += ["![comparison](report.png)", ""]
    md += ["## Stages", "", "| stage | seconds | this run |", "|---|---|---|"]
    for stage, secs in data["stage_seconds"].items():
        md.append(f"| {stage} | {_fmt(secs, '.1f')} | {(status or {}).get(stage, '-')} |")
    write_text(out / "report.md", "\n".join(md) + "\n")
    write_json(out / "report.json", {**data, "status": status or {}, "timings": timings or {}})
    print("\n" + (table(models) if models else "(no trained models yet)"))
    print(f"\nreport: {out / 'report.md'}")
    return data
