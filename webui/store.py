"""Sessions on disk: one JSON file per session under <root>/<user>/, written atomically with the
previous version kept as `.bak`, and guarded by a revision number against lost updates."""

import json
import logging
import re
import threading
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Callable

from flask import current_app

from . import schema
from .errors import WebUIError
from .files import backup_path, write_atomic

log = logging.getLogger(__name__)

# User names become folder names, so they are restricted to characters that are safe in any path.
USER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

Change = Callable[[dict], None]


def current_store() -> "SessionStore":
    return current_app.extensions["session_store"]


def check_session_id(session_id) -> str:
    if not isinstance(session_id, str) or not schema.SESSION_ID.fullmatch(session_id):
        raise WebUIError("bad_request", "That is not a valid session id (32 hexadecimal digits).")
    return session_id


class SessionStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()

    def list(self, user: str) -> list[dict]:
        """Summaries, newest first; a damaged file is listed with its error rather than hidden."""
        folder = self._folder(user)
        summaries = []
        for path in folder.glob("*.json") if folder.exists() else []:
            if not schema.SESSION_ID.fullmatch(path.stem):
                continue
            try:
                summaries.append(summary(self._read(path)))
            except WebUIError as exc:
                summaries.append({"id": path.stem, "error": exc.to_dict()})
        return sorted(summaries, key=lambda entry: entry.get("updated", ""), reverse=True)

    def load(self, user: str, session_id: str) -> dict:
        return self._read(self._path(user, session_id))

    def create(self, user: str, doc: dict) -> dict:
        """Store a checked document under a new id, at revision 1."""
        doc = checked(dict(doc, id=uuid.uuid4().hex, revision=1, updated=schema.now()))
        folder = self._folder(user)
        folder.mkdir(parents=True, exist_ok=True)
        self._write(folder / f"{doc['id']}.json", doc)
        return doc

    def update(self, user: str, session_id: str, revision: int | None, change: Change) -> dict:
        """Apply `change` to the stored document and save it as the next revision. A `revision` other than
        the stored one is refused; None skips that check (the generation worker, which owns a session
        while it writes a reply, uses it)."""
        return self._rewrite(user, session_id, revision, change, bump=True)

    def save_progress(self, user: str, session_id: str, change: Change) -> dict:
        """Save a reply still being written, under the same revision: clients see it through the stream."""
        return self._rewrite(user, session_id, None, change, bump=False)

    def delete(self, user: str, session_id: str, revision: int) -> None:
        path = self._path(user, session_id)
        with self._lock(user, session_id):
            check_revision(self._read(path), revision)
            path.unlink()
            backup_path(path).unlink(missing_ok=True)

    def _rewrite(self, user, session_id, revision, change, bump) -> dict:
        path = self._path(user, session_id)
        with self._lock(user, session_id):
            doc = self._read(path)
            if revision is not None:
                check_revision(doc, revision)
            change(doc)
            doc = checked(doc)
            if bump:
                doc["revision"] += 1
            doc["updated"] = schema.now()
            self._write(path, doc)
            return doc

    def _read(self, path: Path) -> dict:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise WebUIError("not_found", "There is no such session; it may have been deleted.") from None
        except OSError as exc:
            raise WebUIError(
                "storage", f"Could not read {path.name} ({exc.strerror}); check the sessions folder."
            ) from exc
        try:
            doc = schema.check_session(json.loads(data))
            if doc["id"] != path.stem:
                raise schema.SchemaError("its id does not match its file name")
        except (ValueError, schema.SchemaError) as exc:
            log.error("damaged session file %s: %s", path, exc)
            raise WebUIError(
                "corrupt",
                f"Session file {path} is damaged ({exc}); it was left untouched: restore it from "
                f"{backup_path(path).name} or move it away.",
            ) from exc
        return doc

    def _write(self, path: Path, doc: dict) -> None:
        write_atomic(path, json.dumps(doc, ensure_ascii=False, indent=1).encode(), keep_backup=True)

    def _folder(self, user: str) -> Path:
        if not isinstance(user, str) or not USER_NAME.fullmatch(user):
            raise WebUIError("bad_request", "That is not a valid user name.")
        return self.root / user

    def _path(self, user: str, session_id: str) -> Path:
        return self._folder(user) / f"{check_session_id(session_id)}.json"

    def _lock(self, user: str, session_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[(user, session_id)]


def checked(doc: dict) -> dict:
    """Check a document about to be written; a problem is the user's input, worded as such."""
    try:
        return schema.check_session(doc)
    except schema.SchemaError as exc:
        raise WebUIError("bad_request", str(exc)) from exc


def check_revision(doc: dict, revision) -> None:
    if isinstance(revision, bool) or not isinstance(revision, int):
        raise WebUIError("bad_request", "Every change must carry the session revision it was based on.")
    if revision != doc["revision"]:
        raise WebUIError(
            "stale_revision",
            "This session was changed in another tab or window; reload it and try again.",
        )


def summary(doc: dict) -> dict:
    """What a session list shows, without the messages."""
    return {
        "id": doc["id"],
        "title": doc["title"],
        "created": doc["created"],
        "updated": doc["updated"],
        "revision": doc["revision"],
        "message_count": len(doc["messages"]),
        "participants": [p["name"] for p in doc["participants"]],
    }
