"""Users: local mode, accounts with --auth, the cookie, the secret key, `adduser`, and that no request or
socket event reaches another user's sessions."""

import json
import stat

import pytest

import app as server
from webui.accounts import Accounts

PASSWORD = "correct horse"


def register(client, name):
    response = client.post("/auth/register", json={"username": name, "password": PASSWORD})
    assert response.status_code == 201, response.json
    return response


def test_local_mode_has_one_implicit_user(client, tmp_path, new_session):
    assert client.get("/auth/me").json == {"user": "local", "auth": False, "allow_register": False}
    doc = new_session(client)
    assert (tmp_path / "sessions" / "local" / f"{doc['id']}.json").exists()
    assert client.post("/auth/login", json={"username": "x", "password": PASSWORD}).status_code == 400


def test_auth_mode_requires_login_for_http_and_sockets(auth_app, connect):
    client = auth_app.test_client()
    response = client.get("/api/sessions")
    assert response.status_code == 401 and response.json["error"]["code"] == "login_required"
    assert not connect(auth_app, client).socket.is_connected()


def test_register_login_logout_and_the_cookie(auth_app, tmp_path):
    client = auth_app.test_client()
    response = register(client, "alice")
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert client.get("/auth/me").json["user"] == "alice"
    assert client.post("/auth/logout").status_code == 200
    assert client.get("/api/sessions").status_code == 401
    wrong = client.post("/auth/login", json={"username": "alice", "password": "wrong password"})
    assert wrong.status_code == 401 and wrong.json["error"]["message"] == "Wrong user name or password."
    unknown = client.post("/auth/login", json={"username": "nobody", "password": PASSWORD})
    assert unknown.json == wrong.json
    assert client.post("/auth/login", json={"username": "alice", "password": PASSWORD}).status_code == 200
    assert client.get("/api/sessions").status_code == 200
    stored = json.loads((tmp_path / "sessions" / ".users.json").read_text())["users"]["alice"]
    assert PASSWORD not in stored and stored.startswith(("scrypt:", "pbkdf2:"))


@pytest.mark.parametrize("name, password, code", [
    ("alice", PASSWORD, "user_exists"), ("local", PASSWORD, "user_exists"), ("../x", PASSWORD, "bad_request"),
    ("bob", "short", "bad_request"), ("bob", None, "bad_request"),
])
def test_registration_refusals(auth_app, name, password, code):
    register(auth_app.test_client(), "alice")
    response = auth_app.test_client().post("/auth/register", json={"username": name, "password": password})
    assert response.json["error"]["code"] == code


def test_registration_can_be_closed(make_app):
    closed = make_app(AUTH=True).test_client()
    response = closed.post("/auth/register", json={"username": "bob", "password": PASSWORD})
    assert response.status_code == 403 and response.json["error"]["code"] == "registration_closed"


def test_the_secret_key_is_made_once_and_private(make_app, tmp_path):
    first = make_app()
    key_file = tmp_path / "sessions" / ".secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert make_app().secret_key == first.secret_key


def test_adduser_command(make_app, tmp_path, monkeypatch, capsys):
    answers = iter([PASSWORD, PASSWORD])
    monkeypatch.setattr(server.getpass, "getpass", lambda prompt: next(answers))
    assert server.main(["--sessions-dir", str(tmp_path / "sessions"), "adduser", "carol"]) == 0
    assert Accounts(tmp_path / "sessions" / ".users.json").verify("carol", PASSWORD)
    client = make_app(AUTH=True).test_client()
    assert client.post("/auth/login", json={"username": "carol", "password": PASSWORD}).status_code == 200
    mismatched = iter([PASSWORD, "something else"])
    monkeypatch.setattr(server.getpass, "getpass", lambda prompt: next(mismatched))
    assert server.main(["--sessions-dir", str(tmp_path / "sessions"), "adduser", "dave"]) == 1
    assert "differ" in capsys.readouterr().err


def test_the_server_refuses_a_public_host_without_auth(capsys):
    assert server.main(["--host", "0.0.0.0"]) == 2
    assert "without --auth" in capsys.readouterr().err
    assert server.is_loopback("127.0.0.1") and server.is_loopback("::1") and server.is_loopback("localhost")
    assert not server.is_loopback("192.168.1.5")


def test_a_user_cannot_reach_another_users_session(auth_app, connect, new_session, tmp_path):
    alice, bob = auth_app.test_client(), auth_app.test_client()
    register(alice, "alice")
    register(bob, "bob")
    doc = new_session(alice, title="Alice's secrets")
    path = tmp_path / "sessions" / "alice" / f"{doc['id']}.json"
    before = path.read_bytes()
    base = f"/api/sessions/{doc['id']}"

    assert bob.get("/api/sessions").json["sessions"] == []
    for response in (
        bob.get(base),
        bob.get(f"{base}/export"),
        bob.patch(base, json={"revision": 1, "title": "mine now"}),
        bob.delete(f"{base}?revision=1"),
        bob.post(f"{base}/duplicate"),
        bob.post(f"{base}/branch", json={"message_id": "x"}),
    ):
        assert response.status_code == 404, response.json
        assert response.json["error"]["code"] == "not_found"

    socket = connect(auth_app, bob)
    assert socket.socket.is_connected()
    for event, data in (
        ("join", {"session_id": doc["id"]}),
        ("send", {"session_id": doc["id"], "revision": 1, "text": "hi"}),
        ("edit_message", {"session_id": doc["id"], "revision": 1, "message_id": "m1", "text": "x"}),
        ("rewind", {"session_id": doc["id"], "revision": 1, "message_id": "m1"}),
        ("stop", {"session_id": doc["id"]}),
    ):
        ack = socket.emit(event, data)
        assert ack["ok"] is False and ack["error"]["code"] == "not_found", (event, ack)
    assert [error["code"] for error in socket.received("chat_error")] == ["not_found"] * 5
    assert socket.received("snapshot") == []
    assert path.read_bytes() == before
    assert bob.get("/api/sessions").json["sessions"] == []


def test_a_broadcast_reaches_only_the_owners_room(auth_app, connect, new_session):
    alice, bob = auth_app.test_client(), auth_app.test_client()
    register(alice, "alice")
    register(bob, "bob")
    doc = new_session(alice)
    alice_socket, bob_socket = connect(auth_app, alice), connect(auth_app, bob)
    assert alice_socket.emit("join", {"session_id": doc["id"]})["ok"]
    bob_socket.emit("join", {"session_id": doc["id"]})
    alice.patch(f"/api/sessions/{doc['id']}", json={"revision": 1, "title": "private"})
    assert alice_socket.wait_for("session_updated")["session"]["title"] == "private"
    assert bob_socket.received("session_updated") == []
