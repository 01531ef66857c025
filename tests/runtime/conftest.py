"""Shared fixtures for the runtime tests: a tiny exported detector with its sidecar, a generated
video and image folders. Tests (not the runtime) may use torch and ultralytics."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

NAMES = ["crack", "scratch", "pit"]
IMGSZ = 128


def _export_tiny_model(out: Path) -> Path:
    """A YOLOv5s (v5u head) with 3 classes, exported to ONNX at 128 px, plus its sidecar.

    Untrained heads score every anchor near 0; the class-branch biases are spread so that the
    model emits a realistic mix of confident and weak, overlapping boxes for NMS to sort out.
    """
    import torch

    from d3n.artifacts import sha256_file
    from d3n.offline import ultralytics
    from d3n.sidecar import OutputLayout, Sidecar, save

    ul = ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov5s.yaml", nc=len(NAMES), verbose=False)
    model.names = dict(enumerate(NAMES))
    with torch.no_grad():
        for branch in model.model[-1].cv3:  # class scores
            branch[-1].bias.normal_(-1.0, 1.5)
            branch[-1].weight.mul_(8)
        for branch in model.model[-1].cv2:  # box distributions: favour short sides (DFL bins)
            branch[-1].bias.copy_((-0.6 * torch.arange(16.0)).repeat(4))
            branch[-1].weight.mul_(4)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "tiny.pt"
    torch.save({"model": model, "train_args": {"task": "detect", "imgsz": IMGSZ}}, ckpt)
    onnx_path = Path(ul.YOLO(str(ckpt)).export(format="onnx", imgsz=IMGSZ, opset=17, simplify=True,
                                                dynamic=False, verbose=False))
    n_anchors = sum((IMGSZ // s) ** 2 for s in (8, 16, 32))
    save(Sidecar(format="onnx", model_file=onnx_path.name, model_sha256=sha256_file(onnx_path),
                 names=NAMES, imgsz=[IMGSZ, IMGSZ], strides=[8, 16, 32],
                 output=OutputLayout(kind="raw", shape=[1, 4 + len(NAMES), n_anchors]),
                 source_checkpoint=ckpt.name, source_sha256=sha256_file(ckpt)), onnx_path)
    return onnx_path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """Path of the exported model (`tiny.onnx` + `tiny.json` + `tiny.pt`); do not modify it."""
    return _export_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def model_copy(tiny_onnx, tmp_path) -> Path:
    """A private copy of the model and its sidecar that a test may damage."""
    for suffix in (".onnx", ".json"):
        shutil.copy(tiny_onnx.with_suffix(suffix), tmp_path / f"tiny{suffix}")
    return tmp_path / "tiny.onnx"


def make_frame(i: int, w: int = 200, h: int = 150) -> np.ndarray:
    """A textured frame with a moving bright blob and a dark scratch, so the model sees structure."""
    rng = np.random.default_rng(i)
    img = (rng.integers(80, 120, (h, w, 3))).astype(np.uint8)
    cv2.circle(img, (20 + 2 * i % (w - 40), h // 2), 18, (230, 230, 230), -1)
    cv2.line(img, (10, 10 + i % 50), (w - 10, h - 20), (20, 20, 20), 3)
    return img


def write_video(path: Path, n: int = 60, fourcc: str = "MJPG", fps: float = 20.0) -> Path:
    w, h = 200, 150
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened(), f"cannot write {path}"
    for i in range(n):
        writer.write(make_frame(i, w, h))
    writer.release()
    return path


@pytest.fixture(scope="session")
def video_avi(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clip.avi")


@pytest.fixture
def image_dir(tmp_path) -> Path:
    d = tmp_path / "frames"
    d.mkdir()
    for i in range(8):
        cv2.imwrite(str(d / f"img_{i:03d}.jpg"), make_frame(i))
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Code run in a child interpreter before anything else: any import of torch/ultralytics (or the
# training side, when listed) raises, so a test proves the runtime never touches them.
BLOCK_IMPORTS = """
import sys
class _Block:
    def __init__(self, names): self.names = names
    def find_spec(self, name, path=None, target=None):
        if any(name == n or name.startswith(n + ".") for n in self.names):
            raise ImportError(f"blocked import of {name} (the runtime must not import it)")
        return None
sys.meta_path.insert(0, _Block(NAMES))
"""


def python_with_blocked(names: list[str], code: str) -> list[str]:
    return [sys.executable, "-c", BLOCK_IMPORTS.replace("NAMES", repr(list(names))) + code]


@pytest.fixture(scope="session")
def dyn_onnx(tiny_onnx, tmp_path_factory) -> Path:
    """The tiny model exported again with a dynamic batch axis, sidecar `batch: dynamic`."""
    from d3n import sidecar as sidecar_mod
    from d3n.artifacts import sha256_file
    from d3n.offline import ultralytics

    folder = tmp_path_factory.mktemp("dynamic")
    ckpt = folder / "tiny_dyn.pt"
    shutil.copy(tiny_onnx.with_suffix(".pt"), ckpt)
    path = Path(ultralytics().YOLO(str(ckpt)).export(format="onnx", imgsz=IMGSZ, opset=17, simplify=True,
                                                      dynamic=True, verbose=False))
    sc = sidecar_mod.load(tiny_onnx)
    output = sc.output.model_copy(update={"shape": ["dynamic", *sc.output.shape[1:]]})
    sidecar_mod.save(sc.model_copy(update={"model_file": path.name, "model_sha256": sha256_file(path),
                                           "batch": "dynamic", "output": output}), path)
    return path
