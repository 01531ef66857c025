"""The overlapped pipeline: capture -> preprocess -> infer -> postprocess + sinks.

Each stage runs in its own thread, joined by small bounded queues, so while the model runs on
batch n the next one is already letterboxed and the previous one is being decoded and written.
ONNX Runtime and TensorRT release the GIL during inference, so end-to-end throughput approaches
model-only throughput. Bounded queues keep memory and latency flat; live sources additionally
keep only their newest frame (see sources.py).

Threads: one capture thread per source, then one preprocess, one infer and one post thread for
the whole run, whatever the number of sources: the preprocess stage gathers each batch from
the sources' ready frames (batching.py: bounded wait, round robin), the infer stage runs one
inference per batch, the post stage splits it back into frames. A model with a fixed batch of
1 gets batches of one frame. ONNX Runtime's intra-op pool gets `threads` threads (default:
every core the process may use): one compute process per box, see docs/runtime.md.

Public API (used by `d3n run` and `d3n bench`):

    stats = run_pipeline("model.onnx", "video.mp4", sinks=["jsonl:out.jsonl"], conf=0.25)
    stats = run_pipeline("model.onnx", ["cam1=rtsp://...", "cam2=rtsp://..."], max_batch=2)

returns a dict: frames, fps (recent window), mean_fps (whole run), latency_ms per stage
({"p50", "p99"}), frames_dropped, source_drops, reconnects, corrupt_frames, sink_failures,
backend, model ({"file", "sha256"} of the last model), model_swaps ({"ok", "refused"}),
batches ({"count", "frames", "mean_size", "sizes"}), sources (per source: state, reason,
counters), source (the name, or the list of names), source_error, failed_sinks, stopped_by,
metrics_port and view_port (None when not served).

With `view_port` the post stage also hands each result to the live view (view.py): a reference
and its counts, nothing more; drawing and JPEG encoding happen in the view's own thread.

With `watch=True` the model path is polled and a new model is swapped in between two batches
(see swap.py): each queued batch carries the model it was prepared for.

Start-up order: source check, model, metrics and view ports first, then warm-up, then the
sources are opened, and only then (once one has opened) are the sinks created: a run that cannot
start (bad model, source or option, busy port, sources that never open) leaves no empty output
file behind.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np

from d3n.errors import ArtifactError, ConfigError
from d3n.runtime.backends import Backend, open_backend
from d3n.runtime.batching import Gatherer
from d3n.runtime.http import STALE_AFTER_S, MetricsServer
from d3n.runtime.postprocess import class_thresholds, postprocess
from d3n.runtime.preprocess import prepare
from d3n.runtime.roi import RoiMask
from d3n.runtime.sinks import Result, Sink, SinkSet, parse_sink
from d3n.runtime.sources import Source, SourceEntry, source_entries
from d3n.runtime.stats import Stats
from d3n.runtime.swap import Model, ModelSlot, ModelWatcher
from d3n.runtime.view import VIEW_FPS, ViewServer, check_view_fps

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


DOWN_STATES = ("reconnecting", "stalled", "lost")  # a source in one of them makes /health 503


def available_cores() -> int:
    """The cores this process may run on (taskset, cgroup cpusets), not all of the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _Runner:
    def __init__(self, slot: ModelSlot, sources: list[Source], sinks: SinkSet, stats: Stats, *,
                 conf: float, iou: float, max_det: int, class_conf: dict[int, float],
                 roi: RoiMask | None, max_fps: float | None, max_frames: int | None,
                 stop_event: threading.Event, on_result=None, batch_wait: float = 0.005,
                 max_batch: int | None = None, stale_after: float = STALE_AFTER_S):
        self.slot, self.sources, self.sinks, self.stats = slot, sources, sinks, stats
        # A swapped-in model has the same class names (swap.py refuses others): same thresholds.
        self.thresholds = class_thresholds(len(slot.active.names), conf, class_conf)
        self.iou, self.max_det, self.roi = iou, max_det, roi
        self.max_frames = max_frames
        self.stop_event = stop_event
        self.on_result = on_result
        self.gatherer = Gatherer(sources, wait_s=batch_wait, max_fps=max_fps)
        self.batch_limit = max_batch or len(sources)  # default: one frame per source per batch
        self.stale_after = stale_after
        live = any(s.live for s in sources)
        self.q_infer: queue.Queue = queue.Queue(maxsize=1 if live else 2)  # batches
        self.q_post: queue.Queue = queue.Queue(maxsize=1 if live else 2)
        self.abort = threading.Event()  # a stage failed: everyone stops
        self.errors: list[BaseException] = []
        self.stopped_by = "end of source"
        self.phase = "warming up the model"  # what /health says before the first frame
        self.view: ViewServer | None = None  # the live view, fed after the sinks

    def batch_cap(self, model: Model) -> int:
        """Frames per inference on `model`: --max-batch (default: the number of sources), no
        more than the model's max batch (1 for a fixed batch, the engine profile's maximum)."""
        if model.max_batch is None:
            return self.batch_limit
        return max(min(model.max_batch, self.batch_limit), 1)

    def source_report(self) -> dict[str, dict]:
        """Per source: state, reason (None while it is up), live, and its counters."""
        counts = self.stats.source_state()
        return {src.source_id: self._source_entry(src, counts.get(src.source_id, {}))
                for src in self.sources}

    def _source_entry(self, src: Source, counts: dict) -> dict:
        state, reason = src.state, None
        if state == "reconnecting":
            reason = src.down_reason
        elif state == "lost":
            reason = src.error
        elif state == "running" and self._stalled(src, counts.get("last_frame_age_s")):
            age = counts["last_frame_age_s"]
            state = "stalled"
            reason = f"source {src.source_id}: no frame for {age:.1f} s (more than {self.stale_after:g} s)"
        return {"state": state, "reason": reason, "live": src.live, **counts}

    def _stalled(self, src: Source, age: float | None) -> bool:
        """A live source up but silent: among several, the others keep the run's own last
        frame fresh, so only its own age shows it (a single source: the run-wide check does)."""
        return len(self.sources) > 1 and src.live and age is not None and age > self.stale_after

    def health_state(self) -> tuple[str, str | None]:
        """(status, reason) for /health; the HTTP server adds the run-wide staleness check."""
        if self.stop_event.is_set() or self.abort.is_set():
            return "stopping", "the run is ending"
        down = [r["reason"] for r in self.source_report().values() if r["state"] in DOWN_STATES]
        if down:
            return "degraded", "; ".join(down)
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
        taken, last = 0, None
        while not self.abort.is_set():
            model = self.slot.current(last)  # a hot swap takes effect here, between two batches
            if self.stop_event.is_set() or (self.max_frames is not None and taken >= self.max_frames):
                break
            cap = self.batch_cap(model)
            if self.max_frames is not None:
                cap = min(cap, self.max_frames - taken)
            frames = self.gatherer.next_batch(cap)
            if frames is None:  # every source has ended
                break
            if not frames:
                continue  # nothing ready yet: look at the stop flag and the model slot again
            blob, lbs = self._prepare(frames, model)
            taken, last = taken + len(frames), self._label(frames[-1])
            self.slot.prepared(model, len(frames))
            if not self._put(self.q_infer, (frames, model, blob, lbs)):
                return
        self._put(self.q_infer, _END)

    def _prepare(self, frames: list, model: Model):
        """One blob for the batch (every frame letterboxed for `model`) and each frame's mapping."""
        blobs, lbs = [], []
        for frame in frames:
            t0 = time.monotonic()
            blob, lb = prepare(frame.image, model.input_hw, model.preprocess)
            self.stats.observe("preprocess", time.monotonic() - t0)
            blobs.append(blob)
            lbs.append(lb)
        return (blobs[0] if len(blobs) == 1 else np.concatenate(blobs)), lbs

    def _label(self, frame) -> int | str:
        """How the swap log names the last frame before a switch."""
        return frame.index if len(self.sources) == 1 else f"{frame.index} of {frame.source_id}"

    def infer_stage(self) -> None:
        for frames, model, blob, lbs in self._drain(self.q_infer):
            t0 = time.monotonic()
            out = model.backend.infer(blob)  # the model the batch was prepared for, even after a swap
            self.stats.observe("infer", time.monotonic() - t0)
            self.stats.batch_done(len(frames))
            self.slot.inferred(model, len(frames))
            if not self._put(self.q_post, (frames, model, out, lbs)):
                return
        self._put(self.q_post, _END)

    def post_stage(self) -> None:
        for frames, model, out, lbs in self._drain(self.q_post):
            if len(out) != len(frames):
                raise ArtifactError(f"{model.backend.model_path}: the output has {len(out)} rows "
                                    f"for a batch of {len(frames)} frames")
            for k, frame in enumerate(frames):  # the batch split back into its frames, in order
                self._post_one(frame, model, out[k:k + 1], lbs[k])

    def _post_one(self, frame, model: Model, out, lb) -> None:
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
        self.stats.frame_done(len(det), frame.source_id)
        if self.view is not None:  # after the sinks: what it counts is already in the JSONL
            self.view.offer(result)
        if self.on_result is not None:
            self.on_result(result)
        if self.sinks.all_failed:
            self.stopped_by = "all sinks failed"
            self.stop_event.set()


def run_pipeline(model: str | Path | Backend, source, sinks=(), *,
                 conf: float = 0.25, iou: float = 0.7, max_det: int = 300,
                 class_conf: dict[str, float] | None = None, roi: str | Path | RoiMask | None = None,
                 device: str = "auto", warmup: int = 1, max_fps: float | None = None,
                 max_frames: int | None = None, duration: float | None = None,
                 max_reconnects: int | None = None, backoff: tuple[float, float] = (0.5, 10.0),
                 metrics_port: int | None = None, metrics_host: str = "127.0.0.1",
                 stop_event: threading.Event | None = None, on_result=None,
                 stats: Stats | None = None, video_fps: float = 25.0,
                 status_every: float = 60.0, watch: bool = False,
                 watch_interval: float = 2.0, batch_wait: float = 0.005,
                 max_batch: int | None = None, threads: int | None = None, precision: str | None = None,
                 view_port: int | None = None, view_host: str = "127.0.0.1",
                 view_fps: float = VIEW_FPS) -> dict:
    """Run `model` on `source` until the sources end, `max_frames`/`duration` is reached or
    `stop_event` is set; returns the run's stats (see module docstring).

    model: a model path or release folder (opened with `open_backend(model, device)`) or an
    opened Backend (not closed here).
    source: a `--source` string (`NAME=URI` names it), a Source, a SourceEntry, or a list of
    them (several sources, one model: see batching.py). sinks: sink specs or Sinks.
    class_conf: {class name: threshold} overriding `conf`. roi: mask image path or RoiMask.
    max_fps: per source. max_frames: over all sources.
    max_reconnects: consecutive failed reopen attempts allowed for a live source (None: forever).
    metrics_port: serve /health and /metrics on metrics_host:port (0: any free port).
    on_result: called with each `sinks.Result`; status_every: seconds between status log lines.
    watch: poll the model path every `watch_interval` s and hot-swap a new model (swap.py).
    batch_wait: seconds a batch waits for more sources once it holds a frame. max_batch: frames
    per inference (default: the number of sources; never more than the model takes).
    threads: ONNX Runtime intra-op threads (default: every core this process may use).
    precision: OpenVINO's inference precision (default f32; an error on another backend unless f32).
    view_port: serve the live view (view.py) on view_host:port (0: any free port), sending at
    most `view_fps` annotated frames per second to each viewer.
    Raises D3NError subclasses for bad models, sidecars, sources, sinks and options.
    """
    _check_options(conf, iou, max_fps, watch, watch_interval, batch_wait, max_batch, threads)
    if view_port is not None:
        check_view_fps(view_fps)
    threads = threads or available_cores()
    stats = stats or Stats()
    stop_event = stop_event or threading.Event()
    srcs = _sources(source, stats, max_reconnects, backoff)
    owns_backend = not isinstance(model, Backend)
    watcher = None
    if watch:  # its baseline is taken before the load: a model replaced meanwhile is not missed
        watcher = ModelWatcher(model if owns_backend else model.model_path, stats,
                               interval=watch_interval, device=device, warmup=warmup,
                               threads=threads, batch=max_batch or len(srcs), precision=precision)
    backend = (open_backend(model, device, intra_op_threads=threads, inference_precision=precision)
               if owns_backend else model)
    slot = ModelSlot(Model(backend, owned=owns_backend), stats)
    sink_set = SinkSet([], stats)
    server = runner = view = None
    try:
        class_ids = resolve_class_conf(class_conf, list(backend.sidecar.names))
        roi_mask = RoiMask.load(roi) if isinstance(roi, (str, Path)) else roi
        runner = _Runner(slot, srcs, sink_set, stats, conf=conf, iou=iou, max_det=max_det,
                         class_conf=class_ids, roi=roi_mask, max_fps=max_fps, max_frames=max_frames,
                         stop_event=stop_event, on_result=on_result, batch_wait=batch_wait,
                         max_batch=max_batch, stale_after=stale_after(max_fps))
        if metrics_port is not None:  # bound before any output exists: a busy port leaves none
            server = MetricsServer(stats, metrics_host, metrics_port, state=runner.health_state,
                                   stale_after=stale_after(max_fps),
                                   sources=runner.source_report).start()
        if view_port is not None:  # bound before any output too
            view = runner.view = ViewServer(stats, [s.source_id for s in srcs], slot.active.names,
                                            host=view_host, port=view_port, fps=view_fps,
                                            report=runner.source_report).start()
        _log_batching(runner, slot.active, batch_wait)
        if warmup:
            backend.warmup(warmup)
            if runner.batch_cap(slot.active) > 1:  # the TensorRT EP builds for the batch too
                backend.warmup(warmup, runner.batch_cap(slot.active))
        if watcher is not None:  # after the first warm-up: a second one would compete with it
            watcher.start(slot)
        deadline = None if duration is None else time.monotonic() + duration
        runner.phase = "opening the source" if len(srcs) == 1 else "opening the sources"
        for src in srcs:
            src.start()
        if _wait_for_source(runner, deadline):
            for s in sinks:  # opened one by one so that a failure closes the ones already open
                sink_set.sinks.append(s if isinstance(s, Sink) else
                                      parse_sink(s, fps=video_fps, per_source=len(srcs) > 1))
            runner.phase = "waiting for the first frame"
            _drive(runner, deadline, status_every)
        runner.stopped_by = _why_stopped(runner, max_frames)
    finally:
        if watcher is not None:
            watcher.stop()
        if runner is not None:
            runner.abort.set()  # unblocks any stage still waiting on a queue
        for src in srcs:
            src.stop()
        for src in srcs:
            src.join(timeout=10)
        sink_set.close()
        if server is not None:
            server.stop()
        if view is not None:
            view.stop()
        slot.close()  # every model still open (not a Backend the caller passed in)
    if runner.errors:
        raise runner.errors[0]
    return _summary(runner, slot, sink_set, server, view)


def _check_options(conf, iou, max_fps, watch, watch_interval, batch_wait, max_batch, threads) -> None:
    if not 0.0 <= conf <= 1.0 or not 0.0 <= iou <= 1.0:
        raise ConfigError(f"--conf and --iou must be in [0, 1] (got {conf}, {iou})")
    if max_fps is not None and max_fps <= 0:
        raise ConfigError(f"--max-fps must be > 0 (got {max_fps})")
    if watch and not watch_interval > 0:
        raise ConfigError(f"--watch-interval must be > 0 (got {watch_interval})")
    if not 0.0 <= batch_wait <= 10.0:
        raise ConfigError(f"--batch-wait-ms must be in [0, 10000] (got {batch_wait * 1000:g})")
    if max_batch is not None and max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1 (got {max_batch})")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1 (got {threads})")


def _sources(source, stats: Stats, max_reconnects: int | None, backoff) -> list[Source]:
    """Sources from `run_pipeline`'s `source` argument, each counting into `stats`."""
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    if items and all(isinstance(i, str) for i in items):
        items = source_entries(items)  # names them: NAME=URI, srcK, or a lone source's text
    srcs = []
    for item in items:
        if isinstance(item, Source):
            item.stats = stats
            srcs.append(item)
        else:
            spec, name = (item.spec, item.name) if isinstance(item, SourceEntry) else (item, None)
            srcs.append(Source(spec, stats, max_reconnects=max_reconnects, backoff=backoff,
                               source_id=name))
    if not srcs:
        raise ConfigError("no source: give --source (repeatable) or --sources FILE")
    names = [s.source_id for s in srcs]
    if len(set(names)) != len(names):
        raise ConfigError(f"source names must be unique, got {', '.join(names)}")
    for name in names:
        stats.add_source(name)
    return srcs


def _log_batching(runner: _Runner, model: Model, batch_wait: float) -> None:
    """Say how the sources share the model: one inference per frame or batches."""
    n, cap = len(runner.sources), runner.batch_cap(model)
    if cap > 1:
        log.info("%d source%s, one model: up to %d frames per inference (%s batch), waiting at "
                 "most %g ms for fresh frames", n, "s" * (n != 1), cap,
                 "dynamic" if model.max_batch is None else f"max {model.max_batch}", batch_wait * 1000)
    elif n > 1:
        why = "its batch is fixed at 1 (export with --dynamic to batch)" if model.max_batch == 1 \
            else "--max-batch 1"
        log.info("%d sources, one process and one model: one inference per frame, since %s",
                 n, why)


def _summary(runner: _Runner, slot: ModelSlot, sink_set: SinkSet, server, view) -> dict:
    stats, srcs = runner.stats, runner.sources
    out = stats.summary()
    errors = [s.error for s in srcs if s.error]
    out["sources"] = runner.source_report()
    out.update(backend=slot.active.backend.name,
               source=srcs[0].source_id if len(srcs) == 1 else [s.source_id for s in srcs],
               source_error="; ".join(errors) or None,
               failed_sinks=dict(sink_set.failed), stopped_by=runner.stopped_by,
               metrics_port=server.port if server else None, view_port=view.port if view else None)
    log.info("run finished (%s): %d frames, %.1f FPS, e2e p50 %.1f ms, mean batch %.2f",
             runner.stopped_by, out["frames"], out["mean_fps"],
             out["latency_ms"]["end_to_end"]["p50"], out["batches"]["mean_size"])
    return out


def stale_after(max_fps: float | None) -> float:
    """Seconds without a frame after which /health reports degraded: 5 s, or 10 frame
    intervals when --max-fps makes frames rarer than that."""
    return max(STALE_AFTER_S, 10.0 / max_fps) if max_fps else STALE_AFTER_S


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _wait_for_source(runner: _Runner, deadline: float | None) -> bool:
    """Wait until a source has opened (True), or every one failed, a stop came or time ran out
    (False).

    A live source may take a while (it is retried with backoff); the sinks are created only
    once one has opened, so a run whose sources never open leaves no empty output file. One
    source that is down does not hold the others back.
    """
    srcs, stop_event = runner.sources, runner.stop_event
    while not any(s.opened.is_set() for s in srcs):
        if all(s.ended for s in srcs) or stop_event.is_set():
            return False
        if _past(deadline):
            runner.stopped_by = "duration"
            stop_event.set()
            return False
        time.sleep(0.05)
    return True


def _drive(runner: _Runner, deadline: float | None, status_every: float) -> None:
    """Run the stages until the post stage ends; log a status line every `status_every` s."""
    stop_event = runner.stop_event
    threads = [threading.Thread(target=runner._guard(fn), name=f"stage:{fn.__name__}", daemon=True)
               for fn in (runner.preprocess_stage, runner.infer_stage, runner.post_stage)]
    for t in threads:
        t.start()
    next_status = time.monotonic() + status_every
    while threads[-1].is_alive():
        threads[-1].join(0.2)
        if status_every and time.monotonic() >= next_status:  # a heartbeat in long runs
            next_status += status_every
            _log_status(runner)
        if _past(deadline) and not stop_event.is_set():
            runner.stopped_by = "duration"
            stop_event.set()


def _log_status(runner: _Runner) -> None:
    s = runner.stats.summary()
    log.info("status: %d frames, %.1f FPS, e2e p99 %.0f ms, dropped %d, reconnects %d, "
             "corrupt %d, mean batch %.2f", s["frames"], s["fps"],
             s["latency_ms"]["end_to_end"]["p99"], s["frames_dropped"], s["reconnects"],
             s["corrupt_frames"], s["batches"]["mean_size"])
    if len(runner.sources) > 1:
        log.info("status by source: %s", ", ".join(
            f"{name} {r['state']} {r['frames']} frames" for name, r in runner.source_report().items()))


def _why_stopped(runner: _Runner, max_frames: int | None) -> str:
    """The summary's `stopped_by`: a source failure is not an "end of source"."""
    if runner.stopped_by != "end of source":
        return runner.stopped_by  # duration, all sinks failed
    if runner.stop_event.is_set():
        return "stop requested"
    failed = [s for s in runner.sources if s.error]
    if len(runner.sources) == 1 and failed:
        return failed[0].stop_reason or "source failed"
    if max_frames is not None and runner.stats.counters["frames"] >= max_frames:
        return "max frames"
    if failed:
        names = ", ".join(f"{s.source_id} ({s.stop_reason or 'source failed'})" for s in failed)
        return f"end of sources; {len(failed)} of {len(runner.sources)} failed: {names}"
    return "end of source"
