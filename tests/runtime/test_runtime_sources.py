"""Source parsing, frame checks, the live latest-frame slot and bounded reconnects."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import free_port

from d3n.errors import DataError
from d3n.runtime.sources import Source, SourceSpec, check_frame, parse_source
from d3n.runtime.stats import Stats


def test_parse_source_kinds(tmp_path, image_dir, video_avi):
    assert parse_source("0").kind == "camera"
    assert parse_source("/dev/video2").kind == "v4l2"
    gst = "nvarguscamerasrc ! video/x-raw(memory:NVMM) ! nvvidconv ! appsink"
    assert parse_source(gst).kind == "gstreamer"
    for url in ("rtsp://cam/1", "http://host/stream.mjpg", "rtmp://x/y"):
        spec = parse_source(url)
        assert spec.kind == "url" and spec.live
    folder = parse_source(str(image_dir))
    assert folder.kind == "images" and not folder.live and len(folder.paths) == 8
    assert [p.name for p in parse_source(f"{image_dir}/*_00[12].jpg").paths] == ["img_001.jpg", "img_002.jpg"]
    assert parse_source(str(video_avi)).kind == "video"
    with pytest.raises(DataError, match="source not found"):
        parse_source(str(tmp_path / "missing.mp4"))
    with pytest.raises(DataError, match="matches no image"):
        parse_source(str(tmp_path / "*.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        parse_source(str(tmp_path / "empty"))


def test_check_frame():
    assert check_frame(None) is None
    assert check_frame(np.zeros((0, 5, 3), np.uint8)) is None
    assert check_frame(np.zeros((4, 5, 3), np.float32)) is None
    assert check_frame(np.zeros((4, 5, 7), np.uint8)) is None
    assert check_frame(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    assert check_frame(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)


def test_live_source_keeps_only_the_newest_frame():
    stats = Stats()
    src = Source(SourceSpec("0", "camera", True), stats)  # thread not started: feed it by hand
    for i in range(5):
        src._publish(np.full((4, 4, 3), i, np.uint8))
    frame = src.get(timeout=0.1)
    assert frame.index == 4 and frame.image[0, 0, 0] == 4  # the newest, not the oldest
    assert stats.counters["frames_dropped"] == 4
    assert src.get(timeout=0.05) is False  # nothing new yet; the source has not ended


def test_file_source_yields_every_frame_in_order(video_avi):
    stats = Stats()
    src = Source(str(video_avi), stats, queue_size=2).start()
    got = []
    while (f := src.get(timeout=2)) is not None:
        if f is not False:
            got.append(f.index)
            time.sleep(0.002)  # a slow consumer must not make the reader skip frames
    assert got == list(range(60)) and stats.counters["frames_dropped"] == 0 and src.error is None


def test_unreachable_stream_gives_up_after_bound_with_backoff():
    stats = Stats()
    t0 = time.monotonic()  # before start(): the first attempt and its backoff may begin at once
    src = Source(f"rtsp://127.0.0.1:{free_port()}/x", stats, max_reconnects=2, backoff=(0.1, 0.15)).start()
    assert src.get(timeout=10) is None
    src.join(30)  # each refused attempt can take seconds on a loaded machine
    assert "could not open after 3 attempts" in src.error
    assert time.monotonic() - t0 >= 0.1 + 0.15  # waited (capped backoff) between the attempts
    assert stats.counters["reconnects"] == 0
