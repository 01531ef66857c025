"""The `d3n` console script: one entry point, subcommands in the style of ultralytics' `yolo`.

Each command group lives beside the code it drives and exposes `register(subparsers)`. Those
modules import only argparse-level things; heavy imports (torch, ultralytics) happen inside the
handlers, so `d3n run` on an edge box never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from d3n import __version__, distributed
from d3n.errors import D3NError

# Modules that add subcommands. A module missing from an install (e.g. a trimmed edge image)
# just does not contribute its commands.
COMMAND_MODULES = (
    "d3n.data.cli",  # d3n data import|add|check|synth
    "d3n.train.cli",  # d3n train baseline, d3n val, d3n teacher
    "d3n.train.ddpm.cli",  # d3n ddpm train (stage 1: the DDPM)
    "d3n.train.repository.cli",  # d3n repo build|compress|probe, d3n resvae (stage 1: feature repository)
    "d3n.train.generator.cli",  # d3n generator train (the defect generator)
    "d3n.train.augment.cli",  # d3n augment
    "d3n.distill.cli",  # d3n distill
    "d3n.pipeline_cli",  # d3n pipeline, d3n demo
    "d3n.experiment.cli",  # d3n experiment
    "d3n.export.cli",  # d3n export, d3n bench, d3n promote
    "d3n.runtime.cli",  # d3n run
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d3n", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"d3n {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # the group itself is absent, not one of its imports
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # under torchrun (several processes): ranks other than 0 log warnings only; join the group
    main_rank = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if main_rank else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    distributed.init_from_env()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except D3NError as exc:
        print(f"d3n: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("d3n: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
