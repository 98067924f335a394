"""The session store on disk: atomic writes with a backup, revisions, damaged files, full disks, crashes."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from webui import schema
from webui.errors import WebUIError
from webui.store import SessionStore


@pytest.fixture
def store(tmp_path):
    return SessionStore(tmp_path / "sessions")


def add_text(text):
    def change(doc):
        doc["messages"].append(
            {"id": schema.new_message_id(), "author": "You", "is_user": True, "chosen": 0,
             "swipes": [{"text": text, "time": schema.now(), "tokens": None, "tokens_per_second": None}]}
        )

    return change


def test_update_bumps_revision_and_keeps_previous_version_as_backup(store):
    doc = store.create("alice", schema.new_session("Chat"))
    path = store.root / "alice" / f"{doc['id']}.json"
    updated = store.update("alice", doc["id"], 1, add_text("hello"))
    assert updated["revision"] == 2
    assert json.loads(path.read_text())["messages"][0]["swipes"][0]["text"] == "hello"
    assert json.loads((path.parent / f"{path.name}.bak").read_text())["revision"] == 1
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_stale_revision_is_refused_and_nothing_changes(store):
    doc = store.create("alice", schema.new_session())
    store.update("alice", doc["id"], 1, add_text("first tab"))
    before = (store.root / "alice" / f"{doc['id']}.json").read_bytes()
    with pytest.raises(WebUIError) as refused:
        store.update("alice", doc["id"], 1, add_text("second tab, based on revision 1"))
    assert refused.value.code == "stale_revision"
    assert "another tab" in refused.value.message
    assert (store.root / "alice" / f"{doc['id']}.json").read_bytes() == before


def test_progress_saves_keep_the_revision(store):
    doc = store.create("alice", schema.new_session())
    saved = store.save_progress("alice", doc["id"], add_text("partial"))
    assert saved["revision"] == 1
    assert store.load("alice", doc["id"])["messages"][0]["swipes"][0]["text"] == "partial"


@pytest.mark.parametrize("bad_id", ["../alice/x", "..", "a" * 32 + "/..", "A" * 32, "0" * 31, "", None, 5])
def test_malformed_session_ids_never_reach_the_filesystem(store, bad_id):
    with pytest.raises(WebUIError) as refused:
        store.load("alice", bad_id)
    assert refused.value.code == "bad_request"


@pytest.mark.parametrize("bad_user", ["../etc", ".hidden", "Alice", "a/b", "", "x" * 33])
def test_malformed_user_names_never_reach_the_filesystem(store, bad_user):
    with pytest.raises(WebUIError):
        store.list(bad_user)


def test_a_damaged_file_is_reported_and_left_untouched(store):
    doc = store.create("alice", schema.new_session())
    path = store.root / "alice" / f"{doc['id']}.json"
    path.write_text('{"schema": 1, "id": "trunc')
    damaged = path.read_bytes()
    with pytest.raises(WebUIError) as refused:
        store.load("alice", doc["id"])
    assert refused.value.code == "corrupt"
    assert ".bak" in refused.value.message
    with pytest.raises(WebUIError):
        store.update("alice", doc["id"], 1, add_text("this must not replace the damaged file"))
    listed = store.list("alice")
    assert listed == [{"id": doc["id"], "error": listed[0]["error"]}]
    assert listed[0]["error"]["code"] == "corrupt"
    assert path.read_bytes() == damaged


def test_a_file_from_a_newer_server_is_reported_not_rewritten(store):
    doc = store.create("alice", schema.new_session())
    path = store.root / "alice" / f"{doc['id']}.json"
    path.write_text(json.dumps(dict(doc, schema=2)))
    with pytest.raises(WebUIError) as refused:
        store.load("alice", doc["id"])
    assert "newer version" in refused.value.message


def test_a_failure_mid_write_leaves_the_previous_file_intact(store, monkeypatch):
    doc = store.create("alice", schema.new_session())
    store.update("alice", doc["id"], 1, add_text("kept"))
    path = store.root / "alice" / f"{doc['id']}.json"
    before = path.read_bytes()

    def fail(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(WebUIError) as refused:
        store.update("alice", doc["id"], 2, add_text("lost"))
    assert refused.value.code == "storage"
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, f"{path.name}.bak"])


def test_a_full_disk_gives_a_clear_error_and_loses_nothing(store, monkeypatch):
    doc = store.create("alice", schema.new_session())
    path = store.root / "alice" / f"{doc['id']}.json"
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(WebUIError) as refused:
        store.update("alice", doc["id"], 1, add_text("does not fit"))
    assert refused.value.code == "disk_full"
    assert "free some space" in refused.value.message
    assert path.read_bytes() == before
    assert store.load("alice", doc["id"])["revision"] == 1


def test_a_process_killed_mid_write_leaves_a_whole_file(store):
    """A real crash: a child process is killed while it writes; the file still reads back whole."""
    doc = store.create("alice", schema.new_session())
    store.update("alice", doc["id"], 1, add_text("before the crash"))
    script = textwrap.dedent(f"""
        import os, sys, time
        from webui.store import SessionStore
        def slow_fsync(fd):
            print("writing", flush=True)
            time.sleep(60)
        os.fsync = slow_fsync
        def change(doc):
            doc["title"] = "x" * 150
        SessionStore({str(store.root)!r}).update("alice", {doc['id']!r}, 2, change)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    survived = store.load("alice", doc["id"])
    assert survived["revision"] == 2
    assert survived["messages"][0]["swipes"][0]["text"] == "before the crash"


def test_listing_shows_newest_first_and_only_the_users_own(store):
    first = store.create("alice", schema.new_session("first"))
    second = store.create("alice", schema.new_session("second"))
    store.create("bob", schema.new_session("bob's"))
    store.update("alice", first["id"], 1, add_text("touch"))
    assert [entry["title"] for entry in store.list("alice")] == ["first", "second"]
    assert second["id"] in [entry["id"] for entry in store.list("alice")]
    assert [entry["title"] for entry in store.list("bob")] == ["bob's"]


def test_delete_needs_the_current_revision(store):
    doc = store.create("alice", schema.new_session())
    with pytest.raises(WebUIError):
        store.delete("alice", doc["id"], 7)
    store.delete("alice", doc["id"], 1)
    assert store.list("alice") == []
