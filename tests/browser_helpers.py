"""What the browser tests need besides the browser: the chat server as a real process (app.py on a free
loopback port, running the default model on CPU), a few calls to its HTTP API for setting up, and a hold on
the Socket.IO events on their way to the page."""

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Loading the default model takes 10 to 60 s on a busy 2-core machine.
READY_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`python app.py` on 127.0.0.1:`port` over `sessions_dir`; its output is kept for error messages."""

    def __init__(self, sessions_dir: Path, port: int | None = None, *extra_args: str):
        self.sessions_dir = Path(sessions_dir)
        self.port = port or free_port()
        self.extra_args = extra_args
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.output: list[str] = []

    def start(self) -> "ServerProcess":
        command = [sys.executable, "app.py", "--device", "cpu", "--port", str(self.port),
                   "--sessions-dir", str(self.sessions_dir), *self.extra_args]
        self.output = []
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # Read all the time: a full pipe would block the server.
        threading.Thread(target=self._read_output, args=(self.process, self.output), daemon=True).start()
        return self

    @staticmethod
    def _read_output(process, lines):
        for line in process.stdout:
            lines.append(line.rstrip("\n"))

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.output[-lines:])

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/auth/me", timeout=5) as answer:
                    if answer.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, interrupt: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT if interrupt else signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def api(page, method: str, path: str, body=None) -> dict:
    """Call the server's HTTP API with the page's cookies; returns the JSON answer."""
    base = page.url.split("#")[0].rstrip("/")
    response = page.request.fetch(
        f"{base}{path}", method=method,
        data=None if body is None else json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    data = response.json()
    assert response.ok, f"{method} {path} -> {response.status}: {data}"
    return data


class HeldEvents:
    """The server's Socket.IO messages to one page pass through here (Playwright's WebSocket routing), and a test
    can hold them back from a chosen event on: the page then stays in the moment between two events for as long
    as the test needs, where it would otherwise last a few milliseconds. Route before the page first connects."""

    EVENT = re.compile(r'^42\["([^"]+)"')  # a Socket.IO event of the default namespace: 42["name",{...}]

    def __init__(self, page):
        self.page = page
        self.to_page = None  # the page's end of the latest connection
        self.upgraded = False  # the connection moved from HTTP polling to the WebSocket, where it can be held
        self.hold_from = None  # an event name: the first such event and every message after it wait
        self.holding = False
        self.held: list[str] = []
        page.route_web_socket(re.compile(r"/socket\.io/"), self._route)

    def hold(self, event: str) -> None:
        self.hold_from = event

    def release(self, hold_from: str | None = None) -> None:
        """Let the held messages through, in order; with `hold_from`, hold again from that event on."""
        waiting, self.held, self.holding = self.held, [], False
        self.hold_from = hold_from
        for message in waiting:
            self._from_server(message)

    def held_events(self) -> list[str]:
        return [match.group(1) for match in map(self._event, self.held) if match]

    def wait(self, condition, what: str, seconds: float = 45) -> None:
        """Until `condition()` holds; Playwright passes messages on only while the test waits in one of its calls."""
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {seconds:.0f} s in vain for {what}; held: {self.held_events()}")
            self.page.wait_for_timeout(20)

    def wait_upgraded(self) -> None:
        self.wait(lambda: self.upgraded, "the Socket.IO connection to move to its WebSocket")

    def wait_held(self, event: str) -> None:
        self.wait(lambda: event in self.held_events(), f"a held {event!r} event")

    def _route(self, to_page) -> None:
        to_server = to_page.connect_to_server()
        self.to_page = to_page
        to_page.on_message(lambda message: self._from_page(to_server, message))
        to_server.on_message(self._from_server)

    def _from_page(self, to_server, message) -> None:
        if message == "5":  # Engine.IO's upgrade packet: from now on everything goes over this WebSocket
            self.upgraded = True
        to_server.send(message)

    def _from_server(self, message) -> None:
        event = self._event(message)
        if not self.holding and event and event.group(1) == self.hold_from:
            self.holding = True
        if self.holding:
            self.held.append(message)
        else:
            self.to_page.send(message)

    def _event(self, message):
        return self.EVENT.match(message) if isinstance(message, str) else None
