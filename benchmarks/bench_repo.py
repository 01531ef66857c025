"""Stage-1 repository benchmark (issue 3, point 5): bytes, fidelity and serving cost side by side.

    .venv/bin/python benchmarks/bench_repo.py --data DATA --out OUT [--ddpm-steps N] [--vae-steps N]

Runs the stage-1 chain with the tiny preset (each step is skipped when its run folder is already
complete): DDPM training on the train split, raw repositories of the train and val splits,
ResVAE and PCA fitted on the train repository only, and the train repository compressed by each.
Then it reports
- raw and compressed bytes and their ratio;
- reconstruction fidelity per level (cosine, relative MSE) of ResVAE and PCA on the val split's
  features (images the compressors never saw);
- items/s and peak RSS of serving shuffled batches from (a) on-the-fly DDPM extraction, (b) the
  raw repository, (c) the compressed repository + frozen decoder. Each mode runs in its own fresh
  process so its peak RSS is its own.
Results go to OUT/bench_repo.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODES = ("onthefly", "raw", "compressed")


def _rss_mib() -> float:
    """Peak RSS of this process image. VmHWM, not ru_maxrss: Linux carries ru_maxrss across
    fork+exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError("/proc/self/status has no VmHWM (peak RSS needs Linux)")


def serve(mode: str, out: Path, items: int, batch: int, threads: int) -> dict:
    """Serve `items` shuffled train images as (B, T, C, H, W) float32 feature batches per level."""
    import numpy as np
    import torch

    from d3n.train.ddpm.features import DecoderFeatures
    from d3n.train.ddpm.model import DDPM, load_images
    from d3n.train.repository.compress import load_decoder
    from d3n.train.repository.store import FeatureStore

    torch.set_num_threads(threads)
    raw = FeatureStore.open(out / "repo_train", verify=False)
    ids = [raw.image_ids[i] for i in np.random.default_rng(0).permutation(len(raw))[:items]]
    if mode == "onthefly":
        ddpm = DDPM.load(out / "ddpm")
        ext = DecoderFeatures(ddpm.unet, ddpm.scheduler, ddpm.size)
        folder = Path(raw.meta["data_yaml"]).parent / "images" / "train"
        paths = {p.stem: p for p in folder.iterdir()}

        def fetch(chunk):
            return ext(load_images([paths[i] for i in chunk], ddpm.size), chunk, raw.timesteps)
    elif mode == "raw":
        def fetch(chunk):
            got = [raw.get(i) for i in chunk]
            return {lv: torch.from_numpy(np.stack([g[lv] for g in got]).astype(np.float32)) for lv in raw.levels}
    else:
        comp = FeatureStore.open(out / "repo_train_resvae", verify=False)
        dec = load_decoder(comp.meta["compressor"])

        @torch.no_grad()
        def fetch(chunk):
            got = [comp.get(i) for i in chunk]
            feats = {}
            for lv in comp.levels:
                z = torch.from_numpy(np.stack([g[lv] for g in got]).astype(np.float32))
                n, t = z.shape[:2]
                y = dec[lv](z.flatten(0, 1))
                feats[lv] = y.view(n, t, *y.shape[1:])
            return feats
    rss_before = _rss_mib()
    t0 = time.perf_counter()
    for s in range(0, len(ids), batch):
        feats = fetch(ids[s:s + batch])
        assert feats["p3"].shape[0] == len(ids[s:s + batch])
    dt = time.perf_counter() - t0
    return {"mode": mode, "items": len(ids), "seconds": dt, "items_per_s": len(ids) / dt,
            "peak_rss_mib": _rss_mib(), "rss_before_serving_mib": rss_before}


def _serve_in_child(mode: str, args: argparse.Namespace) -> dict:
    items = args.onthefly_items if mode == "onthefly" else args.serve_items
    cmd = [sys.executable, __file__, "--serve", mode, "--out", str(args.out), "--serve-items", str(items),
           "--batch", str(args.batch), "--threads", str(args.threads), "--data", str(args.data)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"serving mode {mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def prepare(args: argparse.Namespace) -> dict:
    import torch

    from d3n.train.ddpm.train import DDPMTrainConfig, train_ddpm
    from d3n.train.repository.build import RepoBuildConfig, build_repo
    from d3n.train.repository.compress import compress_run, load_codecs, reconstruction_metrics
    from d3n.train.repository.fit import CompressorTrainConfig, train_compressor
    from d3n.train.repository.store import FeatureStore

    torch.set_num_threads(args.threads)
    out, timings = args.out, {}

    def step(name, fn):
        t0 = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[bench] {name}: {timings[name]} s", flush=True)
        return result

    ddpm_cfg = DDPMTrainConfig(data=str(args.data), size=args.size, steps=args.ddpm_steps, batch=args.ddpm_batch,
                               lr=args.ddpm_lr, ckpt_every=25)
    ddpm = step("ddpm_train", lambda: train_ddpm(ddpm_cfg, out / "ddpm"))
    for split in ("train", "val"):
        cfg = RepoBuildConfig(ddpm=str(out / "ddpm"), data=str(args.data), split=split, batch=args.batch)
        step(f"repo_build_{split}", lambda cfg=cfg, split=split: build_repo(cfg, out / f"repo_{split}"))
    fits = {}
    for method in ("resvae", "pca"):
        cfg = CompressorTrainConfig(repo=str(out / "repo_train"), method=method, steps=args.vae_steps,
                                    batch=args.vae_batch, holdout=0.05)
        fits[method] = step(f"fit_{method}", lambda cfg=cfg, m=method: train_compressor(cfg, out / m))
        step(f"compress_{method}", lambda m=method: compress_run(out / "repo_train", out / m,
                                                                 out / f"repo_train_{m}"))
    val = FeatureStore.open(out / "repo_val")
    fidelity = {m: step(f"fidelity_{m}", lambda m=m: reconstruction_metrics(val, load_codecs(out / m)))
                for m in ("resvae", "pca")}
    raw = FeatureStore.open(out / "repo_train", verify=False)
    comp = FeatureStore.open(out / "repo_train_resvae", verify=False)
    sizes = {"raw_bytes": raw.nbytes(), "compressed_bytes": comp.nbytes(), "ratio": comp.nbytes() / raw.nbytes(),
             "raw_disk_bytes": raw.disk_bytes(), "compressed_disk_bytes": comp.disk_bytes(),
             "disk_ratio": comp.disk_bytes() / raw.disk_bytes(),
             "shapes_raw": {lv: raw.shape(lv) for lv in raw.levels},
             "shapes_compressed": {lv: comp.shape(lv) for lv in comp.levels}}
    return {"ddpm": {k: v for k, v in ddpm.items() if k != "loss_curve"}, "sizes": sizes, "fidelity_val": fidelity,
            "fit_metrics": {m: {lv: {k: v for k, v in d.items() if k != "mse_curve"}
                                for lv, d in f["levels"].items()} for m, f in fits.items()},
            "timings_s": timings}


def verdict(res: dict) -> dict:
    fid, serving = res["fidelity_val"], {s["mode"]: s for s in res["serving"]}
    levels = list(fid["resvae"])
    return {
        "ratio_le_1_8": res["sizes"]["ratio"] <= 0.125,
        "resvae_cosine_ge_0.95": {lv: fid["resvae"][lv]["cosine"] >= 0.95 for lv in levels},
        "resvae_beats_pca": {lv: fid["resvae"][lv]["cosine"] > fid["pca"][lv]["cosine"] for lv in levels},
        "compressed_speedup_vs_onthefly": serving["compressed"]["items_per_s"] / serving["onthefly"]["items_per_s"],
        "compressed_rss_below_raw": serving["compressed"]["peak_rss_mib"] < serving["raw"]["peak_rss_mib"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="YOLO-layout dataset folder (data.yaml)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--ddpm-steps", type=int, default=60)
    ap.add_argument("--ddpm-batch", type=int, default=8)
    ap.add_argument("--ddpm-lr", type=float, default=5e-4)
    ap.add_argument("--vae-steps", type=int, default=150)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16, help="serving / extraction batch")
    ap.add_argument("--serve-items", type=int, default=1200)
    ap.add_argument("--onthefly-items", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads in every step and mode")
    ap.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)  # internal: one serving mode
    args = ap.parse_args(argv)
    if args.serve:
        print(json.dumps(serve(args.serve, args.out, args.serve_items, args.batch, args.threads)))
        return 0
    res = prepare(args)
    res["serving"] = [_serve_in_child(m, args) for m in MODES]
    res["verdict"] = verdict(res)
    res["command"] = " ".join([".venv/bin/python", "benchmarks/bench_repo.py", *(argv or sys.argv[1:])])
    (args.out / "bench_repo.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(json.dumps({k: res[k] for k in ("sizes", "fidelity_val", "serving", "verdict")}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
