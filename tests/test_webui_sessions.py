"""HTTP routes that manage sessions: list, create, read, set up, delete, duplicate, branch, export, import."""

import json

import pytest

from webui import schema


def test_create_list_get_and_rename(client, new_session):
    doc = new_session(client, title="Pirates")
    assert doc["revision"] == 1 and doc["title"] == "Pirates"
    assert [entry["id"] for entry in client.get("/api/sessions").json["sessions"]] == [doc["id"]]
    renamed = client.patch(f"/api/sessions/{doc['id']}", json={"revision": 1, "title": "Ships"})
    assert renamed.status_code == 200
    assert renamed.json["session"]["title"] == "Ships" and renamed.json["session"]["revision"] == 2
    assert client.get(f"/api/sessions/{doc['id']}").json["session"]["title"] == "Ships"


def test_set_participants_fixed_prompt_and_settings(client, new_session):
    doc = new_session(client)
    participants = [
        {"name": "Ann", "persona": "", "is_user": True},
        {"name": "Alice", "persona": "Alice is a pirate.", "is_user": False},
        {"name": "Bob", "persona": "Bob is a parrot.", "is_user": False},
    ]
    response = client.patch(f"/api/sessions/{doc['id']}", json={
        "revision": 1, "participants": participants, "fixed_prompt": "On a ship.", "keep_fixed_prompt": False,
        "settings": {"temperature": 0.3, "top_k": 20, "seed": 7, "end_on_newline": True},
    })
    assert response.status_code == 200, response.json
    saved = response.json["session"]
    assert saved["participants"] == participants
    assert saved["fixed_prompt"] == "On a ship." and saved["keep_fixed_prompt"] is False
    assert saved["settings"]["temperature"] == 0.3 and saved["settings"]["seed"] == 7
    assert saved["settings"]["top_p"] == schema.default_settings()["top_p"]  # untouched settings stay


@pytest.mark.parametrize("change, words", [
    ({"settings": {"temperature": 9}}, "between"),
    ({"settings": {"top_k": 1.5}}, "whole number"),
    ({"settings": {"nonsense": 1}}, "Unknown setting"),
    ({"settings": {"prompt_format": "chat_template"}, "participants": [
        {"name": "U", "is_user": True}, {"name": "A"}, {"name": "B"}]}, "exactly one bot"),
    ({"participants": [{"name": "A: B", "is_user": True}, {"name": "C"}]}, "colon"),
    ({"participants": [{"name": "A", "is_user": True}, {"name": "a"}]}, "names must differ"),
    ({"participants": [{"name": "A"}, {"name": "B"}]}, "Exactly one participant must be the user"),
    ({"title": ""}, "must not be empty"),
    ({"owner": "bob"}, "not a session setting"),
])
def test_bad_setup_is_refused_with_a_reason(client, new_session, change, words):
    doc = new_session(client)
    response = client.patch(f"/api/sessions/{doc['id']}", json={"revision": 1, **change})
    assert response.status_code == 400
    assert response.json["error"]["code"] == "bad_request"
    assert words in response.json["error"]["message"]
    assert client.get(f"/api/sessions/{doc['id']}").json["session"]["revision"] == 1


def test_a_change_based_on_a_stale_revision_is_refused(client, new_session):
    doc = new_session(client)
    assert client.patch(f"/api/sessions/{doc['id']}", json={"revision": 1, "title": "tab one"}).status_code == 200
    response = client.patch(f"/api/sessions/{doc['id']}", json={"revision": 1, "title": "tab two"})
    assert response.status_code == 409
    assert response.json["error"]["code"] == "stale_revision"
    assert client.get(f"/api/sessions/{doc['id']}").json["session"]["title"] == "tab one"
    missing = client.patch(f"/api/sessions/{doc['id']}", json={"title": "no revision"})
    assert missing.status_code == 400


def test_delete(client, new_session):
    doc = new_session(client)
    assert client.delete(f"/api/sessions/{doc['id']}").status_code == 400  # no revision
    assert client.delete(f"/api/sessions/{doc['id']}?revision=1").json == {"deleted": doc["id"]}
    assert client.get(f"/api/sessions/{doc['id']}").status_code == 404
    assert client.get("/api/sessions").json["sessions"] == []


def exported_with_messages(client, doc, texts):
    exported = client.get(f"/api/sessions/{doc['id']}/export").json
    for number, text in enumerate(texts):
        exported["messages"].append({
            "id": f"m{number}", "author": "You" if number % 2 == 0 else "Assistant", "is_user": number % 2 == 0,
            "chosen": 0, "swipes": [{"text": text, "time": schema.now(), "tokens": None, "tokens_per_second": None}],
        })
    return exported


def test_export_and_import_round_trip_under_a_new_id(client, new_session):
    doc = new_session(client, title="Original")
    export = client.get(f"/api/sessions/{doc['id']}/export")
    assert export.headers["Content-Disposition"].startswith("attachment")
    imported = client.post("/api/sessions/import", json=exported_with_messages(client, doc, ["hi", "hello"]))
    assert imported.status_code == 201
    new = imported.json["session"]
    assert new["id"] != doc["id"] and new["revision"] == 1 and new["title"] == "Original"
    assert [message["swipes"][0]["text"] for message in new["messages"]] == ["hi", "hello"]
    assert len(client.get("/api/sessions").json["sessions"]) == 2


@pytest.mark.parametrize("spoil", [
    lambda e: e.pop("messages"),
    lambda e: e.update(schema=99),
    lambda e: e.update(revision="1"),
    lambda e: e["messages"][0].update(chosen=3),
    lambda e: e["messages"][1].update(id=e["messages"][0]["id"]),
    lambda e: e["messages"][0]["swipes"][0].update(tokens=-1),
    lambda e: e["participants"].append({"name": "x" * 500}),
    lambda e: e.update(extra=True),
])
def test_import_is_validated(client, new_session, spoil):
    doc = new_session(client)
    exported = exported_with_messages(client, doc, ["a", "b"])
    spoil(exported)
    response = client.post("/api/sessions/import", json=exported)
    assert response.status_code == 400
    assert response.json["error"]["message"].startswith("That is not a session export")
    assert len(client.get("/api/sessions").json["sessions"]) == 1


def test_oversize_import_and_bodies_are_refused(client, new_session):
    doc = new_session(client)
    exported = exported_with_messages(client, doc, ["x" * 1000] * 9000)
    response = client.post("/api/sessions/import", data=json.dumps(exported), content_type="application/json")
    assert response.status_code == 413
    assert response.json["error"]["code"] == "too_large"
    too_long_prompt = client.patch(f"/api/sessions/{doc['id']}",
                                   json={"revision": 1, "fixed_prompt": "x" * (schema.MAX_FIXED_PROMPT + 1)})
    assert too_long_prompt.status_code == 400 and "too long" in too_long_prompt.json["error"]["message"]


def test_duplicate_and_branch(client, new_session):
    doc = new_session(client, title="Story")
    imported = client.post("/api/sessions/import", json=exported_with_messages(client, doc, ["one", "two", "three"]))
    source = imported.json["session"]
    duplicate = client.post(f"/api/sessions/{source['id']}/duplicate").json["session"]
    assert duplicate["title"] == "Story (copy)" and len(duplicate["messages"]) == 3
    branch = client.post(f"/api/sessions/{source['id']}/branch", json={"message_id": "m1"}).json["session"]
    assert branch["title"] == "Story (branch)"
    assert [message["id"] for message in branch["messages"]] == ["m0", "m1"]
    assert len(client.get(f"/api/sessions/{source['id']}").json["session"]["messages"]) == 3
    missing = client.post(f"/api/sessions/{source['id']}/branch", json={"message_id": "nope"})
    assert missing.status_code == 404


@pytest.mark.parametrize("path", [
    "/api/sessions/..%2F..%2Fsecret", "/api/sessions/..", "/api/sessions/%2e%2e", "/api/sessions/.secret_key",
    "/api/sessions/" + "a" * 31, "/api/sessions/" + "A" * 32, "/api/sessions/.users.json/export",
])
def test_traversal_ids_are_refused(client, path):
    response = client.get(path)
    assert response.status_code in (400, 404)
    assert "error" in response.json and "Traceback" not in response.get_data(as_text=True)


def test_malformed_bodies_get_json_errors(client, new_session):
    doc = new_session(client)
    for response in (
        client.post("/api/sessions", data="not json", content_type="application/json"),
        client.patch(f"/api/sessions/{doc['id']}", data="[1, 2]", content_type="application/json"),
        client.post(f"/api/sessions/{doc['id']}/branch", json={"message_id": ["x"]}),
        client.post("/api/sessions/import", data="{", content_type="application/json"),
    ):
        assert response.status_code == 400
        assert set(response.json["error"]) == {"code", "message"}
    assert client.get("/api/nothing-here").json["error"]["code"] == "not_found"


def test_the_index_page_is_served(client):
    assert client.get("/").status_code == 200
