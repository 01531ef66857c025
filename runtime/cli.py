"""`d3n run`: the edge runtime on cameras, streams, videos or image folders (one or several).

Imports only argparse/stdlib at module level; the handler imports the runtime (numpy, OpenCV,
onnxruntime), never torch.
"""

from __future__ import annotations

import argparse

EPILOG = """\
sources: 0 (camera index), /dev/video0 (V4L2), a GStreamer pipeline (contains '!', e.g.
  "nvarguscamerasrc ! video/x-raw(memory:NVMM),width=1920,height=1080 ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1"),
  rtsp://... or http://... streams, a video file, an image folder or a glob ('imgs/*.jpg').
Several sources: repeat --source, or list them in --sources FILE (one per line, NAME=URI or
  URI; '#' starts a comment line; relative paths are relative to FILE). Unnamed ones are called
  src0, src1, ... (a lone --source keeps its own text). Every JSONL line, per-source metric and
  /health entry carries the name. With a dynamic-batch model (d3n export --dynamic) frames
  from all sources share each inference, up to --max-batch (default: the number of sources).
sinks: jsonl:PATH, video:PATH.mp4, crops:DIR, mqtt://HOST:PORT/TOPIC (needs d3n[mqtt]).
Live sources are reopened with backoff forever unless --max-reconnects is given.
--watch polls --model (a model file or a release folder) and swaps in a new model between two
frames once it has been copied completely, matches its sidecar, has the same class names and
passes a warm-up inference; a bad one is refused and logged, and the running model carries on.
--view-port P serves a live view on 127.0.0.1:P (--view-host to change): a page with each
source's annotated stream (MJPEG, --view-fps frames/s), its FPS, latency and per-class counts,
and the model's file and sha256. Viewers never slow the pipeline: they skip frames instead.
Exit status: 0 on a normal end (file sources finished, --max-frames/--duration reached, Ctrl-C
or SIGTERM); 1 when the model/sidecar/source/sink is bad, a source could not be (re)opened within
--max-reconnects, or a sink failed during the run.
"""


def parse_class_conf(text: str | None) -> dict[str, float]:
    """'crack=0.6,pit=0.4' -> {'crack': 0.6, 'pit': 0.4}."""
    from d3n.errors import ConfigError

    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, value = part.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--class-conf: '{part}' is not NAME=THRESHOLD") from None
    return out


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run an exported model on a camera/stream/video/images",
                              description=__doc__.splitlines()[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="model.onnx or model.engine (sidecar model.json beside it), or a release "
                        "folder holding one model and its sidecar")
    p.add_argument("--source", action="append", default=[], metavar="[NAME=]SOURCE",
                   help="camera index, /dev/videoN, GStreamer string, URL, video, folder or glob "
                        "(repeatable)")
    p.add_argument("--sources", default=None, metavar="FILE",
                   help="file listing sources, one per line: NAME=URI or URI (# comments)")
    p.add_argument("--sink", action="append", default=[], metavar="SPEC",
                   help="jsonl:PATH | video:PATH | crops:DIR | mqtt://HOST:PORT/TOPIC (repeatable)")
    p.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25, as ultralytics)")
    p.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold (default 0.7, as ultralytics)")
    p.add_argument("--max-det", type=int, default=300, help="detections kept per frame (default 300)")
    p.add_argument("--class-conf", default=None, metavar="NAME=T,...", help="per-class score thresholds")
    p.add_argument("--roi", default=None, metavar="MASK", help="mask image; detections centred outside it are dropped")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "tensorrt", "openvino"),
                   help="auto (default): onnxruntime's TensorRT/CUDA EP if installed, else OpenVINO "
                        "if installed, else onnxruntime CPU; cpu|cuda|tensorrt: that onnxruntime "
                        "provider; openvino: OpenVINO on the CPU (d3n[openvino]). An unavailable "
                        "device is an error, never a silent fallback")
    p.add_argument("--max-fps", type=float, default=None,
                   help="process at most this many frames per second of each source")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, metavar="MS",
                   help="once a batch holds a frame, wait at most MS for the other sources "
                        "(default 5)")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="frames per inference (default: the number of sources; never more than "
                        "the model's max batch)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="inference threads, ONNX Runtime's intra-op pool or OpenVINO's "
                        "(default: every core this process may use)")
    p.add_argument("--openvino-precision", choices=("f32", "bf16", "f16"), default=None,
                   help="OpenVINO's inference precision (default f32: the model's own numbers). bf16 runs "
                        "about 2x faster on CPUs with AMX and moves scores slightly: compare with d3n bench "
                        "before using it. An error on another backend")
    p.add_argument("--max-frames", type=int, default=None, help="stop after N frames")
    p.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    p.add_argument("--max-reconnects", type=int, default=None,
                   help="retry a failed (re)open up to N times in a row, then give up: N + 1 attempts in all "
                        "(default: retry forever)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve /health and /metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address for the metrics server (default 127.0.0.1)")
    p.add_argument("--view-port", type=int, default=None, metavar="P",
                   help="serve a live view page (annotated streams, FPS, latency, per-class "
                        "counts, model) on this port")
    p.add_argument("--view-host", default=None,
                   help="address for the live view (default 127.0.0.1; 0.0.0.0 exposes camera images)")
    p.add_argument("--view-fps", type=float, default=None, metavar="F",
                   help="annotated frames per second sent to each viewer (default 5, at most 30)")
    p.add_argument("--video-fps", type=float, default=25.0, help="frame rate of a video sink (default 25)")
    p.add_argument("--status-every", type=float, default=10.0, metavar="S",
                   help="log a progress/status line every S seconds (0: never; default 10)")
    p.add_argument("--summary", default=None, metavar="JSON", help="write the final run stats to this file")
    p.add_argument("--watch", action="store_true",
                   help="hot-swap the model when a new one (with its sidecar) appears at --model")
    p.add_argument("--watch-interval", type=float, default=None, metavar="S",
                   help="seconds between polls of --model with --watch (default 2)")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args) -> int:
    import json
    import logging
    import signal
    import sys
    import threading

    from d3n.errors import ConfigError
    from d3n.runtime.pipeline import run_pipeline
    from d3n.runtime.sources import source_entries
    from d3n.runtime.view import VIEW_FPS

    if args.watch_interval is not None and not args.watch:
        raise ConfigError("--watch-interval needs --watch")
    for flag, value in (("--view-host", args.view_host), ("--view-fps", args.view_fps)):
        if value is not None and args.view_port is None:
            raise ConfigError(f"{flag} needs --view-port")
    sources = source_entries(args.source, args.sources)  # names checked before the model loads
    log = logging.getLogger("d3n.run")
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s: stopping and flushing sinks", signal.Signals(signum).name)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        stats = run_pipeline(
            args.model, sources, sinks=args.sink, conf=args.conf, iou=args.iou,
            max_det=args.max_det, class_conf=parse_class_conf(args.class_conf), roi=args.roi,
            device=args.device, max_fps=args.max_fps, max_frames=args.max_frames,
            duration=args.duration, max_reconnects=args.max_reconnects,
            metrics_port=args.metrics_port, metrics_host=args.metrics_host, stop_event=stop,
            video_fps=args.video_fps, status_every=args.status_every, watch=args.watch,
            watch_interval=2.0 if args.watch_interval is None else args.watch_interval,
            batch_wait=args.batch_wait_ms / 1000.0, max_batch=args.max_batch, threads=args.threads,
            precision=args.openvino_precision, view_port=args.view_port, view_host=args.view_host or "127.0.0.1",
            view_fps=VIEW_FPS if args.view_fps is None else args.view_fps)
    finally:
        for sig, handler in previous.items():  # in-process callers get their handlers back
            signal.signal(sig, handler)
    if args.summary:
        from d3n.artifacts import write_json

        write_json(args.summary, stats)
    brief = {k: stats[k] for k in ("frames", "mean_fps", "corrupt_frames", "reconnects",
                                   "source_drops", "stopped_by")}
    print(json.dumps({**brief, "mean_batch": stats["batches"]["mean_size"]}))
    rc = 0
    if stats["source_error"]:
        print(f"d3n: error: {stats['source_error']}", file=sys.stderr)
        rc = 1
    for label, reason in stats["failed_sinks"].items():
        print(f"d3n: error: sink {label} failed and was disabled: {reason}", file=sys.stderr)
        rc = 1
    return rc
