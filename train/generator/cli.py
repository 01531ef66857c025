"""`d3n generator train`: the class-conditional defect generator. Only argparse at import time."""

from __future__ import annotations

import argparse

from d3n.train.ddpm.cli import add_schedule
from d3n.train.repository.cli import print_metrics


def _train(args: argparse.Namespace) -> int:
    from d3n.config import from_args
    from d3n.train.generator.train import GeneratorConfig, train_generator

    fields = ("data", "preset", "size", "split", "steps", "epochs", "batch", "lr", "lr_min", "ema", "ckpt_every",
              "seed", "device", "context", "min_side", "p_uncond")
    metrics = train_generator(from_args(GeneratorConfig, args, fields, "d3n generator train"), args.out)
    if metrics:
        print_metrics(metrics)
    return 0


def register(sub) -> None:
    g = sub.add_parser("generator", help="the defect generator for d3n augment").add_subparsers(
        dest="generator_cmd", metavar="CMD")
    t = g.add_parser("train", help="train the class-conditional DDPM on defect crops of a split (resumable)",
                     description="Crops a square around every box of the split (--context times its longer side, "
                     "at least --min-side pixels), resizes it to --size and trains a diffusers UNet2DModel "
                     "conditioned on the box's class, with a null class for classifier-free guidance.")
    t.add_argument("--data", required=True, help="dataset folder (with data.yaml)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--preset", choices=("tiny", "paper"), help="UNet size (default tiny)")
    t.add_argument("--size", type=int, help="crop resolution (default 64)")
    t.add_argument("--context", type=float, help="crop side / box side (default 1.5)")
    t.add_argument("--min-side", dest="min_side", type=int, help="smallest crop in image pixels (default 32)")
    t.add_argument("--p-uncond", dest="p_uncond", type=float, help="share trained without class (default 0.1)")
    add_schedule(t)
    t.set_defaults(func=_train)
