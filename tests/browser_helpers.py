"""What the browser tests need besides the browser: the chat server as a real process (app.py on a free
loopback port, running the default model on CPU), and a few calls to its HTTP API for setting up."""

import json
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
