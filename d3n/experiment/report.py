"""The experiment's report: `experiment.md`, `experiment.json` and the paper's Figs. 11-13.

Rows are the distinct models the finished cells trained: "baseline", then "<variant> teacher" and
"<variant> student" for each variant. A model whose stage key equals another row's at every seed
(the baseline every variant shares, the teacher the self-distillation variant reuses) is that row,
listed once. Every number is on the split each model's metrics.json reports (test when the dataset
has one; val chose the checkpoints): mean ± std over seeds, and paired differences (same seed) with
a 95 % interval.
"""

from __future__ import annotations

import csv
from pathlib import Path

from d3n.artifacts import METRICS, atomic_path, read_json, write_json, write_text
from d3n.errors import ConfigError
from d3n.experiment.cam import report_figure as fig14_gradcam
from d3n.experiment.runner import cell_folder, finished_cells
from d3n.experiment.spec import ExperimentConfig
from d3n.experiment.stats import mean_std, paired

MODELS = (("baseline", "baseline"), ("teacher", "teacher"), ("student", "distill"))  # (row suffix, stage)
METRIC_KEYS = ("mAP50", "mAP50-95", "recall@0.25", "recall", "precision")
STATE = ".pipeline.json"


def _reported(m: dict) -> dict:
    split = m.get("report_split", "val")
    return {**m, **(m.get(split) or {}), "split": split}


def collect(exp: ExperimentConfig) -> dict[str, dict]:
    """{row: {"variant", "model", "stage", "seeds": {seed: reported metrics}, "folders": {seed: path}}}."""
    rows: dict[str, dict] = {}
    keys: dict[str, dict[int, str]] = {}
    finished = finished_cells(exp)
    for variant in exp.variants:
        for model, stage in MODELS:
            seeds, folders, ks = {}, {}, {}
            for seed in exp.seeds:
                folder = cell_folder(exp, variant, seed) / stage
                if f"{variant}-s{seed}" in finished and (folder / METRICS).exists():
                    seeds[seed] = _reported(read_json(folder / METRICS))
                    folders[seed] = folder
                    ks[seed] = read_json(folder / STATE)["key"] if (folder / STATE).exists() else str(folder)
            if not seeds:
                continue
            same = next((r for r, k in keys.items() if rows[r]["stage"] == stage
                         and all(k.get(s) == v for s, v in ks.items())), None)
            if same is not None:
                continue
            name = "baseline" if model == "baseline" else f"{variant} {model}"
            if name in rows:  # a baseline that differs between variants: name it by its variant
                name = f"{variant} baseline"
            rows[name] = {"variant": variant, "model": model, "stage": stage, "seeds": seeds, "folders": folders}
            keys[name] = ks
    return rows


def _fmt(mean: float, std: float | None, scale: float = 100) -> str:
    return f"{mean * scale:.1f}" + (f" ± {std * scale:.1f}" if std is not None else "")


def summary_table(rows: dict[str, dict]) -> tuple[list[str], dict]:
    lines = ["| model | seeds | " + " | ".join(METRIC_KEYS) + " | params | GFLOPs |",
             "|---|---|" + "---|" * (len(METRIC_KEYS) + 2)]
    data = {}
    for name, row in rows.items():
        cells, data[name] = [], {}
        for k in METRIC_KEYS:
            vals = [m[k] for m in row["seeds"].values() if m.get(k) is not None]
            if vals:
                mean, std = mean_std(vals)
                data[name][k] = {"mean": mean, "std": std, "n": len(vals), "values": vals}
                cells.append(_fmt(mean, std))
            else:
                cells.append("-")
        any_m = next(iter(row["seeds"].values()))
        gf = f"{any_m['gflops']:.2f}" if any_m.get("gflops") is not None else "-"
        lines.append(f"| {name} | {len(row['seeds'])} | " + " | ".join(cells) + f" | {any_m.get('params', 0):,} | {gf} |")
    return lines, data


def comparisons(exp: ExperimentConfig, rows: dict[str, dict]) -> list[tuple[str, str]]:
    """Every row against the reference, and each variant's student against the reference variant's
    student (its share of the gain that the variant's change removes)."""
    ref = exp.reference if exp.reference in rows else next(iter(rows), None)
    pairs = [(r, ref) for r in rows if r != ref]
    first = next(iter(exp.variants))
    main_student = f"{first} student"
    if main_student in rows:
        pairs += [(main_student, r) for r in rows if r.endswith(" student") and r != main_student]
    # the file's own pairs, once their rows have finished cells (a pair already there, in either
    # order, is not repeated: B − A is A − B negated)
    pairs += [(a, b) for a, b in exp.compare if a in rows and b in rows
              and (a, b) not in pairs and (b, a) not in pairs]
    return pairs


def paired_table(exp: ExperimentConfig, rows: dict[str, dict]) -> tuple[list[str], list[dict]]:
    lines = ["| A − B | metric | pairs | mean | 95 % interval | verdict |", "|---|---|---|---|---|---|"]
    out = []
    names = {n for row in rows.values() for m in row["seeds"].values() for n in m.get("per_class_AP50") or {}}
    unknown = [c for c in exp.classes if c not in names]
    if rows and unknown:
        raise ConfigError(f"classes: {unknown} are not classes of the experiment's data; it has {sorted(names)}")

    def value(m: dict, k: str) -> float | None:
        return (m.get("per_class_AP50") or {}).get(k[5:]) if k.startswith("AP50 ") else m.get(k)

    for a, b in comparisons(exp, rows):
        for k in ("mAP50", "mAP50-95", "recall@0.25", *(f"AP50 {c}" for c in exp.classes)):
            va = {s: v for s, m in rows[a]["seeds"].items() if (v := value(m, k)) is not None}
            vb = {s: v for s, m in rows[b]["seeds"].items() if (v := value(m, k)) is not None}
            p = paired(va, vb)
            if p is None:
                continue
            ci = f"[{p.low * 100:+.1f}, {p.high * 100:+.1f}]" if p.low is not None else "-"
            lines.append(f"| {a} − {b} | {k} | {p.n} | {p.mean * 100:+.1f} | {ci} | {p.verdict} |")
            out.append({"a": a, "b": b, "metric": k, "n": p.n, "mean": p.mean, "low": p.low, "high": p.high,
                        "verdict": p.verdict})
    return lines, out


def per_class_table(rows: dict[str, dict]) -> list[str]:
    names = list(next(iter(next(iter(rows.values()))["seeds"].values())).get("per_class_AP50") or {})
    lines = ["| AP50 | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for n in names:
        cells = []
        for row in rows.values():
            vals = [m["per_class_AP50"][n] for m in row["seeds"].values() if m.get("per_class_AP50")]
            cells.append(_fmt(*mean_std(vals)) if vals else "-")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def time_table(exp: ExperimentConfig) -> list[str]:
    lines = ["| cell | stages run in it (s) | total s |", "|---|---|---|"]
    for name, rec in finished_cells(exp).items():
        ran = ", ".join(f"{s} {v:.0f}" for s, v in rec.get("stage_seconds", {}).items() if v)
        lines.append(f"| {name} | {ran or 'all shared'} | {rec.get('seconds', 0):.0f} |")
    return lines


def _history(folder: Path) -> list[dict]:
    path = folder / "results.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


def fig11_branch_weights(rows: dict[str, dict], path: Path) -> Path | None:
    """Fig. 11: each teacher's branch weights per level over epochs (mean over seeds)."""
    import matplotlib.pyplot as plt

    teachers = {n: r for n, r in rows.items() if r["model"] == "teacher"}
    hist = {n: [_history(f) for f in r["folders"].values()] for n, r in teachers.items()}
    hist = {n: [h for h in hs if h and any(k.startswith("w_") for k in h[0])] for n, hs in hist.items()}
    hist = {n: hs for n, hs in hist.items() if hs}
    if not hist:
        return None
    levels = ("p3", "p4", "p5")
    fig, axes = plt.subplots(len(hist), 3, figsize=(9, 2.6 * len(hist)), squeeze=False)
    for i, (name, hs) in enumerate(hist.items()):
        for ax, lv in zip(axes[i], levels, strict=True):
            for branch in ("cross", "det", "ddpm"):
                k = f"w_{lv}_{branch}"
                if k in hs[0][0]:
                    n = min(len(h) for h in hs)
                    ys = [sum(h[e][k] for h in hs) / len(hs) for e in range(n)]
                    ax.plot(range(1, n + 1), ys, marker=".", label=branch)
            ax.set_title(f"{name}: {lv}", fontsize=8)
            ax.set_ylim(0, 1)
            ax.legend(fontsize=6)
    return _save(fig, path)


def fig12_curves(rows: dict[str, dict], path: Path, pair: tuple[str, str]) -> Path | None:
    """Fig. 12: val mAP50, mAP50-95 and the training loss per epoch, two rows overlaid (each seed)."""
    import matplotlib.pyplot as plt

    if not all(p in rows for p in pair):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    for name, color in zip(pair, ("tab:blue", "tab:red"), strict=True):
        for i, folder in enumerate(rows[name]["folders"].values()):
            h = _history(folder)
            if not h:
                continue
            ep = [r["epoch"] for r in h]
            loss = [sum(v for k, v in r.items() if k in ("box", "cls", "dfl")) for r in h]
            for ax, ys in zip(axes, ([r.get("mAP50") for r in h], [r.get("mAP50-95") for r in h], loss),
                              strict=True):
                ax.plot(ep, ys, color=color, alpha=0.7, label=name if i == 0 else None)
    for ax, title in zip(axes, ("val mAP50", "val mAP50-95", "train loss (box + cls + dfl)"), strict=True):
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def fig13_map_vs_gflops(data: dict, rows: dict[str, dict], path: Path) -> Path | None:
    """Fig. 13: mAP50 (mean ± std over seeds) against GFLOPs, one point per row."""
    import matplotlib.pyplot as plt

    pts = [(n, next(iter(rows[n]["seeds"].values())).get("gflops"), d["mAP50"]) for n, d in data.items()
           if "mAP50" in d]
    pts = [p for p in pts if p[1] is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, gf, m in pts:
        ax.errorbar(gf, m["mean"] * 100, yerr=(m["std"] or 0) * 100, fmt="o", capsize=3)
        ax.annotate(name, (gf, m["mean"] * 100), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("GFLOPs (fvcore, at the training size)")
    ax.set_ylabel("mAP50 (%)")
    return _save(fig, path)


def write_experiment_report(exp: ExperimentConfig) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    rows = collect(exp)
    cells = finished_cells(exp)
    md = [f"# Experiment `{exp.out.name}`", "",
          f"Base config `{exp.base}`; seeds {exp.seeds}; {len(cells)} of "
          f"{len(exp.variants) * len(exp.seeds)} cells finished.", ""]
    result = {"base": str(exp.base), "seeds": exp.seeds, "variants": exp.variants, "cells": cells}
    if rows:
        splits = sorted({m["split"] for r in rows.values() for m in r["seeds"].values()})
        md += [f"Numbers in % on the **{', '.join(splits)}** split" + (" (checkpoints chosen on val)"
                                                                        if "test" in splits else "")
               + "; mean ± std over seeds.", ""]
        table, data = summary_table(rows)
        pairs, diffs = paired_table(exp, rows)
        md += ["## Models", "", *table, "", "## Paired differences (same seed)", "",
               "An interval that contains 0 is no difference.", "", *pairs, ""]
        waiting = [f"{a} − {b}" for a, b in exp.compare if a not in rows or b not in rows]
        if waiting:  # named in the file, not yet made by a finished cell
            md += [f"Not yet reported (a row has no finished cell): {'; '.join(waiting)}.", ""]
        md += ["## AP50 per class", "", *per_class_table(rows), ""]
        result.update({"rows": {n: {k: v for k, v in r.items() if k != "folders"} for n, r in rows.items()},
                       "summary": data, "paired": diffs})
        first = next(iter(exp.variants))
        figs = [fig11_branch_weights(rows, exp.out / "fig11_branch_weights.png"),
                fig12_curves(rows, exp.out / "fig12_curves.png", ("baseline", f"{first} student")),
                fig13_map_vs_gflops(data, rows, exp.out / "fig13_map_vs_gflops.png")]
        figs.append(fig14_gradcam(rows, f"{first} student", exp.out / "fig14_gradcam.png"))
        md += [f"![{f.stem}]({f.name})" for f in figs if f is not None] + [""]
    md += ["## Time per cell", "", *time_table(exp), ""]
    write_text(exp.out / "experiment.md", "\n".join(md))
    write_json(exp.out / "experiment.json", result)
    print("\n".join(md))
    return result
