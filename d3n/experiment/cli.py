"""CLI: `d3n experiment EXP.yaml [--cells a,b] [--gather]`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="variants x seeds of the pipeline, shared stages once, paired statistics")
    p.add_argument("config", type=Path, help="experiment YAML, e.g. experiments/neu-det-cpu.yaml")
    p.add_argument("--cells", help="comma-separated subset of cells (VARIANT-sSEED), e.g. d3n-s0,d3n-s1")
    p.add_argument("--out", type=Path, help="experiment folder (default: the file's `out`)")
    p.add_argument("--gather", action="store_true", help="only write the report from the cells that finished")
    p.set_defaults(func=_experiment)


def _experiment(args) -> int:
    from d3n.experiment.runner import run_experiment
    from d3n.experiment.spec import load_experiment

    exp = load_experiment(args.config)
    if args.out is not None:
        exp.out = args.out.resolve()
    if not args.gather:
        run_experiment(exp, [c.strip() for c in args.cells.split(",")] if args.cells else None)
    from d3n.experiment.report import write_experiment_report

    write_experiment_report(exp)
    return 0
