"""Regenerate with a count: several alternatives (swipes) of the last reply written at once by the real
default model on CPU, streamed side by side, saved while they stream and when they end."""

import json

import pytest

from webui import schema

SHORT = {"seed": 1, "max_reply_tokens": 8}
LONG_STORY = {"seed": 1, "max_reply_tokens": 200, "prompt_format": "chat_template"}


def swipe(text):
    return {"text": text, "time": schema.now(), "tokens": None, "tokens_per_second": None}


@pytest.fixture
def open_chat(model_app, model_client, connect, new_session):
    """open_chat(settings, bot_swipes=None) -> (session, joined socket); with bot_swipes the session already
    holds a user message and a bot reply with these alternatives, the first shown."""

    def open_one(settings, bot_swipes=None):
        doc = new_session(model_client, settings=settings)
        if bot_swipes is not None:
            exported = model_client.get(f"/api/sessions/{doc['id']}/export").json
            exported["messages"] = [
                {"id": "ask", "author": "You", "is_user": True, "chosen": 0,
                 "swipes": [swipe("Write a long story about a dragon.")]},
                {"id": "reply", "author": "Assistant", "is_user": False, "chosen": 0,
                 "swipes": [swipe(text) for text in bot_swipes]},
            ]
            doc = model_client.post("/api/sessions/import", json=exported).json["session"]
        socket = connect(model_app, model_client)
        assert socket.emit("join", {"session_id": doc["id"]})["ok"]
        return doc, socket

    return open_one


def stored(client, session_id):
    return client.get(f"/api/sessions/{session_id}").json["session"]


def streamed_texts(tokens) -> dict[int, str]:
    """Each swipe's text as its token events build it, checking that its offsets are contiguous."""
    texts: dict[int, str] = {}
    for token in tokens:
        text = texts.get(token["swipe"], "")
        assert token["offset"] == len(text)
        texts[token["swipe"]] = text + token["text"]
    return texts


def test_regenerate_with_a_count_streams_and_saves_every_swipe(open_chat, model_client):
    doc, socket = open_chat(SHORT)
    since = socket.mark()
    ack = socket.emit("send", {"session_id": doc["id"], "revision": 1, "text": "Hello! Who are you?"})
    finished = socket.wait_for("job_finished", since, job_id=ack["job_id"])

    since = socket.mark()
    ack = socket.emit("regenerate", {"session_id": doc["id"], "revision": finished["revision"], "count": 3})
    assert ack["ok"], ack
    finished = socket.wait_for("job_finished", since, job_id=ack["job_id"])
    assert finished["reason"] == "done"
    assert [started["swipe"] for started in socket.received("generation_started", since)] == [1, 2, 3]
    texts = streamed_texts(socket.received("token", since))
    done = socket.received("generation_finished", since)
    assert [d["swipe"] for d in done] == [1, 2, 3] and all(d["kept"] for d in done)

    reply = stored(model_client, doc["id"])["messages"][1]
    assert len(reply["swipes"]) == 4 and reply["chosen"] == 1
    # The message the job writes is known from its first event on. The saved session comes right after the
    # swipes are announced finished, so that a client knows which removed swipes it lacks when it arrives.
    assert ack["message_id"] == socket.received("queue_position", since)[0]["message_id"] == reply["id"]
    assert [name for name, _ in socket.events[since:] if name != "token"][-5:] == [
        "generation_finished", "generation_finished", "generation_finished", "session_updated", "job_finished"]
    assert socket.received("session_updated", since)[-1]["revision"] == done[0]["revision"]
    for index, d in zip([1, 2, 3], done):
        saved = reply["swipes"][index]
        assert saved["text"] == texts[index].rstrip() and saved["tokens"] == d["tokens"] > 0
        assert saved["tokens_per_second"] > 0
    # The first new swipe draws with the session's seed, as the first reply did, so it is the same text;
    # the others draw with the next seeds.
    assert reply["swipes"][1]["text"] == reply["swipes"][0]["text"]
    assert len({reply["swipes"][i]["text"] for i in (1, 2, 3)}) > 1
    assert finished["revision"] == stored(model_client, doc["id"])["revision"]


def test_swipes_are_saved_and_shown_to_a_new_tab_while_they_stream(open_chat, model_app, model_client, connect,
                                                                   tmp_path):
    doc, socket = open_chat(LONG_STORY, bot_swipes=["Once there was a dragon."])
    since = socket.mark()
    ack = socket.emit("regenerate", {"session_id": doc["id"], "revision": doc["revision"], "count": 2})
    assert ack["ok"], ack
    socket.wait_for("token", since, swipe=1)
    socket.wait_for("token", since, swipe=2)

    # A tab that joins now gets both swipes' text so far, then the rest of each.
    second_tab = connect(model_app, model_client)
    second_tab.emit("join", {"session_id": doc["id"]})
    job = second_tab.wait_for("snapshot")["job"]
    message = second_tab.received("snapshot")[0]["session"]["messages"][1]
    assert job["message_id"] == "reply"
    assert [entry["swipe"] for entry in job["reply"]["swipes"]] == [1, 2]
    so_far = {entry["swipe"]: message["swipes"][entry["swipe"]]["text"] for entry in job["reply"]["swipes"]}
    assert all(len(so_far[entry["swipe"]]) == entry["length"] > 0 for entry in job["reply"]["swipes"])
    # Both swipes are on disk while they stream.
    second_tab.wait_for("token")
    on_disk = json.loads((tmp_path / "sessions" / "local" / f"{doc['id']}.json").read_text())["messages"][1]
    assert all(on_disk["swipes"][index]["text"].startswith(so_far[index]) for index in (1, 2))

    socket.emit("stop", {"session_id": doc["id"]})
    assert socket.wait_for("job_finished", since, job_id=ack["job_id"])["reason"] == "stopped"
    assert [d["stop_reason"] for d in socket.received("generation_finished", since)] == ["cancelled", "cancelled"]
    texts = streamed_texts(socket.received("token", since))
    rest = {}
    for token in second_tab.received("token"):
        assert token["offset"] == len(so_far[token["swipe"]]) + len(rest.get(token["swipe"], ""))
        rest[token["swipe"]] = rest.get(token["swipe"], "") + token["text"]
    reply = stored(model_client, doc["id"])["messages"][1]
    assert [s["text"] for s in reply["swipes"]] == ["Once there was a dragon.", texts[1].rstrip(), texts[2].rstrip()]
    assert all((so_far[i] + rest.get(i, "")).rstrip() == texts[i].rstrip() for i in (1, 2))


def test_regenerate_counts_are_checked(open_chat):
    doc, socket = open_chat(SHORT, bot_swipes=[f"Take {i}." for i in range(schema.MAX_SWIPES - 2)])
    for count in (0, 17, "3", True):
        refused = socket.emit("regenerate", {"session_id": doc["id"], "revision": doc["revision"], "count": count})
        assert refused["error"]["code"] == "bad_request"
    refused = socket.emit("regenerate", {"session_id": doc["id"], "revision": doc["revision"], "count": 3})
    assert refused["error"]["code"] == "invalid_operation" and "Only 2 more" in refused["error"]["message"]
