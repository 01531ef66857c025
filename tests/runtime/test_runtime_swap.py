"""Hot model swap (`d3n run --watch`): a new model goes live between two frames, a bad one is
refused while the old one keeps running, and every result names the model that made it.

The swap is made deterministic by holding the post stage (the `on_result` callback) at a chosen
frame until the watcher has logged its verdict on the new files; the pipeline is never paused
otherwise, so the frames around the switch are the real in-flight ones."""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from conftest import NAMES, free_port, write_video
from onnx import helper, numpy_helper

from d3n import sidecar as sidecar_mod
from d3n.artifacts import sha256_file
from d3n.cli import main
from d3n.runtime.backends import open_backend
from d3n.runtime.pipeline import run_pipeline
from d3n.runtime.postprocess import class_thresholds, postprocess
from d3n.runtime.preprocess import prepare

N_FRAMES = 60
WATCH = 0.05  # seconds between polls: a change settles in about 0.1 s


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wrap_input(graph, size: int, inner: int) -> None:
    """Take a size x size input and resize it to the model's own inner x inner in the graph: a
    valid model with another input size, the same classes and the same output."""
    name = graph.input[0].name
    for node in graph.node:
        node.input[:] = ["resized" if x == name else x for x in node.input]
    graph.initializer.append(numpy_helper.from_array(np.array([1, 3, inner, inner], np.int64), "rs_sizes"))
    graph.node.insert(0, helper.make_node("Resize", [name, "", "", "rs_sizes"], ["resized"], mode="linear"))
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = size


def _poison_output(graph) -> None:
    """Multiply the output by NaN: the model loads and runs, but its results are useless."""
    name = graph.output[0].name
    for node in graph.node:
        node.output[:] = ["pre_nan" if x == name else x for x in node.output]
    graph.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan"))
    graph.node.append(helper.make_node("Mul", ["pre_nan", "nan"], [name]))


def variant(src: Path, dst: Path, *, doc: str = "retrained", names: list[str] | None = None,
            imgsz: int | None = None, nan: bool = False) -> Path:
    """A valid copy of the model `src` at `dst` (other bytes, so another sha256) with its own
    matching sidecar; optionally other class names, another input size or NaN outputs."""
    model = onnx.load(str(src))
    model.doc_string = doc
    sc = sidecar_mod.load(src)
    if imgsz:
        _wrap_input(model.graph, imgsz, sc.imgsz[0])
    if nan:
        _poison_output(model.graph)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    update = {"model_file": dst.name, "model_sha256": sha256_file(dst)}
    if names:
        update["names"] = names
    if imgsz:
        update["imgsz"] = [imgsz, imgsz]
    sidecar_mod.save(sc.model_copy(update=update), dst)
    return dst


def deliver(model: Path, folder: Path, name: str | None = None, atomic: bool = False) -> Path:
    """Copy a model then its sidecar into `folder`, optionally renamed (the sidecar's model_file
    is left alone: a renamed model no longer matches it). `atomic`: copy under hidden names and
    rename, as the docs advise, so the watcher never sees the new model with the old sidecar."""
    dst = folder / (name or model.name)
    for src, to in ((model, dst), (sidecar_mod.sidecar_path(model), sidecar_mod.sidecar_path(dst))):
        tmp = to.with_name(f".{to.name}.tmp") if atomic else to
        shutil.copy(src, tmp)
        tmp.replace(to)
    return dst


class Verdicts(logging.Handler):
    """Collects the watcher's log lines; `wait(n, "refused")` blocks until n such lines exist."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.cond = threading.Condition()

    def emit(self, record):
        with self.cond:
            self.messages.append(record.getMessage())
            self.cond.notify_all()

    def matching(self, word: str) -> list[str]:
        with self.cond:
            return [m for m in self.messages if word in m]

    def wait(self, n: int, word: str, timeout: float = 30.0) -> list[str]:
        with self.cond:
            self.cond.wait_for(lambda: len([m for m in self.messages if word in m]) >= n, timeout)
        found = self.matching(word)
        assert len(found) >= n, f"no {n} '{word}' line(s) in {timeout} s; log: {self.messages}"
        return found


@pytest.fixture
def verdicts():
    logger = logging.getLogger("d3n.runtime.swap")
    handler, level = Verdicts(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def clip(tmp_path) -> Path:
    return write_video(tmp_path / "clip.avi", n=N_FRAMES)


@pytest.fixture
def release(tiny_onnx, tmp_path) -> Path:
    """A release folder holding the running model, as a promotion writes it."""
    folder = tmp_path / "release"
    folder.mkdir()
    deliver(tiny_onnx, folder)
    (folder / "promotion.json").write_text("{}")  # other files in a release are not models
    return folder


def runs_of(rows: list[dict]) -> list[tuple[str, str, int]]:
    """(model file, short sha256, number of consecutive lines) for each run of lines."""
    out: list[tuple[str, str, int]] = []
    for r in rows:
        key = (r["model"], r["model_sha256"])
        if out and out[-1][:2] == key:
            out[-1] = (*key, out[-1][2] + 1)
        else:
            out.append((*key, 1))
    return out


def scrape(port: int) -> tuple[str, dict]:
    base = f"http://127.0.0.1:{port}"
    metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    return metrics, json.loads(urllib.request.urlopen(base + "/health", timeout=5).read())


def test_swap_mid_run_loses_no_frame_and_every_line_names_its_model(tiny_onnx, release, clip, tmp_path,
                                                                    verdicts):
    new = variant(tiny_onnx, tmp_path / "staging" / "student_v2.onnx")
    old_sha, new_sha = sidecar_mod.load(tiny_onnx).model_sha256, sidecar_mod.load(new).model_sha256
    port, scraped = free_port(), {}

    def on_result(result):
        if result.frame.index == 10:  # hold the line until the new model is validated
            deliver(new, release)
            verdicts.wait(1, "validated")
        if result.frame.index == 50:
            scraped["metrics"], scraped["health"] = scrape(port)

    out = tmp_path / "det.jsonl"
    stats = run_pipeline(release, str(clip), sinks=[f"jsonl:{out}"], watch=True, watch_interval=WATCH,
                         on_result=on_result, metrics_port=port, warmup=0)
    rows = read_jsonl(out)
    assert [r["frame"] for r in rows] == list(range(N_FRAMES))  # none lost, none twice
    runs = runs_of(rows)
    assert [r[:2] for r in runs] == [("tiny.onnx", old_sha[:12]), ("student_v2.onnx", new_sha[:12])]
    assert runs[0][2] >= 11  # the switch came after the frame that delivered the new model
    assert stats["model_swaps"] == {"ok": 1, "refused": 0}
    assert stats["model"] == {"file": "student_v2.onnx", "sha256": new_sha}
    assert any(f"after frame {runs[0][2] - 1}" in m for m in verdicts.matching("->"))
    # /metrics and /health name the model that made the current results.
    assert f'd3n_model_info{{sha256="{new_sha}",file="student_v2.onnx"}} 1' in scraped["metrics"]
    assert 'd3n_model_swaps_total{result="ok"} 1' in scraped["metrics"]
    assert 'd3n_model_swaps_total{result="refused"} 0' in scraped["metrics"]
    assert scraped["health"]["model"] == {"file": "student_v2.onnx", "sha256": new_sha}
    # The old model still lying in the folder is not swapped back in.
    assert sorted(p.name for p in release.glob("*.onnx")) == ["student_v2.onnx", "tiny.onnx"]


def test_bad_replacements_are_refused_and_the_old_model_keeps_running(tiny_onnx, model_copy, clip,
                                                                      tmp_path, verdicts):
    """Each bad model replaces the watched file in turn; each is refused and counted, and every
    frame is still made by the original model."""
    sha = sidecar_mod.load(model_copy).model_sha256
    side = sidecar_mod.sidecar_path(model_copy)
    good = model_copy.read_bytes()
    staging = tmp_path / "staging"

    def truncated_in_place():  # sidecar left as it is: its sha256 no longer matches
        model_copy.write_bytes(good[: len(good) // 2])

    def truncated_with_matching_sidecar():  # hash matches, but the file is no model
        sc = sidecar_mod.load(model_copy, verify_hash=False)
        sidecar_mod.save(sc.model_copy(update={"model_sha256": sha256_file(model_copy)}), model_copy)

    def other_classes():
        deliver(variant(tiny_onnx, staging / "tiny.onnx", names=["crack", "scratch", "dent"]),
                model_copy.parent, atomic=True)

    def nan_outputs():  # loads and runs, but the warm-up inference gives NaN
        deliver(variant(tiny_onnx, staging / "tiny.onnx", nan=True), model_copy.parent, atomic=True)

    breakages = {10: truncated_in_place, 20: truncated_with_matching_sidecar, 30: other_classes,
                 40: nan_outputs}

    def on_result(result):
        k = result.frame.index
        if k in breakages:
            breakages[k]()
            verdicts.wait(sorted(breakages).index(k) + 1, "refused")

    out = tmp_path / "det.jsonl"
    stats = run_pipeline(model_copy, str(clip), sinks=[f"jsonl:{out}"], watch=True, watch_interval=WATCH,
                         on_result=on_result, warmup=0, device="cpu")  # ORT's load error below
    rows = read_jsonl(out)
    assert [r["frame"] for r in rows] == list(range(N_FRAMES))
    assert runs_of(rows) == [("tiny.onnx", sha[:12], N_FRAMES)]  # the old model never stopped
    assert stats["model_swaps"] == {"ok": 0, "refused": 4}
    assert stats["model"] == {"file": "tiny.onnx", "sha256": sha}
    refused = verdicts.matching("refused")
    for message in refused:  # each names the new model, its sidecar and the model kept running
        assert str(model_copy) in message and str(side) in message
        assert f"still running tiny.onnx (sha256 {sha[:12]})" in message
    assert "sha256 of tiny.onnx does not match" in refused[0]
    assert "ONNX Runtime cannot load the model" in refused[1]
    assert "class names ['crack', 'scratch', 'dent'] differ" in refused[2]
    assert "warm-up inference gave non-finite values" in refused[3]


def test_swap_to_another_input_size_follows_the_new_sidecar(tiny_onnx, release, clip, tmp_path, verdicts):
    """A new model with another input size gets frames letterboxed for it from the switch on,
    while the frames already prepared for the old model finish on the old one."""
    new = variant(tiny_onnx, tmp_path / "staging" / "tiny.onnx", imgsz=160)

    def on_result(result):
        if result.frame.index == 5:
            deliver(new, release)  # over the running model's own files
            verdicts.wait(1, "validated")

    out = tmp_path / "det.jsonl"
    stats = run_pipeline(release, str(clip), sinks=[f"jsonl:{out}"], watch=True, watch_interval=WATCH,
                         on_result=on_result, warmup=0, max_frames=30, device="cpu")  # compared with ORT CPU below
    rows = read_jsonl(out)
    assert [r["frame"] for r in rows] == list(range(30))
    runs = runs_of(rows)
    assert len(runs) == 2 and runs[1][1] == sidecar_mod.load(new).model_sha256[:12]
    assert stats["model_swaps"]["ok"] == 1 and any("128x128 -> 160x160" in m for m in verdicts.messages)
    # Lines on either side of the switch are what each model gives on its own for that frame.
    cap = cv2.VideoCapture(str(clip))
    frames = [cap.read()[1] for _ in range(30)]
    first_new = runs[0][2]
    for model, k in ((tiny_onnx, first_new - 1), (new, first_new)):
        backend = open_backend(model, "cpu")
        blob, lb = prepare(frames[k], backend.input_shape[2:], backend.sidecar.preprocess)
        det = postprocess(backend.infer(blob), lb, class_thresholds(len(NAMES), 0.25))
        assert rows[k]["detections"] == det.to_list(NAMES)


def test_cli_watch_options_and_release_folders(tiny_onnx, release, clip, tmp_path, capsys):
    out = tmp_path / "det.jsonl"
    rc = main(["run", "--model", str(release), "--source", str(clip), "--watch", "--watch-interval",
               "0.05", "--max-frames", "5", "--sink", f"jsonl:{out}", "--summary", str(tmp_path / "s.json")])
    assert rc == 0, capsys.readouterr().err
    sha = sidecar_mod.load(tiny_onnx).model_sha256
    assert runs_of(read_jsonl(out)) == [("tiny.onnx", sha[:12], 5)]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["model"] == {"file": "tiny.onnx", "sha256": sha} and summary["model_swaps"]["ok"] == 0
    rc = main(["run", "--model", str(tiny_onnx), "--source", str(clip), "--watch-interval", "1"])
    assert rc == 1 and "--watch-interval needs --watch" in capsys.readouterr().err
    rc = main(["run", "--model", str(tiny_onnx), "--source", str(clip), "--watch", "--watch-interval", "0"])
    assert rc == 1 and "--watch-interval must be > 0" in capsys.readouterr().err
    # A release folder stands for its one model; none or two is an error that lists them.
    deliver(tiny_onnx, release, "second.onnx")
    rc = main(["run", "--model", str(release), "--source", str(clip)])
    err = capsys.readouterr().err
    assert rc == 1 and re.search(r"exactly one model .*found second\.onnx, tiny\.onnx", err) and str(release) in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["run", "--model", str(empty), "--source", str(clip)])
    assert rc == 1 and "found none" in capsys.readouterr().err
