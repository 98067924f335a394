"""Load test for the chat server (a benchmark, not a test): N users chat at once over Socket.IO.

Starts the server in this process with accounts on and the default model (or -d MODEL), registers one
account per client, and has each client hold a T-turn chat in its own session. Checks that every job
finishes, that no client receives an event for a session other than its own, that what streamed to each
client is what was saved, and that no errors arrived. Reports queue waits and tokens per second.

    python bench/load_chat.py [--clients 8] [--turns 5] [--max-tokens 24] [-d MODEL] [--device cpu]
"""

import argparse
import logging
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import socketio as socketio_client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine  # noqa: E402
from webui import create_app  # noqa: E402
from webui.rooms import socketio as server_socketio  # noqa: E402

PASSWORD = "load-test-password"
PROMPTS = ["Hello! Who are you?", "What is your favourite colour?", "Tell me a fact about the sea.",
           "Why is the sky blue?", "Thanks, goodbye!"]


@dataclass
class Turn:
    queue_seconds: float  # measured by the server: request queued -> reply started
    first_token_seconds: float  # measured here: send -> first token event
    seconds: float  # measured here: send -> job finished
    tokens: int
    tokens_per_second: float


@dataclass
class ClientReport:
    name: str
    turns: list[Turn] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model, sessions_dir: str, port: int) -> None:
    app = create_app({"SESSIONS_DIR": sessions_dir, "AUTH": True, "ALLOW_REGISTER": True}, model=model)
    thread = threading.Thread(
        target=server_socketio.run, kwargs={"app": app, "host": "127.0.0.1", "port": port,
                                            "allow_unsafe_werkzeug": True, "log_output": False},
        daemon=True,
    )
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/auth/me", timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise SystemExit("the server did not start within 30 s")


class ChatClient:
    """One user: an account, a session, and a Socket.IO connection that records every event."""

    def __init__(self, base_url: str, name: str, max_tokens: int, turns: int):
        self.base_url, self.turns, self.report = base_url, turns, ClientReport(name)
        self.http = requests.Session()
        self.http.post(f"{base_url}/auth/register", json={"username": name, "password": PASSWORD}).raise_for_status()
        created = self.http.post(f"{base_url}/api/sessions", json={"settings": {"max_reply_tokens": max_tokens}})
        created.raise_for_status()
        self.session = created.json()["session"]
        self.events: list[tuple[float, str, dict]] = []
        self.finished: dict[str, threading.Event] = {}
        self.sio = socketio_client.Client()
        self.sio.on("*", self._record)

    def _record(self, name, data=None):
        self.events.append((time.monotonic(), name, data))
        if name == "job_finished":
            self.finished.setdefault(data["job_id"], threading.Event()).set()

    def run(self) -> None:
        try:
            cookie = "; ".join(f"{key}={value}" for key, value in self.http.cookies.items())
            self.sio.connect(self.base_url, headers={"Cookie": cookie}, wait_timeout=30)
            revision = self.sio.call("join", {"session_id": self.session["id"]}, timeout=30)["revision"]
            for turn in range(self.turns):
                revision = self._turn(PROMPTS[turn % len(PROMPTS)], revision)
            self._check_stream_matches_saved()
        except Exception as exc:  # a benchmark reports failures rather than stopping at the first
            self.report.problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.sio.disconnect()

    def _turn(self, text: str, revision: int) -> int:
        sent = time.monotonic()
        since = len(self.events)
        ack = self.sio.call("send", {"session_id": self.session["id"], "revision": revision, "text": text}, timeout=30)
        if not ack["ok"]:
            raise RuntimeError(ack["error"]["message"])
        if not self.finished.setdefault(ack["job_id"], threading.Event()).wait(timeout=600):
            raise RuntimeError(f"job {ack['job_id']} did not finish within 600 s")
        events = self.events[since:]
        started = next(data for _, name, data in events if name == "generation_started")
        done = next(data for _, name, data in events if name == "generation_finished")
        first_token = next((at for at, name, _ in events if name == "token"), time.monotonic())
        ended = next(at for at, name, data in events if name == "job_finished")
        self.report.turns.append(Turn(started["queue_seconds"], first_token - sent, ended - sent,
                                      done["tokens"], done["tokens_per_second"]))
        return next(data for _, name, data in events if name == "job_finished")["revision"]

    def _check_stream_matches_saved(self) -> None:
        own = self.session["id"]
        for _, name, data in self.events:
            if isinstance(data, dict) and data.get("session_id") not in (None, own):
                self.report.problems.append(f"received {name} for another session {data['session_id']}")
            if name == "chat_error":
                self.report.problems.append(f"error: {data}")
        saved = self.http.get(f"{self.base_url}/api/sessions/{own}").json()["session"]
        for message in saved["messages"]:
            if message["is_user"]:
                continue
            streamed = "".join(data["text"] for _, name, data in self.events
                               if name == "token" and data["message_id"] == message["id"])
            if streamed.rstrip() != message["swipes"][message["chosen"]]["text"]:
                self.report.problems.append(f"message {message['id']}: streamed text differs from saved text")
        replies = sum(not message["is_user"] for message in saved["messages"])
        if replies != self.turns:
            self.report.problems.append(f"{replies} replies saved, expected {self.turns}")


def summarize(reports: list[ClientReport], wall: float) -> bool:
    turns = [turn for report in reports for turn in report.turns]
    print(f"\n{len(reports)} clients, {len(turns)} turns in {wall:.1f} s")
    print(f"{'client':<10}{'turns':>6}{'queue wait avg/max s':>24}{'first token avg s':>20}{'tok/s avg':>11}  problems")
    for report in reports:
        waits = [turn.queue_seconds for turn in report.turns] or [0.0]
        firsts = [turn.first_token_seconds for turn in report.turns] or [0.0]
        speeds = [turn.tokens_per_second for turn in report.turns] or [0.0]
        print(f"{report.name:<10}{len(report.turns):>6}{statistics.mean(waits):>15.2f} / {max(waits):<6.2f}"
              f"{statistics.mean(firsts):>20.2f}{statistics.mean(speeds):>11.1f}  {len(report.problems)}")
        for problem in report.problems:
            print(f"    {problem}")
    if turns:
        waits = sorted(turn.queue_seconds for turn in turns)
        tokens = sum(turn.tokens for turn in turns)
        print(f"queue wait: mean {statistics.mean(waits):.2f} s, median {statistics.median(waits):.2f} s, "
              f"max {waits[-1]:.2f} s")
        print(f"decode speed per reply: mean {statistics.mean(t.tokens_per_second for t in turns):.1f} tok/s; "
              f"server throughput {tokens / wall:.1f} tok/s ({tokens} tokens)")
    ok = all(not report.problems for report in reports) and all(len(r.turns) == len(reports[0].turns) for r in reports)
    print("OK: all finished, no cross-talk, no errors" if ok else "FAILED")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=24, help="max reply tokens per turn")
    parser.add_argument("-d", "--model", default="default")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per long-poll request drowns the report

    print(f"Loading model {args.model} on {args.device} ...", flush=True)
    model = engine.load_model(args.model, device=args.device)
    port = free_port()
    with tempfile.TemporaryDirectory() as sessions_dir:
        start_server(model, sessions_dir, port)
        clients = [ChatClient(f"http://127.0.0.1:{port}", f"user{number}", args.max_tokens, args.turns)
                   for number in range(args.clients)]
        threads = [threading.Thread(target=client.run) for client in clients]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return 0 if summarize([client.report for client in clients], time.monotonic() - started) else 1


if __name__ == "__main__":
    sys.exit(main())
