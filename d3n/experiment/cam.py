"""GradCAM++ heat maps of the baseline and the distilled student side by side (paper Fig. 14).

Fig. 14 shows where each detector looks on the same defect images; the paper reads it as the
student, distilled from the diffusion-feature teacher, concentrating on the defects more than the
baseline does. The
CAM itself is pytorch_grad_cam's `GradCAMPlusPlus` (PyPI `grad-cam`); this module supplies what it
cannot know about an ultralytics detector: which layers to explain, a scalar to explain, and the
letterboxed input the model was trained on. Everything runs on the CPU, without randomness.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from d3n.artifacts import atomic_path
from d3n.boxes import Letterbox, scale_boxes, xywh2xyxy
from d3n.data.layout import DatasetLayout, label_path_for
from d3n.errors import DataError
from d3n.runtime.postprocess import Detections, class_thresholds, decode_raw_indexed

CONF = 0.25  # the runtime's operating threshold: the boxes drawn are those a deployment reports
IOU = 0.7  # ultralytics' NMS IoU, as the runtime decodes
MAX_SHOWN = 5  # detections drawn (and explained) per panel
REPORT_IMAGES = 4  # rows of the report's Fig. 14
PANEL_INCH, DPI = 2.4, 90


def target_layers(model) -> list:
    """The neck outputs that feed the Detect head: P3, P4, P5 (layers 17, 20, 23 of YOLOv5s).

    Grad-CAM explains best on the last feature maps that still have spatial extent, and for a
    detector these are the head's inputs, not one backbone map: the last backbone C3 sees only
    stride 32, where the small defects that P3 detects are a pixel or two. pytorch_grad_cam scales
    each level's map to the input and averages them, so all three scales show in one heat map.
    """
    return [model.model[i] for i in model.model[-1].f]


def _wrapped(model):
    """The detector as pytorch_grad_cam wants it: one tensor out, (B, 4 + nc, N) with the decoded
    xywh boxes (input pixels) and then the class *logits*.

    The eval-mode DetectionModel returns a (decoded, raw) tuple that the library cannot iterate per
    image. Logits, not the sigmoid scores: the sigmoid's gradient vanishes for weak scores and for
    saturated ones, and GradCAM++'s weights (grads squared over grads squared plus 1e-6) then
    collapse to zero; a logit's gradient does not depend on how confident the model is.
    """
    import torch

    from d3n.distill.loss import head_outputs

    class BoxesAndLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            # the input carries the graph: the detector's weights stay frozen, yet the target
            # layers' outputs require grad, so pytorch_grad_cam can hook their gradients
            out = self.model(x.detach().requires_grad_(True))
            _, logits = head_outputs(out, self.model.model[-1].reg_max)
            return torch.cat([out[0][:, :4], logits.transpose(1, 2)], 1)

    return BoxesAndLogits()


class DetectionTarget:
    """The scalar explained: the summed class logits of the detections drawn in the figure (NMS,
    score > CONF, at most `max_det`), or of the single top anchor when nothing passes CONF, so an
    image without a confident box still shows what looks most like a defect to the model.

    pytorch_grad_cam calls it on each image's output; the detections it chose stay in
    `self.detections` (input pixels) for the figure, so the boxes and the heat map match.
    """

    def __init__(self, conf: float = CONF, max_det: int = MAX_SHOWN):
        self.conf, self.max_det = conf, max_det
        self.detections = Detections.empty()

    def __call__(self, output):
        nc = output.shape[0] - 4
        pred = output.detach().clone()
        pred[4:] = pred[4:].sigmoid()
        pred = pred.cpu().numpy()
        self.detections, anchors = decode_raw_indexed(pred, class_thresholds(nc, self.conf), IOU, self.max_det)
        classes = self.detections.class_ids
        if not len(anchors):
            best = pred[4:].max(0)
            anchors = np.asarray([int(best.argmax())])
            classes = np.asarray([int(pred[4:, anchors[0]].argmax())])
        return output[4 + classes, anchors].sum()


@contextlib.contextmanager
def _explaining(model) -> Iterator[None]:
    """Eval mode, weights frozen (no gradient kept on them), both restored afterwards."""
    training, flags = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        yield
    finally:
        model.train(training)
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def explain(model, image) -> tuple[np.ndarray, Detections]:
    """GradCAM++ of `model` on one (1, 3, H, W) float32 RGB [0, 1] input: (H x W heat map in
    [0, 1], the detections it explains, in input pixels)."""
    from pytorch_grad_cam import GradCAMPlusPlus

    target = DetectionTarget()
    with _explaining(model):
        cam = GradCAMPlusPlus(_wrapped(model), target_layers(model))
        try:  # not `with`: its __exit__ swallows IndexError
            heat = cam(input_tensor=image.to(next(model.parameters()).device), targets=[target])[0]
        finally:
            cam.activations_and_grads.release()
    return np.clip(np.nan_to_num(heat.astype(np.float32)), 0, 1), target.detections


def gradcam_map(model, image) -> np.ndarray:
    """The GradCAM++ heat map alone (H x W float32 in [0, 1], H x W of the input)."""
    return explain(model, image)[0]


def _input(frame: np.ndarray, imgsz: int, model):
    """BGR frame -> ((1, 3, s, s) float32 RGB [0, 1] tensor, its letterbox), as the runtime and
    the INT8 calibration prepare it; `imgsz` rounded up to the model's stride, as ultralytics does."""
    import torch

    from d3n.runtime.preprocess import letterbox, to_blob

    stride = int(model.stride.max())
    img, lb = letterbox(frame, math.ceil(imgsz / stride) * stride)
    return torch.from_numpy(to_blob(img)), lb


def _in_frame(heat: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Heat map of the letterboxed input -> the original frame's pixels (padding cut off)."""
    import cv2

    top, bottom, left, right = lb.padding
    h, w = lb.input_shape
    crop = np.ascontiguousarray(heat[top:h - bottom, left:w - right])
    return cv2.resize(crop, (lb.orig_shape[1], lb.orig_shape[0]), interpolation=cv2.INTER_LINEAR)


def ground_truth(image: Path, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(xyxy pixels, class ids) of the YOLO label file beside `image`; empty when there is none."""
    empty = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    try:
        path = label_path_for(image)
    except DataError:
        return empty
    if not path.exists() or not path.read_text().strip():
        return empty
    try:
        arr = np.loadtxt(path, dtype=np.float32, ndmin=2)
    except ValueError as exc:
        raise DataError(f"{path}: malformed label file ({exc})") from None
    h, w = shape
    return xywh2xyxy(arr[:, 1:5] * np.float32([w, h, w, h])), arr[:, 0].astype(np.int64)


def _boxes(ax, xyxy, classes, names: dict, color: str, scores=None) -> None:
    from matplotlib.patches import Rectangle

    for i, (x1, y1, x2, y2) in enumerate(xyxy):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1))
        text = str(names.get(int(classes[i]), int(classes[i])))
        if scores is not None:
            text += f" {scores[i]:.2f}"
        ax.text(x1, y1, text, color="white", fontsize=5, va="bottom", bbox={"facecolor": color, "pad": 0.5, "lw": 0})


def _columns(models: dict[str, Path], frames: list[np.ndarray], imgsz: int) -> tuple[dict, dict]:
    """{model name: [(heat map in frame pixels, detections in frame pixels) per frame]}, class names."""
    from d3n.offline import configure_ultralytics
    from d3n.train.detector.model import load

    configure_ultralytics()
    columns, names = {}, {}
    for name, path in models.items():
        model = load(path).cpu()
        names = names or dict(model.names)
        cells = []
        for frame in frames:
            x, lb = _input(frame, imgsz, model)
            heat, det = explain(model, x)
            det.xyxy = scale_boxes(det.xyxy, lb)
            cells.append((_in_frame(heat, lb), det))
        columns[name] = cells
    return columns, names


def cam_figure(models: dict[str, Path], images: list[Path], imgsz: int, out: Path) -> Path | None:
    """Fig. 14: one PNG grid, a row per image; columns: the image with its ground-truth boxes, then
    per model its GradCAM++ heat map over the image with the detections the map explains.
    Each map is min-max scaled on its own (pytorch_grad_cam's normalisation), so the colours compare
    where the models look, not how strongly. Nothing is written (None) without models or images."""
    if not models or not images:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from d3n.export.calib import read_image

    frames = [read_image(Path(p)) for p in images]
    columns, names = _columns(models, frames, imgsz)
    fig = Figure(figsize=(PANEL_INCH * (1 + len(models)), PANEL_INCH * len(frames)))
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    axes = fig.subplots(len(frames), 1 + len(models), squeeze=False)
    for r, (path, frame) in enumerate(zip(images, frames, strict=True)):
        rgb = frame[..., ::-1]
        axes[r, 0].imshow(rgb)
        _boxes(axes[r, 0], *ground_truth(Path(path), frame.shape[:2]), names, "tab:green")
        axes[r, 0].set_ylabel(Path(path).stem, fontsize=6)
        for c, cells in enumerate(columns.values(), start=1):
            heat, det = cells[r]
            axes[r, c].imshow(show_cam_on_image(np.float32(rgb) / 255, heat, use_rgb=True))
            _boxes(axes[r, c], det.xyxy, det.class_ids, names, "tab:red", det.scores)
    for c, title in enumerate(("image + ground truth", *models)):
        axes[0, c].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(out)


def report_figure(rows: dict[str, dict], student: str, out: Path, n: int = REPORT_IMAGES) -> Path | None:
    """The experiment report's Fig. 14: the baseline against `student` at the first seed where both
    checkpoints exist, on the first `n` test images (val when the dataset has no test split)."""
    pair = ("baseline", student)
    if not all(r in rows for r in pair):
        return None
    both = [s for s in rows["baseline"]["folders"] if s in rows[student]["folders"]]
    seed = next((s for s in both if all((rows[r]["folders"][s] / "best.pt").exists() for r in pair)), None)
    if seed is None:
        return None
    folder = rows[student]["folders"][seed]
    layout = DatasetLayout.open(folder.parent / "data" / "dataset")
    images = layout.images("test" if layout.has("test") else "val")[:n]
    models = {r: rows[r]["folders"][seed] / "best.pt" for r in pair}
    return cam_figure(models, images, int(rows[student]["seeds"][seed]["imgsz"]), out)
