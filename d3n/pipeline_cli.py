"""CLI: `d3n pipeline CONFIG.yaml` and `d3n demo`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="run the whole D3N chain from a config (skips finished stages)")
    p.add_argument("config", type=Path, help="pipeline YAML, e.g. configs/demo.yaml")
    p.add_argument("--out", type=Path, help="run folder (default: the config's `out`)")
    p.add_argument("--stages", help="comma-separated subset, e.g. baseline,teacher,distill")
    g = p.add_argument_group("several processes (torchrun; the training stages split each batch across them)")
    g.add_argument("--nproc", type=int, default=1, help="processes on this node (one per GPU, or CPU "
                   "processes sharing the cores); 1: this process alone")
    g.add_argument("--nnodes", type=int, default=1, help="machines taking part (each runs the same command)")
    g.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0 .. nnodes-1")
    g.add_argument("--rdzv-endpoint", help="HOST:PORT where the nodes meet (several nodes)")
    p.set_defaults(func=_pipeline)

    d = sub.add_parser("demo", help="the whole chain on a small synthetic dataset, on CPU")
    d.add_argument("--out", type=Path, default=Path("runs/demo"))
    d.set_defaults(func=_demo)


def _pipeline(args) -> int:
    from d3n.pipeline import Pipeline, load_config

    cfg = load_config(args.config)  # checked here, before any process starts
    if args.nproc > 1 or args.nnodes > 1:
        return _launch(args)
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    Pipeline(cfg, args.out).run(stages)
    return 0


def _launch(args) -> int:
    """The same command under torchrun (d3n.distributed), without the launch options."""
    from d3n import distributed
    from d3n.errors import ConfigError

    if distributed.launched():
        raise ConfigError("--nproc/--nnodes given inside a torchrun launch: give them once, outside")
    argv = (["-v"] if args.verbose else []) + ["pipeline", str(args.config.resolve())]
    if args.out:
        argv += ["--out", str(args.out.resolve())]
    if args.stages:
        argv += ["--stages", args.stages]
    try:
        return distributed.launch(argv, args.nproc, args.nnodes, args.node_rank, args.rdzv_endpoint)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _demo(args) -> int:
    from importlib import resources

    from d3n.pipeline import Pipeline, load_config

    with resources.as_file(resources.files("d3n") / "assets" / "demo.yaml") as path:
        cfg = load_config(path)
    Pipeline(cfg, args.out).run()
    return 0
