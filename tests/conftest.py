"""Fixtures for the web server tests: apps in local and account mode, HTTP and Socket.IO clients, and one
real model (the default, on CPU) shared by every test that generates."""

import time

import pytest

from webui import create_app
from webui.rooms import socketio


def make_config(tmp_path, **overrides) -> dict:
    return {"TESTING": True, "SESSIONS_DIR": str(tmp_path / "sessions"), **overrides}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each test's outcome on its item (item.report_call), for fixtures that report on failures."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def make_app(tmp_path):
    """make_app(**config) -> an app without a model over this test's sessions folder."""
    return lambda **overrides: create_app(make_config(tmp_path, **overrides))


@pytest.fixture
def app(make_app):
    """Local mode, no model: sessions can be managed but nobody replies."""
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def auth_app(make_app):
    return make_app(AUTH=True, ALLOW_REGISTER=True)


@pytest.fixture(scope="session")
def default_model():
    import engine

    return engine.load_model("default", device="cpu")


@pytest.fixture
def model_app(tmp_path, default_model):
    # Checkpoints after every token, so the saving-while-streaming path runs in every generating test.
    app = create_app(make_config(tmp_path, CHECKPOINT_SECONDS=0.0), model=default_model)
    yield app
    app.extensions["generation_worker"].close()


@pytest.fixture
def model_client(model_app):
    return model_app.test_client()


class SocketWatcher:
    """A Socket.IO test client plus everything it has received, read without racing the worker thread
    that appends to it (the test client's own get_received() rebuilds the list and can drop events)."""

    def __init__(self, socket_client):
        self.socket = socket_client
        self.events: list[tuple[str, dict]] = []

    def emit(self, event: str, data) -> dict:
        """Send an event; returns its acknowledgement."""
        return self.socket.emit(event, data, callback=True)

    def mark(self) -> int:
        self._collect()
        return len(self.events)

    def received(self, name: str, since: int = 0) -> list[dict]:
        self._collect()
        return [data for event, data in self.events[since:] if event == name]

    def wait_for(self, name: str, since: int = 0, timeout: float = 120, **fields) -> dict:
        """The first `name` event from index `since` on whose payload has these field values."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for data in self.received(name, since):
                if all(data.get(key) == value for key, value in fields.items()):
                    return data
            time.sleep(0.01)
        raise AssertionError(f"no {name} event with {fields} within {timeout} s; got {[e for e, _ in self.events]}")

    def _collect(self) -> None:
        queue = self.socket.queue
        for entry in queue[len(self.events):]:
            self.events.append((entry["name"], entry["args"][0] if entry["args"] else None))


@pytest.fixture
def connect():
    """connect(app, http_client) -> SocketWatcher sharing the HTTP client's cookies (its login)."""
    watchers = []

    def open_socket(app, http_client):
        watcher = SocketWatcher(socketio.test_client(app, flask_test_client=http_client))
        watchers.append(watcher)
        return watcher

    yield open_socket
    for watcher in watchers:
        if watcher.socket.is_connected():
            watcher.socket.disconnect()


@pytest.fixture
def new_session():
    """new_session(http_client, **fields) -> the created session document."""

    def create(http_client, **fields):
        response = http_client.post("/api/sessions", json=fields)
        assert response.status_code == 201, response.json
        return response.json["session"]

    return create
