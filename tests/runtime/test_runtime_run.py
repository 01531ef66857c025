"""`d3n run` end to end on files, folders and globs: sinks, corrupt input, bad options, metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest
from conftest import NAMES, free_port, make_frame, write_video

from d3n.cli import main
from d3n.runtime.backends import open_backend
from d3n.runtime.pipeline import run_pipeline
from d3n.runtime.postprocess import class_thresholds, postprocess
from d3n.runtime.preprocess import prepare


def run(capsys, *args) -> tuple[int, str]:
    rc = main(["run", *map(str, args)])
    return rc, capsys.readouterr().err


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_video_with_all_file_sinks(tiny_onnx, video_avi, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run(capsys, "--model", tiny_onnx, "--source", video_avi, "--conf", 0.5,
                  "--sink", f"jsonl:{out}/det.jsonl", "--sink", f"video:{out}/annotated.mp4",
                  "--sink", f"crops:{out}/crops", "--summary", out / "summary.json")
    assert rc == 0, err
    rows = read_jsonl(out / "det.jsonl")
    assert [r["frame"] for r in rows] == list(range(60))  # in order, no frame skipped
    n_det = 0
    for r in rows:
        assert r["source"] == str(video_avi) and (r["width"], r["height"]) == (200, 150)
        assert r["result_ts"] >= r["capture_ts"] and r["latency_ms"] > 0
        for d in r["detections"]:
            assert d["class"] == NAMES[d["class_id"]] and d["score"] > 0.5
            x1, y1, x2, y2 = d["xyxy"]
            assert 0 <= x1 <= x2 <= 200 and 0 <= y1 <= y2 <= 150
        n_det += len(r["detections"])
    assert n_det > 0
    # The first line holds exactly what the model gives on the decoded first frame.
    ok, frame0 = cv2.VideoCapture(str(video_avi)).read()
    backend = open_backend(tiny_onnx)
    blob, lb = prepare(frame0, backend.input_shape[2:], backend.sidecar.preprocess)
    det0 = postprocess(backend.infer(blob), lb, class_thresholds(len(NAMES), 0.5))
    assert rows[0]["detections"] == det0.to_list(NAMES)
    # Annotated video: every frame, original size.
    cap = cv2.VideoCapture(str(out / "annotated.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 60
    assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (200, 150)
    # One crop per detection, named by frame and class.
    crops = sorted((out / "crops").glob("*.jpg"))
    assert len(crops) == n_det
    assert all(re.search(r"_\d{8}_\d{2}_(crack|scratch|pit)\.jpg$", c.name) for c in crops)
    assert cv2.imread(str(crops[0])) is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 60 and summary["stopped_by"] == "end of source"
    assert summary["detections"] == n_det and summary["corrupt_frames"] == 0


def test_image_folder_and_glob(tiny_onnx, image_dir, tmp_path, capsys):
    rc, err = run(capsys, "--model", tiny_onnx, "--source", image_dir, "--sink", f"jsonl:{tmp_path}/a.jsonl")
    assert rc == 0, err
    rows = read_jsonl(tmp_path / "a.jsonl")
    assert [r["name"] for r in rows] == [f"img_{i:03d}.jpg" for i in range(8)]
    rc, err = run(capsys, "--model", tiny_onnx, "--source", f"{image_dir}/img_00[0-3].jpg",
                  "--sink", f"jsonl:{tmp_path}/b.jsonl")
    assert rc == 0, err
    assert [r["name"] for r in read_jsonl(tmp_path / "b.jsonl")] == [f"img_{i:03d}.jpg" for i in range(4)]


def test_corrupt_jpeg_in_folder_is_skipped_and_counted(tiny_onnx, image_dir, tmp_path, capsys):
    good = (image_dir / "img_002.jpg").read_bytes()
    (image_dir / "img_002b.jpg").write_bytes(good[:200] + b"\x00garbage" * 50)  # truncated + junk
    (image_dir / "img_004b.jpg").write_bytes(b"this is not a jpeg")
    rc, err = run(capsys, "--model", tiny_onnx, "--source", image_dir,
                  "--sink", f"jsonl:{tmp_path}/d.jsonl", "--summary", tmp_path / "s.json")
    assert rc == 0, err
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["frames"] + s["corrupt_frames"] == 10 and s["corrupt_frames"] >= 1
    assert s["frames"] >= 8 and len(read_jsonl(tmp_path / "d.jsonl")) == s["frames"]


def test_corrupt_video_frames_are_skipped_and_counted(tiny_onnx, tmp_path, capsys):
    data = bytearray(write_video(tmp_path / "clip.avi").read_bytes())
    # Garbage over the start of two JPEG frames in the middle: undecodable, not just smeared.
    starts = [m.start() for m in re.finditer(b"\xff\xd8\xff", bytes(data))]
    for k in (20, 35):
        data[starts[k]:starts[k] + 400] = bytes((i * 37 + 11) % 256 for i in range(400))
    bad = tmp_path / "bad.avi"
    bad.write_bytes(bytes(data))
    rc, err = run(capsys, "--model", tiny_onnx, "--source", bad, "--summary", tmp_path / "s.json")
    assert rc == 0, err
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["corrupt_frames"] >= 1 and s["frames"] >= 50


def test_max_frames_class_conf_and_roi(tiny_onnx, video_avi, tmp_path, capsys):
    rc, _ = run(capsys, "--model", tiny_onnx, "--source", video_avi, "--max-frames", 5,
                "--sink", f"jsonl:{tmp_path}/all.jsonl")
    assert rc == 0 and len(read_jsonl(tmp_path / "all.jsonl")) == 5
    classes_all = {d["class"] for r in read_jsonl(tmp_path / "all.jsonl") for d in r["detections"]}
    assert "pit" in classes_all
    rc, _ = run(capsys, "--model", tiny_onnx, "--source", video_avi, "--max-frames", 5,
                "--class-conf", "pit=1.0", "--sink", f"jsonl:{tmp_path}/nopit.jsonl")
    rows = read_jsonl(tmp_path / "nopit.jsonl")
    assert rc == 0 and all(d["class"] != "pit" for r in rows for d in r["detections"])
    mask = np.zeros((30, 40), np.uint8)
    mask[:, :20] = 255  # left half
    cv2.imwrite(str(tmp_path / "roi.png"), mask)
    rc, _ = run(capsys, "--model", tiny_onnx, "--source", video_avi, "--max-frames", 5,
                "--roi", tmp_path / "roi.png", "--sink", f"jsonl:{tmp_path}/roi.jsonl")
    rows = read_jsonl(tmp_path / "roi.jsonl")
    centres = [(d["xyxy"][0] + d["xyxy"][2]) / 2 for r in rows for d in r["detections"]]
    assert rc == 0 and centres and max(centres) < 100
    rc, err = run(capsys, "--model", tiny_onnx, "--source", video_avi, "--class-conf", "dent=0.5")
    assert rc == 1 and "unknown class 'dent'" in err
    rc, err = run(capsys, "--model", tiny_onnx, "--source", video_avi, "--roi", tmp_path / "none.png")
    assert rc == 1 and "none.png: cannot read the ROI mask" in err


def test_unwritable_sink_path_refused(tiny_onnx, video_avi, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc, err = run(capsys, "--model", tiny_onnx, "--source", video_avi, "--sink", f"jsonl:{blocker}/det.jsonl")
    assert rc == 1 and "cannot open jsonl sink" in err and str(blocker) in err
    rc, err = run(capsys, "--model", tiny_onnx, "--source", video_avi, "--sink", f"crops:{blocker}/c")
    assert rc == 1 and "cannot open crops sink" in err
    rc, err = run(capsys, "--model", tiny_onnx, "--source", video_avi, "--sink", "parquet:x")
    assert rc == 1 and "unknown sink 'parquet'" in err


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_sink_is_disabled_others_continue(tiny_onnx, video_avi, tmp_path, capsys):
    rc, err = run(capsys, "--model", tiny_onnx, "--source", video_avi, "--sink", "jsonl:/dev/full",
                  "--sink", f"jsonl:{tmp_path}/ok.jsonl", "--summary", tmp_path / "s.json")
    assert rc == 1 and "jsonl:/dev/full failed" in err and "No space left" in err
    assert len(read_jsonl(tmp_path / "ok.jsonl")) == 60  # the healthy sink got every frame
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["sink_failures"] == 1 and s["frames"] == 60
    # With no healthy sink left the run stops instead of computing into the void.
    rc, err = run(capsys, "--model", tiny_onnx, "--source", video_avi, "--sink", "jsonl:/dev/full",
                  "--summary", tmp_path / "s2.json")
    s2 = json.loads((tmp_path / "s2.json").read_text())
    assert rc == 1 and s2["stopped_by"] == "all sinks failed" and s2["frames"] < 60


def test_missing_and_never_opening_sources(tiny_onnx, tmp_path, capsys):
    rc, err = run(capsys, "--model", tiny_onnx, "--source", tmp_path / "nope.mp4")
    assert rc == 1 and "nope.mp4: source not found" in err
    url = f"rtsp://127.0.0.1:{free_port()}/live"  # nothing listens there
    rc, err = run(capsys, "--model", tiny_onnx, "--source", url, "--max-reconnects", 1)
    assert rc == 1 and "could not open after 2 attempts" in err and url in err


def test_source_that_never_opens_says_why_the_run_stopped(tiny_onnx):
    url = f"rtsp://127.0.0.1:{free_port()}/live"  # nothing listens there
    stats = run_pipeline(tiny_onnx, url, max_reconnects=1, backoff=(0.05, 0.1), warmup=0)
    assert stats["stopped_by"] == "source never opened: 2 attempts failed (--max-reconnects 1)"
    assert stats["frames"] == 0 and "could not open after 2 attempts" in stats["source_error"]


def parse_prometheus(text: str) -> dict[str, float]:
    """Minimal Prometheus text-format parser: {'name{labels}': value}; checks line syntax."""
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_]\w*="[^"]*",?)*\})? (\S+)', line)
        assert m, f"bad exposition line: {line!r}"
        base = re.sub(r"_(sum|count|bucket)$", "", m.group(1))
        assert m.group(1) in types or base in types, f"sample without TYPE: {line}"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def test_metrics_and_health_scraped_while_running(tiny_onnx, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):
        cv2.imwrite(str(folder / f"f{i:03d}.png"), make_frame(i))
    port = free_port()
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(run_pipeline(
        tiny_onnx, str(folder), max_fps=10, metrics_port=port)), daemon=True)
    t.start()
    base = f"http://127.0.0.1:{port}"
    scraped = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and t.is_alive():
        try:
            health = json.loads(urllib.request.urlopen(base + "/health", timeout=2).read())
            if health["frames"] >= 5:
                resp = urllib.request.urlopen(base + "/metrics", timeout=2)
                assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                scraped = parse_prometheus(resp.read().decode())
                break
        except OSError:
            pass
        time.sleep(0.2)
    t.join(30)
    assert scraped is not None, "metrics endpoint never answered during the run"
    assert health["status"] == "running" and health["last_frame_age_s"] is not None
    assert scraped["d3n_frames_total"] >= 5 and scraped["d3n_fps"] > 0
    for stage in ("preprocess", "infer", "postprocess", "end_to_end"):
        assert scraped[f'd3n_stage_latency_seconds{{stage="{stage}",quantile="0.99"}}'] > 0
    for name in ("reconnects", "source_drops", "corrupt_frames", "frames_dropped"):
        assert f"d3n_{name}_total" in scraped
    assert result["frames"] == 40 and result["metrics_port"] == port


def test_duration_and_max_fps_stop_a_run(tiny_onnx, image_dir):
    stats = run_pipeline(tiny_onnx, f"{image_dir}/*.jpg", max_fps=2, duration=1.0, warmup=0)
    assert stats["stopped_by"] == "duration" and 1 <= stats["frames"] < 8


def test_metrics_port_in_use_is_a_clear_error(tiny_onnx, image_dir, tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc, err = run(capsys, "--model", tiny_onnx, "--source", image_dir, "--metrics-port", port,
                      "--sink", f"jsonl:{tmp_path}/x.jsonl")
    assert rc == 1 and f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}" in err
    assert not (tmp_path / "x.jsonl").exists()  # the port is bound before any output is created


def test_unreadable_sources_leave_no_output_behind(tiny_onnx, tmp_path, capsys):
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"not a video at all" * 100)
    rc, err = run(capsys, "--model", tiny_onnx, "--source", fake, "--sink", f"jsonl:{tmp_path}/a.jsonl",
                  "--sink", f"video:{tmp_path}/a.mp4", "--sink", f"crops:{tmp_path}/crops")
    assert rc == 1 and "fake.mp4: cannot open video file" in err
    url = f"rtsp://127.0.0.1:{free_port()}/live"  # nothing listens there
    rc, err = run(capsys, "--model", tiny_onnx, "--source", url, "--max-reconnects", 0,
                  "--sink", f"jsonl:{tmp_path}/b.jsonl")
    assert rc == 1 and "could not open" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.mp4"]  # no file, no folder


# A video with a damaged stretch in its middle ----------------------------------------------

N_DAMAGED_CLIP = 120


def damaged_h264(tmp_path) -> tuple:
    """An H.264 MP4 (keyframe every 10 frames) with 1/30 of its bytes overwritten at 30 % of
    the file; returns (path, frames ffprobe can decode or None). OpenCV's read() fails for
    several frames in a row there, then decodes again from the next keyframe."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not on PATH")
    clip = write_video(tmp_path / "src.avi", n=N_DAMAGED_CLIP)
    mp4 = tmp_path / "clip.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(clip), "-c:v",
                    "libx264", "-g", "10", "-threads", "1", "-pix_fmt", "yuv420p", str(mp4)], check=True)
    data = bytearray(mp4.read_bytes())
    at, n = int(len(data) * 0.3), len(data) // 30
    data[at:at + n] = bytes((i * 37 + 11) % 256 for i in range(n))
    mp4.write_bytes(bytes(data))
    if shutil.which("ffprobe") is None:
        return mp4, None
    probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                            "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(mp4)],
                           capture_output=True, text=True)
    return mp4, int(probe.stdout.split()[0])


def check_damaged_run(tmp_path, rc, err, decodable, min_share: float = 0.9) -> dict:
    assert rc == 0, err
    s = json.loads((tmp_path / "s.json").read_text())
    rows = read_jsonl(tmp_path / "d.jsonl")
    frames = [r["frame"] for r in rows]
    assert s["stopped_by"] == "end of source" and s["frames"] == len(rows)
    assert s["frames"] >= min_share * N_DAMAGED_CLIP and frames[-1] == N_DAMAGED_CLIP - 1  # read to the end
    if decodable is not None:
        assert decodable < N_DAMAGED_CLIP and s["frames"] >= decodable - 1  # as much as ffmpeg gets
    # The loss is counted and shows as a gap in the frame numbers.
    gaps = sum(b - a - 1 for a, b in zip(frames, frames[1:], strict=False))
    assert s["corrupt_frames"] >= 2 and gaps == s["corrupt_frames"]
    assert s["frames"] + s["corrupt_frames"] == N_DAMAGED_CLIP
    return s


def test_damaged_stretch_in_a_video_is_skipped_not_taken_for_its_end(tiny_onnx, tmp_path, capsys, caplog):
    mp4, decodable = damaged_h264(tmp_path)
    with caplog.at_level("WARNING", logger="d3n.runtime.sources"):
        rc, err = run(capsys, "--model", tiny_onnx, "--source", mp4, "--sink", f"jsonl:{tmp_path}/d.jsonl",
                      "--summary", tmp_path / "s.json")
    s = check_damaged_run(tmp_path, rc, err, decodable)
    lost = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
    assert lost and str(mp4) in lost[0] and f"{s['corrupt_frames']} frame" in " ".join(lost)


def test_damaged_video_reopened_and_sought_past_the_damage(tiny_onnx, tmp_path, capsys, monkeypatch):
    """When reading on does not get past the damage, the file is reopened and sought beyond it."""
    from d3n.runtime import sources

    monkeypatch.setattr(sources.VideoReader, "READ_RETRIES", 0)  # seek at the first failure
    mp4, _ = damaged_h264(tmp_path)
    rc, err = run(capsys, "--model", tiny_onnx, "--source", mp4, "--sink", f"jsonl:{tmp_path}/d.jsonl",
                  "--summary", tmp_path / "s.json")
    check_damaged_run(tmp_path, rc, err, None, min_share=0.5)  # a seek lands past a keyframe


# JSONL: whole lines only -------------------------------------------------------------------

def test_jsonl_partial_last_line_is_cut_before_appending(tiny_onnx, video_avi, tmp_path, caplog):
    out = tmp_path / "det.jsonl"
    good = '{"source":"cam","frame":1,"detections":[]}\n'
    out.write_text(good * 2 + '{"source":"cam","frame":2,"detec')  # the disk filled mid-line
    with caplog.at_level("WARNING", logger="d3n.runtime.sinks"):
        stats = run_pipeline(tiny_onnx, str(video_avi), sinks=[f"jsonl:{out}"], max_frames=3, warmup=0)
    rows = read_jsonl(out)  # every line parses
    assert stats["frames"] == 3 and len(rows) == 5 and rows[:2] == [json.loads(good)] * 2
    assert [r["frame"] for r in rows[2:]] == [0, 1, 2] and out.read_text().endswith("\n")
    assert any("partial last line" in r.getMessage() and str(out) in r.getMessage() for r in caplog.records)


JSONL_AT_FILE_SIZE_LIMIT = """
import json, resource, signal, sys
import numpy as np
from d3n.runtime.postprocess import Detections
from d3n.runtime.sinks import JsonlSink, Result
from d3n.runtime.sources import Frame

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed: a full disk
path = sys.argv[1]

def result(index, n_det):
    det = Detections(np.tile(np.float32([1, 2, 30, 40]), (n_det, 1)), np.full(n_det, 0.5, np.float32),
                     np.zeros(n_det, np.int64))
    frame = Frame(np.zeros((8, 8, 3), np.uint8), index, 0.0, 0.0, "cam")
    return Result(frame, det, ["crack"], 0.0, 0.01)

sink = JsonlSink(path)
sink.write(result(0, 1))
size = len(open(path, "rb").read())
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 300, resource.RLIM_INFINITY))
try:
    sink.write(result(1, 50))  # about 3 kB: only its first 300 bytes fit
except OSError as exc:
    print("write failed:", exc.strerror)
sink.close()
"""


def test_jsonl_record_that_does_not_fit_leaves_no_fragment(tmp_path):
    """A line that hits a full file system (here RLIMIT_FSIZE: the kernel writes what fits, then
    refuses) must not stay half-written: the file holds whole lines only."""
    out = tmp_path / "det.jsonl"
    proc = subprocess.run([sys.executable, "-c", JSONL_AT_FILE_SIZE_LIMIT, str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "write failed: File too large" in proc.stdout, proc.stderr
    text = out.read_text()
    assert text.endswith("\n") and [json.loads(line)["frame"] for line in text.splitlines()] == [0]


# /health tells a stalled source apart from a running one -------------------------------------

def get_health(port: int) -> tuple[int, dict]:
    try:
        resp = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_health_is_503_when_the_last_frame_is_stale():
    from d3n.runtime.http import MetricsServer
    from d3n.runtime.stats import Stats

    stats = Stats()
    stats.frame_done(0)
    server = MetricsServer(stats, port=0, stale_after=3.0).start()
    try:
        code, body = get_health(server.port)
        assert code == 200 and body["status"] == "running"
        stats.last_result = time.monotonic() - 10  # no frame for 10 s
        code, body = get_health(server.port)
        assert code == 503 and body["status"] == "degraded"
        assert "no frame for 10" in body["reason"] and body["last_frame_age_s"] >= 10
    finally:
        server.stop()


def test_health_is_503_while_the_source_is_down(tiny_onnx, tmp_path):
    port, stop = free_port(), threading.Event()
    url = f"rtsp://127.0.0.1:{free_port()}/live"  # down: refused, retried forever
    t = threading.Thread(target=lambda: run_pipeline(tiny_onnx, url, metrics_port=port, stop_event=stop,
                                                     backoff=(0.1, 0.2), warmup=0), daemon=True)
    t.start()
    try:
        deadline, code, body = time.monotonic() + 20, None, {}
        while time.monotonic() < deadline and body.get("status") != "degraded":
            try:
                code, body = get_health(port)
            except OSError:  # not listening yet
                time.sleep(0.1)
        assert code == 503 and body["status"] == "degraded", body
        assert "reconnecting" in body["reason"] and url in body["reason"]
    finally:
        stop.set()
        t.join(20)
    assert not t.is_alive()
