"""`d3n data import|check|synth`: bring datasets into the YOLO layout, check them, synthesise one."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="dataset tools: import, check, synth")
    cmds = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    p = cmds.add_parser("synth", help="render the synthetic steel-defect dataset")
    p.add_argument("--out", required=True, help="dataset folder to create (YOLO layout)")
    p.add_argument("--images", type=int, default=240, help="number of images (default 240)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--val-frac", type=float, default=0.2, help="share of images in val (default 0.2)")
    p.add_argument("--force", action="store_true", help="replace --out if it holds something else")
    p.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    from d3n.data.synth import generate

    out = generate(args.out, images=args.images, size=args.size, seed=args.seed,
                   val_frac=args.val_frac, overwrite=args.force)
    print(f"synthetic dataset: {out} ({args.images} images, {args.size}px); preview: {out / 'preview.png'}")
    return 0
