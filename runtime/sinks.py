"""Where detections go: JSONL, annotated video, defect crops, MQTT.

Sink specs on the command line: `jsonl:PATH`, `video:PATH`, `crops:DIR`,
`mqtt://HOST[:PORT]/TOPIC`. A sink that cannot be opened stops the run before it starts. A sink
that fails while running (full disk, unwritable file, broker error) is disabled, logged and
counted, and the others go on; when every sink has failed the run stops with an error.
File sinks also check free space, because cv2.VideoWriter reports no write errors at all.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import cv2
import numpy as np

from d3n.errors import ArtifactError, ConfigError
from d3n.runtime.postprocess import Detections
from d3n.runtime.sources import Frame
from d3n.runtime.swap import ModelId

log = logging.getLogger(__name__)

MIN_FREE_BYTES = 16 << 20  # stop writing before the disk is completely full
SPACE_CHECK_EVERY = 25  # frames between free-space checks


@dataclass
class Result:
    """One processed frame: the frame, its detections and when they were ready."""

    frame: Frame
    detections: Detections
    names: list[str]
    result_time: float  # wall clock
    latency: float  # seconds from capture to result
    model: ModelId | None = None  # the model that made the detections (hot swaps change it)

    def record(self) -> dict:
        """The JSON-ready line written by the JSONL and MQTT sinks."""
        f = self.frame
        rec = {"source": f.source_id, "frame": f.index, "capture_ts": round(f.capture_time, 6),
               "result_ts": round(self.result_time, 6), "latency_ms": round(self.latency * 1000, 3),
               "width": int(f.image.shape[1]), "height": int(f.image.shape[0])}
        if self.model is not None:  # every line traceable to its model, across hot swaps
            rec["model"], rec["model_sha256"] = self.model.file, self.model.short
        rec["detections"] = self.detections.to_list(self.names)
        if f.name:
            rec["name"] = f.name
        return rec


class Sink:
    """Base: `write(result)` per frame, `close()` once. Errors propagate to `SinkSet`."""

    kind = "sink"

    def __init__(self, target: str):
        self.target = target
        self._writes = 0

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.target}"

    def write(self, result: Result) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _check_space(self, path: Path) -> None:
        self._writes += 1
        if self._writes % SPACE_CHECK_EVERY:
            return
        free = shutil.disk_usage(path if path.is_dir() else path.parent).free
        if free < MIN_FREE_BYTES:
            raise OSError(errno.ENOSPC, f"less than {MIN_FREE_BYTES >> 20} MiB free", str(path))


def _cannot_open(kind: str, path: Path, exc: OSError) -> ArtifactError:
    return ArtifactError(f"{path}: cannot open {kind} sink ({exc.strerror or exc})")


class JsonlSink(Sink):
    """One JSON line per frame, appended (a restarted service keeps its history).

    Every line is whole: each record goes to the kernel in one unbuffered write, and a write
    that fails part-way (disk full) is cut back off, so no later line is glued onto a fragment.
    A fragment left by an older version or a crash (no final newline) is cut off, and logged,
    when the file is opened.
    """

    kind = "jsonl"

    def __init__(self, path: str | Path):
        super().__init__(str(path))
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "ab", buffering=0)  # unbuffered: one write() per line
        except OSError as exc:
            raise _cannot_open(self.kind, self.path, exc) from None
        self._regular = stat.S_ISREG(os.fstat(self._f.fileno()).st_mode)  # not /dev/full, a pipe
        if self._regular:
            try:
                self._cut_partial_line()
            except OSError as exc:
                self._f.close()
                raise _cannot_open(self.kind, self.path, exc) from None

    def _cut_partial_line(self) -> None:
        """Truncate a last line that has no newline: the next record would be glued onto it."""
        end = os.fstat(self._f.fileno()).st_size
        keep = _end_of_last_line(self.path, end)
        if keep == end:
            return
        os.ftruncate(self._f.fileno(), keep)
        log.warning("%s: cut a partial last line (%d bytes, from an interrupted write) before "
                    "appending", self.path, end - keep)

    def write(self, result: Result) -> None:
        data = (json.dumps(result.record(), separators=(",", ":")) + "\n").encode()
        start = os.fstat(self._f.fileno()).st_size if self._regular else 0
        try:
            done = 0
            while done < len(data):  # a short write (disk nearly full) is followed by an error
                done += self._f.write(data[done:])
        except OSError:
            if self._regular:
                self._truncate_quietly(start)
            raise
        self._check_space(self.path)

    def _truncate_quietly(self, size: int) -> None:
        """Drop the part of a record that did fit; the write's own error is what gets reported."""
        try:
            os.ftruncate(self._f.fileno(), size)
        except OSError as exc:
            log.error("%s: cannot remove a partly written line (%s)", self.path, exc.strerror)

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as exc:
            log.error("%s: closing failed (%s)", self.path, exc)


def _end_of_last_line(path: Path, size: int, block: int = 1 << 16) -> int:
    """The length of `path` up to and including its last newline (0 if it has none)."""
    with open(path, "rb") as f:
        pos = size
        while pos > 0:
            start = max(pos - block, 0)
            f.seek(start)
            chunk = f.read(pos - start)
            if pos == size and chunk.endswith(b"\n"):
                return size
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                return start + nl + 1
            pos = start
    return 0


def color_for(cid: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(cid * 7919 + 17)
    return tuple(int(v) for v in rng.integers(64, 256, 3))


def annotate(img: np.ndarray, det: Detections, names: list[str]) -> np.ndarray:
    """A copy of `img` with boxes and 'class score' labels drawn."""
    out = img.copy()
    for box, score, cid in zip(det.xyxy, det.scores, det.class_ids, strict=False):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        color = color_for(int(cid))
        cv2.rectangle(out, (x1, y1), (x2, y2), color, 2)
        label = f"{names[cid] if cid < len(names) else cid} {score:.2f}"
        cv2.putText(out, label, (x1, max(y1 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1,
                    cv2.LINE_AA)
    return out


class VideoSink(Sink):
    """Annotated video via cv2.VideoWriter (mp4v for .mp4/.mov, MJPG for .avi).

    With several sources (`per_source`), each gets its own file, `PATH` with the source's name
    before the suffix (`out.mp4` -> `out.cam1.mp4`): one video mixing cameras (and sizes) would
    be of no use.
    """

    kind = "video"
    FOURCC = {".mp4": "mp4v", ".mov": "mp4v", ".m4v": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}

    def __init__(self, path: str | Path, fps: float = 25.0, per_source: bool = False):
        super().__init__(str(path))
        self.path = Path(path)
        self.fps = fps
        self.per_source = per_source
        if self.path.suffix.lower() not in self.FOURCC:
            raise ConfigError(f"{self.path}: video sink needs one of {', '.join(self.FOURCC)}")
        try:  # fail now, not on the first frame, if the file cannot be created
            self.path.parent.mkdir(parents=True, exist_ok=True)
            probe = self.path.with_name(f".{self.path.name}.d3n-write-test") if per_source else self.path
            probe.touch()
            if per_source:
                probe.unlink()
        except OSError as exc:
            raise _cannot_open(self.kind, self.path, exc) from None
        self._writers: dict[str, tuple[cv2.VideoWriter, tuple[int, int], Path]] = {}

    def path_for(self, source_id: str) -> Path:
        if not self.per_source:
            return self.path
        return self.path.with_name(f"{self.path.stem}.{_safe(source_id)}{self.path.suffix}")

    def _open(self, source_id: str, w: int, h: int):
        path = self.path_for(source_id)
        fourcc = cv2.VideoWriter_fourcc(*self.FOURCC[self.path.suffix.lower()])
        writer = cv2.VideoWriter(str(path), fourcc, self.fps, (w, h))
        if not writer.isOpened():
            raise OSError(errno.EIO, "cv2.VideoWriter cannot open the file", str(path))
        self._writers[source_id] = (writer, (w, h), path)
        return self._writers[source_id]

    def write(self, result: Result) -> None:
        img = annotate(result.frame.image, result.detections, result.names)
        h, w = img.shape[:2]
        key = result.frame.source_id if self.per_source else ""
        writer, size, path = self._writers.get(key) or self._open(key, w, h)
        if (w, h) != size:  # a reconnected camera may come back at another resolution
            img = cv2.resize(img, size)
        writer.write(img)
        self._check_space(path)

    def close(self) -> None:
        for writer, _, _ in self._writers.values():
            writer.release()


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[-40:].strip("_") or "src"


class CropsSink(Sink):
    """One JPEG per detection: DIR/<source>_<frame>_<k>_<class>.jpg."""

    kind = "crops"

    def __init__(self, directory: str | Path, margin: int = 4):
        super().__init__(str(directory))
        self.dir = Path(directory)
        self.margin = margin
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".d3n-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise _cannot_open(self.kind, self.dir, exc) from None

    def write(self, result: Result) -> None:
        img, det = result.frame.image, result.detections
        h, w = img.shape[:2]
        src = _safe(result.frame.name or result.frame.source_id)
        for k, (box, cid) in enumerate(zip(det.xyxy, det.class_ids, strict=False)):
            x1, y1 = max(int(box[0]) - self.margin, 0), max(int(box[1]) - self.margin, 0)
            x2, y2 = min(int(np.ceil(box[2])) + self.margin, w), min(int(np.ceil(box[3])) + self.margin, h)
            if x2 <= x1 or y2 <= y1:
                continue
            name = result.names[cid] if cid < len(result.names) else str(cid)
            path = self.dir / f"{src}_{result.frame.index:08d}_{k:02d}_{_safe(name)}.jpg"
            if not cv2.imwrite(str(path), img[y1:y2, x1:x2]):
                raise OSError(errno.EIO, "cv2.imwrite failed", str(path))
        self._check_space(self.dir)


class MqttSink(Sink):
    """Publishes each frame's record as JSON to mqtt://host:port/topic (paho-mqtt, optional).

    paho's network loop runs in its own thread and reconnects to the broker by itself; a publish
    while disconnected is dropped by paho and counted here.
    """

    kind = "mqtt"

    def __init__(self, url: str, qos: int = 0, connect_wait: float = 3.0):
        super().__init__(url)
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise ConfigError("the MQTT sink needs paho-mqtt: pip install 'd3n[mqtt]'") from None
        u = urlparse(url)
        self.topic = u.path.lstrip("/")
        if not u.hostname or not self.topic:
            raise ConfigError(f"{url}: MQTT sink wants mqtt://HOST[:PORT]/TOPIC")
        self.qos = qos
        self.dropped = 0
        api = getattr(mqtt, "CallbackAPIVersion", None)
        self.client = mqtt.Client(api.VERSION2) if api else mqtt.Client()
        if u.username:
            self.client.username_pw_set(u.username, u.password)
        self.client.reconnect_delay_set(1, 30)
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect_async(u.hostname, u.port or 1883)
        self.client.loop_start()
        self._mqtt = mqtt
        self._last = None
        if not connected.wait(connect_wait):  # not fatal: paho keeps retrying in the background
            log.warning("%s: broker not reachable yet; messages are dropped until it is", url)

    def write(self, result: Result) -> None:
        info = self.client.publish(self.topic, json.dumps(result.record()), qos=self.qos)
        self._last = info
        if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("%s: broker not reachable, %d message(s) dropped", self.target, self.dropped)

    def close(self) -> None:
        if self._last is not None and self._last.rc == self._mqtt.MQTT_ERR_SUCCESS:
            try:  # let the network thread send what is queued before disconnecting
                self._last.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()


def parse_sink(spec: str, fps: float = 25.0, per_source: bool = False) -> Sink:
    """Build a sink from its command-line spec (see module docstring). `per_source`: the run
    has several sources (a video sink then writes one file per source)."""
    if spec.startswith("mqtt://"):
        return MqttSink(spec)
    kind, sep, target = spec.partition(":")
    if not sep or not target:
        raise ConfigError(f"--sink {spec!r}: expected jsonl:PATH, video:PATH, crops:DIR or mqtt://HOST/TOPIC")
    if kind == "jsonl":
        return JsonlSink(target)
    if kind == "video":
        return VideoSink(target, fps=fps, per_source=per_source)
    if kind == "crops":
        return CropsSink(target)
    raise ConfigError(f"--sink {spec!r}: unknown sink '{kind}' (jsonl, video, crops, mqtt)")


class SinkSet:
    """Fans a result out to every live sink; a failing sink is disabled and counted."""

    def __init__(self, sinks: list[Sink], stats=None):
        self.sinks = list(sinks)
        self.stats = stats
        self.failed: dict[str, str] = {}

    @property
    def all_failed(self) -> bool:
        return bool(self.sinks) and len(self.failed) == len(self.sinks)

    def write(self, result: Result) -> None:
        for sink in self.sinks:
            if sink.label in self.failed:
                continue
            try:
                sink.write(result)
            except (OSError, ValueError, cv2.error) as exc:
                reason = f"{exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
                self.failed[sink.label] = reason
                if self.stats is not None:
                    self.stats.sink_failed(sink.label)
                log.error("sink %s failed at frame %d and is disabled: %s", sink.label,
                          result.frame.index, reason)
                try:
                    sink.close()
                except Exception:  # noqa: BLE001 - closing a broken sink may fail again
                    pass

    def close(self) -> None:
        for sink in self.sinks:
            if sink.label not in self.failed:
                try:
                    sink.close()
                except OSError as exc:
                    self.failed[sink.label] = str(exc)
                    log.error("sink %s failed while closing: %s", sink.label, exc)
