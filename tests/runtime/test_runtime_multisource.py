"""Several sources, one model, batched: `d3n run --source A --source B` / `--sources FILE`.

Three video files of different lengths and one RTSP camera that never answers go through one
dynamic-batch ONNX model: every file frame is processed exactly once and in order, each JSONL
line names its source, the dead camera neither stalls the others nor hides from /health, and
inferences hold frames of several sources. The batcher's fairness and wait bound are checked on
hand-fed sources; the sources file parser on good and bad files."""

from __future__ import annotations

import collections
import json
import logging
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import IMGSZ, NAMES, free_port, write_video

from d3n.cli import main
from d3n.errors import ConfigError, DataError
from d3n.runtime.backends import open_backend
from d3n.runtime.batching import Gatherer
from d3n.runtime.pipeline import available_cores, run_pipeline
from d3n.runtime.postprocess import class_thresholds, postprocess
from d3n.runtime.preprocess import prepare
from d3n.runtime.sources import Source, SourceSpec, read_sources_file, source_entries
from d3n.runtime.stats import Stats

LENGTHS = {"cam1": 12, "cam2": 20, "src2": 31}  # frames of each file source, all different


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    return {name: write_video(folder / f"{name}.avi", n=n) for name, n in LENGTHS.items()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def frames_by_source(rows: list[dict]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = collections.defaultdict(list)
    for r in rows:
        out[r["source"]].append(r["frame"])
    return dict(out)


def get(url: str) -> tuple[int, bytes]:
    try:
        resp = urllib.request.urlopen(url, timeout=5)
        return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# The whole line: three files and a dead camera through one batched model -----------------------

def scrape_while_running(port: int, done: threading.Event, timeout: float = 60) -> dict:
    """/health and /metrics at a moment where the file sources run and the camera is down."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done.is_set():
        try:
            code, body = get(f"http://127.0.0.1:{port}/health")
        except OSError:  # not listening yet
            time.sleep(0.05)
            continue
        health = json.loads(body)
        srcs = health.get("sources", {})
        if srcs.get("cam1", {}).get("frames", 0) >= 2 and srcs["cam1"]["state"] == "running" \
                and srcs["dead"]["state"] in ("reconnecting", "lost"):
            metrics = get(f"http://127.0.0.1:{port}/metrics")[1].decode()
            return {"code": code, "health": health, "metrics": metrics}
        time.sleep(0.05)
    raise AssertionError("never saw the file sources running while the camera was down")


@pytest.mark.timeout(120)
def test_three_files_and_a_dead_camera_share_one_batched_model(dyn_onnx, clips, tmp_path, capsys):
    listing = tmp_path / "cams.txt"
    shutil.copy(clips["cam2"], tmp_path / "b.avi")
    dead = f"rtsp://127.0.0.1:{free_port()}/live"  # nothing listens there
    listing.write_text(f"# line 3\ncam1={clips['cam1']}\ncam2 = b.avi\n\n   # the third has no name\n"
                       f"{clips['src2']}\ndead={dead}\n")
    out, port = tmp_path / "det.jsonl", free_port()
    result: dict = {}

    def run():
        result["rc"] = main(["run", "--model", str(dyn_onnx), "--sources", str(listing), "--conf", "0.5",
                             "--sink", f"jsonl:{out}", "--summary", str(tmp_path / "s.json"),
                             "--metrics-port", str(port), "--max-reconnects", "3", "--max-fps", "15",
                             "--batch-wait-ms", "20", "--status-every", "0"])

    done = threading.Event()
    t = threading.Thread(target=lambda: (run(), done.set()), daemon=True)
    t.start()
    seen = scrape_while_running(port, done)
    t.join(90)
    assert not t.is_alive()
    err = capsys.readouterr().err

    # The dead camera is down in /health (503) while the files run; every source has its entry.
    assert seen["code"] == 503 and seen["health"]["status"] == "degraded"
    assert f"source dead ({dead}) down" in seen["health"]["reason"]
    assert set(seen["health"]["sources"]) == {"cam1", "cam2", "src2", "dead"}
    assert seen["health"]["sources"]["cam1"]["reason"] is None
    m = seen["metrics"]
    assert 'd3n_source_up{source="dead"} 0' in m and 'd3n_source_up{source="cam1"} 1' in m
    assert 'd3n_source_frames_total{source="dead"} 0' in m
    for family in ("frames_dropped", "reconnects", "corrupt_frames", "stream_drops"):
        assert f'd3n_source_{family}_total{{source="cam1"}} 0' in m
    assert 'd3n_source_last_frame_age_seconds{source="cam1"}' in m
    assert "d3n_batch_size_bucket" in m and "d3n_batch_size_count" in m

    # Every frame of every file exactly once, in order; each line names its source.
    rows = read_jsonl(out)
    assert frames_by_source(rows) == {name: list(range(n)) for name, n in LENGTHS.items()}
    # Batches mixed the sources: some inferences held more than one frame.
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["frames"] == sum(LENGTHS.values()) == s["batches"]["frames"]
    assert s["batches"]["mean_size"] > 1 and max(map(int, s["batches"]["sizes"])) > 1
    assert s["sources"]["dead"]["state"] == "lost" and s["sources"]["cam1"]["state"] == "ended"
    assert {name: s["sources"][name]["frames"] for name in LENGTHS} == LENGTHS
    # The dead camera is a failure of the run (exit 1), named, after the others were served.
    assert result["rc"] == 1 and f"source dead ({dead}): could not open after 4 attempts" in err
    assert s["stopped_by"].startswith("end of sources; 1 of 4 failed: dead (source never opened")
    # A batched frame gets what the model gives that frame on its own.
    cap = cv2.VideoCapture(str(clips["cam1"]))
    backend = open_backend(dyn_onnx, "cpu")
    cam1 = [r for r in rows if r["source"] == "cam1"]
    for k in range(LENGTHS["cam1"]):
        blob, lb = prepare(cap.read()[1], backend.input_shape[2:], backend.sidecar.preprocess)
        det = postprocess(backend.infer(blob), lb, class_thresholds(len(NAMES), 0.5)).to_list(NAMES)
        got = cam1[k]["detections"]
        assert [d["class_id"] for d in got] == [d["class_id"] for d in det]
        np.testing.assert_allclose([d["xyxy"] for d in got], [d["xyxy"] for d in det], atol=0.05)
        np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in det], atol=1e-4)


def test_a_fixed_batch_model_runs_one_inference_per_frame(tiny_onnx, clips, tmp_path, capsys, caplog):
    """Repeated --source, names, per-source video files; a batch-1 model says it cannot batch."""
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="d3n.runtime.pipeline"):
        rc = main(["run", "--model", str(tiny_onnx), "--source", str(clips["cam1"]), "--source",
                   f"side={clips['cam2']}", "--sink", f"jsonl:{out}/det.jsonl", "--sink",
                   f"video:{out}/annotated.avi", "--summary", str(out / "s.json")])
    assert rc == 0, capsys.readouterr().err
    assert any("one inference per frame" in r.getMessage() and "fixed at 1" in r.getMessage()
               for r in caplog.records)
    s = json.loads((out / "s.json").read_text())
    assert s["batches"]["sizes"] == {"1": 32} and s["stopped_by"] == "end of source"
    assert frames_by_source(read_jsonl(out / "det.jsonl")) == {"src0": list(range(12)), "side": list(range(20))}
    # One video per source: cameras are not mixed into one file.
    assert sorted(p.name for p in out.glob("*.avi")) == ["annotated.side.avi", "annotated.src0.avi"]
    counts = {p.name: int(cv2.VideoCapture(str(p)).get(cv2.CAP_PROP_FRAME_COUNT)) for p in out.glob("*.avi")}
    assert counts == {"annotated.src0.avi": 12, "annotated.side.avi": 20}


def test_hot_swap_with_several_sources_keeps_every_frame(dyn_onnx, clips, tmp_path):
    """A batch is prepared for one model; the lines of each source switch once, none is lost."""
    from test_runtime_swap import Verdicts, deliver, variant

    release = tmp_path / "release"
    release.mkdir()
    deliver(dyn_onnx, release)
    new = variant(dyn_onnx, tmp_path / "staging" / "v2.onnx")
    verdicts, logger = Verdicts(), logging.getLogger("d3n.runtime.swap")
    logger.addHandler(verdicts)
    level = logger.level
    logger.setLevel(logging.INFO)

    def on_result(result):
        if result.frame.source_id == "a" and result.frame.index == 2:  # hold the line until it is validated
            deliver(new, release)
            verdicts.wait(1, "validated")

    out = tmp_path / "det.jsonl"
    try:
        summary = run_pipeline(release, [f"a={clips['cam2']}", f"b={clips['src2']}"], sinks=[f"jsonl:{out}"],
                               watch=True, watch_interval=0.05, on_result=on_result, warmup=0)
    finally:
        logger.removeHandler(verdicts)
        logger.setLevel(level)
    rows = read_jsonl(out)
    assert frames_by_source(rows) == {"a": list(range(20)), "b": list(range(31))}
    assert summary["model_swaps"] == {"ok": 1, "refused": 0} and summary["batches"]["mean_size"] > 1
    for name in ("a", "b"):  # old model, then the new one, never back
        models = [r["model"] for r in rows if r["source"] == name]
        switch = models.index("v2.onnx")
        assert switch >= 1 and set(models[:switch]) == {"tiny_dyn.onnx"} and set(models[switch:]) == {"v2.onnx"}
    assert any(" of a" in m or " of b" in m for m in verdicts.matching("-> v2.onnx"))


# The batcher on hand-fed sources ------------------------------------------------------------

def live(name: str, up: bool = True) -> Source:
    """A live source whose capture thread is not started: frames are published by hand."""
    src = Source(SourceSpec("0", "camera", True), Stats(), source_id=name)
    if up:
        src.opened.set()
    return src


def feed(*sources: Source) -> None:
    for src in sources:
        src._publish(np.zeros((4, 4, 3), np.uint8))


def names(batch) -> list[str]:
    return [f.source_id for f in batch]


def test_round_robin_lets_no_source_starve():
    a, b, c, d = (live(n) for n in "abcd")
    gatherer = Gatherer([a, b, c, d], wait_s=0.0)
    feed(a, b, c, d)
    assert names(gatherer.next_batch(2)) == ["a", "b"]
    feed(a, b)  # a and b deliver again before c and d were served
    assert names(gatherer.next_batch(2)) == ["c", "d"]  # those left out go first
    feed(c, d)
    assert names(gatherer.next_batch(2)) == ["a", "b"]
    assert names(gatherer.next_batch(4)) == ["c", "d"]
    feed(a, b, c, d)
    assert names(gatherer.next_batch(8)) == ["a", "b", "c", "d"]  # a live source: one frame per batch


def test_a_silent_source_costs_at_most_the_wait_and_a_down_one_nothing():
    a, silent = live("a"), live("silent")  # up, but sends nothing
    gatherer = Gatherer([a, silent], wait_s=0.05)
    feed(a)
    t0 = time.monotonic()
    assert names(gatherer.next_batch(2)) == ["a"]
    assert 0.04 <= time.monotonic() - t0 < 0.5
    down = live("down")
    down.down_reason = "source down down: reconnecting (3 failed attempts)"
    gatherer = Gatherer([a, down, live("starting", up=False)], wait_s=5.0)
    feed(a)
    t0 = time.monotonic()
    assert names(gatherer.next_batch(3)) == ["a"] and time.monotonic() - t0 < 1.0
    t0 = time.monotonic()
    assert gatherer.next_batch(3) == [] and time.monotonic() - t0 < 1.0  # idle: back to the caller


def test_file_sources_fill_the_batch_in_order_and_end():
    f = Source(SourceSpec("clip.avi", "video", False), Stats(), source_id="f", queue_size=8)
    f.opened.set()
    feed(*[f] * 5)
    gatherer = Gatherer([f], wait_s=0.0)
    assert [x.index for x in gatherer.next_batch(3)] == [0, 1, 2]
    f._done.set()  # the file ended after its last frame was queued
    assert [x.index for x in gatherer.next_batch(3)] == [3, 4]
    assert gatherer.next_batch(3) is None


def test_max_fps_throttles_each_source():
    a = live("a")
    gatherer = Gatherer([a], wait_s=0.0, max_fps=10)
    feed(a)
    assert names(gatherer.next_batch(1)) == ["a"]
    feed(a)
    t0 = time.monotonic()
    assert names(gatherer.next_batch(1)) == ["a"] and time.monotonic() - t0 >= 0.08


# Sources files and names --------------------------------------------------------------------

def test_sources_file_names_comments_and_relative_paths(tmp_path, video_avi):
    shutil.copy(video_avi, tmp_path / "local.avi")
    gst = "v4l2src device=/dev/video0 ! videoconvert ! appsink"
    listing = tmp_path / "cams.txt"
    listing.write_text(f"# cameras of line 3\n\ncam1=rtsp://10.0.0.5/stream?channel=1&x=y\n"
                       f"  door = /dev/video2  \nlocal.avi\n{gst}\nhttp://cam/mjpg?a=b\n")
    got = [(n, spec.kind, spec.text) for n, spec, _ in read_sources_file(listing)]
    assert got == [("cam1", "url", "rtsp://10.0.0.5/stream?channel=1&x=y"), ("door", "v4l2", "/dev/video2"),
                   (None, "video", str(tmp_path / "local.avi")), (None, "gstreamer", gst),
                   (None, "url", "http://cam/mjpg?a=b")]
    entries = source_entries([f"top={video_avi}", str(video_avi)], listing)
    assert [e.name for e in entries] == ["top", "src1", "cam1", "door", "src4", "src5", "src6"]
    assert entries[3].origin == f"{listing}:4"
    # A lone unnamed --source keeps its text as its name, as single-source runs always did.
    assert [e.name for e in source_entries([str(video_avi)])] == [str(video_avi)]


@pytest.mark.parametrize("text, line, message", [
    ("cam1=rtsp://a/b\nthis is not a source\n", 2, "this is not a source: source not found"),
    ("# c\n\ncam1=/nowhere/clip.mp4\n", 3, "clip.mp4: source not found"),
    ("cam1=\n", 1, "'cam1=' gives no URI or path"),
    ("cam1=rtsp://a/b\ncam1=rtsp://a/c\n", 2, "source name 'cam1' is already used"),
    ("rtps://typo/stream\n", 1, "source not found"),
])
def test_bad_sources_file_lines_name_the_file_and_line(tmp_path, text, line, message):
    listing = tmp_path / "cams.txt"
    listing.write_text(text)
    with pytest.raises((DataError, ConfigError)) as exc:
        source_entries([], listing)
    assert str(exc.value).startswith(f"{listing}:{line}: ") and message in str(exc.value)


def test_sources_file_errors_through_the_cli(tiny_onnx, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    for args, message in (
            (["--sources", str(empty)], f"{empty}: no source in the sources file"),
            (["--sources", str(tmp_path / "missing.txt")], "missing.txt: cannot read the sources file"),
            ([], "no source: give --source"),
            (["--source", "a=rtsp://x/1", "--source", "a=rtsp://x/2"], "source name 'a' is already used"),
            (["--source", "rtsp://x/1", "--max-batch", "0"], "--max-batch must be >= 1"),
            (["--source", "rtsp://x/1", "--threads", "0"], "--threads must be >= 1"),
            (["--source", "rtsp://x/1", "--batch-wait-ms", "-1"], "--batch-wait-ms must be in")):
        rc = main(["run", "--model", str(tiny_onnx), *args])
        err = capsys.readouterr().err
        assert rc == 1 and message in err, (args, err)


# Backends: batches and threads --------------------------------------------------------------

def test_backends_take_batches_up_to_their_max(tiny_onnx, dyn_onnx):
    dyn, fixed = open_backend(dyn_onnx, "cpu"), open_backend(tiny_onnx, "cpu")
    assert dyn.max_batch is None and fixed.max_batch == 1 and dyn.input_shape == (1, 3, IMGSZ, IMGSZ)
    blob = np.random.default_rng(0).uniform(0, 1, (3, 3, IMGSZ, IMGSZ)).astype(np.float32)
    out = dyn.infer(blob)
    assert out.shape[0] == 3
    np.testing.assert_allclose(out[1:2], fixed.infer(blob[1:2]), atol=1e-4)
    with pytest.raises(ValueError, match=r"input blob shape \(3, 3, 128, 128\).*batch of 1 to 1"):
        fixed.infer(blob)


def test_threads_default_to_the_cores_of_the_process(dyn_onnx, clips, monkeypatch):
    from d3n.runtime import pipeline

    opened = []
    real = pipeline.open_backend
    monkeypatch.setattr(pipeline, "open_backend", lambda *a, **kw: opened.append(kw) or real(*a, **kw))
    run_pipeline(dyn_onnx, str(clips["cam1"]), max_frames=2, warmup=0)
    run_pipeline(dyn_onnx, str(clips["cam1"]), max_frames=2, warmup=0, threads=1)
    assert [kw["intra_op_threads"] for kw in opened] == [available_cores(), 1]
    b = open_backend(dyn_onnx, "cpu", intra_op_threads=1)
    assert b.session.get_session_options().intra_op_num_threads == 1


def test_health_names_a_silent_camera_among_running_ones(tiny_onnx):
    """Among several sources the others keep the run's last frame fresh: a camera that stops
    sending without dropping shows only in its own age, and /health says which one."""
    from d3n.runtime.pipeline import _Runner
    from d3n.runtime.sinks import SinkSet
    from d3n.runtime.swap import Model, ModelSlot

    stats = Stats()
    a, b = live("a"), live("b")
    runner = _Runner(ModelSlot(Model(open_backend(tiny_onnx, "cpu")), stats), [a, b], SinkSet([]), stats,
                     conf=0.25, iou=0.7, max_det=300, class_conf={}, roi=None, max_fps=None,
                     max_frames=None, stop_event=threading.Event(), stale_after=5.0)
    stats.frame_done(0, "a")
    stats.frame_done(0, "b")
    assert runner.health_state() == ("running", None)
    stats._source_last["b"] -= 12  # b's last result was 12 s ago; a keeps delivering
    status, reason = runner.health_state()
    assert status == "degraded" and reason.startswith("source b: no frame for 12.")
    report = runner.source_report()
    assert report["a"]["state"] == "running" and report["b"]["state"] == "stalled"
    b.down_reason = "source b down: stream dropped, reconnecting"
    assert runner.health_state() == ("degraded", "source b down: stream dropped, reconnecting")
