"""`/health` (JSON) and Prometheus `/metrics` over HTTP, bound to 127.0.0.1 unless told otherwise.

Served by a stdlib ThreadingHTTPServer in a daemon thread; it only reads `Stats` and the run's
per-source report (each source's state, for /health and `d3n_source_up`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from d3n.errors import ConfigError
from d3n.runtime.stats import STAGES, Stats

log = logging.getLogger(__name__)

COUNTER_HELP = {
    "frames": "Frames processed (results produced)",
    "frames_dropped": "Live frames superseded by a newer one before processing",
    "source_drops": "Times the source stream dropped",
    "reconnects": "Successful source reconnections",
    "corrupt_frames": "Corrupt frames skipped",
    "sink_failures": "Sinks disabled after a write failure",
    "detections": "Detections emitted",
}


def _num(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NaN"
    return repr(float(v))


def _label(value: str) -> str:
    """A label value escaped as the exposition format wants (a file name may hold anything)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _model_lines(stats: Stats, extra: str) -> list[str]:
    """The model now making results as an info gauge, and the hot swaps by result, so each
    detection can be traced to the model that made it."""
    sep = "," if extra else ""
    lines = ["# HELP d3n_model_info The model making the results (sha256 from its sidecar)",
             "# TYPE d3n_model_info gauge"]
    model, swaps = stats.model_state()
    if model:
        lines.append(f'd3n_model_info{{{extra}{sep}sha256="{_label(model["sha256"])}",'
                     f'file="{_label(model["file"])}"}} 1')
    lines += ["# HELP d3n_model_swaps_total Hot model swaps (--watch), by result",
              "# TYPE d3n_model_swaps_total counter"]
    lines += [f'd3n_model_swaps_total{{{extra}{sep}result="{k}"}} {v}' for k, v in swaps.items()]
    return lines


SOURCE_HELP = {  # per-source families: their sum over `source` is the run-wide counter above
    "frames": ("d3n_source_frames_total", "Frames processed, by source"),
    "frames_dropped": ("d3n_source_frames_dropped_total",
                       "Live frames superseded by a newer one before processing, by source"),
    "source_drops": ("d3n_source_stream_drops_total", "Times the source stream dropped, by source"),
    "reconnects": ("d3n_source_reconnects_total", "Successful source reconnections, by source"),
    "corrupt_frames": ("d3n_source_corrupt_frames_total", "Corrupt frames skipped, by source"),
    "detections": ("d3n_source_detections_total", "Detections emitted, by source"),
}
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # fixed, so that every scrape has the same series


def _source_lines(stats: Stats, sources: dict[str, dict] | None, extra: str) -> list[str]:
    """Per-source counters, last-frame age and up/down, each with a `source` label. They get
    their own names: the same name with and without the label would double-count in sum()."""
    report = sources if sources is not None else stats.source_state()
    pre = extra + "," if extra else ""
    lines = []
    for key, (name, help_text) in SOURCE_HELP.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        lines += [f'{name}{{{pre}source="{_label(src)}"}} {r.get(key, 0)}' for src, r in report.items()]
    lines += ["# HELP d3n_source_last_frame_age_seconds Seconds since the last result of the source",
              "# TYPE d3n_source_last_frame_age_seconds gauge"]
    lines += [f'd3n_source_last_frame_age_seconds{{{pre}source="{_label(src)}"}} '
              f'{_num(r.get("last_frame_age_s"))}' for src, r in report.items()]
    if sources is not None:  # states are known only inside a run
        lines += ["# HELP d3n_source_up 1 while the source is up (starting, running or ended), "
                  "0 while reconnecting, stalled or lost", "# TYPE d3n_source_up gauge"]
        lines += [f'd3n_source_up{{{pre}source="{_label(src)}"}} '
                  f'{0 if r["state"] in ("reconnecting", "stalled", "lost") else 1}'
                  for src, r in report.items()]
    return lines


def _batch_lines(stats: Stats, extra: str) -> list[str]:
    """The frames per inference as a histogram (one observation per inference)."""
    sizes = {int(k): v for k, v in stats.batch_state()["sizes"].items()}
    pre, base = (extra + ",", "{" + extra + "}") if extra else ("", "")
    lines = ["# HELP d3n_batch_size Frames per inference (one batch from several sources)",
             "# TYPE d3n_batch_size histogram"]
    for le in BATCH_BUCKETS:
        lines.append(f'd3n_batch_size_bucket{{{pre}le="{le}"}} '
                     f'{sum(v for k, v in sizes.items() if k <= le)}')
    lines.append(f'd3n_batch_size_bucket{{{pre}le="+Inf"}} {sum(sizes.values())}')
    lines.append(f"d3n_batch_size_sum{base} {sum(k * v for k, v in sizes.items())}")
    lines.append(f"d3n_batch_size_count{base} {sum(sizes.values())}")
    return lines


def prometheus_text(stats: Stats, labels: dict[str, str] | None = None,
                    sources: dict[str, dict] | None = None) -> str:
    """Stats in the Prometheus text exposition format (version 0.0.4). `sources`: the run's
    per-source report (state and counters), else the per-source counters of `stats`."""
    extra = ",".join(f'{k}="{v}"' for k, v in (labels or {}).items())
    base = "{" + extra + "}" if extra else ""
    lines = []
    for name, help_text in COUNTER_HELP.items():
        lines += [f"# HELP d3n_{name}_total {help_text}", f"# TYPE d3n_{name}_total counter",
                  f"d3n_{name}_total{base} {stats.counters[name]}"]
    lines += ["# HELP d3n_fps Results per second over the recent window", "# TYPE d3n_fps gauge",
              f"d3n_fps{base} {_num(stats.fps())}",
              "# HELP d3n_uptime_seconds Seconds since the runtime started",
              "# TYPE d3n_uptime_seconds gauge", f"d3n_uptime_seconds{base} {_num(stats.uptime())}"]
    age = stats.last_frame_age()
    lines += ["# HELP d3n_last_frame_age_seconds Seconds since the last result",
              "# TYPE d3n_last_frame_age_seconds gauge",
              f"d3n_last_frame_age_seconds{base} {_num(age)}"]
    lines += ["# HELP d3n_stage_latency_seconds Per-stage latency (recent window quantiles)",
              "# TYPE d3n_stage_latency_seconds summary"]
    sep = "," if extra else ""
    for stage in STAGES:
        q = stats.percentiles(stage)
        for name, quant in (("p50", "0.5"), ("p99", "0.99")):
            lines.append(f'd3n_stage_latency_seconds{{{extra}{sep}stage="{stage}",quantile="{quant}"}} '
                         f"{_num(q[name])}")
        lines.append(f'd3n_stage_latency_seconds_sum{{{extra}{sep}stage="{stage}"}} '
                     f"{_num(stats.latency_sum[stage])}")
        lines.append(f'd3n_stage_latency_seconds_count{{{extra}{sep}stage="{stage}"}} '
                     f"{stats.latency_count[stage]}")
    lines += _model_lines(stats, extra)
    lines += _source_lines(stats, sources, extra) + _batch_lines(stats, extra)
    return "\n".join(lines) + "\n"


STALE_AFTER_S = 5.0  # default: a frame older than this means the source or pipeline has stalled


def health(stats: Stats, state="running", stale_after: float = STALE_AFTER_S,
           sources: dict[str, dict] | None = None) -> dict:
    """The /health body. `state` is a status string or (status, reason): "running", "starting",
    "degraded" or "stopping". A running pipeline whose last frame is older than `stale_after`
    seconds is reported degraded: the source stalled without dropping, or a stage hangs.
    `sources`, the per-source report (state, reason, counters), is added as `sources`."""
    status, reason = state if isinstance(state, tuple) else (state, None)
    age = stats.last_frame_age()
    model, swaps = stats.model_state()
    if status == "running" and age is not None and age > stale_after:
        status, reason = "degraded", f"no frame for {age:.1f} s (more than {stale_after:g} s)"
    return {"status": status, "reason": reason, "uptime_s": round(stats.uptime(), 3),
            "frames": stats.counters["frames"],
            "last_frame_age_s": None if age is None else round(age, 3),
            "stale_after_s": stale_after, "reconnects": stats.counters["reconnects"],
            "source_drops": stats.counters["source_drops"], "model": model, "model_swaps": swaps,
            **({"sources": sources} if sources is not None else {})}


class MetricsServer:
    """Serves /health and /metrics for `stats`. `port=0` picks a free port (see `.port`).

    `state()` returns the pipeline's status for /health (see `health`); /health answers 200 only
    while it is "running" with fresh frames, 503 otherwise, so a plain HTTP check alerts.
    """

    def __init__(self, stats: Stats, host: str = "127.0.0.1", port: int = 9100,
                 state=lambda: "running", stale_after: float = STALE_AFTER_S, sources=None):
        self.stats, self.state, self.stale_after = stats, state, stale_after
        self.sources = sources  # () -> per-source report, or None
        handler = self._handler()
        try:
            self.server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"--metrics-port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None
        self.server.daemon_threads = True
        self.host, self.port = host, self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics-http", daemon=True)

    def _handler(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - stdlib name
                path, code = self.path.split("?")[0], 200
                report = outer.sources() if outer.sources is not None else None
                if path == "/metrics":
                    body = prometheus_text(outer.stats, sources=report).encode()
                    ctype = "text/plain; version=0.0.4; charset=utf-8"
                elif path == "/health":
                    doc = health(outer.stats, outer.state(), outer.stale_after, report)
                    body, ctype = json.dumps(doc).encode(), "application/json"
                    code = 200 if doc["status"] == "running" else 503
                else:
                    self.send_error(404, "try /health or /metrics")
                    return
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):  # keep scrapes out of the run log
                log.debug("http: " + fmt, *args)

        return Handler

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics: http://%s:%d/metrics and /health", self.host, self.port)
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
