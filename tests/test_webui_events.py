"""Socket.IO events that change a chat without the model: snapshots, edit, delete, rewind, swipes,
stale revisions, malformed and oversize events."""

import pytest

from webui import schema


def swipe(text):
    return {"text": text, "time": schema.now(), "tokens": None, "tokens_per_second": None}


@pytest.fixture
def chat(client, new_session):
    """A session with three messages, the last a bot reply with two alternatives (swipes)."""
    doc = new_session(client, title="Chat")
    exported = client.get(f"/api/sessions/{doc['id']}/export").json
    exported["messages"] = [
        {"id": "m0", "author": "You", "is_user": True, "chosen": 0, "swipes": [swipe("Hi")]},
        {"id": "m1", "author": "Assistant", "is_user": False, "chosen": 0, "swipes": [swipe("Hello!")]},
        {"id": "m2", "author": "Assistant", "is_user": False, "chosen": 1,
         "swipes": [swipe("How are you?"), swipe("Nice day.")]},
    ]
    return client.post("/api/sessions/import", json=exported).json["session"]


@pytest.fixture
def socket(app, client, connect):
    return connect(app, client)


def texts(doc):
    return [message["swipes"][message["chosen"]]["text"] for message in doc["messages"]]


def test_join_sends_a_snapshot(socket, chat):
    ack = socket.emit("join", {"session_id": chat["id"]})
    assert ack == {"ok": True, "session_id": chat["id"], "revision": 1}
    snapshot = socket.wait_for("snapshot")
    assert snapshot["session"] == chat and snapshot["revision"] == 1 and snapshot["job"] is None


def test_edit_delete_rewind_and_choose_swipe(socket, chat, client):
    socket.emit("join", {"session_id": chat["id"]})
    session_id = chat["id"]
    ack = socket.emit("choose_swipe", {"session_id": session_id, "revision": 1, "message_id": "m2", "swipe": 0})
    assert ack == {"ok": True, "session_id": session_id, "revision": 2}
    assert texts(socket.wait_for("session_updated", revision=2)["session"])[-1] == "How are you?"

    socket.emit("edit_message", {"session_id": session_id, "revision": 2, "message_id": "m0", "text": "Hey"})
    edited = socket.wait_for("session_updated", revision=3)["session"]
    assert texts(edited)[0] == "Hey"

    socket.emit("delete_message", {"session_id": session_id, "revision": 3, "message_id": "m1"})
    assert [m["id"] for m in socket.wait_for("session_updated", revision=4)["session"]["messages"]] == ["m0", "m2"]

    socket.emit("rewind", {"session_id": session_id, "revision": 4, "message_id": "m0"})
    assert socket.wait_for("session_updated", revision=5)["session"]["messages"][0]["id"] == "m0"
    stored = client.get(f"/api/sessions/{session_id}").json["session"]
    assert texts(stored) == ["Hey"] and stored["revision"] == 5


def test_a_stale_revision_is_refused_with_an_error_event(socket, chat, client):
    socket.emit("join", {"session_id": chat["id"]})
    socket.emit("edit_message", {"session_id": chat["id"], "revision": 1, "message_id": "m0", "text": "tab one"})
    ack = socket.emit("edit_message", {"session_id": chat["id"], "revision": 1, "message_id": "m0",
                                       "text": "tab two", "request_id": "r7"})
    assert ack["ok"] is False
    error = socket.wait_for("chat_error")
    assert error == {"code": "stale_revision", "event": "edit_message", "request_id": "r7", "session_id": chat["id"],
                     "message": "This session was changed in another tab or window; reload it and try again."}
    assert texts(client.get(f"/api/sessions/{chat['id']}").json["session"])[0] == "tab one"


def test_a_second_tab_sees_every_change(app, client, connect, chat):
    first, second = connect(app, client), connect(app, client)
    first.emit("join", {"session_id": chat["id"]})
    second.emit("join", {"session_id": chat["id"]})
    first.emit("delete_message", {"session_id": chat["id"], "revision": 1, "message_id": "m2"})
    assert len(second.wait_for("session_updated", revision=2)["session"]["messages"]) == 2


def test_joining_another_session_leaves_the_first(socket, chat, client, new_session):
    other = new_session(client)
    socket.emit("join", {"session_id": chat["id"]})
    socket.emit("join", {"session_id": other["id"]})
    client.patch(f"/api/sessions/{chat['id']}", json={"revision": 1, "title": "unseen"})
    client.patch(f"/api/sessions/{other['id']}", json={"revision": 1, "title": "seen"})
    assert [update["session"]["title"] for update in socket.received("session_updated")] == ["seen"]


@pytest.mark.parametrize("event, args", [
    ("join", ["not an object"]),
    ("join", [{"session_id": "../../etc/passwd"}]),
    ("join", [{"session_id": ["x"]}]),
    ("join", [{"session_id": "0" * 32}, "extra"]),
    ("join", []),
    ("edit_message", [{"session_id": "0" * 32, "revision": "1", "message_id": "m0", "text": "x"}]),
    ("edit_message", [{"session_id": "0" * 32, "revision": True, "message_id": "m0", "text": "x"}]),
    ("choose_swipe", [{"session_id": "0" * 32, "revision": 1, "message_id": "m2", "swipe": "1"}]),
    ("rewind", [{"session_id": "0" * 32, "revision": 1, "message_id": "../m0"}]),
    ("send", [{"session_id": "0" * 32, "revision": 1, "text": 42}]),
    ("no_such_event", [{}]),
])
def test_malformed_events_get_an_error_event(socket, event, args):
    socket.socket.emit(event, *args)
    error = socket.wait_for("chat_error")
    assert error["code"] == "bad_request" and error["event"] == event
    assert "Traceback" not in error["message"]
    assert socket.socket.is_connected()


def test_bad_references_are_refused(socket, chat):
    base = {"session_id": chat["id"], "revision": 1}
    assert socket.emit("choose_swipe", {**base, "message_id": "m2", "swipe": 5})["error"]["code"] == "bad_request"
    assert socket.emit("edit_message", {**base, "message_id": "zz", "text": "x"})["error"]["code"] == "not_found"
    assert socket.emit("edit_message", {**base, "message_id": "m0", "text": "  "})["error"]["code"] == "bad_request"
    assert socket.emit("join", {"session_id": "f" * 32})["error"]["code"] == "not_found"


def test_oversize_messages_are_refused(socket, chat, client):
    huge = "x" * (schema.MAX_MESSAGE + 1)
    ack = socket.emit("edit_message", {"session_id": chat["id"], "revision": 1, "message_id": "m0", "text": huge})
    assert ack["error"]["code"] == "too_large" and "limit" in ack["error"]["message"]
    ack = socket.emit("send", {"session_id": chat["id"], "revision": 1, "text": huge})
    assert ack["error"]["code"] == "too_large"
    assert client.get(f"/api/sessions/{chat['id']}").json["session"]["revision"] == 1


def test_generation_needs_a_model(socket, chat):
    for event in ("send", "regenerate", "continue"):
        ack = socket.emit(event, {"session_id": chat["id"], "revision": 1, "text": "hi"})
        assert ack["error"]["code"] == "no_model"
    assert socket.emit("stop", {"session_id": chat["id"]}) == {"ok": True, "stopped": False}


def test_a_damaged_session_is_reported_over_the_socket(socket, chat, tmp_path):
    path = tmp_path / "sessions" / "local" / f"{chat['id']}.json"
    path.write_text("{}")
    ack = socket.emit("join", {"session_id": chat["id"]})
    assert ack["error"]["code"] == "corrupt" and "left untouched" in ack["error"]["message"]
    assert path.read_text() == "{}"


def test_a_bug_is_reported_without_a_stack_trace(socket, chat, client, monkeypatch):
    from webui import operations

    def broken(*args):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(operations, "rewind", broken)
    ack = socket.emit("rewind", {"session_id": chat["id"], "revision": 1, "message_id": "m0"})
    assert ack["error"]["code"] == "internal" and "secret" not in ack["error"]["message"]
    monkeypatch.setattr(operations, "duplicate", broken)
    response = client.post(f"/api/sessions/{chat['id']}/duplicate")
    assert response.status_code == 500 and response.json["error"]["code"] == "internal"
    assert "secret" not in response.get_data(as_text=True)
