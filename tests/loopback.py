"""A real HTTP server on the loopback interface for tests of the HTTP clients: each test sets how it
answers (chosen from the request, injected 5xx/429, slow answers) and reads back what it received
(bodies, headers, the most requests in flight at once)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from pytest_sftsafety.errors import SftSafetyError


@dataclass
class Call:
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: dict | None
    at: float  # time.monotonic() on arrival


Reply = tuple[int, dict[str, str], "bytes | str | dict"]


class LoopbackServer:
    """A threaded HTTP server whose answers the test chooses, recording every request."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.stop = threading.Event()  # ends slow answers at teardown
        self.respond: Callable[[int, Call], Reply] = lambda index, call: (200, {}, {})
        self.delay: Callable[[int, Call], float] = lambda index, call: 0.0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.state = self  # type: ignore[attr-defined]
        self.httpd.handle_error = lambda request, address: None  # a client that timed out is expected
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> LoopbackServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - quiet test output
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.do_POST()

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        state: LoopbackServer = self.server.state  # type: ignore[attr-defined]
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        split = urlsplit(self.path)
        call = Call(split.path, parse_qs(split.query), {k.lower(): v for k, v in self.headers.items()},
                    json.loads(raw) if raw else None, time.monotonic())
        with state.lock:
            index = len(state.calls)
            state.calls.append(call)
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            delay = state.delay(index, call)
            if delay:
                state.stop.wait(delay)
            status, headers, body = state.respond(index, call)
        except Exception as exc:  # noqa: BLE001 - a broken test handler shows up as a 599 to assert on
            status, headers, body = 599, {}, f"test handler failed: {exc!r}"
        finally:
            # Counted out before answering: the client holds its slot until it has read the answer, so this
            # count never exceeds the client's true number of requests in flight.
            with state.lock:
                state.in_flight -= 1
        data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client gave up (timeout test)




def assert_one_line(exc: BaseException) -> str:
    text = str(exc)
    assert isinstance(exc, SftSafetyError)
    assert text and "\n" not in text and len(text) < 600, text
    return text


def closed_port() -> int:
    """A port that was free a moment ago, now closed: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
