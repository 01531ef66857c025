"""CLI: `d3n train baseline`, `d3n val`, `d3n teacher train`."""

from __future__ import annotations

import argparse
from pathlib import Path

from d3n.stage import add_inputs, execute, inputs_from_args
from d3n.stages import get


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a detector")
    tsub = p.add_subparsers(dest="train_cmd", metavar="WHAT")
    b = tsub.add_parser("baseline", help="train the plain YOLOv5s baseline")
    add_inputs(b, get("baseline"))
    b.add_argument("--out", type=Path, required=True, help="run folder to write")
    b.add_argument("--config", type=Path, help="YAML with train settings (TrainConfig keys)")
    add_train_args(b)
    b.set_defaults(func=_baseline)
    p.set_defaults(func=lambda a: p.print_help() or 2)

    t = sub.add_parser("teacher", help="the D3N fusion teacher")
    tt = t.add_subparsers(dest="teacher_cmd", metavar="WHAT")
    tr = tt.add_parser("train", help="train YOLOv5s fused with DDPM features at P3/P4/P5")
    add_inputs(tr, get("teacher"))
    tr.add_argument("--resvae", type=Path, help="compressor run (default: recorded in the repository)")
    tr.add_argument("--out", type=Path, required=True)
    tr.add_argument("--config", type=Path, help="YAML with train settings (TrainConfig keys)")
    tr.add_argument("--fusion", help="fusion mode: dynamic (paper), concat, sum, weighted_sum")
    tr.add_argument("--fusion-off", default="", metavar="PARTS",
                    help=f"comma-separated fusion parts to switch off, for the paper's Tables I and III: "
                         f"{', '.join(FUSION_SWITCHES)}")
    add_train_args(tr)
    tr.set_defaults(func=_teacher)
    t.set_defaults(func=lambda a: t.print_help() or 2)

    v = sub.add_parser("val", help="evaluate a detector checkpoint (baseline, student or teacher) on a dataset split")
    v.add_argument("--model", type=Path, required=True)
    v.add_argument("--data", type=Path, required=True)
    v.add_argument("--imgsz", type=int, default=640)
    v.add_argument("--batch", type=int, default=16)
    v.add_argument("--device", default="cpu")
    v.add_argument("--split", default="val", help="train, val or test (default val)")
    v.add_argument("--json", type=Path, help="write the metrics here")
    v.add_argument("--repo", type=Path, help="teacher: a repository holding this split's DDPM features "
                                              "(default: computed on the fly)")
    v.add_argument("--ddpm", type=Path, help="teacher: DDPM run for on-the-fly features (default: recorded)")
    v.add_argument("--resvae", type=Path, help="teacher: compressor run (default: recorded)")
    v.set_defaults(func=_val)


# --fusion-off names -> FusionConfig fields (paper Tables I and III ablations)
FUSION_SWITCHES = {"filter": "use_filter", "cross": "use_cross", "self_x": "use_self_x", "self_d": "use_self_d",
                   "learn_weights": "learn_weights", "residual": "residual", "norm": "norm"}


def fusion_overrides(mode: str | None, off: str) -> dict:
    """The FusionConfig fields set by `--fusion` and `--fusion-off`."""
    from d3n.errors import ConfigError

    parts = [p.strip() for p in off.split(",") if p.strip()]
    unknown = [p for p in parts if p not in FUSION_SWITCHES]
    if unknown:
        raise ConfigError(f"--fusion-off: unknown part(s) {', '.join(unknown)}; "
                          f"known: {', '.join(FUSION_SWITCHES)}")
    over = {FUSION_SWITCHES[p]: False for p in parts}
    return {"mode": mode, **over} if mode else over


TRAIN_ARGS = ("imgsz", "epochs", "batch", "device", "seed", "workers", "optimizer", "lr0", "weights")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--imgsz", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--optimizer", choices=("SGD", "AdamW", "auto"),
                   help="default auto: ultralytics' rule, which picks AdamW at its own lr for short runs")
    p.add_argument("--lr0", type=float, help="initial learning rate (SGD, AdamW)")
    p.add_argument("--weights", type=Path, help="initial weights, a local .pt (default: from scratch)")


def train_overrides(args) -> dict:
    from d3n.config import load_yaml

    base = load_yaml(args.config) if getattr(args, "config", None) else {}
    over = {k: getattr(args, k, None) for k in TRAIN_ARGS}
    return {**base, **{k: v for k, v in over.items() if v is not None}}


def _baseline(args) -> int:
    from d3n.config import validate
    from d3n.train.detector import baseline
    from d3n.train.detector.loop import TrainConfig, headline

    tcfg = validate(TrainConfig, train_overrides(args), str(args.config or "command line"))
    m = execute(get("baseline"), baseline.Config(train=tcfg), inputs_from_args(get("baseline"), args), args.out)
    print(f"baseline: {headline(m)}  params {m['params']:,}  "
          f"GFLOPs {m['gflops']:.2f} @ {m['imgsz']} -> {args.out / 'best.pt'}")
    return 0


def _teacher(args) -> int:
    from d3n.config import validate
    from d3n.train.detector.loop import TrainConfig, headline
    from d3n.train.teacher import stage as teacher
    from d3n.train.teacher.fusion import FusionConfig

    tcfg = validate(TrainConfig, train_overrides(args), str(args.config or "command line"))
    fusion = validate(FusionConfig, fusion_overrides(args.fusion, args.fusion_off), "--fusion/--fusion-off")
    stage = get("teacher")
    init = "baseline" if args.baseline is not None else "weights"
    m = execute(stage, teacher.Config(init=init, resvae=args.resvae, fusion=fusion, train=tcfg),
                inputs_from_args(stage, args), args.out)
    print(f"teacher: {headline(m)}  branch weights {m['branch_weights']}"
          f"  -> {args.out / 'best.pt'}")
    return 0


def _val(args) -> int:
    from d3n.artifacts import write_json
    from d3n.train.detector import val
    from d3n.train.teacher.model import is_teacher_checkpoint

    if is_teacher_checkpoint(args.model):
        from d3n.train.teacher import val as teacher_val

        m = teacher_val.run(args.model, args.data, imgsz=args.imgsz, batch=args.batch, device=args.device,
                            split=args.split, repo=args.repo, ddpm=args.ddpm, resvae=args.resvae)
        print(f"teacher features: {m['features']}")
    else:
        m = val.run(args.model, args.data, imgsz=args.imgsz, batch=args.batch, device=args.device, split=args.split)
    names = list(m["per_class_AP50"])
    print(val.format_table({args.model.name: m}, names))
    if args.json:
        write_json(args.json, m)
    return 0
