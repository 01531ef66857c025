"""Frame sources: cameras, V4L2 devices, GStreamer pipelines, RTSP/HTTP streams, video files,
image folders and globs, each read by its own capture thread.

Live sources (cameras, devices, pipelines, URLs) keep only the newest frame: when inference is
slower than the camera, older frames are dropped (and counted) instead of queueing up, so the
latency from capture to result stays bounded however long the runtime runs. A live source that
fails (read error, stream end) is reopened with exponential backoff, forever unless
`max_reconnects` = N allows N retries of a failed open in a row (N + 1 attempts). Files and folders are read in order
through a bounded queue, no frame skipped; their end is the normal end of the run.
Corrupt frames (undecodable images or video packets, empty or wrongly shaped frames) are
counted, logged and skipped; a damaged stretch inside a video file is stepped over (see
`VideoReader`), so only the real end of the file ends the run.

A run may read several sources (`--source` repeated, `--sources FILE`): each is a `Source` of
its own, named (`source_entries`), and counts into the run's stats under its name.
"""

from __future__ import annotations

import glob
import logging
import os
import queue
import re
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


def _live_kind(s: str) -> str | None:
    """The kind of a live source string (camera, v4l2, gstreamer, url), None for a path."""
    if s.isdigit():
        return "camera"
    if s.startswith("/dev/video"):
        return "v4l2"
    if "!" in s:
        return "gstreamer"
    if s.lower().startswith(URL_SCHEMES):
        return "url"
    return None


def parse_source(text: str) -> SourceSpec:
    """Classify a `--source` string (see module docstring); files must exist."""
    s = str(text).strip()
    kind = _live_kind(s)
    if kind is not None:
        return SourceSpec(s, kind, True)
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


# Several sources ---------------------------------------------------------------------------

# NAME=URI: the name is a short token; GStreamer strings ("v4l2src device=...") have a space
# before their first '=', URLs a ':' or '/', so neither is taken for a name.
NAME_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\s*=(.*)", re.DOTALL)


@dataclass
class SourceEntry:
    """One source of a run: its name (on every JSONL line, metric label and /health entry),
    what it is, and where it was given (`--source` or FILE:LINE) for error messages."""

    name: str
    spec: SourceSpec
    origin: str = "--source"


def split_name(text: str, base: Path | None = None) -> tuple[str | None, str]:
    """'cam1=rtsp://...' -> ('cam1', 'rtsp://...'); a text without a name -> (None, text).
    An existing path containing '=' (relative to `base` if given) is a path, not a name."""
    s = str(text).strip()
    m = NAME_RE.fullmatch(s)
    if m is None or (base or Path()).joinpath(s).exists():
        return None, s
    return m.group(1), m.group(2).strip()


def _resolve(uri: str, base: Path) -> str:
    """A relative path in a sources file is relative to that file's folder, so the file works
    from whatever directory the service starts in; live sources are left alone."""
    if _live_kind(uri) is not None or Path(uri).is_absolute():
        return uri
    return str(base / uri)


def _entry(name: str | None, uri: str, origin: str, base: Path | None = None
           ) -> tuple[str | None, SourceSpec, str]:
    if not uri:
        raise DataError(f"{origin}: '{name}=' gives no URI or path after the name")
    try:
        return name, parse_source(uri if base is None else _resolve(uri, base)), origin
    except DataError as exc:
        if origin == "--source":
            raise  # the message already names the source, as it always has
        raise DataError(f"{origin}: {exc}") from None


def read_sources_file(path: str | Path) -> list[tuple[str | None, SourceSpec, str]]:
    """The sources listed in a `--sources` file: one per line, `NAME=URI` or `URI`; blank lines
    and lines starting with '#' are skipped. A line that is no camera, device, pipeline, URL,
    file, folder or glob is an error naming the file and line."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a text file"
        raise DataError(f"{p}: cannot read the sources file ({reason})") from None
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#"):
            out.append(_entry(*split_name(s, p.parent), f"{p}:{no}", p.parent))
    if not out:
        raise DataError(f"{p}: no source in the sources file (one URI or path per line, "
                        "optionally NAME=URI; '#' starts a comment)")
    return out


def source_entries(texts: list[str] = (), sources_file: str | Path | None = None) -> list[SourceEntry]:
    """The run's sources, `--source` texts first, then the `--sources` file, each named: NAME=URI
    names it, else `srcK` (K: its position). A lone unnamed `--source` keeps its own text as its
    name, as single-source runs always have. Names must be unique."""
    raw = [_entry(*split_name(t), "--source") for t in texts]
    if sources_file is not None:
        raw += read_sources_file(sources_file)
    if not raw:
        raise ConfigError("no source: give --source (repeatable) or --sources FILE")
    entries, seen = [], {}
    for k, (name, spec, origin) in enumerate(raw):
        if name is None:
            name = spec.text if len(raw) == 1 and origin == "--source" else f"src{k}"
        if name in seen:
            raise ConfigError(f"{origin}: source name '{name}' is already used ({seen[name]}); "
                              "names must be unique")
        seen[name] = origin
        entries.append(SourceEntry(name, spec, origin))
    return entries


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


class VideoReader:
    """Reads a video file in order, stepping over damaged stretches instead of ending there.

    OpenCV's read() fails for each packet of a damaged stretch and then decodes again from the
    next intact frame, so a failure is first retried (`READ_RETRIES` reads). If that does not
    get past the damage (a demuxer that lost its place), the file is reopened and sought further
    on, twice as far each time (`SEEK_TRIES` attempts). OpenCV's frame position counts decoded
    frames only, so the frames lost are counted from the timestamps: over the few reads after a
    failure (the decoder still hands out frames it held before the gap), a jump of more than
    one frame interval is a gap. The interval is the one seen between intact frames, because
    the header's frame rate and frame count can be wrong (an MPEG-4 AVI may claim twice its
    frames). The end is the header's frame count or duration when reached, else a failure that
    neither reading on nor seeking gets past. Frames a demuxer skips silently (no failed read)
    are not counted.
    """

    READ_RETRIES = 64  # failed reads in a row before seeking (about one per damaged packet)
    SEEK_TRIES = 8  # reopen + seek attempts: 1, 2, 4, ... 128 frames past the last good one
    SUSPECT_READS = 16  # reads after a failure in which a timestamp jump means lost frames

    def __init__(self, path: str):
        self.path = path
        self.cap = cv2.VideoCapture(path)
        self.opened = self.cap.isOpened()
        self.total = max(int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 0) if self.opened else 0
        fps = self.cap.get(cv2.CAP_PROP_FPS) if self.opened else 0.0
        self.step_ms = 1000.0 / fps if fps and fps > 0 else None  # refined from the frames read
        self.duration_ms = self.total * self.step_ms if self.total and self.step_ms else None
        self.index = -1  # position of the last frame returned
        self.last_ms: float | None = None
        self.suspect = 0  # reads left in which a timestamp jump counts as lost frames

    def read(self) -> tuple[np.ndarray, int] | None:
        """(the next decodable frame, frames lost just before it), or None at the end."""
        ok, img = self.cap.read()
        if ok:
            return img, self._landed(0)
        if self.at_end():
            return None
        for failed in range(1, self.READ_RETRIES + 1):
            ok, img = self.cap.read()
            if ok:
                return img, self._landed(failed)
        return self._seek_past()

    def at_end(self) -> bool:
        """Whether the last frame read is the file's last by its header: by frame count, or by
        time (count / rate), which still holds when frames were skipped or the rate is off."""
        if not self.total:
            return False
        if self.index + 1 >= self.total:
            return True
        return (self.duration_ms is not None and self.last_ms is not None
                and self.last_ms + 1.5 * self.step_ms > self.duration_ms)

    def _seek_past(self) -> tuple[np.ndarray, int] | None:
        first = self.index + 1  # the first frame not read
        for attempt in range(self.SEEK_TRIES):
            skip = 2 ** attempt
            if self.total and first + skip >= self.total:
                break
            self.cap.release()  # a fresh demuxer: the old one may be stuck in the damage
            self.cap = cv2.VideoCapture(self.path)
            self._seek(first + skip)
            ok, img = self.cap.read()
            # Never step back: a wrong header can map a frame number to an earlier time.
            if ok and (self.last_ms is None or self.cap.get(cv2.CAP_PROP_POS_MSEC) > self.last_ms):
                return img, self._landed(skip)
        return None

    def _seek(self, frame: int) -> None:
        """Seek to `frame`: by time from the last frame read when possible, because the
        header's frame rate, which OpenCV turns frame numbers into times with, can be wrong."""
        if self.last_ms is None or not self.step_ms:
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, frame)
        else:
            self.cap.set(cv2.CAP_PROP_POS_MSEC, self.last_ms + (frame - self.index) * self.step_ms)

    def _landed(self, failed: int) -> int:
        """Book the frame just read after `failed` failures (reads, or frames sought past);
        returns the frames lost just before it."""
        ms = self.cap.get(cv2.CAP_PROP_POS_MSEC)
        if failed:
            self.suspect = self.SUSPECT_READS
        lost = 0
        if self.suspect:
            self.suspect -= 1
            lost = self._gap(ms, failed)
        elif self.last_ms is not None and ms > self.last_ms:
            self.step_ms = ms - self.last_ms  # intact frames: the real frame interval
        self.index += 1 + lost
        self.last_ms = ms
        return lost

    def _gap(self, ms: float, fallback: int) -> int:
        """Frames missing between the last frame read and one at `ms` (timestamps when usable)."""
        if not self.step_ms:
            return fallback
        prev = self.last_ms if self.last_ms is not None else -self.step_ms
        if ms <= prev:
            return fallback  # no usable timestamps
        return max(int(round((ms - prev) / self.step_ms)) - 1, 0)

    def release(self) -> None:
        self.cap.release()


class Source:
    """A capture thread over one source. `get()` returns Frames, then None at the end.

    `opened` is set once the source has opened (files at once). `down_reason` says why a live
    source is down while it is being reopened (None while it delivers). After the end, `error`
    holds a message if the source failed (never opened, reconnects exhausted) rather than ending
    normally, and `stop_reason` the short form for the run summary.
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
        self.stop_reason: str | None = None
        self.down_reason: str | None = None
        self.opened = threading.Event()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._latest: Frame | None = None
        self._cond = threading.Condition()
        self._index = 0
        self.wake = None  # an object with notify(), told of every new frame and of the end
        self._thread = threading.Thread(target=self._run, name=f"capture:{self.source_id}", daemon=True)

    @property
    def live(self) -> bool:
        return self.spec.live

    @property
    def label(self) -> str:
        """The name, and what it stands for when that differs: errors say which camera."""
        return self.source_id if self.source_id == self.spec.text else f"{self.source_id} ({self.spec.text})"

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

    @property
    def ended(self) -> bool:
        """The capture thread has finished (end of the source, a failure or a stop)."""
        return self._done.is_set()

    @property
    def state(self) -> str:
        """starting (not opened yet), running, reconnecting (down, being reopened), ended (a
        file or folder read to its end, or stopped) or lost (failed for good)."""
        if self.ended:
            return "lost" if self.error else "ended"
        if self.down_reason:
            return "reconnecting"
        return "running" if self.opened.is_set() else "starting"

    # consumer side
    def get(self, timeout: float = 0.5) -> Frame | None | bool:
        """The next frame; None when the source has ended; False if none arrived in `timeout`
        (0: do not wait)."""
        if self.live:
            with self._cond:
                if self._latest is None and not self._done.is_set() and timeout > 0:
                    self._cond.wait(timeout)
                frame, self._latest = self._latest, None
            if frame is not None:
                return frame
            return None if self._done.is_set() else False
        try:
            return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None if self._done.is_set() and self._queue.empty() else False

    def poll(self) -> Frame | None | bool:
        """`get` without waiting: the batcher polls every source and waits on `wake` instead."""
        return self.get(timeout=0)

    def _notify(self) -> None:
        if self.wake is not None:
            self.wake.notify()

    # producer side
    def _publish(self, img: np.ndarray, name: str = "") -> None:
        t0 = time.monotonic()
        frame = Frame(img, self._index, time.time(), t0, self.source_id, name)
        self._index += 1
        if self.live:
            with self._cond:
                if self._latest is not None:
                    self.stats.add("frames_dropped", source=self.source_id)  # superseded before it was processed
                self._latest = frame
                self._cond.notify_all()
            self._notify()
            return
        while not self._stop.is_set():  # files: block (back-pressure), never skip a frame
            try:
                self._queue.put(frame, timeout=0.2)
                self._notify()
                return
            except queue.Full:
                continue

    def _corrupt(self, what: str) -> None:
        self.stats.add("corrupt_frames", source=self.source_id)
        log.warning("source %s: corrupt frame skipped (%s)", self.source_id, what)

    def _fail(self, reason: str, error: str) -> None:
        """End the source as failed: `reason` for the summary, `error` for the log and exit."""
        self.stop_reason, self.error = reason, error
        log.error("%s", error)

    def _run(self) -> None:
        try:
            if self.spec.kind == "images":
                self._run_images()
            elif self.live:
                self._run_live()
            else:
                self._run_video()
        except Exception as exc:  # a capture thread must report, never die silently
            self.stop_reason = "source failed: capture error"
            self.error = f"source {self.label}: capture failed: {exc!r}"
            log.exception("source %s: capture thread failed", self.source_id)
        finally:
            self._done.set()
            with self._cond:
                self._cond.notify_all()
            self._notify()

    def _run_images(self) -> None:
        self.opened.set()  # parse_source found the files; each is checked as it is read
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
        reader = VideoReader(self.spec.text)
        if not reader.opened:
            self._fail("source failed: cannot open the video file",
                       f"{self.spec.text}: cannot open video file (corrupt or unsupported codec)")
            return
        self.opened.set()
        try:
            while not self._stop.is_set():
                t0 = time.monotonic()
                got = reader.read()
                self.stats.observe("capture", time.monotonic() - t0)
                if got is None:
                    break
                self._video_frame(reader, *got)
        finally:
            reader.release()
        if not self._stop.is_set() and reader.total and not reader.at_end():
            log.warning("source %s: no decodable frame after frame %d, though the header says "
                        "%d frames: ending (damaged or truncated end of the file?)",
                        self.source_id, reader.index, reader.total)

    def _video_frame(self, reader: VideoReader, img: np.ndarray, lost: int) -> None:
        if lost:  # the gap shows in the frame numbers too
            self.stats.add("corrupt_frames", lost, source=self.source_id)
            log.warning("source %s: frames %d-%d undecodable (damaged data): %d frame%s lost, "
                        "reading on", self.source_id, reader.index - lost, reader.index - 1, lost,
                        "s" * (lost != 1))
        self._index = reader.index
        img = check_frame(img)
        if img is None:
            self._index += 1
            self._corrupt(f"{self.spec.text}: frame {reader.index} has a bad shape")
            return
        self._publish(img)

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
                    self._give_up(failed_opens, opened_before)
                    return
                self.down_reason = (f"source {self.label} down: reconnecting ({failed_opens} "
                                    f"failed attempt{'s' * (failed_opens != 1)})")
                log.warning("source %s: cannot open (attempt %d); retrying in %.1f s",
                            self.source_id, failed_opens, delay)
                if self._wait(delay):
                    return
                delay = min(delay * 2, self.backoff[1])
                continue
            if opened_before:
                self.stats.add("reconnects", source=self.source_id)
                log.info("source %s: reconnected after %d failed attempt%s", self.source_id,
                         failed_opens, "s" * (failed_opens != 1))
            else:
                log.info("source %s: opened (%s)", self.label, self.spec.kind)
            opened_before, failed_opens, delay = True, 0, self.backoff[0]
            self.down_reason = None
            self.opened.set()
            self._read_live(cap)
            cap.release()
            if self._stop.is_set():
                return
            self.stats.add("source_drops", source=self.source_id)
            self.down_reason = f"source {self.label} down: stream dropped, reconnecting"
            log.warning("source %s: stream dropped; reopening in %.1f s", self.source_id, delay)
            if self._wait(delay):
                return

    def _give_up(self, attempts: int, opened_before: bool) -> None:
        """--max-reconnects is spent: say whether the source was lost or never there."""
        s, bound = "s" * (attempts != 1), f"(--max-reconnects {self.max_reconnects})"
        if opened_before:
            self._fail(f"source lost: {attempts} reconnect attempt{s} failed {bound}",
                       f"source {self.label}: lost; {attempts} reconnect attempt{s} failed {bound}")
        else:
            self._fail(f"source never opened: {attempts} attempt{s} failed {bound}",
                       f"source {self.label}: could not open after {attempts} attempt{s} {bound}")

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
