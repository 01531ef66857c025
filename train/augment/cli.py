"""`d3n augment`: new defect images for the train split. Only argparse at import time."""

from __future__ import annotations

import argparse
import json


def _augment(args: argparse.Namespace) -> int:
    from d3n.data.layout import DatasetLayout
    from d3n.train.augment.augment import augment, plan_counts
    from d3n.train.augment.params import Params

    layout = DatasetLayout.open(args.data)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    counts = plan_counts(layout, classes, args.count, args.balance)
    params = Params(strength=args.strength, guidance=args.guidance, steps=args.steps, transition=args.transition)
    result = augment(args.data, args.out, args.method, counts, masks=args.masks, generator=args.generator,
                     params=params, seed=args.seed, check_model=args.check_model, min_conf=args.min_conf,
                     device=args.device)
    print(json.dumps(result, indent=2))
    return 0


def register(sub) -> None:
    from d3n.train.augment.params import METHODS, Params

    d = Params()
    p = sub.add_parser("augment", help="generate defect images into a copy of a dataset's train split",
                       description="Copies DATA to OUT and adds new images with one defect each to OUT's train "
                       "split (val and test are copied untouched), with augment.json saying what each was made "
                       "from and contact_sheets/<class>.png (real crops over generated ones) for review. "
                       "Resumable: rerun the same command. Methods: sdedit, inpaint, blend (the defect "
                       "generator, `d3n generator train`), paste (Poisson cloning of real defects) and noise (a control: "
                       "colour noise in the box, what an odd patch labelled as the class is worth).")
    p.add_argument("data", help="dataset folder (with data.yaml)")
    p.add_argument("--out", required=True, help="the augmented dataset folder to write")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--classes", help="comma-separated classes to add (default: all)")
    p.add_argument("--count", type=int, help="new images per class")
    p.add_argument("--balance", type=int, help="top each class up to this many train boxes")
    p.add_argument("--masks", default="random",
                   help="where the defects go: random (default: on defect-free images when there are some), "
                        "boxes (an ellipse inside a real box) or a folder of PNG masks named after train images")
    p.add_argument("--generator", help="defect generator run folder (sdedit, inpaint, blend)")
    p.add_argument("--strength", type=float, default=d.strength, help=f"sdedit noise level 0..1 (default {d.strength})")
    p.add_argument("--guidance", type=float, default=d.guidance, help=f"classifier-free guidance (default {d.guidance})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"denoising steps (default {d.steps})")
    p.add_argument("--transition", type=float, default=d.transition,
                   help=f"blend: transition band / box side (default {d.transition})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-model", dest="check_model",
                   help="a detector checkpoint: reject images in which it does not find the class in the box")
    p.add_argument("--min-conf", dest="min_conf", type=float, default=0.25, help="for --check-model (default 0.25)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(func=_augment)
