"""`d3n bench`: one checkpoint measured side by side, in one run, on one machine.

- model-only latency (p50/p99) and FPS for every available backend: ORT CPU FP32, ORT CPU INT8,
  OpenVINO CPU FP32 and INT8 (the same two ONNX files) when openvino is installed, and ORT CUDA /
  TensorRT EP / native TensorRT engine when a GPU is present;
- torch eager on the same checkpoint (model-only);
- end-to-end FPS of the d3n runtime pipeline on a video (FP32 and INT8);
- ultralytics' own predictor on the same ONNX file and video (`stream=True`), the tool users
  would otherwise reach for, and (with openvino installed) ultralytics' own OpenVINO export of the
  checkpoint, its predictor's FPS and its own val mAP;
- mAP50 / mAP50-95 of every backend that d3n runs (ORT and OpenVINO, FP32 and INT8) on one split of
  `--calib`'s dataset (`--split`; by default test where it has one: val chose the checkpoint), through the runtime's
  pre/postprocessing (export/evaluate.py).
Targets (reported, not asserted): e2e FPS >= 0.95 x model-only FPS; INT8 latency <= 0.45 x FP32.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from d3n.artifacts import write_json
from d3n.data.layout import DatasetLayout
from d3n.errors import D3NError, DataError

log = logging.getLogger(__name__)


@dataclass
class BenchOptions:
    model: Path
    source: Path | None = None
    imgsz: tuple[int, int] = (640, 640)
    json: Path | None = None
    frames: int = 200
    iters: int = 100
    calib: Path | None = None
    out: Path | None = None
    warmup: int = 5
    split: str | None = None  # the split of --calib's dataset every mAP is scored on (None: test, else val)


def hardware() -> dict:
    """CPU model and core count as lscpu reports them, plus the GPU when there is one."""
    info = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "?").strip()
        info["cores"] = fields.get("CPU(s)", "?").strip()
        flags = fields.get("Flags", "").split()
        info["int8_vnni"] = any(f in flags for f in ("avx512_vnni", "avx_vnni"))  # INT8 speed-up depends on it
    except (OSError, subprocess.SubprocessError):
        info["cpu"], info["cores"] = platform.processor() or "?", "?"
    from d3n.export.cudart import device_count

    info["cuda_devices"] = device_count()
    return info


def latency(fn, iters: int, warmup: int) -> dict:
    """p50/p99 latency (ms) and FPS of `fn()` over `iters` timed calls."""
    from tqdm import tqdm

    for _ in range(warmup):
        fn()
    times = []
    for _ in tqdm(range(iters), desc="timing", unit="it", leave=False):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    t = np.asarray(times) * 1000
    return {"p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)),
            "fps": float(1000.0 / t.mean()), "iters": iters}


def make_video(frames: list[np.ndarray], path: Path, n: int, fps: float = 25.0) -> Path:
    """An mp4 of `n` frames cycling through `frames` (all resized to the first one's size)."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise D3NError(f"{path}: OpenCV cannot write an mp4 video here")
    for i in range(n):
        writer.write(cv2.resize(frames[i % len(frames)], (w, h)))
    writer.release()
    return path


def backend_latency(model: Path, device: str, opts: BenchOptions) -> dict:
    from d3n.runtime.backends import open_backend

    be = open_backend(model, device=device)
    try:
        return _timed(be, model, opts, {})
    finally:
        be.close()


def _timed(be, model: Path, opts: BenchOptions, options: dict) -> dict:
    blob = np.random.default_rng(0).random(be.input_shape, dtype=np.float32)
    res = latency(lambda: be.infer(blob), opts.iters, opts.warmup)
    # the precision the backend compiled (OpenVINO reports it), when one was asked for
    name = be.name + (f" ({getattr(be, 'precision', '?')})" if "inference_precision" in options else "")
    return {"backend": name, "model": model.name, **res}


def torch_latency(ckpt_path: Path, opts: BenchOptions) -> dict:
    import torch

    from d3n.export.checkpoint import load_checkpoint

    model = load_checkpoint(ckpt_path).torch_model()
    torch.set_num_threads(os.cpu_count() or 1)  # ultralytics caps it at cores - 1; compare like with like
    x = torch.rand(1, 3, *opts.imgsz)

    def run():
        with torch.inference_mode():
            model(x)

    return {"backend": f"torch-eager-cpu ({torch.get_num_threads()} threads)", "model": ckpt_path.name,
            **latency(run, max(10, opts.iters // 2), 2)}


def pipeline_fps(model: Path, video: Path, opts: BenchOptions, device: str = "cpu", precision: str | None = None) -> dict:
    from d3n.runtime.pipeline import run_pipeline

    s = run_pipeline(model, str(video), sinks=(), device=device, warmup=opts.warmup, max_frames=opts.frames,
                     precision=precision)
    return {"model": model.name, "backend": s["backend"], "frames": s["frames"], "fps": s["mean_fps"],
            "latency_ms": s["latency_ms"]}


def _ultralytics_imgsz(opts: BenchOptions):
    """imgsz as ultralytics takes it: one int for a square, [h, w] otherwise."""
    return opts.imgsz[0] if opts.imgsz[0] == opts.imgsz[1] else list(opts.imgsz)


def ultralytics_fps(model: Path, video: Path, opts: BenchOptions) -> dict:
    from d3n.offline import ultralytics

    yolo = ultralytics().YOLO(str(model), task="detect")
    size = _ultralytics_imgsz(opts)
    n, t0 = 0, None
    for _ in yolo.predict(source=str(video), imgsz=size, device="cpu", stream=True, verbose=False):
        n += 1
        if n == opts.warmup:
            t0 = time.perf_counter()  # skip the warm-up frames, as the d3n run does
        if n >= opts.frames:
            break
    if t0 is None or n <= opts.warmup:
        raise D3NError(f"{video}: too few frames for the ultralytics predictor run ({n})")
    return {"model": model.name, "frames": n, "fps": (n - opts.warmup) / (time.perf_counter() - t0)}


def _export_models(opts: BenchOptions, out: Path) -> dict[str, Path]:
    from d3n.data.synth import generate
    from d3n.export.exporter import ExportOptions, export_model

    data = opts.calib or generate(out / "synth", images=64, size=256, progress=False)
    res = export_model(ExportOptions(model=opts.model, format="onnx-int8", imgsz=opts.imgsz, calib=Path(data),
                                     out=out, calib_images=64 if opts.calib is None else 128))
    models = {"fp32": out / "model.onnx", "int8": res.model, "data": Path(data)}
    models["metrics"] = res.extra.get("metrics", {})
    return models


def _accuracy(row: dict, metrics: dict) -> dict:
    return {**row, **{k: metrics[k] for k in ("mAP50", "mAP50-95", "split") if k in metrics}}


def _scored_rows(m: dict, device: str, opts: BenchOptions, models=("fp32", "int8"), **options) -> list[dict]:
    """Latency and mAP of the FP32 and Q/DQ INT8 files on one backend, each loaded once, timed and
    scored on the same split through the same pre/postprocessing."""
    from d3n.export.evaluate import evaluate_onnx
    from d3n.runtime.backends import open_backend

    rows = []
    for k in models:
        be = open_backend(m[k], device=device, **options)
        try:
            rows.append(_accuracy(_timed(be, m[k], opts, options),
                                  evaluate_onnx(m[k], m["data"], opts.imgsz, opts.split, backend=be)))
        finally:
            be.close()
    return rows


def _openvino_rows(m: dict, opts: BenchOptions) -> list[dict]:
    """OpenVINO CPU on the same FP32 and Q/DQ INT8 files, when openvino is installed."""
    from d3n.runtime.openvino_backend import openvino_available

    if not openvino_available():
        log.info("bench: openvino not installed, no OpenVINO rows (pip install 'd3n[openvino]')")
        return []
    # and the FP32 model at bf16, OpenVINO's own default on CPUs with AMX (ultralytics' OpenVINO
    # route runs it so): faster there, other numbers; `d3n run --openvino-precision bf16` takes it
    return [*_scored_rows(m, "openvino", opts), *_scored_rows(m, "openvino", opts, ("fp32",), inference_precision="bf16")]


def ultralytics_openvino(m: dict, video: Path, opts: BenchOptions, out: Path) -> dict[str, dict]:
    """ultralytics' own route on an Intel CPU: its OpenVINO export of the checkpoint (FP32 weights,
    run at OpenVINO's default precision; and INT8 through NNCF when nncf is installed, calibrated
    on the dataset's train images, as d3n's own INT8 is), its predictor's
    FPS on the video, and its own val mAP on the same split (ultralytics' matching and AP, not
    d3n.metrics). Empty without openvino; a route that fails is {"failed": why}."""
    import importlib.util
    import shutil

    from d3n.offline import ultralytics
    from d3n.runtime.openvino_backend import openvino_available

    if not openvino_available():
        return {}
    import openvino as ov

    work = out / "ultralytics-openvino"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = shutil.copy2(opts.model, work / opts.model.name)  # ultralytics writes beside the checkpoint
    size = _ultralytics_imgsz(opts)
    data = str(DatasetLayout.open(m["data"]).yaml_path)
    ul = ultralytics()
    # ultralytics leaves the float precision to OpenVINO's CPU default (bf16 on CPUs with AMX): say which
    default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()  # "bf16", "f32"
    routes = {"ultralytics_openvino": ({}, default)}
    if importlib.util.find_spec("nncf") is not None:
        # calibrated on train, as d3n's own INT8 is: never on the images it is scored on
        routes["ultralytics_openvino_int8"] = ({"int8": True, "data": data, "split": "train"}, "int8")
    else:
        log.info("bench: nncf not installed, no ultralytics OpenVINO INT8 row (pip install nncf)")
    rows = {}
    for name, (extra, precision) in routes.items():
        try:  # another tool's export: a failure is recorded and the rest of the bench kept
            folder = Path(ul.YOLO(str(ckpt), task="detect").export(format="openvino", imgsz=size, device="cpu",
                                                                   **extra))
            row = ultralytics_fps(folder, video, opts)
            val = ul.YOLO(str(folder), task="detect").val(data=data, split=opts.split, imgsz=size, batch=1,
                                                          device="cpu", plots=False, verbose=False,
                                                          project=str(work), name="val", exist_ok=True)
        except Exception as exc:
            log.warning("bench: ultralytics route %s failed: %s", name, exc)
            rows[name] = {"failed": f"{type(exc).__name__}: {exc}"}
            continue
        rows[name] = {**row, "backend": "ultralytics-openvino-cpu", "precision": precision,
                      "mAP50": float(val.box.map50), "mAP50-95": float(val.box.map), "split": opts.split,
                      "mAP_by": "ultralytics val"}
    return rows


def _gpu_rows(fp32: Path, opts: BenchOptions, out: Path) -> list[dict]:
    """ORT CUDA / TensorRT EP and a native FP16 engine, when the machine has them."""
    rows = []
    if hardware()["cuda_devices"] == 0:
        return rows
    for device in ("cuda", "tensorrt"):
        try:
            rows.append(backend_latency(fp32, device, opts))
        except D3NError as exc:
            log.warning("bench: %s backend not available: %s", device, exc)
    try:
        from d3n.export.exporter import ExportOptions, export_model

        eng = export_model(ExportOptions(model=opts.model, format="engine", imgsz=opts.imgsz, half=True,
                                         out=out / "model.engine")).model
        rows.append(backend_latency(eng, "tensorrt", opts))
    except D3NError as exc:
        log.warning("bench: TensorRT engine not available: %s", exc)
    return rows


def scored_split(data: Path, split: str | None) -> str:
    """The split every mAP is scored on: as asked, else test where the dataset has one (val chose the
    checkpoints and so flatters every row), else val."""
    layout = DatasetLayout.open(data)
    if split is None:
        split = "test" if layout.has("test") and layout.images("test") else "val"
        if split == "val":
            log.warning("bench: %s has no test split; mAP is scored on val, which chose the checkpoint", data)
    elif not layout.has(split):
        raise DataError(f"{layout.yaml_path}: no split '{split}' to score on (has {sorted(layout.splits)})")
    return split


def run_bench(opts: BenchOptions) -> dict:
    if not opts.model.is_file() or opts.model.suffix != ".pt":
        raise D3NError(f"{opts.model}: d3n bench takes an ultralytics .pt checkpoint")
    if opts.calib is not None:  # a split that is not there is said before minutes of export
        opts = replace(opts, split=scored_split(opts.calib, opts.split))
    with tempfile.TemporaryDirectory(prefix="d3n-bench-") as tmp:
        out = opts.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        m = _export_models(opts, out)
        opts = replace(opts, split=scored_split(m["data"], opts.split))
        video = opts.source or _default_video(m["data"], out, opts.frames)
        if not Path(video).exists():
            raise D3NError(f"{video}: video not found")
        result = {"hardware": hardware(), "imgsz": list(opts.imgsz), "checkpoint": str(opts.model),
                  "split": opts.split,
                  "video": str(opts.source or "generated from the dataset's val images"),
                  "model_only": [*_scored_rows(m, "cpu", opts), *_openvino_rows(m, opts),
                                 *_gpu_rows(m["fp32"], opts, out), torch_latency(opts.model, opts)],
                  "end_to_end": {"d3n_fp32": pipeline_fps(m["fp32"], video, opts),
                                 "d3n_int8": pipeline_fps(m["int8"], video, opts),
                                 "ultralytics_fp32": ultralytics_fps(m["fp32"], video, opts)},
                  "accuracy": m["metrics"]}
        if ov := ultralytics_openvino(m, video, opts, out):  # and d3n's own runs on OpenVINO
            result["end_to_end"]["d3n_openvino_bf16"] = pipeline_fps(m["fp32"], video, opts, "openvino", "bf16")
            result["end_to_end"]["d3n_openvino_int8"] = pipeline_fps(m["int8"], video, opts, "openvino")
            result["end_to_end"].update({k: v for k, v in ov.items() if "failed" not in v})
            result["failed"] = {k: v["failed"] for k, v in ov.items() if "failed" in v}
        result["ratios"] = ratios(result)
        path = results_path(opts)
        write_json(path, result)
    print(table(result))
    print(f"results written to {path}")
    return result


def results_path(opts: BenchOptions) -> Path:
    """--json, else bench.json in --out, else in the working folder (without --out the models go
    to a temporary folder that is deleted on exit)."""
    return opts.json or (opts.out / "bench.json" if opts.out else Path("bench.json"))


def _default_video(data: Path, out: Path, n: int) -> Path:
    from d3n.export.calib import dataset_images, read_image

    frames = [read_image(p) for p in dataset_images(data, "val", 50)]
    return make_video(frames, out / "bench.mp4", n + 10)


def ratios(r: dict) -> dict:
    mo = {row["model"]: row for row in r["model_only"] if row["backend"] == "onnxruntime-cpu"}
    fp32, int8 = mo.get("model.onnx"), next((v for k, v in mo.items() if k.endswith(".int8.onnx")), None)
    e2e = r["end_to_end"]
    out = {}
    if fp32:
        out["e2e_over_model_only_fp32"] = e2e["d3n_fp32"]["fps"] / fp32["fps"]  # target >= 0.95
        out["ultralytics_e2e_over_model_only_fp32"] = e2e["ultralytics_fp32"]["fps"] / fp32["fps"]
        out["d3n_over_ultralytics_e2e"] = e2e["d3n_fp32"]["fps"] / e2e["ultralytics_fp32"]["fps"]
    if int8:
        out["e2e_over_model_only_int8"] = e2e["d3n_int8"]["fps"] / int8["fps"]
    # d3n's fastest end-to-end run over ultralytics' fastest (target >= 1.2); their mAPs are in the rows
    best = {who: max((v["fps"] for k, v in e2e.items() if k.startswith(who)), default=None)
            for who in ("d3n", "ultralytics")}
    if best["d3n"] and best["ultralytics"]:
        out["d3n_best_over_ultralytics_best_e2e"] = best["d3n"] / best["ultralytics"]
    if fp32 and int8:
        out["int8_over_fp32_latency_p50"] = int8["p50_ms"] / fp32["p50_ms"]  # target <= 0.45
    acc = r.get("accuracy") or {}
    if "mAP50_drop" in acc:
        out["int8_mAP50_drop"] = acc["mAP50_drop"]  # a fraction, as the mAPs; target <= 0.01 (one point)
    return out


def table(r: dict) -> str:
    hw = r["hardware"]
    lines = [f"d3n bench  imgsz {r['imgsz']}  on {hw.get('cpu')} ({hw.get('cores')} CPUs, "
             f"{hw.get('cuda_devices')} CUDA devices)", "",
             f"{'model-only':<44}{'p50 ms':>9}{'p99 ms':>9}{'FPS':>8}{'mAP50':>8}"]

    def m50(row):
        return f"{row['mAP50'] * 100:>8.1f}" if "mAP50" in row else f"{'-':>8}"

    for row in r["model_only"]:
        lines.append(f"{row['backend'] + ' ' + row['model']:<44}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
                     f"{row['fps']:>8.2f}{m50(row)}")
    lines += ["", f"{'end-to-end (video)':<44}{'FPS':>26}{'mAP50':>8}"]
    for name, row in r["end_to_end"].items():
        lines.append(f"{name + ' ' + row['model']:<44}{row['fps']:>26.2f}{m50(row)}")
    lines += [""] + [f"{k:<44}{v:>26.3f}" for k, v in r["ratios"].items()]
    lines += [f"FAILED {k}: {v}" for k, v in (r.get("failed") or {}).items()]
    return "\n".join(lines)
