"""`d3n export`, `d3n bench` and `d3n promote`.

Only argparse here; the handlers import the heavy stack lazily.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _imgsz(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",") if p]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0 or any(p % 32 for p in parts):
        raise argparse.ArgumentTypeError(f"--imgsz '{text}': one or two positive multiples of 32 (h,w)")
    return parts[0], parts[1]


def register(sub) -> None:
    p = sub.add_parser("export", help="export a detector checkpoint to ONNX / ONNX INT8 / TensorRT",
                       description="Export an ultralytics detection checkpoint (.pt) with a sidecar JSON. "
                                   "--format engine also accepts a d3n ONNX export (build on the target device).")
    p.add_argument("model", type=Path, help="checkpoint .pt (or, for --format engine, a d3n model.onnx)")
    p.add_argument("--format", default="onnx", choices=["onnx", "onnx-int8", "engine"])
    p.add_argument("--imgsz", type=_imgsz, default=(640, 640), help="input size: 640 or h,w (default 640)")
    p.add_argument("--half", action="store_true", help="FP16 (engine; ONNX needs a CUDA device)")
    p.add_argument("--int8", action="store_true", help="INT8 engine (needs --calib)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch (ONNX axes, engine profile)")
    p.add_argument("--batch", type=int, default=8, help="max batch of the dynamic engine profile")
    p.add_argument("--calib", type=Path, help="dataset folder (data.yaml) with real images for calibration, "
                                              "parity and evaluation")
    p.add_argument("--calib-images", type=int, default=128, help="calibration images (default 128)")
    p.add_argument("--nms", action="store_true", help="NMS inside the graph: output (1, max_det, 6)")
    p.add_argument("--conf", type=float, default=0.25, help="NMS score threshold (in-graph NMS and parity)")
    p.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=300, help="max detections per image")
    p.add_argument("--out", type=Path, help="output file (.onnx/.engine) or folder")
    p.add_argument("--workspace", type=float, default=4.0, help="TensorRT workspace limit in GB")
    p.add_argument("--no-parity", action="store_true", help="skip the torch vs ONNX parity check")
    p.add_argument("--no-eval", action="store_true", help="onnx-int8: skip the FP32/INT8 mAP50 scoring")
    p.set_defaults(func=_cmd_export)

    b = sub.add_parser("bench", help="benchmark backends, the d3n runtime and ultralytics side by side")
    b.add_argument("--model", type=Path, required=True, help="checkpoint .pt")
    b.add_argument("--source", type=Path, help="video for the end-to-end runs (default: a generated one)")
    b.add_argument("--imgsz", type=_imgsz, default=(640, 640))
    b.add_argument("--json", type=Path, help="write the results here (default <out>/bench.json with --out, else ./bench.json)")
    b.add_argument("--frames", type=int, default=200, help="frames per end-to-end run")
    b.add_argument("--iters", type=int, default=100, help="timed model-only iterations per backend")
    b.add_argument("--calib", type=Path, help="dataset for INT8 calibration and mAP50 (default: a generated "
                                              "synthetic dataset, whose mAP says nothing about the model)")
    b.add_argument("--split", default=None, help="split of --calib's dataset every mAP is scored on (default: "
                                                 "test where it has one, else val)")
    b.add_argument("--out", type=Path, help="folder for the exported models (default: a temp folder)")
    b.set_defaults(func=_cmd_bench)

    pr = sub.add_parser("promote", help="gate a retrained model against the deployed one on a test split",
                        description="Score CANDIDATE and DEPLOYED (exported .onnx with sidecars, or .pt "
                                    "checkpoints, exported first with parity on) on the same split of DATA "
                                    "through the runtime's pre/postprocessing; write a release folder only "
                                    "if no gated metric and no class's AP50 drops by more than its "
                                    "tolerance.",
                        epilog="exit status: 0 promoted (release folder written); 3 refused (no release; "
                               "the report goes beside where it would be, <release>.refused.md/.json); "
                               "1 error (missing file, mismatched sidecars, no test split); 2 bad usage.")
    pr.add_argument("candidate", type=Path,
                    help="the new model: exported .onnx (sidecar beside it) or checkpoint .pt")
    pr.add_argument("--against", type=Path, required=True, metavar="DEPLOYED",
                    help="the model on the line: .onnx, .pt, or a release folder of a previous promote")
    pr.add_argument("--data", type=Path, required=True, help="dataset folder (data.yaml)")
    pr.add_argument("--split", choices=["test", "val"], default=None,
                    help="split to score on (default test, which must exist; val only when asked: it "
                         "chose the checkpoints)")
    pr.add_argument("--release", type=Path, metavar="DIR",
                    help="release folder written if promoted (default releases/<candidate sha256[:12]>)")
    pr.add_argument("--tolerance", default=None, metavar="METRIC=T,...",
                    help="allowed drop per metric, fractions (default mAP50=0.005,mAP50-95=0.005,"
                         "recall@0.25=0.01); also precision, recall, miss_rate, overkill_rate; "
                         "T=off drops a gate")
    pr.add_argument("--class-tolerance", type=float, default=None, metavar="T",
                    help="allowed AP50 drop of any one class (default 0.05)")
    pr.add_argument("--imgsz", type=_imgsz, default=None, metavar="N",
                    help="input size for exporting .pt models (default: their training size, else the other "
                         "model's, else 640); exported models are scored at their sidecar's size")
    pr.set_defaults(func=_cmd_promote)


def _cmd_export(args) -> int:
    from d3n.export.exporter import ExportOptions, export_model
    from d3n.export.nms_graph import NMSSettings

    opts = ExportOptions(
        model=args.model, format=args.format, imgsz=args.imgsz, half=args.half, int8=args.int8,
        dynamic=args.dynamic, calib=args.calib, nms=args.nms, out=args.out, workspace=args.workspace,
        parity=not args.no_parity, calib_images=args.calib_images, max_batch=args.batch,
        evaluate=not args.no_eval, nms_settings=NMSSettings(args.conf, args.iou, args.max_det))
    res = export_model(opts)
    print(f"exported {res.model} (sidecar {res.sidecar})")
    return 0


def _cmd_bench(args) -> int:
    from d3n.export.bench import BenchOptions, run_bench

    run_bench(BenchOptions(model=args.model, source=args.source, imgsz=args.imgsz, json=args.json,
                           frames=args.frames, iters=args.iters, calib=args.calib, out=args.out,
                           split=args.split))
    return 0


def _cmd_promote(args) -> int:
    from d3n.export.promote import REFUSED, PromoteOptions, parse_tolerance, promote

    opts = PromoteOptions(candidate=args.candidate, deployed=args.against, data=args.data, split=args.split,
                          release=args.release, tolerance=parse_tolerance(args.tolerance), imgsz=args.imgsz)
    if args.class_tolerance is not None:
        opts.class_tolerance = args.class_tolerance
    res = promote(opts)
    print(res.markdown)
    if res.promoted:
        print(f"promoted: release {res.release}")
        return 0
    print(f"refused ({', '.join(res.report['failed'])}); report {res.report_files[0]}, no release written")
    return REFUSED
