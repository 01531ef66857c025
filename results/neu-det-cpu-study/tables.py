"""Print the README's study tables from an experiment.json (rows summary, paired differences)."""
import json
import sys

r = json.load(open(sys.argv[1]))
rows = r["summary"]
params = {n: next(iter(v["seeds"].values())) for n, v in r["rows"].items()}
print("| model | seeds | mAP50 | mAP50-95 | recall@0.25 | params | GFLOPs |")
print("|---|---:|---:|---:|---:|---:|---:|")


def f(m, k):
    v = m.get(k)
    if not v:
        return "-"
    return f"{v['mean'] * 100:.1f} ± {v['std'] * 100:.1f}" if v.get("std") is not None else f"{v['mean'] * 100:.1f}"


for name, m in rows.items():
    p = params[name]
    print(f"| {name} | {m['mAP50']['n']} | {f(m, 'mAP50')} | {f(m, 'mAP50-95')} | {f(m, 'recall@0.25')} | {p.get('params', 0):,} | {p.get('gflops', 0):.2f} |")
print()
print("| A − B (paired by seed) | metric | pairs | mean | 95 % interval | verdict |")
print("|---|---|---:|---:|---|---|")
for d in r["paired"]:
    ci = f"[{d['low'] * 100:+.1f}, {d['high'] * 100:+.1f}]" if d.get("low") is not None else "-"
    print(f"| {d['a']} − {d['b']} | {d['metric']} | {d['n']} | {d['mean'] * 100:+.1f} | {ci} | {d['verdict']} |")
print()
for c, rec in r["cells"].items():
    print(c, rec.get("seconds"), rec.get("stage_seconds"))
print()
# training time per cell from the training loops' own per-epoch seconds (results.csv), which add up
# over resumed attempts (the cells were run before stage times counted every attempt)
import csv  # noqa: E402
from pathlib import Path  # noqa: E402

cells = Path(sys.argv[1]).parent / "cells"
print("| cell | stages trained in it | training seconds (sum of epochs) |")
print("|---|---|---:|")
for c in sorted(cells.iterdir()):
    got = {}
    for st in ("ddpm", "resvae", "baseline", "teacher", "distill"):
        state = c / st / ".pipeline.json"
        if not state.exists() or json.loads(state.read_text()).get("made", "").startswith("shared"):
            continue
        res = c / st / "results.csv"
        if res.exists():
            got[st] = sum(float(row["seconds"]) for row in csv.DictReader(res.open()))
    if got:
        print(f"| {c.name} | {', '.join(f'{k} {v / 60:.0f} min' for k, v in got.items())} | {sum(got.values()):.0f} |")
