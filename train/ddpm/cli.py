"""`d3n ddpm train`: the DDPM stage as a command. Only argparse at import time."""

from __future__ import annotations

import argparse
from pathlib import Path

from d3n.train.repository.cli import add_device, print_metrics


def _ddpm_train(args: argparse.Namespace) -> int:
    from d3n.config import from_args
    from d3n.stage import execute
    from d3n.stages import get
    from d3n.train.ddpm.train import DDPMTrainConfig

    fields = ("data", "preset", "size", "split", "steps", "epochs", "batch", "lr", "lr_min", "ema",
              "ckpt_every", "seed", "device")
    cfg = from_args(DDPMTrainConfig, args, fields, "d3n ddpm train")
    print_metrics(execute(get("ddpm"), cfg, {"data": Path(cfg.data)}, Path(args.out)))
    return 0


def _ddpm_parser(sub) -> None:
    p = sub.add_parser("ddpm", help="stage 1: DDPM pre-training").add_subparsers(dest="ddpm_cmd", metavar="CMD")
    t = p.add_parser("train", help="train the DDPM on a split's images (resumes from its checkpoint)")
    t.add_argument("--data", required=True, help="dataset folder or its data.yaml")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--preset", choices=("tiny", "paper"), help="UNet size (default tiny)")
    t.add_argument("--size", type=int, help="DDPM input size (default 64)")
    add_schedule(t)
    t.set_defaults(func=_ddpm_train)


def add_schedule(t: argparse.ArgumentParser) -> None:
    """The DDPM loop's options (train/ddpm/train.py), shared with `d3n generator train`."""
    t.add_argument("--split", help="split to train on (default train)")
    t.add_argument("--steps", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--lr-min", dest="lr_min", type=float)
    t.add_argument("--ema", type=float, help="EMA decay, 0 disables (default 0.999)")
    t.add_argument("--ckpt-every", dest="ckpt_every", type=int)
    t.add_argument("--seed", type=int)
    add_device(t)


def register(sub) -> None:
    _ddpm_parser(sub)
