"""LoRA adapters in the chat: a session's default adapter and each bot's own, stored in the session file
and applied by the worker. Replies are compared with direct engine runs of the same prompt and adapter, on
the real default model on CPU with two small random adapters."""

import json

import pytest

import engine
from engine.generator import Generator
from engine.sampling import SamplingSettings
from webui import create_app
from webui.prompt import build_prompt

from adapters import write_adapter
from conftest import make_config

GREEDY = {"temperature": 0.0, "max_reply_tokens": 8}
PARTY = [
    {"name": "You", "persona": "", "is_user": True},
    {"name": "Alice", "persona": "Alice is a pirate captain.", "is_user": False, "adapter": "beta"},
    {"name": "Bob", "persona": "Bob is a talking parrot.", "is_user": False},  # speaks with the session default
]


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    """Its own copy of the default model with adapters alpha and beta; the shared one stays adapter-free.
    The adapters need the model's layer shapes, so they are added after loading, as load_model's lora does."""
    model = engine.load_model("default", device="cpu")
    root = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(["alpha", "beta"]):
        model.adapters.load(name, write_adapter(root / name, model.config, seed))
    return model


@pytest.fixture
def lora_app(tmp_path, lora_model):
    app = create_app(make_config(tmp_path), model=lora_model)
    yield app
    app.extensions["generation_worker"].close()


@pytest.fixture
def chat(lora_app, connect, new_session):
    """chat(**fields) -> (http client, session, socket joined to it)."""
    client = lora_app.test_client()

    def open_one(**fields):
        doc = new_session(client, **fields)
        socket = connect(lora_app, client)
        assert socket.emit("join", {"session_id": doc["id"]})["ok"]
        return client, doc, socket

    return open_one


def run(socket, event, data):
    """Emit a job request and wait for the job to end; returns (job_finished, index before the request)."""
    since = socket.mark()
    ack = socket.emit(event, data)
    assert ack["ok"], ack
    return socket.wait_for("job_finished", since, job_id=ack["job_id"]), since


def shown(message):
    return message["swipes"][message["chosen"]]


def direct_reply(model, doc, index, adapters):
    """What the engine alone says for message `index` of `doc`: the worker's prompt for that turn, run by a
    fresh generator with `adapters`."""
    message = doc["messages"][index]
    settings = doc["settings"]
    prompt = build_prompt(doc, model.tokenizer, doc["messages"][:index], message["author"], None,
                          model.max_seq_len - settings["max_reply_tokens"])
    stream = Generator(model).generate(prompt.ids, SamplingSettings.from_dict(settings),
                                       max_new_tokens=settings["max_reply_tokens"], stop_strings=prompt.stop_strings,
                                       adapters=adapters)
    "".join(stream)
    return stream.result.text.strip(), len(stream.result.token_ids)


def test_each_bot_speaks_with_its_own_adapter_or_the_session_default(chat, lora_model, tmp_path):
    client, doc, socket = chat(participants=PARTY, settings={**GREEDY, "adapter": "alpha"})
    finished, _ = run(socket, "send", {"session_id": doc["id"], "revision": 1, "text": "Ahoy! Who goes there?",
                                       "next_speaker": "Alice"})
    finished, _ = run(socket, "send", {"session_id": doc["id"], "revision": finished["revision"], "text": "",
                                       "next_speaker": "Bob"})
    assert finished["reason"] == "done"
    saved = client.get(f"/api/sessions/{doc['id']}").json["session"]
    # The file stores both choices: Alice's own adapter, and the default that Bob falls back to.
    on_disk = json.loads((tmp_path / "sessions" / "local" / f"{doc['id']}.json").read_text())
    assert on_disk["settings"]["adapter"] == "alpha"
    assert [p.get("adapter") for p in on_disk["participants"]] == [None, "beta", None]
    assert "adapter" not in on_disk["participants"][2]  # unset stays absent, as in files from before adapters

    # A new alternative of Bob's reply is written with Bob's adapter too. (Before the direct runs below:
    # they overwrite the model's KV cache behind the worker's back.)
    run(socket, "regenerate", {"session_id": doc["id"], "revision": saved["revision"]})
    swipes = client.get(f"/api/sessions/{doc['id']}").json["session"]["messages"][-1]["swipes"]
    assert [swipe["text"] for swipe in swipes] == [shown(saved["messages"][2])["text"]] * 2

    _, alice, bob = saved["messages"]
    assert (alice["author"], bob["author"]) == ("Alice", "Bob")
    for message, index, adapter in [(alice, 1, "beta"), (bob, 2, "alpha")]:
        text, tokens = direct_reply(lora_model, saved, index, {adapter: 1.0})
        assert shown(message)["text"] == text and shown(message)["tokens"] == tokens
        # The adapter must matter, or matching says nothing.
        assert direct_reply(lora_model, saved, index, None)[0] != text
        other = "alpha" if adapter == "beta" else "beta"
        assert direct_reply(lora_model, saved, index, {other: 1.0})[0] != text



@pytest.mark.parametrize("fields, send", [
    ({"settings": {**GREEDY, "adapter": "nope"}}, {}),  # the default adapter picks the speaker in a round
    ({"participants": [*PARTY[:2], {**PARTY[2], "adapter": "nope"}], "settings": GREEDY}, {"next_speaker": "Bob"}),
], ids=["session_default", "bot"])
def test_an_adapter_the_server_did_not_load_is_refused_by_name(chat, fields, send):
    client, doc, socket = chat(**{"participants": PARTY, **fields})
    finished, since = run(socket, "send", {"session_id": doc["id"], "revision": 1, "text": "Hi", **send})
    assert finished["reason"] == "error"
    error = socket.received("chat_error", since)[0]
    assert error["code"] == "invalid_operation"
    assert "'nope'" in error["message"] and "alpha, beta" in error["message"]
    # Refused before anything was written: the user's message is there, no empty reply.
    saved = client.get(f"/api/sessions/{doc['id']}").json["session"]
    assert [message["author"] for message in saved["messages"]] == ["You"]


def test_adapter_fields_are_checked_and_old_documents_still_read(lora_app, new_session):
    client = lora_app.test_client()
    too_long = client.post("/api/sessions", json={"settings": {"adapter": "x" * 65}})
    assert too_long.status_code == 400 and "too long" in too_long.json["error"]["message"]
    not_text = client.post("/api/sessions", json={"participants": [{**PARTY[0]}, {**PARTY[1], "adapter": 3}]})
    assert not_text.status_code == 400 and "Alice" in not_text.json["error"]["message"]
    doc = new_session(client, participants=PARTY)
    changed = client.patch(f"/api/sessions/{doc['id']}", json={"revision": 1, "settings": {"adapter": "beta"}})
    assert changed.json["session"]["settings"]["adapter"] == "beta"
    cleared = client.patch(f"/api/sessions/{doc['id']}", json={"revision": 2, "settings": {"adapter": None}})
    assert cleared.json["session"]["settings"]["adapter"] is None
    # A document from before adapters: no settings.adapter, no participant adapters.
    old = {**doc, "participants": [PARTY[0], {k: v for k, v in PARTY[1].items() if k != "adapter"}]}
    old["settings"] = {k: v for k, v in doc["settings"].items() if k != "adapter"}
    imported = client.post("/api/sessions/import", json=old)
    assert imported.status_code == 201 and imported.json["session"]["settings"]["adapter"] is None


def test_the_model_route_lists_the_loaded_adapters(lora_app):
    assert lora_app.test_client().get("/api/model").json["adapters"] == ["alpha", "beta"]
