"""Repository commands: `d3n repo build|compress` (one split, as tools) and `d3n resvae train` (the stage).

Only argparse at import time; torch and diffusers are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N, or auto (cuda if available, else cpu); default cpu")


def print_metrics(metrics: dict) -> None:
    keep = {k: v for k, v in metrics.items() if not k.endswith("_curve") and k != "held_out_images"}
    print(json.dumps(keep, indent=2, default=str)[:4000])


def _repo_build(args: argparse.Namespace) -> int:
    from d3n.config import validate
    from d3n.train.repository.build import RepoBuildConfig, build_repo, parse_timesteps

    data = {"ddpm": args.ddpm, "data": args.data, "split": args.split, "timesteps": parse_timesteps(args.timesteps),
            "shard_size": args.shard_size, "batch": args.batch, "device": args.device}
    metrics = build_repo(validate(RepoBuildConfig, data, "d3n repo build"), args.out)
    if metrics:  # (under torchrun, rank 0's)
        print_metrics(metrics)
    return 0


def _repo_compress(args: argparse.Namespace) -> int:
    from d3n.config import validate
    from d3n.train.repository.compress import RepoCompressConfig, compress_with

    data = {"repo": args.repo, "compressor": args.resvae, "method": args.method, "batch": args.batch,
            "device": args.device}
    print_metrics(compress_with(validate(RepoCompressConfig, data, "d3n repo compress"), args.out))
    return 0


def _resvae_train(args: argparse.Namespace) -> int:
    from d3n.config import from_args
    from d3n.stage import execute
    from d3n.stages import get
    from d3n.train.repository.fit import CompressorTrainConfig

    fields = ("repo", "method", "latent_channels", "epochs", "steps", "batch", "lr", "kl_weight", "hidden",
              "blocks", "holdout", "seed", "device")
    cfg = from_args(CompressorTrainConfig, args, fields, "d3n resvae train")
    if args.no_pca_init:
        cfg.pca_init = False
    print_metrics(execute(get("resvae"), cfg, {"repo": Path(cfg.repo)}, Path(args.out)))
    return 0


def _repo_probe(args: argparse.Namespace) -> int:
    from d3n.artifacts import write_json
    from d3n.train.repository.probe import probe

    result = probe(args.repo, args.eval_repo, args.data, args.split)
    print_metrics(result)
    if args.json:
        write_json(args.json, result)
    return 0


def _repo_parser(sub) -> None:
    p = sub.add_parser("repo", help="stage 1: feature repository").add_subparsers(dest="repo_cmd", metavar="CMD")
    b = p.add_parser("build", help="extract DDPM decoder features of a split (resumes at the first missing shard)")
    b.add_argument("--ddpm", required=True, help="DDPM run folder")
    b.add_argument("--data", required=True)
    b.add_argument("--out", required=True, help="repository folder")
    b.add_argument("--timesteps", default="100,150,250", help="comma-separated t (paper: 100,150,250)")
    b.add_argument("--split", default="train")
    b.add_argument("--shard-size", dest="shard_size", type=int, default=64)
    b.add_argument("--batch", type=int, default=8)
    add_device(b)
    b.set_defaults(func=_repo_build)
    c = p.add_parser("compress", help="write a repository's latents with a fitted compressor")
    c.add_argument("--repo", required=True, help="raw repository (any split)")
    c.add_argument("--resvae", required=True, help="compressor run folder (ResVAE or PCA)")
    c.add_argument("--out", required=True)
    c.add_argument("--method", choices=("resvae", "pca"), help="assert the compressor's method")
    c.add_argument("--batch", type=int, default=32)
    add_device(c)
    c.set_defaults(func=_repo_compress)
    pr = p.add_parser("probe", help="linear probe: how well each level's features separate the defect classes")
    pr.add_argument("--repo", type=Path, required=True, help="the train split's repository (fits the probe)")
    pr.add_argument("--eval-repo", dest="eval_repo", type=Path, required=True, help="another split's repository")
    pr.add_argument("--data", type=Path, required=True, help="the dataset (labels give each image's class)")
    pr.add_argument("--split", default="val", help="the split of --eval-repo (default val)")
    pr.add_argument("--json", type=Path, help="write the result here")
    pr.set_defaults(func=_repo_probe)


def _resvae_parser(sub) -> None:
    p = sub.add_parser("resvae", help="stage 1: repository compressor").add_subparsers(dest="resvae_cmd", metavar="CMD")
    t = p.add_parser("train", help="fit a ResVAE (or PCA) per level on a train-split repository")
    t.add_argument("--repo", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--method", choices=("resvae", "pca"))
    t.add_argument("--latent-channels", dest="latent_channels", type=int,
                   help="latent width of the widest level (default width/8; paper 512 -> 64)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--steps", type=int, help="optimizer steps per level (overrides --epochs)")
    t.add_argument("--batch", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--kl-weight", dest="kl_weight", type=float)
    t.add_argument("--hidden", type=int)
    t.add_argument("--blocks", type=int)
    t.add_argument("--holdout", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--no-pca-init", dest="no_pca_init", action="store_true")
    add_device(t)
    t.set_defaults(func=_resvae_train)


def register(sub) -> None:
    _repo_parser(sub)
    _resvae_parser(sub)
