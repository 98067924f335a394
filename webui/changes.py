"""The path every user change to a stored session takes, from HTTP routes and socket events alike:
refuse it while a reply is being written, refuse it when based on a stale revision, save it, and show
the new revision to everyone watching the session."""

from .rooms import broadcast_session
from .store import Change, check_revision, current_store
from .worker import busy_error, current_worker


def refuse_if_busy(user: str, session_id: str) -> None:
    worker = current_worker()
    if worker is not None and worker.is_busy(user, session_id):
        raise busy_error()


def current(user: str, session_id: str, revision: int) -> dict:
    """The session, for an action that starts from it without changing it yet (e.g. regenerate)."""
    doc = current_store().load(user, session_id)
    refuse_if_busy(user, session_id)
    check_revision(doc, revision)
    return doc


def commit(user: str, session_id: str, revision: int, change: Change) -> dict:
    # A job may be queued right after the busy check. Nothing is lost either way: the worker applies each
    # of its saves to the session as read afresh under the store's lock, and once it has saved, this
    # change (based on an older revision) is refused as stale.
    refuse_if_busy(user, session_id)
    doc = current_store().update(user, session_id, revision, change)
    broadcast_session(user, doc)
    return doc
