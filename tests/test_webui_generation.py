"""Chatting with the real default model on CPU: streaming, saving while streaming, regenerate, swipes,
continue, stop, the queue, reconnecting, multibot rounds and the chat template format. Replies are kept
a few tokens long so the suite stays quick."""

import json

import pytest

SHORT = {"seed": 1, "max_reply_tokens": 8}
# The chat template format has no stop strings, so no text is held back: each token is one token event.
LONG_STORY = {"seed": 1, "max_reply_tokens": 200, "prompt_format": "chat_template"}
PARTY = [
    {"name": "You", "persona": "", "is_user": True},
    {"name": "Alice", "persona": "Alice is a pirate captain.", "is_user": False},
    {"name": "Bob", "persona": "Bob is a talking parrot.", "is_user": False},
]


@pytest.fixture
def open_chat(model_app, model_client, connect, new_session):
    """open_chat(settings, **fields) -> (session, socket joined to it)."""

    def open_one(settings, **fields):
        doc = new_session(model_client, settings=settings, **fields)
        socket = connect(model_app, model_client)
        assert socket.emit("join", {"session_id": doc["id"]})["ok"]
        return doc, socket

    return open_one


def run(socket, event, data):
    """Emit a job request and wait for the job to end; returns (ack, job_finished, index before the ack)."""
    since = socket.mark()
    ack = socket.emit(event, data)
    assert ack["ok"], ack
    return ack, socket.wait_for("job_finished", since, job_id=ack["job_id"]), since


def stored(client, session_id):
    return client.get(f"/api/sessions/{session_id}").json["session"]


def shown(message):
    return message["swipes"][message["chosen"]]


def test_a_reply_streams_token_by_token_and_is_saved(open_chat, model_client, tmp_path):
    doc, socket = open_chat(SHORT)
    ack, finished, since = run(socket, "send", {"session_id": doc["id"], "revision": 1, "text": "Hello! Who are you?"})
    assert finished["reason"] == "done"
    started = socket.received("generation_started", since)[0]
    tokens = socket.received("token", since)
    done = socket.received("generation_finished", since)[0]
    saved = stored(model_client, doc["id"])
    user, bot = saved["messages"]
    assert shown(user)["text"] == "Hello! Who are you?" and user["is_user"]
    assert bot["id"] == started["message_id"] and bot["author"] == "Assistant" and not bot["is_user"]
    assert tokens and all(t["session_id"] == doc["id"] and t["message_id"] == bot["id"] and t["swipe"] == 0
                          for t in tokens)
    assert [t["offset"] for t in tokens] == [sum(len(t["text"]) for t in tokens[:i]) for i in range(len(tokens))]
    assert "".join(t["text"] for t in tokens).rstrip() == shown(bot)["text"]
    assert shown(bot)["tokens"] == done["tokens"] > 0 and shown(bot)["tokens_per_second"] > 0
    assert saved["revision"] == finished["revision"] == socket.received("session_updated", since)[-1]["revision"]
    # What streamed is on disk, a crash-safe backup of the previous version beside it.
    path = tmp_path / "sessions" / "local" / f"{doc['id']}.json"
    assert json.loads(path.read_text()) == saved
    assert (path.parent / f"{path.name}.bak").exists()


def test_the_next_turn_reuses_the_cached_prompt(open_chat):
    doc, socket = open_chat(SHORT)
    _, first, since = run(socket, "send", {"session_id": doc["id"], "revision": 1, "text": "Hi"})
    _, second, since = run(socket, "send", {"session_id": doc["id"], "revision": first["revision"], "text": "And?"})
    turn = socket.received("generation_finished", since)[0]
    assert turn["reused_tokens"] > turn["prompt_tokens"] // 2


def test_regenerate_adds_a_swipe_and_choose_swipe_flips_back(open_chat, model_client):
    doc, socket = open_chat(SHORT)
    _, finished, _ = run(socket, "send", {"session_id": doc["id"], "revision": 1, "text": "Hello!"})
    first_text = shown(stored(model_client, doc["id"])["messages"][1])["text"]
    _, finished, since = run(socket, "regenerate", {"session_id": doc["id"], "revision": finished["revision"]})
    assert socket.received("generation_started", since)[0]["swipe"] == 1
    reply = stored(model_client, doc["id"])["messages"][1]
    assert len(reply["swipes"]) == 2 and reply["chosen"] == 1 and reply["swipes"][0]["text"] == first_text
    ack = socket.emit("choose_swipe", {"session_id": doc["id"], "revision": finished["revision"],
                                       "message_id": reply["id"], "swipe": 0})
    assert ack["ok"] and stored(model_client, doc["id"])["messages"][1]["chosen"] == 0


def test_continue_extends_the_last_reply(open_chat, model_client):
    doc, socket = open_chat({"seed": 1, "max_reply_tokens": 5})
    _, finished, _ = run(socket, "send", {"session_id": doc["id"], "revision": 1, "text": "Tell me about cats."})
    before = shown(stored(model_client, doc["id"])["messages"][1])
    _, finished, since = run(socket, "continue", {"session_id": doc["id"], "revision": finished["revision"]})
    assert socket.received("generation_started", since)[0]["text"] == before["text"]
    after = shown(stored(model_client, doc["id"])["messages"][1])
    assert after["text"].startswith(before["text"]) and len(after["text"]) > len(before["text"])
    assert after["tokens"] > before["tokens"]
    assert len(stored(model_client, doc["id"])["messages"]) == 2


def test_stop_ends_a_reply_within_one_token_and_keeps_what_was_written(open_chat, model_app, model_client):
    doc, socket = open_chat(LONG_STORY)
    since = socket.mark()
    ack = socket.emit("send", {"session_id": doc["id"], "revision": 1, "text": "Write a long story about a dragon."})
    socket.wait_for("token", since)
    # Holding the worker's lock keeps it from sending a token between counting and stopping (the test
    # client runs the stop handler in this thread, and the lock is reentrant).
    with model_app.extensions["generation_worker"]._lock:
        seen = len(socket.received("token", since))
        assert socket.emit("stop", {"session_id": doc["id"]}) == {"ok": True, "stopped": True}
    finished = socket.wait_for("job_finished", since, job_id=ack["job_id"])
    done = socket.received("generation_finished", since)[0]
    assert finished["reason"] == "stopped" and done["stop_reason"] == "cancelled"
    assert done["tokens"] <= seen + 1
    streamed = "".join(t["text"] for t in socket.received("token", since)).rstrip()
    assert shown(stored(model_client, doc["id"])["messages"][1])["text"] == streamed


def test_the_queue_reports_positions_and_stop_cancels_a_queued_job(open_chat, model_client):
    busy, busy_socket = open_chat(LONG_STORY)
    waiting, waiting_socket = open_chat(SHORT)
    since = waiting_socket.mark()
    first = busy_socket.emit("send", {"session_id": busy["id"], "revision": 1, "text": "Write a long story."})
    second = waiting_socket.emit("send", {"session_id": waiting["id"], "revision": 1, "text": "Hi"})
    assert first["ahead"] == 0 and second["ahead"] == 1
    assert waiting_socket.wait_for("queue_position", since)["ahead"] == 1
    # A busy session refuses changes until its reply is done or stopped.
    refused = busy_socket.emit("send", {"session_id": busy["id"], "revision": 2, "text": "again"})
    assert refused["error"]["code"] == "busy"
    assert model_client.delete(f"/api/sessions/{busy['id']}?revision=2").json["error"]["code"] == "busy"
    assert waiting_socket.emit("stop", {"session_id": waiting["id"]})["stopped"]
    finished = waiting_socket.wait_for("job_finished", since, job_id=second["job_id"])
    assert finished["reason"] == "stopped"
    assert waiting_socket.received("generation_started", since) == []
    assert [m["is_user"] for m in stored(model_client, waiting["id"])["messages"]] == [True]
    busy_socket.emit("stop", {"session_id": busy["id"]})
    busy_socket.wait_for("job_finished", job_id=first["job_id"])


def test_a_reloaded_page_gets_the_text_so_far_then_the_rest(open_chat, model_app, model_client, connect, tmp_path):
    doc, first_tab = open_chat(LONG_STORY)
    since = first_tab.mark()
    ack = first_tab.emit("send", {"session_id": doc["id"], "revision": 1, "text": "Write a long story about a dragon."})
    first_tab.wait_for("token", since)
    reloaded = connect(model_app, model_client)
    reloaded.emit("join", {"session_id": doc["id"]})
    snapshot = reloaded.wait_for("snapshot")
    job = snapshot["job"]
    assert job["state"] == "running" and job["job_id"] == ack["job_id"]
    message = next(m for m in snapshot["session"]["messages"] if m["id"] == job["reply"]["message_id"])
    so_far = message["swipes"][job["reply"]["swipe"]]["text"]
    assert len(so_far) == job["reply"]["length"] > 0
    # The reply is on disk while it streams: the worker saves the text so far before its next token.
    reloaded.wait_for("token")
    on_disk = json.loads((tmp_path / "sessions" / "local" / f"{doc['id']}.json").read_text())
    assert on_disk["messages"][-1]["swipes"][0]["text"].startswith(so_far)
    reloaded.emit("stop", {"session_id": doc["id"]})
    reloaded.wait_for("job_finished", job_id=ack["job_id"])
    rest = reloaded.received("token")
    assert rest[0]["offset"] == len(so_far)
    final = shown(stored(model_client, doc["id"])["messages"][1])["text"]
    assert (so_far + "".join(t["text"] for t in rest)).rstrip() == final
    assert final.startswith(on_disk["messages"][-1]["swipes"][0]["text"].rstrip())


def test_a_reply_whose_client_left_is_finished_and_saved(open_chat, model_app, model_client, connect):
    doc, socket = open_chat(SHORT)
    socket.emit("send", {"session_id": doc["id"], "revision": 1, "text": "Hello!"})
    socket.socket.disconnect()
    watcher = connect(model_app, model_client)
    watcher.emit("join", {"session_id": doc["id"]})
    watcher.wait_for("job_finished")
    reply = stored(model_client, doc["id"])["messages"][1]
    assert shown(reply)["text"] and shown(reply)["tokens"] > 0


def test_a_multibot_round_lets_each_bot_speak_at_most_once(open_chat, model_client):
    doc, socket = open_chat(SHORT, participants=PARTY)
    _, finished, since = run(socket, "send", {"session_id": doc["id"], "revision": 1, "text": "Hello everyone!"})
    authors = [started["author"] for started in socket.received("generation_started", since)]
    assert authors and len(authors) == len(set(authors)) and set(authors) <= {"Alice", "Bob"}
    assert [m["author"] for m in stored(model_client, doc["id"])["messages"]] == ["You", *authors]

    _, finished, since = run(socket, "send", {"session_id": doc["id"], "revision": finished["revision"],
                                              "text": "Bob, say something.", "next_speaker": "Bob"})
    assert [s["author"] for s in socket.received("generation_started", since)] == ["Bob"]

    count = len(stored(model_client, doc["id"])["messages"])
    _, finished, since = run(socket, "send", {"session_id": doc["id"], "revision": finished["revision"], "text": ""})
    messages = stored(model_client, doc["id"])["messages"]
    assert len(messages) > count and not any(m["is_user"] for m in messages[count:])

    unknown = socket.emit("send", {"session_id": doc["id"], "revision": finished["revision"], "next_speaker": "Eve"})
    assert unknown["error"]["code"] == "bad_request"


def test_the_chat_template_format_answers(open_chat, model_client):
    doc, socket = open_chat({"seed": 1, "max_reply_tokens": 8, "prompt_format": "chat_template"})
    _, finished, since = run(socket, "send", {"session_id": doc["id"], "revision": 1, "text": "What is 2 + 2?"})
    assert finished["reason"] == "done"
    assert shown(stored(model_client, doc["id"])["messages"][1])["text"]


def test_regenerate_and_continue_need_a_bot_reply_last(open_chat):
    doc, socket = open_chat(SHORT)
    for event in ("regenerate", "continue"):
        ack = socket.emit(event, {"session_id": doc["id"], "revision": 1})
        assert ack["error"]["code"] == "invalid_operation"


def test_a_reply_that_cannot_be_saved_for_a_full_disk_is_kept_and_saved_later(open_chat, model_client, monkeypatch):
    import errno
    import threading

    from webui import store, worker
    from webui.files import storage_error, write_atomic

    disk_full = threading.Event()

    def write_unless_full(path, data, keep_backup=False):
        if disk_full.is_set():
            raise storage_error(OSError(errno.ENOSPC, "No space left on device"), path)
        write_atomic(path, data, keep_backup)

    monkeypatch.setattr(store, "write_atomic", write_unless_full)
    monkeypatch.setattr(worker, "RETRY_SAVE_SECONDS", 0.1)
    doc, socket = open_chat(LONG_STORY)
    since = socket.mark()
    ack = socket.emit("send", {"session_id": doc["id"], "revision": 1, "text": "Write a long story about a dragon."})
    socket.wait_for("token", since)
    disk_full.set()
    socket.emit("stop", {"session_id": doc["id"]})
    error = socket.wait_for("chat_error", since)
    assert error["code"] == "disk_full" and "kept in memory" in error["message"]
    assert socket.wait_for("job_finished", since, job_id=ack["job_id"])["reason"] == "error"
    refused = socket.emit("delete_message", {"session_id": doc["id"], "revision": 3, "message_id": "x"})
    assert refused["error"]["code"] == "busy"

    disk_full.clear()
    saved = socket.wait_for("session_updated", since, revision=4)["session"]
    streamed = "".join(t["text"] for t in socket.received("token", since)).rstrip()
    assert shown(saved["messages"][1])["text"] == streamed
    assert stored(model_client, doc["id"]) == saved
