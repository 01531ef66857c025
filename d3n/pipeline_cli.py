"""CLI: `d3n pipeline CONFIG.yaml` and `d3n demo`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="run the whole D3N chain from a config (skips finished stages)")
    p.add_argument("config", type=Path, help="pipeline YAML, e.g. configs/demo.yaml")
    p.add_argument("--out", type=Path, help="run folder (default: the config's `out`)")
    p.add_argument("--stages", help="comma-separated subset, e.g. baseline,teacher,distill")
    p.set_defaults(func=_pipeline)

    d = sub.add_parser("demo", help="the whole chain on a small synthetic dataset, on CPU")
    d.add_argument("--out", type=Path, default=Path("runs/demo"))
    d.set_defaults(func=_demo)


def _pipeline(args) -> int:
    from d3n.pipeline import Pipeline, load_config

    cfg = load_config(args.config)
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    Pipeline(cfg, args.out).run(stages)
    return 0


def _demo(args) -> int:
    from importlib import resources

    from d3n.pipeline import Pipeline, load_config

    with resources.as_file(resources.files("d3n") / "assets" / "demo.yaml") as path:
        cfg = load_config(path)
    Pipeline(cfg, args.out).run()
    return 0
