"""A reward service written with the standard library (``http.server``), on 127.0.0.1 in a
thread, for the tests of ``reward.remote``: it speaks the contract of README "Remote rewards"
and can misbehave on request (``mode``), go down and come back on the same port."""

from __future__ import annotations

import json
import ssl
import string
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOWER = set(string.ascii_lowercase + " ")


def lowercase_fraction(text: str) -> float:
    return sum(c in LOWER for c in text) / max(len(text), 1)


class RewardServer:
    """``mode``: 'ok' (lowercase fraction per response), 'not_json', 'no_scores', 'short',
    'nan', 'huge_int', 'huge_exp', '401', '500', '429', '503', 'slow' (sleeps ``slow_s`` first);
    'flaky:K' answers 500 to the first K requests, 'busy:K' 503 with ``Retry-After: 2`` to the
    first K, 'fail_after:K' 500 to all after the first K. ``tls``: serve https. ``token``: the bearer token required (None: none). Every request body is
    kept in ``requests``."""

    def __init__(self, token: str | None = None, port: int = 0, tls: tuple[str, str] | None = None):
        self.token = token
        self.tls = tls  # (certificate, key) PEM files: serve https
        self.mode = "ok"
        self.slow_s = 2.0
        self.requests: list[dict[str, Any]] = []
        self.answered = 0
        self.lock = threading.Lock()
        self.port = port
        self.httpd: ThreadingHTTPServer | None = None
        self.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/score"

    def start(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    count = len(server.requests)
                want = f"Bearer {server.token}"
                if server.token is not None and self.headers.get("Authorization") != want:
                    return self.answer(401, {"error": "bad token"})
                status, payload = server.reply(body, count)
                self.answer(status, payload)

            def answer(self, status: int, payload: Any) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                if status == 503:
                    self.send_header("Retry-After", "2")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def reply(self, body: dict[str, Any], count: int) -> tuple[int, Any]:
        scores: list[Any] = [lowercase_fraction(r) for r in body["responses"]]
        mode = self.mode
        if mode.startswith("flaky:"):
            mode = "500" if count <= int(mode.split(":")[1]) else "ok"
        if mode.startswith("busy:"):  # 503 with Retry-After: 2 to the first K requests
            mode = "503" if count <= int(mode.split(":")[1]) else "ok"
        if mode.startswith("fail_after:"):
            mode = "500" if count > int(mode.split(":")[1]) else "ok"
        if mode == "slow":
            time.sleep(self.slow_s)
        answers: dict[str, tuple[int, Any]] = {
            "not_json": (200, b"scores: 1, 2"),
            "no_scores": (200, {"score": scores}),
            "short": (200, {"scores": scores[:-1]}),
            "nan": (200, b'{"scores": [' + b", ".join([b"NaN"] * len(scores)) + b"]}"),
            "401": (401, {"error": "no"}),
            "500": (500, {"error": "down"}),
            "429": (429, {"error": "slow down"}),
            "503": (503, {"error": "queue full"}),
            "huge_int": (200, b'{"scores": [' + b"9" * 5000 + b"]}"),
            "huge_exp": (200, b'{"scores": [' + b", ".join([b"1e999"] * len(scores)) + b"]}"),
        }
        self.answered += 1
        return answers.get(mode, (200, {"scores": scores}))

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
