"""The overlapped pipeline: capture -> preprocess -> infer -> postprocess + sinks.

Each stage runs in its own thread, joined by small bounded queues, so while the model runs on
frame n the next frame is already letterboxed and the previous one is being decoded and written.
ONNX Runtime and TensorRT release the GIL during inference, so end-to-end throughput approaches
model-only throughput. Bounded queues keep memory and latency flat; live sources additionally
keep only their newest frame (see sources.py).

Public API (used by `d3n run` and `d3n bench`):

    stats = run_pipeline("model.onnx", "video.mp4", sinks=["jsonl:out.jsonl"], conf=0.25)

returns a dict: frames, fps (recent window), mean_fps (whole run), latency_ms per stage
({"p50", "p99"}), frames_dropped, source_drops, reconnects, corrupt_frames, sink_failures,
backend, model ({"file", "sha256"} of the last model), model_swaps ({"ok", "refused"}),
source_error, failed_sinks, stopped_by.

With `watch=True` the model path is polled and a new model is swapped in between two frames
(see swap.py): each queued frame carries the model it was prepared for.

Start-up order: model, source check and metrics port first, then warm-up, then the source is
opened, and only then are the sinks created: a run that cannot start (bad model, source or
option, busy port, a source that never opens) leaves no empty output file behind.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

from d3n.errors import ConfigError
from d3n.runtime.backends import Backend, open_backend
from d3n.runtime.http import STALE_AFTER_S, MetricsServer
from d3n.runtime.postprocess import class_thresholds, postprocess
from d3n.runtime.preprocess import prepare
from d3n.runtime.roi import RoiMask
from d3n.runtime.sinks import Result, Sink, SinkSet, parse_sink
from d3n.runtime.sources import Source
from d3n.runtime.stats import Stats
from d3n.runtime.swap import Model, ModelSlot, ModelWatcher

log = logging.getLogger(__name__)

_END = object()  # passed down the stages when the source ends or a stop is requested


def resolve_class_conf(class_conf: dict[str, float] | None, names: list[str]) -> dict[int, float]:
    """{class name: threshold} -> {class id: threshold}; unknown names are an error."""
    out = {}
    for name, value in (class_conf or {}).items():
        if name not in names:
            raise ConfigError(f"--class-conf: unknown class '{name}' (model classes: {', '.join(names)})")
        if not 0.0 <= float(value) <= 1.0:
            raise ConfigError(f"--class-conf: threshold for '{name}' must be in [0, 1], got {value}")
        out[names.index(name)] = float(value)
    return out


class _Runner:
    def __init__(self, slot: ModelSlot, source: Source, sinks: SinkSet, stats: Stats, *,
                 conf: float, iou: float, max_det: int, class_conf: dict[int, float],
                 roi: RoiMask | None, max_fps: float | None, max_frames: int | None,
                 stop_event: threading.Event, on_result=None):
        self.slot, self.source, self.sinks, self.stats = slot, source, sinks, stats
        # A swapped-in model has the same class names (swap.py refuses others): same thresholds.
        self.thresholds = class_thresholds(len(slot.active.names), conf, class_conf)
        self.iou, self.max_det, self.roi = iou, max_det, roi
        self.max_fps, self.max_frames = max_fps, max_frames
        self.stop_event = stop_event
        self.on_result = on_result
        live = source.live
        self.q_infer: queue.Queue = queue.Queue(maxsize=1 if live else 2)
        self.q_post: queue.Queue = queue.Queue(maxsize=1 if live else 2)
        self.abort = threading.Event()  # a stage failed: everyone stops
        self.errors: list[BaseException] = []
        self.stopped_by = "end of source"
        self.phase = "warming up the model"  # what /health says before the first frame

    def health_state(self) -> tuple[str, str | None]:
        """(status, reason) for /health; the HTTP server adds the staleness check."""
        if self.stop_event.is_set() or self.abort.is_set():
            return "stopping", "the run is ending"
        if self.source.down_reason:
            return "degraded", self.source.down_reason
        if not self.stats.counters["frames"]:
            return "starting", self.phase
        return "running", None

    def _put(self, q: queue.Queue, item) -> bool:
        while not self.abort.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue):
        while not self.abort.is_set():
            try:
                return q.get(timeout=0.2)
            except queue.Empty:
                continue
        return _END

    def _drain(self, q: queue.Queue):
        """The items of `q` up to the end marker (or an abort)."""
        while (item := self._get(q)) is not _END:
            yield item

    def _guard(self, fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by run_pipeline
                log.exception("pipeline stage %s failed", fn.__name__)
                self.errors.append(exc)
                self.abort.set()
        return run

    def preprocess_stage(self) -> None:
        taken, next_t, last_index = 0, time.monotonic(), None
        while not self.abort.is_set():
            model = self.slot.current(last_index)  # a hot swap takes effect here, between frames
            if self.stop_event.is_set() or (self.max_frames is not None and taken >= self.max_frames):
                break
            if self.max_fps:
                wait = next_t - time.monotonic()
                if wait > 0 and self.stop_event.wait(wait):
                    break
                next_t = max(next_t + 1.0 / self.max_fps, time.monotonic())
            frame = self.source.get(timeout=0.2)
            if frame is False:
                continue
            if frame is None:
                break
            t0 = time.monotonic()
            blob, lb = prepare(frame.image, model.input_hw, model.preprocess)
            self.stats.observe("preprocess", time.monotonic() - t0)
            taken, last_index = taken + 1, frame.index
            self.slot.prepared(model)
            if not self._put(self.q_infer, (frame, model, blob, lb)):
                return
        self._put(self.q_infer, _END)

    def infer_stage(self) -> None:
        for frame, model, blob, lb in self._drain(self.q_infer):
            t0 = time.monotonic()
            out = model.backend.infer(blob)  # the model the blob was prepared for, even after a swap
            self.stats.observe("infer", time.monotonic() - t0)
            self.slot.inferred(model)
            if not self._put(self.q_post, (frame, model, out, lb)):
                return
        self._put(self.q_post, _END)

    def post_stage(self) -> None:
        for frame, model, out, lb in self._drain(self.q_post):
            t0 = time.monotonic()
            det = postprocess(out, lb, self.thresholds, model.kind, self.iou, self.max_det,
                              model.box_format)
            if self.roi is not None:
                det = self.roi.filter(det, frame.image.shape)
            t1 = time.monotonic()
            self.stats.observe("postprocess", t1 - t0)
            result = Result(frame, det, model.names, time.time(), t1 - frame.capture_mono, model.id)
            self.stats.observe("end_to_end", result.latency)
            self.sinks.write(result)
            self.stats.observe("sinks", time.monotonic() - t1)
            self.stats.frame_done(len(det))
            if self.on_result is not None:
                self.on_result(result)
            if self.sinks.all_failed:
                self.stopped_by = "all sinks failed"
                self.stop_event.set()


def run_pipeline(model: str | Path | Backend, source: str | Source, sinks=(), *,
                 conf: float = 0.25, iou: float = 0.7, max_det: int = 300,
                 class_conf: dict[str, float] | None = None, roi: str | Path | RoiMask | None = None,
                 device: str = "auto", warmup: int = 1, max_fps: float | None = None,
                 max_frames: int | None = None, duration: float | None = None,
                 max_reconnects: int | None = None, backoff: tuple[float, float] = (0.5, 10.0),
                 metrics_port: int | None = None, metrics_host: str = "127.0.0.1",
                 stop_event: threading.Event | None = None, on_result=None,
                 stats: Stats | None = None, video_fps: float = 25.0,
                 status_every: float = 60.0, watch: bool = False,
                 watch_interval: float = 2.0) -> dict:
    """Run `model` on `source` until the source ends, `max_frames`/`duration` is reached or
    `stop_event` is set; returns the run's stats (see module docstring).

    model: a model path or release folder (opened with `open_backend(model, device)`) or an
    opened Backend (not closed here).
    source: a `--source` string or a Source. sinks: sink specs (`jsonl:PATH`, ...) or Sinks.
    class_conf: {class name: threshold} overriding `conf`. roi: mask image path or RoiMask.
    max_reconnects: consecutive failed reopen attempts allowed for a live source (None: forever).
    metrics_port: serve /health and /metrics on metrics_host:port (0: any free port).
    on_result: called with each `sinks.Result`; status_every: seconds between status log lines.
    watch: poll the model path every `watch_interval` s and hot-swap a new model (swap.py).
    Raises D3NError subclasses for bad models, sidecars, sources, sinks and options.
    """
    if not 0.0 <= conf <= 1.0 or not 0.0 <= iou <= 1.0:
        raise ConfigError(f"--conf and --iou must be in [0, 1] (got {conf}, {iou})")
    if max_fps is not None and max_fps <= 0:
        raise ConfigError(f"--max-fps must be > 0 (got {max_fps})")
    if watch and not watch_interval > 0:
        raise ConfigError(f"--watch-interval must be > 0 (got {watch_interval})")
    stats = stats or Stats()
    stop_event = stop_event or threading.Event()
    owns_backend = not isinstance(model, Backend)
    watcher = None
    if watch:  # its baseline is taken before the load: a model replaced meanwhile is not missed
        watcher = ModelWatcher(model if owns_backend else model.model_path, stats,
                               interval=watch_interval, device=device, warmup=warmup)
    backend = open_backend(model, device) if owns_backend else model
    slot = ModelSlot(Model(backend, owned=owns_backend), stats)
    sink_set = SinkSet([], stats)
    src = server = runner = None
    try:
        class_ids = resolve_class_conf(class_conf, list(backend.sidecar.names))
        roi_mask = RoiMask.load(roi) if isinstance(roi, (str, Path)) else roi
        src = source if isinstance(source, Source) else Source(
            source, stats, max_reconnects=max_reconnects, backoff=backoff)
        src.stats = stats
        runner = _Runner(slot, src, sink_set, stats, conf=conf, iou=iou, max_det=max_det,
                         class_conf=class_ids, roi=roi_mask, max_fps=max_fps, max_frames=max_frames,
                         stop_event=stop_event, on_result=on_result)
        if metrics_port is not None:  # bound before any output exists: a busy port leaves none
            server = MetricsServer(stats, metrics_host, metrics_port, state=runner.health_state,
                                   stale_after=stale_after(max_fps)).start()
        if warmup:
            backend.warmup(warmup)
        if watcher is not None:  # after the first warm-up: a second one would compete with it
            watcher.start(slot)
        deadline = None if duration is None else time.monotonic() + duration
        runner.phase = "opening the source"
        src.start()
        if _wait_for_source(runner, deadline):
            for s in sinks:  # opened one by one so that a failure closes the ones already open
                sink_set.sinks.append(s if isinstance(s, Sink) else parse_sink(s, fps=video_fps))
            runner.phase = "waiting for the first frame"
            _drive(runner, deadline, status_every)
        runner.stopped_by = _why_stopped(runner, max_frames)
    finally:
        if watcher is not None:
            watcher.stop()
        if runner is not None:
            runner.abort.set()  # unblocks any stage still waiting on a queue
        if src is not None:
            src.stop()
            src.join(timeout=10)
        sink_set.close()
        if server is not None:
            server.stop()
        slot.close()  # every model still open (not a Backend the caller passed in)
    if runner.errors:
        raise runner.errors[0]
    out = stats.summary()
    out.update(backend=slot.active.backend.name, source=src.source_id, source_error=src.error,
               failed_sinks=dict(sink_set.failed), stopped_by=runner.stopped_by,
               metrics_port=server.port if server else None)
    log.info("run finished (%s): %d frames, %.1f FPS, e2e p50 %.1f ms", runner.stopped_by,
             out["frames"], out["mean_fps"], out["latency_ms"]["end_to_end"]["p50"])
    return out


def stale_after(max_fps: float | None) -> float:
    """Seconds without a frame after which /health reports degraded: 5 s, or 10 frame
    intervals when --max-fps makes frames rarer than that."""
    return max(STALE_AFTER_S, 10.0 / max_fps) if max_fps else STALE_AFTER_S


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _wait_for_source(runner: _Runner, deadline: float | None) -> bool:
    """Wait until the source has opened (True), or failed, a stop came or time ran out (False).

    A live source may take a while (it is retried with backoff); the sinks are created only
    once it has opened, so a source that never opens leaves no empty output file.
    """
    src, stop_event = runner.source, runner.stop_event
    while not src.opened.wait(0.1):
        if src.ended or stop_event.is_set():
            return False
        if _past(deadline):
            runner.stopped_by = "duration"
            stop_event.set()
            return False
    return True


def _drive(runner: _Runner, deadline: float | None, status_every: float) -> None:
    """Run the stages until the post stage ends; log a status line every `status_every` s."""
    stats, stop_event = runner.stats, runner.stop_event
    threads = [threading.Thread(target=runner._guard(fn), name=f"stage:{fn.__name__}", daemon=True)
               for fn in (runner.preprocess_stage, runner.infer_stage, runner.post_stage)]
    for t in threads:
        t.start()
    next_status = time.monotonic() + status_every
    while threads[-1].is_alive():
        threads[-1].join(0.2)
        if status_every and time.monotonic() >= next_status:  # a heartbeat in long runs
            next_status += status_every
            s = stats.summary()
            log.info("status: %d frames, %.1f FPS, e2e p99 %.0f ms, dropped %d, reconnects %d, "
                     "corrupt %d", s["frames"], s["fps"], s["latency_ms"]["end_to_end"]["p99"],
                     s["frames_dropped"], s["reconnects"], s["corrupt_frames"])
        if _past(deadline) and not stop_event.is_set():
            runner.stopped_by = "duration"
            stop_event.set()


def _why_stopped(runner: _Runner, max_frames: int | None) -> str:
    """The summary's `stopped_by`: a source failure is not an "end of source"."""
    if runner.stopped_by != "end of source":
        return runner.stopped_by  # duration, all sinks failed
    if runner.stop_event.is_set():
        return "stop requested"
    if runner.source.error:
        return runner.source.stop_reason or "source failed"
    if max_frames is not None and runner.stats.counters["frames"] >= max_frames:
        return "max frames"
    return "end of source"
