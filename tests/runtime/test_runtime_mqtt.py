"""The MQTT sink publishes each frame's record to a broker; without paho-mqtt it says what to install."""

from __future__ import annotations

import json
import socket
import subprocess
import threading

import pytest
from conftest import python_with_blocked


class TinyBroker:
    """Enough of MQTT 3.1.1 on 127.0.0.1 for one client: CONNACK, QoS-0 PUBLISH, PINGRESP."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.messages: list[tuple[str, bytes]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @staticmethod
    def _read(conn, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError
            data += chunk
        return data

    def _packet(self, conn) -> tuple[int, bytes]:
        kind = self._read(conn, 1)[0]
        length, shift = 0, 0
        while True:  # remaining length: base-128 varint
            byte = self._read(conn, 1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return kind, self._read(conn, length)

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        try:
            while True:
                kind, body = self._packet(conn)
                if kind >> 4 == 1:  # CONNECT
                    conn.sendall(b"\x20\x02\x00\x00")
                elif kind >> 4 == 3:  # PUBLISH, QoS 0
                    n = int.from_bytes(body[:2], "big")
                    self.messages.append((body[2:2 + n].decode(), body[2 + n:]))
                elif kind >> 4 == 12:  # PINGREQ
                    conn.sendall(b"\xd0\x00")
                elif kind >> 4 == 14:  # DISCONNECT
                    return
        except (ConnectionError, OSError):
            return
        finally:
            conn.close()


def test_mqtt_sink_publishes_every_frame(tiny_onnx, image_dir):
    pytest.importorskip("paho.mqtt.client", reason="MQTT sink needs the `mqtt` extra (paho-mqtt)")
    from d3n.runtime.pipeline import run_pipeline

    broker = TinyBroker()
    stats = run_pipeline(tiny_onnx, str(image_dir), sinks=[f"mqtt://127.0.0.1:{broker.port}/plant/line3"])
    broker.thread.join(10)
    assert stats["frames"] == 8 and not stats["failed_sinks"]
    assert [t for t, _ in broker.messages] == ["plant/line3"] * 8
    records = [json.loads(p) for _, p in broker.messages]
    assert [r["name"] for r in records] == sorted(p.name for p in image_dir.iterdir())
    assert all({"frame", "capture_ts", "result_ts", "detections"} <= r.keys() for r in records)


def test_mqtt_sink_without_paho_names_the_extra():
    code = ("from d3n.runtime.sinks import parse_sink\n"
            "from d3n.errors import ConfigError\n"
            "try:\n    parse_sink('mqtt://127.0.0.1:1883/x')\n"
            "except ConfigError as e:\n    print(e)\n")
    proc = subprocess.run(python_with_blocked(["paho"], code), capture_output=True, text=True, timeout=60)
    assert "needs paho-mqtt: pip install 'd3n[mqtt]'" in proc.stdout, proc.stderr
