"""The live view (`d3n run --view-port P`): what the detector sees, in a browser.

A stdlib HTTP server of its own, on `--view-host` (127.0.0.1 unless told otherwise), serves:

- `/`: one small HTML page (inline CSS and JS, no external asset: nothing reaches the network)
  showing, per source, its annotated stream, FPS, latency and per-class counts, and the file
  and short sha256 of the model making the results (it changes on a hot swap);
- `/view/stream/<source>`: the source's frames with boxes and labels drawn, as MJPEG
  (`multipart/x-mixed-replace` of JPEG frames), at most `fps` frames per second;
- `/view/stats`: the JSON the page polls (see `ViewServer.snapshot`).

Its own port, not the metrics server's: metrics are often opened to a scraper (0.0.0.0) while
camera images should stay on loopback, and long-lived MJPEG connections must not compete with
health checks.

The pipeline never waits on a viewer. The post stage only calls `offer(result)`: it keeps a
reference to the newest result of the source and adds its per-class counts, under a short lock.
One encoder thread, at a lower OS priority, draws and JPEG-encodes at the view rate, and only
the sources someone watches. Each viewer has its own handler thread that sends the newest JPEG
once the previous one has gone out: a slow viewer skips frames instead of queueing them, one
that takes nothing for `SEND_TIMEOUT_S` is dropped, and at most `max_streams` streams are served.
"""

from __future__ import annotations

import collections
import html
import json
import logging
import math
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote

import cv2
import numpy as np

from d3n.errors import ConfigError
from d3n.runtime.sinks import Result, annotate
from d3n.runtime.stats import Stats
from d3n.runtime.swap import SHORT_SHA

log = logging.getLogger(__name__)

VIEW_FPS = 5.0  # default frames per second sent to each viewer
MAX_VIEW_FPS = 30.0  # a viewer, not a recorder: every encoded frame costs the line's CPU
MAX_STREAMS = 8  # concurrent MJPEG viewers (one thread each); more are answered 503
MAX_WIDTH = 1280  # wider frames are scaled down before encoding: the JPEG cost grows with pixels
JPEG_QUALITY = 80
SEND_TIMEOUT_S = 10.0  # a viewer that accepts no data for this long is dropped
WINDOW = 100  # recent results per source kept for its FPS and latency
STALE_S = 5.0  # a source with no result for this long shows 0 FPS
BOUNDARY = "d3nframe"


def check_view_fps(fps: float) -> None:
    if not 0.0 < fps <= MAX_VIEW_FPS:
        raise ConfigError(f"--view-fps must be in (0, {MAX_VIEW_FPS:g}] (got {fps:g})")


class _SourceView:
    """What the view knows of one source: the newest result, counts, recent timings, and the
    newest JPEG with the result number it shows."""

    def __init__(self, name: str, n_classes: int):
        self.name = name
        self.latest: Result | None = None
        self.seq = 0  # results offered so far
        self.counts = [0] * n_classes  # detections per class id, since the start
        self.in_frame = [0] * n_classes  # detections per class id in the newest result
        self.recent: collections.deque[tuple[float, float]] = collections.deque(maxlen=WINDOW)
        self.jpeg: bytes | None = None
        self.jpeg_seq = 0  # the result number the JPEG shows (0: none yet)
        self.viewers = 0


def _count(ids: np.ndarray, n_classes: int) -> list[int]:
    """Detections per class id; an id outside the names (never, for a checked model) is dropped."""
    ids = ids[(ids >= 0) & (ids < n_classes)].astype(np.int64)
    return np.bincount(ids, minlength=n_classes).tolist()


def _ms(seconds: float | None) -> float | None:
    """Milliseconds for JSON: NaN (no sample yet) is not valid JSON, so it becomes null."""
    return None if seconds is None or math.isnan(seconds) else round(seconds * 1000, 2)


def _rate(recent: list[tuple[float, float]], now: float) -> float:
    """Results per second over the recent window; 0 once the source has gone quiet."""
    if len(recent) < 2 or now - recent[-1][0] > STALE_S or recent[-1][0] <= recent[0][0]:
        return 0.0
    return (len(recent) - 1) / (recent[-1][0] - recent[0][0])


def _lower_priority(step: int = 5) -> None:
    """Let inference win the CPU over encoding: on Linux each thread has its own nice value, and
    raising it needs no privilege. Elsewhere the thread keeps the process's priority."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + step, 19))
    except (AttributeError, OSError):
        pass


def stream_path(name: str) -> str:
    """The MJPEG URL path of a source (names may be any `--source` text: quoted)."""
    return "/view/stream/" + quote(name, safe="")


class ViewServer:
    """Serves the live view of a run: `offer(result)` from the post stage, `start()`, `stop()`.

    `sources`: the run's source names, in order; `names`: the model's class names (a hot swap
    keeps them); `report()`: the run's per-source report (for each source's state), or None.
    `port=0` picks a free port (see `.port`).
    """

    def __init__(self, stats: Stats, sources: list[str], names: list[str], *,
                 host: str = "127.0.0.1", port: int = 0, fps: float = VIEW_FPS, report=None,
                 max_streams: int = MAX_STREAMS):
        check_view_fps(fps)
        self.stats, self.names, self.fps, self.report = stats, list(names), fps, report
        self.max_streams = max_streams
        self.sources = {name: _SourceView(name, len(self.names)) for name in sources}
        self._cond = threading.Condition()  # guards the _SourceViews; wakes the streams
        self._stop = threading.Event()
        self._streams = 0
        self._started = False
        try:
            self.server = ThreadingHTTPServer((host, port), self._handler())
        except OSError as exc:
            raise ConfigError(f"--view-port {port}: cannot listen on {host}:{port} "
                              f"({exc.strerror or exc})") from None
        self.server.daemon_threads = True
        self.host, self.port = host, self.server.server_address[1]
        self._threads = [threading.Thread(target=self.server.serve_forever, name="view-http", daemon=True),
                         threading.Thread(target=self._encode_loop, name="view-encoder", daemon=True)]

    # The hot path ------------------------------------------------------------------------

    def offer(self, result: Result) -> None:
        """Called by the post stage for every result: bookkeeping only (microseconds), no
        drawing, no encoding, no waiting for a viewer."""
        src = self.sources.get(result.frame.source_id)
        if src is None:
            return
        in_frame = _count(result.detections.class_ids, len(self.names))
        with self._cond:
            src.latest, src.seq, src.in_frame = result, src.seq + 1, in_frame
            src.counts = [a + b for a, b in zip(src.counts, in_frame, strict=True)]
            src.recent.append((time.monotonic(), result.latency))

    # Encoding (its own thread) -----------------------------------------------------------

    def _encode_loop(self) -> None:
        _lower_priority()
        period, due = 1.0 / self.fps, time.monotonic()
        while not self._stop.is_set():
            for src, result, seq in self._to_encode():
                self._encode(src, result, seq)
            due = max(due + period, time.monotonic())  # a slow pass is not made up for
            self._stop.wait(due - time.monotonic())

    def _to_encode(self) -> list[tuple[_SourceView, Result, int]]:
        """Sources that someone watches and whose newest result is not encoded yet."""
        with self._cond:
            return [(s, s.latest, s.seq) for s in self.sources.values()
                    if s.viewers and s.latest is not None and s.seq != s.jpeg_seq]

    def _encode(self, src: _SourceView, result: Result, seq: int) -> None:
        try:
            jpeg = encode_frame(result)
        except Exception as exc:  # noqa: BLE001 - keep the encoder (and every viewer) going
            log.warning("live view: cannot encode frame %d of %s: %s", result.frame.index, src.name, exc)
            return
        with self._cond:
            src.jpeg, src.jpeg_seq = jpeg, seq
            self._cond.notify_all()

    def _next_jpeg(self, src: _SourceView, shown: int) -> tuple[bytes | None, int]:
        """Wait for a JPEG newer than result number `shown`: (jpeg, its number), or (None, shown)
        when the server stops. Whatever was encoded meanwhile is skipped: only the newest goes."""
        with self._cond:
            while not self._stop.is_set():
                if src.jpeg is not None and src.jpeg_seq != shown:
                    return src.jpeg, src.jpeg_seq
                self._cond.wait(1.0)
        return None, shown

    # Stats -------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """The /view/stats body: the model, run-wide FPS and end-to-end latency, and per source
        (in order) its state, frames, FPS, latency and detections per class (since the start and
        in the newest frame). A source's frames and counts are taken together: they describe
        the same results, the first `frames` JSONL lines of that source."""
        model, swaps = self.stats.model_state()
        if model:
            model = {**model, "short": model["sha256"][:SHORT_SHA]}
        q = self.stats.percentiles("end_to_end")
        report = self.report() if self.report is not None else {}
        return {"model": model, "model_swaps": swaps, "classes": self.names,
                "frames": self.stats.counters["frames"], "fps": round(self.stats.fps(), 2),
                "latency_ms": {"p50": _ms(q["p50"]), "p99": _ms(q["p99"])},
                "view_fps": self.fps, "uptime_s": round(self.stats.uptime(), 1),
                "sources": [self._source_doc(s, report.get(s.name, {})) for s in self.sources.values()]}

    def _source_doc(self, src: _SourceView, rep: dict) -> dict:
        now = time.monotonic()
        with self._cond:
            recent, seq, counts, in_frame = list(src.recent), src.seq, src.counts, src.in_frame
            last = src.latest.frame.index if src.latest is not None else None
        lat = np.median([r[1] for r in recent]) if recent else None
        return {"name": src.name, "stream": stream_path(src.name), "state": rep.get("state"),
                "reason": rep.get("reason"), "frames": seq, "last_frame": last,
                "fps": round(_rate(recent, now), 2), "latency_ms": _ms(lat),
                "counts": dict(zip(self.names, counts, strict=True)),
                "in_frame": dict(zip(self.names, in_frame, strict=True))}

    # HTTP --------------------------------------------------------------------------------

    def _handler(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = SEND_TIMEOUT_S  # the socket's: a viewer that stops reading is dropped

            def do_GET(self):  # noqa: N802 - stdlib name
                path = self.path.split("?")[0]
                if path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", page(outer).encode())
                elif path == "/view/stats":
                    self._send(200, "application/json", json.dumps(outer.snapshot()).encode())
                elif path.startswith("/view/stream/"):
                    outer._stream(self, unquote(path[len("/view/stream/"):]))
                else:
                    self.send_error(404, "try /, /view/stats or /view/stream/<source>")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):  # keep viewers out of the run log
                log.debug("view http: " + fmt, *args)

        return Handler

    def _stream(self, handler: BaseHTTPRequestHandler, name: str) -> None:
        src = self.sources.get(name)
        if src is None:
            handler.send_error(404, f"no source {name!r} (sources: {', '.join(self.sources)})")
            return
        if not self._enter(src):
            handler.send_error(503, f"too many live view streams (at most {self.max_streams})")
            return
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            handler.send_header("Cache-Control", "no-store")
            handler.end_headers()
            shown = 0
            while True:
                jpeg, shown = self._next_jpeg(src, shown)
                if jpeg is None:
                    return
                handler.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                    f"{len(jpeg)}\r\n\r\n".encode() + jpeg + b"\r\n")
        except OSError:  # the viewer went away or stopped reading (timeout): its loss only
            log.debug("live view: a viewer of %s disconnected", name)
        finally:
            self._leave(src)

    def _enter(self, src: _SourceView) -> bool:
        with self._cond:
            if self._streams >= self.max_streams:
                return False
            self._streams += 1
            src.viewers += 1
            return True

    def _leave(self, src: _SourceView) -> None:
        with self._cond:
            self._streams -= 1
            src.viewers -= 1

    @property
    def streams(self) -> int:
        """MJPEG streams being served now."""
        with self._cond:
            return self._streams

    def start(self) -> ViewServer:
        for t in self._threads:
            t.start()
        self._started = True
        log.info("live view: http://%s:%d/ (%g frames/s per viewer)", self.host, self.port, self.fps)
        return self

    def stop(self) -> None:
        """Stop serving: open streams end (their threads return), the port is released."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._started:  # shutdown() waits for serve_forever, which must have been started
            self.server.shutdown()
            self._threads[1].join(5)
        self.server.server_close()


def encode_frame(result: Result, max_width: int = MAX_WIDTH, quality: int = JPEG_QUALITY) -> bytes:
    """The result's frame with its boxes and labels drawn, as JPEG (scaled down to `max_width`)."""
    img = annotate(result.frame.image, result.detections, result.names)
    h, w = img.shape[:2]
    if w > max_width:
        img = cv2.resize(img, (max_width, max(1, round(h * max_width / w))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("cv2.imencode failed")
    return buf.tobytes()


# The page ------------------------------------------------------------------------------------

_CSS = """
body{font:14px system-ui,sans-serif;margin:0;background:#151515;color:#e8e8e8}
header{display:flex;flex-wrap:wrap;gap:6px 24px;padding:8px 12px;background:#262626}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px;padding:12px}
section{background:#1f1f1f;border-radius:6px;padding:8px}
h2{font-size:15px;margin:0 0 6px} .state{font-weight:normal;color:#9c9}
.down{color:#f77} img{display:block;width:100%;min-height:90px;background:#000}
p{margin:6px 0} table{border-collapse:collapse} th,td{padding:1px 12px 1px 0;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums} code{color:#fc6}
"""

_JS = """
const cards = Array.from(document.querySelectorAll('section[data-source]'));
const fmt = (v, d) => v === null || v === undefined ? '-' : Number(v).toFixed(d);
function put(root, sel, text) { const e = root.querySelector(sel); if (e) e.textContent = text; }
function show(s) {
  put(document, '#model', s.model ? s.model.file : '-');
  put(document, '#sha', s.model ? s.model.short : '-');
  put(document, '#fps', fmt(s.fps, 1));
  put(document, '#p50', fmt(s.latency_ms.p50, 1));
  put(document, '#p99', fmt(s.latency_ms.p99, 1));
  put(document, '#conn', '');
  s.sources.forEach((src, i) => {
    const c = cards[i]; if (!c) return;
    put(c, '.state', src.state || '');
    c.querySelector('.state').className = 'state' + (['reconnecting', 'stalled', 'lost'].includes(src.state) ? ' down' : '');
    put(c, '.frames', src.frames); put(c, '.frame', src.last_frame === null ? '-' : src.last_frame);
    put(c, '.fps', fmt(src.fps, 1)); put(c, '.lat', fmt(src.latency_ms, 1));
    s.classes.forEach((name, k) => {
      const row = c.querySelectorAll('tbody tr')[k]; if (!row) return;
      row.querySelector('.total').textContent = src.counts[name];
      row.querySelector('.now').textContent = src.in_frame[name];
    });
  });
  document.body.dataset.polls = Number(document.body.dataset.polls || 0) + 1;
}
const reopen = img => { img.src = img.dataset.src + '?t=' + Date.now(); };
let lost = false;
async function poll() {
  try {
    const r = await fetch('/view/stats', {cache: 'no-store'}); show(await r.json());
    if (lost) cards.forEach(c => reopen(c.querySelector('img')));  // the runtime is back (a restart)
    lost = false;
  } catch (e) { put(document, '#conn', '(no answer from the runtime)'); lost = true; }
  setTimeout(poll, 1000);
}
cards.forEach(c => { const img = c.querySelector('img');
  img.onerror = () => setTimeout(() => reopen(img), 2000); });  // a stream that failed to open
poll();
"""


def _card(name: str, classes: list[str]) -> str:
    e = html.escape
    rows = "".join(f'<tr><td>{e(c)}</td><td class="n total">0</td><td class="n now">0</td></tr>'
                   for c in classes)
    return (f'<section data-source="{e(name)}"><h2>{e(name)} <span class="state">starting</span></h2>'
            f'<img src="{e(stream_path(name))}" data-src="{e(stream_path(name))}" alt="{e(name)}">'
            f'<p>frame <span class="frame">-</span> &middot; <span class="frames">0</span> results '
            f'&middot; <span class="fps">-</span> FPS &middot; latency <span class="lat">-</span> ms</p>'
            f'<table><thead><tr><th>class</th><th>total</th><th>in frame</th></tr></thead>'
            f'<tbody>{rows}</tbody></table></section>')


def page(view: ViewServer) -> str:
    """The whole page: cards per source rendered here (sources and classes are fixed for the
    run), numbers filled in by the script from /view/stats."""
    model, _ = view.stats.model_state()
    file, short = (model["file"], model["sha256"][:SHORT_SHA]) if model else ("-", "-")
    cards = "".join(_card(name, view.names) for name in view.sources)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>d3n live view</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style>'
            f'</head><body><header><b>d3n live view</b>'
            f'<span>model <span id="model">{html.escape(file)}</span> sha256 <code id="sha">'
            f'{html.escape(short)}</code></span><span><span id="fps">-</span> FPS</span>'
            f'<span>latency p50 <span id="p50">-</span> ms, p99 <span id="p99">-</span> ms</span>'
            f'<span id="conn" class="down"></span></header><main>{cards}</main>'
            f'<script>{_JS}</script></body></html>')
