"""Run statistics shared by the pipeline threads, the HTTP endpoint and the final summary.

Latencies are kept in a bounded ring per stage (the last `window` samples), so memory stays
flat however long the runtime runs; counters only grow. The counters a source causes are also
kept per source (by its name), and the size of every inference batch is counted.
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

STAGES = ("capture", "preprocess", "infer", "postprocess", "sinks", "end_to_end")
COUNTERS = ("frames", "frames_dropped", "source_drops", "reconnects", "corrupt_frames",
            "sink_failures", "detections")
SOURCE_COUNTERS = ("frames", "frames_dropped", "source_drops", "reconnects", "corrupt_frames",
                   "detections")  # the ones kept per source too


class Stats:
    """Thread-safe counters, per-stage latency rings and an FPS window."""

    def __init__(self, window: int = 1000):
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.latency = {s: collections.deque(maxlen=window) for s in STAGES}
        self.latency_sum = dict.fromkeys(STAGES, 0.0)
        self.latency_count = dict.fromkeys(STAGES, 0)
        self._result_times: collections.deque[float] = collections.deque(maxlen=window)
        self.first_result: float | None = None
        self.last_result: float | None = None
        self.sink_failures: dict[str, int] = {}
        self.model: dict[str, str] | None = None  # {"file", "sha256"} of the model making results
        self.model_swaps = {"ok": 0, "refused": 0}
        self.sources: dict[str, dict[str, int]] = {}  # per-source counters, by source name
        self._source_last: dict[str, float] = {}  # monotonic time of each source's last result
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # frames -> batches

    def add_source(self, name: str) -> None:
        """Make `name` known, so that it shows (with zeros) before anything happens to it."""
        with self._lock:
            self.sources.setdefault(name, dict.fromkeys(SOURCE_COUNTERS, 0))

    def add(self, counter: str, n: int = 1, source: str | None = None) -> None:
        with self._lock:
            self.counters[counter] += n
            if source is not None and counter in SOURCE_COUNTERS:
                self.sources.setdefault(source, dict.fromkeys(SOURCE_COUNTERS, 0))[counter] += n

    def observe(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.latency[stage].append(seconds)
            self.latency_sum[stage] += seconds
            self.latency_count[stage] += 1

    def sink_failed(self, sink: str) -> None:
        with self._lock:
            self.sink_failures[sink] = self.sink_failures.get(sink, 0) + 1
            self.counters["sink_failures"] += 1

    def set_model(self, file: str, sha256: str) -> None:
        with self._lock:
            self.model = {"file": file, "sha256": sha256}

    def model_swap(self, result: str) -> None:
        """Count a hot model swap: "ok" (the new model went live) or "refused"."""
        with self._lock:
            self.model_swaps[result] += 1

    def model_state(self) -> tuple[dict[str, str] | None, dict[str, int]]:
        """(model identity, swaps by result), copied: read by the HTTP threads."""
        with self._lock:
            return (dict(self.model) if self.model else None), dict(self.model_swaps)

    def frame_done(self, n_det: int, source: str | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            self.counters["frames"] += 1
            self.counters["detections"] += n_det
            self._result_times.append(now)
            if self.first_result is None:
                self.first_result = now
            self.last_result = now
            if source is not None:
                mine = self.sources.setdefault(source, dict.fromkeys(SOURCE_COUNTERS, 0))
                mine["frames"] += 1
                mine["detections"] += n_det
                self._source_last[source] = now

    def batch_done(self, size: int) -> None:
        """Count one inference over `size` frames."""
        with self._lock:
            self.batch_sizes[size] += 1

    def batch_state(self) -> dict:
        """Inference batches: how many, the frames in them, the mean size and the count of
        batches per size (keys are sizes, as strings for JSON)."""
        with self._lock:
            sizes = dict(self.batch_sizes)
        count, frames = sum(sizes.values()), sum(k * v for k, v in sizes.items())
        return {"count": count, "frames": frames,
                "mean_size": round(frames / count, 3) if count else 0.0,
                "sizes": {str(k): sizes[k] for k in sorted(sizes)}}

    def source_state(self) -> dict[str, dict]:
        """Per source: its counters and `last_frame_age_s` (None before its first result)."""
        now = time.monotonic()
        with self._lock:
            out = {name: dict(c) for name, c in self.sources.items()}
            last = dict(self._source_last)
        for name, c in out.items():
            c["last_frame_age_s"] = round(now - last[name], 3) if name in last else None
        return out

    def fps(self) -> float:
        """Results per second over the recent window."""
        with self._lock:
            t = list(self._result_times)
        if len(t) < 2 or t[-1] <= t[0]:
            return 0.0
        return (len(t) - 1) / (t[-1] - t[0])

    def mean_fps(self) -> float:
        """Results per second from the first result to the last (whole run, warm-up excluded)."""
        with self._lock:
            n, a, b = self.counters["frames"], self.first_result, self.last_result
        if n < 2 or a is None or b <= a:
            return 0.0
        return (n - 1) / (b - a)

    def percentiles(self, stage: str, qs=(50, 99)) -> dict[str, float]:
        with self._lock:
            samples = np.asarray(self.latency[stage], dtype=np.float64)
        if not samples.size:
            return {f"p{q}": float("nan") for q in qs}
        return {f"p{q}": float(np.percentile(samples, q)) for q in qs}

    def last_frame_age(self) -> float | None:
        with self._lock:
            last = self.last_result
        return None if last is None else time.monotonic() - last

    def uptime(self) -> float:
        return time.monotonic() - self.started

    def summary(self) -> dict:
        """Plain dict: counters, fps, mean_fps, uptime, per-stage p50/p99 latency in ms, the
        model's identity, the hot swaps by result, the inference batches (`batch_state`) and
        the per-source counters (`source_state`)."""
        with self._lock:
            out = dict(self.counters)
            sink_failures = dict(self.sink_failures)
        out["model"], out["model_swaps"] = self.model_state()
        out["fps"] = round(self.fps(), 3)
        out["mean_fps"] = round(self.mean_fps(), 3)
        out["uptime_s"] = round(self.uptime(), 3)
        out["latency_ms"] = {
            s: {k: round(v * 1000, 3) for k, v in self.percentiles(s).items()} for s in STAGES
        }
        out["sink_failures_by_sink"] = sink_failures
        out["batches"] = self.batch_state()
        out["sources"] = self.source_state()
        return out
