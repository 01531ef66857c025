"""CLI: `d3n distill`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from d3n.stage import add_inputs
    from d3n.stages import get
    from d3n.train.cli import add_train_args

    p = sub.add_parser("distill", help="distil the fusion teacher into a plain YOLOv5s student (Eqs. 6-7)")
    add_inputs(p, get("distill"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resvae", type=Path, help="compressor run (default: recorded in the repository)")
    p.add_argument("--config", type=Path, help="YAML with train settings (TrainConfig keys)")
    p.add_argument("--weight", type=float, help="lambda: weight of the teacher terms (default 0.5)")
    p.add_argument("--terms", choices=("kl", "l2"), help="kl (default): each term on the head's probabilities; "
                                                         "l2: the paper's logit L2")
    p.add_argument("--temperature", type=float, help="class-term temperature (kl)")
    add_train_args(p)
    p.set_defaults(func=_distill)


def _distill(args) -> int:
    from d3n.config import validate
    from d3n.distill import trainer
    from d3n.distill.loss import DistillConfig
    from d3n.errors import ConfigError
    from d3n.stage import execute, inputs_from_args
    from d3n.stages import get
    from d3n.train.cli import train_overrides
    from d3n.train.detector.loop import TrainConfig, headline

    tcfg = validate(TrainConfig, train_overrides(args), str(args.config or "command line"))
    dcfg = validate(DistillConfig, {k: v for k in ("weight", "terms", "temperature")
                                    if (v := getattr(args, k)) is not None}, "command line")
    if (args.teacher is None) == (args.baseline is None):
        raise ConfigError("give exactly one of --teacher (the fusion teacher) or --baseline (self-distillation)")
    stage = get("distill")
    cfg = trainer.Config(teacher="teacher" if args.teacher else "baseline", resvae=args.resvae, distill=dcfg,
                         train=tcfg)
    m = execute(stage, cfg, inputs_from_args(stage, args), args.out)
    print(f"student: {headline(m)}  params {m['params']:,} "
          f"(baseline {m['baseline_params']:,})  -> {args.out / 'best.pt'}")
    return 0
