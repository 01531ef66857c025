"""`d3n export`: checkpoint -> ONNX / ONNX INT8 / TensorRT engine, each with its sidecar.

Every format starts from the FP32 ONNX export of the checkpoint, checked against torch (parity)
unless told not to; the INT8 and engine steps build on that file.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from d3n import sidecar as sidecar_mod
from d3n.artifacts import write_json
from d3n.errors import ArtifactError, D3NError
from d3n.export.nms_graph import NMSSettings

log = logging.getLogger(__name__)
FORMATS = ("onnx", "onnx-int8", "engine")
SUFFIX = {"onnx": ".onnx", "onnx-int8": ".int8.onnx", "engine": ".engine"}


@dataclass
class ExportOptions:
    model: Path
    format: str = "onnx"
    imgsz: tuple[int, int] = (640, 640)
    half: bool = False
    int8: bool = False
    dynamic: bool = False
    calib: Path | None = None
    nms: bool = False
    out: Path | None = None
    workspace: float = 4.0
    parity: bool = True
    parity_images: int = 8
    calib_images: int = 128
    max_batch: int = 8
    evaluate: bool = True
    nms_settings: NMSSettings = field(default_factory=NMSSettings)


@dataclass
class ExportResult:
    model: Path
    sidecar: Path
    extra: dict


def output_path(opts: ExportOptions) -> Path:
    """--out as a file (its suffix names it) or a folder; default: <checkpoint stem>_export/ beside it."""
    stem = "model"
    if opts.out is not None and opts.out.suffix in (".onnx", ".engine"):
        return opts.out
    folder = opts.out if opts.out is not None else opts.model.parent / f"{opts.model.stem}_export"
    if opts.model.suffix == ".onnx":
        stem = opts.model.stem
    return folder / f"{stem}{SUFFIX[opts.format]}"


def _validate(opts: ExportOptions) -> None:
    if opts.format not in FORMATS:
        raise D3NError(f"--format must be one of {FORMATS}, not '{opts.format}'")
    if opts.format == "engine":
        from d3n.export.engine import require_tensorrt

        require_tensorrt()  # before any work: no GPU / no TensorRT -> clear message
    if not opts.model.exists():
        raise ArtifactError(f"{opts.model}: model not found")
    if opts.model.suffix == ".onnx" and opts.format != "engine":
        raise D3NError(f"{opts.model}: {opts.format} export starts from a .pt checkpoint")
    if opts.format == "onnx-int8" and opts.calib is None:
        raise D3NError("onnx-int8 needs --calib DATA: real images to calibrate the INT8 scales on")
    if opts.format == "engine" and opts.int8 and opts.calib is None:
        raise D3NError("an INT8 engine needs --calib DATA: real images to calibrate on")
    if opts.nms and opts.dynamic:
        raise D3NError("--nms builds a batch-1 graph; drop --dynamic or --nms")
    if opts.calib is not None:
        from d3n.data.layout import DatasetLayout

        DatasetLayout.open(opts.calib)  # fails early, naming the file, if DATA is not a dataset


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _inputs(opts: ExportOptions, n: int, split: str = "train") -> list:
    from d3n.export.calib import batches, load_frames

    return list(batches(load_frames(opts.calib, n, split), opts.imgsz))


def _onnx_fp32(opts: ExportOptions, ckpt, dst: Path, extra: dict) -> Path:
    """Raw-head FP32 (or FP16 with --half) ONNX at dst, parity-checked against torch."""
    from d3n.export.onnx_export import export_onnx
    from d3n.export.parity import check_parity

    export_onnx(ckpt, dst, opts.imgsz, dynamic=opts.dynamic, half=opts.half and opts.format == "onnx")
    if opts.parity:
        precision = "fp16" if opts.half and opts.format == "onnx" else "fp32"
        rep = check_parity(ckpt.torch_model(), dst, _inputs(opts, opts.parity_images), precision,
                           opts.nms_settings)
        print(rep.summary())
        extra["parity"] = rep.to_dict()
    return dst


def _add_onnx_nms(opts: ExportOptions, ckpt, raw: Path, dst: Path, extra: dict, check: bool) -> None:
    from d3n.export.nms_graph import append_onnx_nms
    from d3n.export.parity import check_parity

    append_onnx_nms(raw, dst, opts.nms_settings)
    extra["nms"] = {"kind": "onnx NonMaxSuppression", **asdict(opts.nms_settings)}
    if check and opts.parity:
        raw_parity = extra.get("parity", {})
        band = 4 * raw_parity.get("max_abs_diff_score", 0.0) + 1e-7
        rep = check_parity(ckpt.torch_model(), dst, _inputs(opts, opts.parity_images), "fp32",
                           opts.nms_settings, test_is_nms=True, band=band)
        print("in-graph NMS " + rep.summary())
        extra["nms_parity"] = rep.to_dict()


def _save_sidecar(opts, ckpt, model_path: Path, precision: str, extra: dict) -> Path:
    from d3n.export.onnx_export import build_sidecar

    max_det = opts.nms_settings.max_det if opts.nms else None
    sc = build_sidecar(ckpt, model_path, opts.format, opts.imgsz, precision, opts.dynamic, max_det, extra)
    return sidecar_mod.save(sc, model_path)


def export_model(opts: ExportOptions) -> ExportResult:
    _validate(opts)
    out = output_path(opts)
    out.parent.mkdir(parents=True, exist_ok=True)
    if opts.format == "engine":
        return _export_engine(opts, out)
    from d3n.export.checkpoint import load_checkpoint

    ckpt = load_checkpoint(opts.model)
    extra: dict = {"versions": _versions(), "opset": 17}
    with tempfile.TemporaryDirectory(prefix="d3n-export-") as tmp:
        if opts.format == "onnx":
            raw = _onnx_fp32(opts, ckpt, Path(tmp) / "raw.onnx" if opts.nms else out, extra)
            if opts.nms:
                _add_onnx_nms(opts, ckpt, raw, out, extra, check=True)
            precision = "fp16" if opts.half else "fp32"
        else:
            _export_int8(opts, ckpt, out, Path(tmp), extra)
            precision = "int8"
    path = _save_sidecar(opts, ckpt, out, precision, extra)
    return ExportResult(out, path, extra)


def _export_int8(opts: ExportOptions, ckpt, out: Path, tmp: Path, extra: dict) -> None:
    """FP32 ONNX beside the INT8 one (with its own sidecar), quantize, score both on DATA's val."""
    from d3n.export.int8 import quantize

    base = out.name[: -len(".int8.onnx")] if out.name.endswith(".int8.onnx") else f"{out.stem}.fp32"
    fp32 = out.with_name(f"{base}.onnx")
    fp32_extra = {"versions": extra["versions"], "opset": 17}
    _onnx_fp32(opts, ckpt, fp32, fp32_extra)
    fp32_opts = ExportOptions(**{**asdict(opts), "format": "onnx", "nms": False,
                                 "nms_settings": opts.nms_settings})
    _save_sidecar(fp32_opts, ckpt, fp32, "fp32", fp32_extra)
    qraw = tmp / "int8_raw.onnx" if opts.nms else out
    extra["quantization"] = quantize(fp32, qraw, _inputs(opts, opts.calib_images, "train"))
    extra["calibration_data"] = str(opts.calib)
    if opts.evaluate:
        from d3n.export.evaluate import evaluate_onnx

        metrics = {"fp32": {"model": fp32.name, **evaluate_onnx(fp32, opts.calib, opts.imgsz)},
                   "int8": {"model": out.name, **evaluate_onnx(qraw, opts.calib, opts.imgsz)}}
        # a fraction like the mAPs themselves (0.01 = one point)
        metrics["mAP50_drop"] = round(metrics["fp32"]["mAP50"] - metrics["int8"]["mAP50"], 5)
        write_json(out.with_name(out.name.replace(".onnx", ".metrics.json")), metrics)
        extra["metrics"] = metrics
        print(f"mAP50 on {opts.calib} val: FP32 {metrics['fp32']['mAP50']:.3f}, "
              f"INT8 {metrics['int8']['mAP50']:.3f} (drop {metrics['mAP50_drop']:.3f})")
    if opts.nms:
        _add_onnx_nms(opts, ckpt, qraw, out, extra, check=False)  # INT8 is not bit-comparable


def _engine_source(opts: ExportOptions, out: Path, extra: dict):
    """(onnx path, checkpoint-like info) for the engine: export from .pt, or take a d3n ONNX."""
    from d3n.export.checkpoint import load_checkpoint

    if opts.model.suffix == ".onnx":
        sc = sidecar_mod.load(opts.model)
        if sc.output.kind != "raw" or sc.format != "onnx":
            raise D3NError(f"{opts.model}: build engines from the raw FP32 ONNX export (no --nms, not INT8)")
        info = _SidecarInfo(Path(sc.source_checkpoint), sc.names, sc.strides, sc.source_sha256)
        opts.imgsz = tuple(sc.imgsz)
        return opts.model, info
    ckpt = load_checkpoint(opts.model)
    src = out.with_suffix(".onnx")
    _onnx_fp32(opts, ckpt, src, extra)
    _save_sidecar(ExportOptions(**{**asdict(opts), "format": "onnx", "nms": False,
                                   "nms_settings": opts.nms_settings}), ckpt, src, "fp32", dict(extra))
    return src, ckpt


@dataclass
class _SidecarInfo:
    path: Path
    names: list
    strides: list
    sha256: str

    @property
    def nc(self) -> int:
        return len(self.names)


def _export_engine(opts: ExportOptions, out: Path) -> ExportResult:
    from d3n.export.engine import build_engine, explicit_quantization, require_tensorrt
    from d3n.export.int8 import quantize
    from d3n.export.nms_graph import append_trt_nms

    trt = require_tensorrt()
    extra: dict = {"versions": _versions()}
    src, info = _engine_source(opts, out, extra)
    precision = "int8" if opts.int8 else "fp16" if opts.half else "fp32"
    calib_inputs = None
    with tempfile.TemporaryDirectory(prefix="d3n-engine-") as tmp:
        if precision == "int8":
            calib_inputs = _inputs(opts, opts.calib_images, "train")
            if explicit_quantization(trt):
                qdq = out.with_suffix(".qdq.onnx")
                extra["quantization"] = quantize(src, qdq, calib_inputs, for_tensorrt=True)
                src = qdq
        if opts.nms:
            src = append_trt_nms(src, Path(tmp) / "nms.onnx", opts.nms_settings)
            extra["nms"] = {"kind": "EfficientNMS_TRT", **asdict(opts.nms_settings)}
        extra["build"] = build_engine(src, out, precision, opts.workspace, opts.dynamic, opts.max_batch,
                                      tuple(opts.imgsz), calib_inputs)
    path = _save_sidecar(opts, info, out, precision, extra)
    return ExportResult(out, path, extra)
