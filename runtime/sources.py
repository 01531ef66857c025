"""Frame sources: cameras, V4L2 devices, GStreamer pipelines, RTSP/HTTP streams, video files,
image folders and globs, each read by its own capture thread.

Live sources (cameras, devices, pipelines, URLs) keep only the newest frame: when inference is
slower than the camera, older frames are dropped (and counted) instead of queueing up, so the
latency from capture to result stays bounded however long the runtime runs. A live source that
fails (read error, stream end) is reopened with exponential backoff, forever unless
`max_reconnects` bounds the consecutive failed attempts. Files and folders are read in order
through a bounded queue, no frame skipped; their end is the normal end of the run.
Corrupt frames (undecodable images or video packets, empty or wrongly shaped frames) are
counted, logged and skipped.
"""

from __future__ import annotations

import glob
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from d3n.errors import ConfigError, DataError
from d3n.runtime.stats import Stats

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
OPEN_TIMEOUT_MS = 5000  # a stream that accepts the connection but sends nothing is a failure


@dataclass
class Frame:
    """One captured frame (BGR uint8 HxWx3) with where and when it came from."""

    image: np.ndarray
    index: int  # position in the source (0-based; counts every frame the source produced)
    capture_time: float  # wall clock (time.time()) for logs and JSONL
    capture_mono: float  # monotonic clock, for latencies
    source_id: str
    name: str = ""  # file name for image sources


@dataclass
class SourceSpec:
    """What a `--source` string means. kind: camera|v4l2|gstreamer|url|video|images."""

    text: str
    kind: str
    live: bool
    paths: list[Path] = field(default_factory=list)


def parse_source(text: str) -> SourceSpec:
    """Classify a `--source` string (see module docstring); files must exist."""
    s = str(text).strip()
    if s.isdigit():
        return SourceSpec(s, "camera", True)
    if s.startswith("/dev/video"):
        return SourceSpec(s, "v4l2", True)
    if "!" in s:
        return SourceSpec(s, "gstreamer", True)
    if s.lower().startswith(URL_SCHEMES):
        return SourceSpec(s, "url", True)
    p = Path(s)
    if p.is_dir():
        paths = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS and f.is_file())
        if not paths:
            raise DataError(f"{p}: no images ({', '.join(sorted(IMAGE_EXTS))}) in this folder")
        return SourceSpec(s, "images", False, paths)
    if any(ch in s for ch in "*?["):
        paths = sorted(Path(f) for f in glob.glob(s, recursive=True)
                       if Path(f).suffix.lower() in IMAGE_EXTS and Path(f).is_file())
        if not paths:
            raise DataError(f"{s}: the glob matches no image files")
        return SourceSpec(s, "images", False, paths)
    if not p.exists():
        raise DataError(f"{s}: source not found (not a file, folder, glob, camera index, "
                        "/dev/video device, URL or GStreamer pipeline)")
    if p.suffix.lower() in IMAGE_EXTS:
        return SourceSpec(s, "images", False, [p])
    return SourceSpec(s, "video", False)


def check_frame(img) -> np.ndarray | None:
    """A usable BGR uint8 HxWx3 frame, converted if grey/BGRA; None if it is corrupt."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.size == 0:
        return None
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim != 3 or img.shape[0] < 2 or img.shape[1] < 2:
        return None
    if img.shape[2] == 3:
        return img
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if img.shape[2] == 1:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return None


def has_gstreamer() -> bool:
    info = cv2.getBuildInformation()
    line = next((ln for ln in info.splitlines() if "GStreamer:" in ln), "")
    return "YES" in line


def open_capture(spec: SourceSpec, timeout_ms: int = OPEN_TIMEOUT_MS) -> cv2.VideoCapture:
    """A cv2.VideoCapture for a camera/device/pipeline/URL/video spec (may be unopened).

    For URLs, `timeout_ms` bounds both opening and each read, so a stalled stream counts as a drop.
    """
    if spec.kind == "camera":
        return cv2.VideoCapture(int(spec.text))
    if spec.kind == "v4l2":
        return cv2.VideoCapture(spec.text, cv2.CAP_V4L2)
    if spec.kind == "gstreamer":
        return cv2.VideoCapture(spec.text, cv2.CAP_GSTREAMER)
    if spec.kind == "url":
        # TCP for RTSP unless the user configured FFmpeg: UDP loses packets and smears frames.
        os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")
        return cv2.VideoCapture(spec.text, cv2.CAP_FFMPEG,
                                [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms,
                                 cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms])
    return cv2.VideoCapture(spec.text)


class Source:
    """A capture thread over one source. `get()` returns Frames, then None at the end.

    After the end, `error` holds a message if the source failed (never opened, reconnects
    exhausted) rather than ending normally.
    """

    def __init__(self, spec: SourceSpec | str, stats: Stats | None = None,
                 max_reconnects: int | None = None, backoff: tuple[float, float] = (0.5, 10.0),
                 queue_size: int = 4, source_id: str | None = None, timeout_ms: int = OPEN_TIMEOUT_MS):
        self.spec = parse_source(spec) if isinstance(spec, str) else spec
        if self.spec.kind == "gstreamer" and not has_gstreamer():
            raise ConfigError(f"{self.spec.text!r}: this OpenCV build has no GStreamer support "
                              "(on Jetson use JetPack's OpenCV, not the pip wheel)")
        self.stats = stats or Stats()
        self.max_reconnects = max_reconnects
        self.backoff = backoff
        self.timeout_ms = timeout_ms
        self.source_id = source_id or self.spec.text
        self.error: str | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._latest: Frame | None = None
        self._cond = threading.Condition()
        self._index = 0
        self._thread = threading.Thread(target=self._run, name=f"capture:{self.spec.kind}", daemon=True)

    @property
    def live(self) -> bool:
        return self.spec.live

    def start(self) -> Source:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # consumer side
    def get(self, timeout: float = 0.5) -> Frame | None | bool:
        """The next frame; None when the source has ended; False if none arrived in `timeout`."""
        if self.live:
            with self._cond:
                if self._latest is None and not self._done.is_set():
                    self._cond.wait(timeout)
                frame, self._latest = self._latest, None
            if frame is not None:
                return frame
            return None if self._done.is_set() else False
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None if self._done.is_set() and self._queue.empty() else False

    # producer side
    def _publish(self, img: np.ndarray, name: str = "") -> None:
        t0 = time.monotonic()
        frame = Frame(img, self._index, time.time(), t0, self.source_id, name)
        self._index += 1
        if self.live:
            with self._cond:
                if self._latest is not None:
                    self.stats.add("frames_dropped")  # superseded before it was processed
                self._latest = frame
                self._cond.notify_all()
            return
        while not self._stop.is_set():  # files: block (back-pressure), never skip a frame
            try:
                self._queue.put(frame, timeout=0.2)
                return
            except queue.Full:
                continue

    def _corrupt(self, what: str) -> None:
        self.stats.add("corrupt_frames")
        log.warning("source %s: corrupt frame skipped (%s)", self.source_id, what)

    def _run(self) -> None:
        try:
            if self.spec.kind == "images":
                self._run_images()
            elif self.live:
                self._run_live()
            else:
                self._run_video()
        except Exception as exc:  # a capture thread must report, never die silently
            self.error = f"source {self.source_id}: capture failed: {exc!r}"
            log.exception("source %s: capture thread failed", self.source_id)
        finally:
            self._done.set()
            with self._cond:
                self._cond.notify_all()

    def _run_images(self) -> None:
        for path in self.spec.paths:
            if self._stop.is_set():
                return
            t0 = time.monotonic()
            img = check_frame(cv2.imread(str(path), cv2.IMREAD_COLOR))
            self.stats.observe("capture", time.monotonic() - t0)
            if img is None:
                self._index += 1
                self._corrupt(f"{path}: cannot decode image")
                continue
            self._publish(img, path.name)

    def _run_video(self) -> None:
        cap = open_capture(self.spec)
        if not cap.isOpened():
            self.error = f"{self.spec.text}: cannot open video file (corrupt or unsupported codec)"
            return
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        fail_pos, fails_here = -1, 0
        try:
            while not self._stop.is_set():
                t0 = time.monotonic()
                ok, img = cap.read()
                self.stats.observe("capture", time.monotonic() - t0)
                if ok:
                    fails_here = 0
                    img = check_frame(img)
                    if img is None:
                        self._index += 1
                        self._corrupt(f"{self.spec.text}: frame {self._index - 1} has a bad shape")
                        continue
                    self._publish(img)
                    continue
                # A failed read before the last frame is a damaged packet: skip it and go on.
                # The decoder position stops advancing at the real end (or past unreadable data).
                pos = int(cap.get(cv2.CAP_PROP_POS_FRAMES) or 0)
                if pos >= total or (pos == fail_pos and fails_here >= 2):
                    return
                if pos != fail_pos:
                    fail_pos, fails_here = pos, 0
                    self._index += 1
                    self._corrupt(f"{self.spec.text}: undecodable frame near position {pos}")
                fails_here += 1
        finally:
            cap.release()

    def _wait(self, seconds: float) -> bool:
        """Sleep unless stopped; True if stopped."""
        return self._stop.wait(seconds)

    def _run_live(self) -> None:
        delay, failed_opens, opened_before = self.backoff[0], 0, False
        while not self._stop.is_set():
            cap = open_capture(self.spec, self.timeout_ms)
            if not cap.isOpened():
                cap.release()
                failed_opens += 1
                if self.max_reconnects is not None and failed_opens > self.max_reconnects:
                    self.error = (f"source {self.source_id}: could not open after {failed_opens} "
                                  f"attempt{'s' * (failed_opens != 1)} (--max-reconnects "
                                  f"{self.max_reconnects})")
                    log.error("%s", self.error)
                    return
                log.warning("source %s: cannot open (attempt %d); retrying in %.1f s",
                            self.source_id, failed_opens, delay)
                if self._wait(delay):
                    return
                delay = min(delay * 2, self.backoff[1])
                continue
            if opened_before:
                self.stats.add("reconnects")
                log.info("source %s: reconnected after %d failed attempt%s", self.source_id,
                         failed_opens, "s" * (failed_opens != 1))
            else:
                log.info("source %s: opened (%s)", self.source_id, self.spec.kind)
            opened_before, failed_opens, delay = True, 0, self.backoff[0]
            self._read_live(cap)
            cap.release()
            if self._stop.is_set():
                return
            self.stats.add("source_drops")
            log.warning("source %s: stream dropped; reopening in %.1f s", self.source_id, delay)
            if self._wait(delay):
                return

    def _read_live(self, cap: cv2.VideoCapture) -> None:
        bad_in_a_row = 0
        while not self._stop.is_set():
            t0 = time.monotonic()
            ok, img = cap.read()
            self.stats.observe("capture", time.monotonic() - t0)
            if not ok:
                return
            img = check_frame(img)
            if img is None:
                self._index += 1
                bad_in_a_row += 1
                self._corrupt(f"bad frame from {self.spec.kind} source")
                if bad_in_a_row >= 100:  # a stream that only yields garbage: treat as dropped
                    return
                continue
            bad_in_a_row = 0
            self._publish(img)
