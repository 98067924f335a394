"""The generation worker: one thread owns the model and writes every user's replies, one job at a time,
first come first served.

A job is what one request asks for: a reply from one bot, a multibot round, new alternatives (swipes)
for the last reply (several at once share the prompt's KV cache), or more of it. While a job is queued or
running its session is busy: only the worker writes it, and it saves the reply as it streams. Everything
clients hear about jobs is broadcast while holding the worker's lock, so that a client joining mid-reply
gets the text so far and then exactly the pieces that follow."""

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from engine.errors import ModelError
from engine.generator import Generator
from engine.parallel import ParallelGenerator, Sample
from engine.sampling import SamplingSettings
from flask import current_app

from .errors import WebUIError
from .operations import (add_message, add_swipes, bot_names, index_of, last_bot_message, new_swipe, text_of,
                         user_name)
from .prompt import build_prompt
from .rooms import broadcast, broadcast_session
from .schema import new_message_id
from .store import Change, SessionStore

log = logging.getLogger(__name__)

# How often a failed final save (disk full) is tried again while the worker has nothing else to do.
RETRY_SAVE_SECONDS = 5.0

@dataclass
class Job:
    user: str
    session_id: str
    kind: str  # "reply" | "round" | "regenerate" | "continue"
    revision: int  # the session's revision as last seen by this job; sent along with every event
    speaker: str | None = None  # "reply": the bot that answers
    message_id: str | None = None  # "regenerate" / "continue": the reply they work on, told from the first event on
    count: int = 1  # "regenerate": how many alternatives to write at once
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # when the worker took it from the queue

    @property
    def key(self) -> tuple[str, str]:
        return (self.user, self.session_id)


def current_worker() -> "GenerationWorker | None":
    """The app's generation worker, or None when the server runs without a model."""
    return current_app.extensions["generation_worker"]


def busy_error() -> WebUIError:
    return WebUIError("busy", "A reply is being written in this session; wait for it to finish or stop it first.")


def job_for_message(user: str, doc: dict, next_speaker: str | None) -> Job:
    """What answers a user's message: the named bot, the only bot, or a multibot round."""
    bots = bot_names(doc)
    if next_speaker is not None:
        if next_speaker not in bots:
            raise WebUIError("bad_request", f"{next_speaker!r} is not a bot of this session.")
        return Job(user, doc["id"], "reply", doc["revision"], speaker=next_speaker)
    if len(bots) == 1:
        return Job(user, doc["id"], "reply", doc["revision"], speaker=bots[0])
    return Job(user, doc["id"], "round", doc["revision"])


@dataclass
class LiveReply:
    """The reply being written now, inside the in-memory copy of its session that clients are shown."""

    job: Job
    doc: dict
    message_id: str
    swipes: list[int]  # the swipes being written: one, or several for a regenerate with a count

    def entry(self, swipe: int) -> dict:
        return self.doc["messages"][index_of(self.doc, self.message_id)]["swipes"][swipe]


class GenerationWorker:
    def __init__(self, model, store: SessionStore, checkpoint_seconds: float = 2.0):
        self._model = model
        self._store = store
        self._checkpoint_seconds = checkpoint_seconds
        self._lock = threading.Condition()  # guards the fields below and orders what clients hear
        self._queue: list[Job] = []
        self._running: Job | None = None
        self._live: LiveReply | None = None
        self._unsaved: dict[tuple[str, str], Change] = {}
        self._keep_from: dict[tuple[str, str], str | None] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="generation-worker", daemon=True)
        self._thread.start()

    # --- called from request handlers -------------------------------------------------------------

    def submit(self, job: Job) -> int:
        """Queue `job`; returns how many jobs will run before it."""
        with self._lock:
            if self._busy(job.key):
                raise busy_error()
            self._queue.append(job)
            self._announce_queue()
            self._lock.notify_all()
            return self._ahead(job)

    def stop(self, user: str, session_id: str) -> bool:
        """Cancel the session's job: a queued one never starts, a running one ends before its next token."""
        with self._lock:
            dropped = [job for job in self._queue if job.key == (user, session_id)]
            for job in dropped:
                self._queue.remove(job)
                self._tell(job, "job_finished", reason="stopped")
            if dropped:
                self._announce_queue()
            running = self._running is not None and self._running.key == (user, session_id)
            if running:
                self._running.cancel.set()
            return running or bool(dropped)

    def is_busy(self, user: str, session_id: str) -> bool:
        with self._lock:
            return self._busy((user, session_id))

    def with_live_state(self, user: str, session_id: str, callback):
        """Run `callback(state)` while no job event can go out; `state` is None when the session is idle,
        else {"job": {...}, "doc": the session as shown now, including the reply so far}."""
        with self._lock:
            return callback(self._state((user, session_id)))

    def close(self) -> None:
        with self._lock:
            self._closing = True
            if self._running is not None:
                self._running.cancel.set()
            self._lock.notify_all()
        self._thread.join()

    # --- the worker thread -------------------------------------------------------------------------

    def _serve(self) -> None:
        generator = Generator(self._model)  # owns the KV cache; only this thread may touch it
        parallel = ParallelGenerator(generator)  # several swipes at once, over the same cache
        while True:
            self._retry_unsaved()
            with self._lock:
                if self._closing:
                    return
                if not self._queue:
                    self._lock.wait(timeout=RETRY_SAVE_SECONDS if self._unsaved else None)
                    continue
                job = self._queue.pop(0)
                job.started = time.monotonic()
                self._running = job
                self._announce_queue()
            self._run(job, generator, parallel)

    def _run(self, job: Job, generator: Generator, parallel: ParallelGenerator) -> None:
        reason = "done"
        try:
            if job.kind == "round":
                self._round(job, generator)
            else:
                self._single(job, generator, parallel)
            if job.cancel.is_set():
                reason = "stopped"
        except (WebUIError, ModelError) as exc:
            reason = "error"
            error = exc if isinstance(exc, WebUIError) else WebUIError("model_error", str(exc))
            self._tell(job, "chat_error", **error.to_dict())
        except Exception:
            log.exception("generation job %s failed", job.id)
            reason = "error"
            self._tell(job, "chat_error", code="internal", message="The reply failed; details are in the server log.")
        finally:
            with self._lock:
                self._running = None
                self._live = None
                self._tell(job, "job_finished", reason=reason)

    def _single(self, job: Job, generator: Generator, parallel: ParallelGenerator) -> None:
        doc = self._store.load(job.user, job.session_id)
        if job.kind == "reply":
            self._write_reply(job, generator, doc, job.speaker)
            return
        # The session was busy since the request, so this only fails if it changed in the instant before.
        target = last_bot_message(doc)
        if target["id"] != job.message_id:
            raise WebUIError("invalid_operation", "The chat changed before the reply started; try again.")
        if job.kind == "continue":
            self._write_reply(job, generator, doc, target["author"], continued=target)
        else:
            self._write_swipes(job, parallel, doc, target)

    def _round(self, job: Job, generator: Generator) -> None:
        """Bots answer in turns the model picks; each speaks at most once; the round ends when the model
        picks the user. The first pick leaves the user out: someone has to answer."""
        doc = self._store.load(job.user, job.session_id)
        spoken: list[str] = []
        while not job.cancel.is_set():
            candidates = [name for name in bot_names(doc) if name not in spoken]
            if not candidates:
                return
            if spoken:
                candidates.append(user_name(doc))
            speaker = candidates[0]
            if len(candidates) > 1:
                speaker = candidates[self._pick(job, generator, doc, candidates)]
            if speaker == user_name(doc):
                return
            doc = self._write_reply(job, generator, doc, speaker)
            spoken.append(speaker)

    def _pick(self, job, generator, doc, candidates) -> int:
        # Nobody speaks yet, so the session's default adapter judges who should.
        adapters = self._adapters(doc, None)
        prompt = self._prompt(job, doc, doc["messages"], None, None)
        options = [f"{name}:" for name in candidates]
        return generator.choose(prompt.ids, options, SamplingSettings.from_dict(doc["settings"]), adapters=adapters)

    def _write_reply(self, job, generator, doc, speaker, continued=None) -> dict:
        """Stream one reply into the session: a new message, or more of `continued` (the last message's
        shown swipe). Returns the session as saved afterwards."""
        history = doc["messages"] if continued is None else doc["messages"][:-1]
        partial = None if continued is None else text_of(continued)
        adapters = self._adapters(doc, speaker)
        prompt = self._prompt(job, doc, history, speaker, partial)
        if continued is None:
            message_id = new_message_id()
            # Room for the reply is saved before the first token, so that checkpoints have a place to go.
            doc = self._save(job, lambda stored: add_message(stored, speaker, False, "", message_id))
        else:
            message_id = continued["id"]
        swipe = doc["messages"][index_of(doc, message_id)]["chosen"]
        live = self._go_live(job, doc, message_id, [swipe], speaker)
        settings = doc["settings"]
        stream = generator.generate(
            prompt.ids, SamplingSettings.from_dict(settings), max_new_tokens=settings["max_reply_tokens"],
            stop_strings=prompt.stop_strings, stop_on_eos=True, cancel=job.cancel, adapters=adapters,
        )
        self._stream(live, ((swipe, piece) for piece in stream), trim_start=continued is None)
        result = stream.result
        text = live.entry(swipe)["text"].rstrip()
        earlier_tokens = 0 if continued is None else continued["swipes"][swipe]["tokens"] or 0

        def finish(stored: dict) -> None:
            index = index_of(stored, message_id)
            if text.strip():
                stored["messages"][index]["swipes"][swipe] = new_swipe(
                    text, earlier_tokens + len(result.token_ids), round(result.tokens_per_second, 2)
                )
            elif continued is None:  # an empty reply (stopped at once, or the model had nothing to say) is dropped
                del stored["messages"][index]

        return self._save_finished(live, finish, [result], [bool(text.strip())])

    def _write_swipes(self, job, parallel, doc, target) -> None:
        """Stream job.count new alternatives of `target`, the last reply, all at once from one prompt."""
        adapters = self._adapters(doc, target["author"])
        prompt = self._prompt(job, doc, doc["messages"][:-1], target["author"], None)
        message_id, earlier_choice = target["id"], target["chosen"]
        doc = self._save(job, lambda stored: add_swipes(stored["messages"][index_of(stored, message_id)], job.count))
        first = doc["messages"][index_of(doc, message_id)]["chosen"]
        swipes = list(range(first, first + job.count))
        live = self._go_live(job, doc, message_id, swipes, target["author"])
        settings = doc["settings"]
        samples = Sample.alternatives(SamplingSettings.from_dict(settings), job.count, settings["max_reply_tokens"],
                                      prompt.stop_strings)
        stream = parallel.generate(prompt.ids, samples, stop_on_eos=True, cancel=job.cancel, adapters=adapters)
        self._stream(live, ((swipes[event.index], event.text) for event in stream), trim_start=True)
        texts = [live.entry(swipe)["text"].rstrip() for swipe in swipes]
        kept = [bool(text.strip()) for text in texts]

        def finish(stored: dict) -> None:
            message = stored["messages"][index_of(stored, message_id)]
            for swipe, text, result in zip(swipes, texts, stream.results):
                message["swipes"][swipe] = new_swipe(text, len(result.token_ids), round(result.tokens_per_second, 2))
            # Empty alternatives (stopped at once, or nothing to say) are dropped, the last first so that the
            # indices of the others hold; the first one kept is shown.
            for swipe, keep in reversed(list(zip(swipes, kept))):
                if not keep:
                    del message["swipes"][swipe]
            message["chosen"] = first if any(kept) else earlier_choice

        self._save_finished(live, finish, stream.results, kept)

    def _go_live(self, job, doc, message_id, swipes, author) -> LiveReply:
        """Show the swipes about to stream to clients, and to anyone who joins while they do."""
        live = LiveReply(job, doc, message_id, swipes)
        with self._lock:
            self._live = live
            for swipe in swipes:
                self._tell(job, "generation_started", message_id=message_id, swipe=swipe, author=author,
                           text=live.entry(swipe)["text"], queue_seconds=round(job.started - job.submitted, 3))
        return live

    def _stream(self, live: LiveReply, pieces, trim_start: bool) -> None:
        """Append each (swipe, text piece) to the live reply, and save the text so far every few seconds."""
        last_checkpoint = time.monotonic()
        for swipe, piece in pieces:
            self._append(live, swipe, piece, trim_start)
            if time.monotonic() - last_checkpoint >= self._checkpoint_seconds:
                self._checkpoint(live)
                last_checkpoint = time.monotonic()

    def _adapters(self, doc, speaker) -> dict[str, float] | None:
        """The adapter mix `speaker` talks with: its own adapter, else the session's default, else none
        (speaker None: the default). Checked before anything is written, so that a name this server did
        not load leaves the session as it was."""
        own = next((p.get("adapter") for p in doc["participants"] if p["name"] == speaker), None)
        name = own or doc["settings"]["adapter"]
        if name is None:
            return None
        loaded = list(self._model.adapters.folders)
        if name not in loaded:
            offer = (f"pick one of {', '.join(loaded)} or none" if loaded
                     else "this server runs without adapters (start it with --lora NAME=DIR), so pick none")
            raise WebUIError("invalid_operation", f"No LoRA adapter named {name!r} is loaded; {offer} in the "
                                                  "session's setup.")
        return {name: 1.0}

    def _prompt(self, job, doc, history, speaker, partial):
        budget = self._model.max_seq_len - doc["settings"]["max_reply_tokens"]
        prompt = build_prompt(doc, self._model.tokenizer, history, speaker, partial, budget,
                              self._keep_from.get(job.key))
        self._keep_from[job.key] = prompt.first_message_id
        return prompt

    def _append(self, live: LiveReply, swipe: int, piece: str, trim_start: bool) -> None:
        with self._lock:
            entry = live.entry(swipe)
            if trim_start and not entry["text"]:
                # "Name:" is followed by a space the model writes; the reply starts after it.
                piece = piece.lstrip()
            if piece:
                offset = len(entry["text"])
                entry["text"] += piece
                self._tell(live.job, "token", message_id=live.message_id, swipe=swipe, offset=offset, text=piece)

    # --- saving ------------------------------------------------------------------------------------

    def _save(self, job: Job, change) -> dict:
        """Save a change as the next revision and show it to the session's room."""
        doc = self._write(job, change)
        with self._lock:
            job.revision = doc["revision"]
            broadcast_session(job.user, doc)
        return doc

    def _save_finished(self, live: LiveReply, change, results, kept: list[bool]) -> dict:
        """The reply's final save. Its swipes are announced finished just before the saved session goes out:
        a client learns which empty swipes the save removed before it gets the session without them, so that
        it can tell which swipe its user is reading in either."""
        job = live.job
        doc = self._write(job, change, final=True)
        with self._lock:
            job.revision = doc["revision"]
            self._live = None
            for swipe, result, keep in zip(live.swipes, results, kept):
                self._tell(job, "generation_finished", message_id=live.message_id, swipe=swipe, kept=keep,
                           stop_reason=result.stop_reason, tokens=len(result.token_ids),
                           tokens_per_second=round(result.tokens_per_second, 2), prompt_tokens=result.prompt_tokens,
                           reused_tokens=result.reused_tokens)
            broadcast_session(job.user, doc)
        return doc

    def _write(self, job: Job, change, final: bool = False) -> dict:
        """Store a change as the next revision. A final save that fails for lack of space is kept and tried
        again, and the session stays busy until it lands."""
        try:
            return self._store.update(job.user, job.session_id, None, change)
        except WebUIError as exc:
            if final and exc.code in ("disk_full", "storage"):
                with self._lock:
                    self._unsaved[job.key] = change
                kept = " The reply is kept in memory and saved once that is fixed."
                raise WebUIError(exc.code, exc.message + kept) from exc
            raise

    def _checkpoint(self, live: LiveReply) -> None:
        texts = {swipe: live.entry(swipe)["text"] for swipe in live.swipes}

        def write_texts(stored: dict) -> None:
            swipes = stored["messages"][index_of(stored, live.message_id)]["swipes"]
            for swipe, text in texts.items():
                swipes[swipe]["text"] = text

        try:
            self._store.save_progress(live.job.user, live.job.session_id, write_texts)
        except WebUIError as exc:
            # The reply goes on streaming; the final save reports the problem if it lasts.
            log.warning("could not checkpoint session %s: %s", live.job.session_id, exc.message)

    def _retry_unsaved(self) -> None:
        with self._lock:
            pending = list(self._unsaved.items())
        for (user, session_id), change in pending:
            try:
                doc = self._store.update(user, session_id, None, change)
            except WebUIError as exc:
                log.warning("reply for session %s still unsaved: %s", session_id, exc.message)
                continue
            with self._lock:
                del self._unsaved[(user, session_id)]
                broadcast_session(user, doc)

    # --- bookkeeping, under the lock ---------------------------------------------------------------

    def _busy(self, key) -> bool:
        running = self._running is not None and self._running.key == key
        return running or key in self._unsaved or any(job.key == key for job in self._queue)

    def _ahead(self, job: Job) -> int:
        return self._queue.index(job) + (self._running is not None)

    def _announce_queue(self) -> None:
        for job in self._queue:
            self._tell(job, "queue_position", ahead=self._ahead(job), message_id=job.message_id)

    def _state(self, key) -> dict | None:
        live = self._live if self._live is not None and self._live.job.key == key else None
        job = next((job for job in [self._running, *self._queue] if job is not None and job.key == key), None)
        if job is None:
            return None
        reply = None
        if live is not None:
            swipes = [{"swipe": swipe, "length": len(live.entry(swipe)["text"])} for swipe in live.swipes]
            reply = {"message_id": live.message_id, **swipes[0], "swipes": swipes}
        return {
            "job": {
                "job_id": job.id,
                "state": "running" if job is self._running else "queued",
                "ahead": 0 if job is self._running else self._ahead(job),
                "message_id": live.message_id if live is not None else job.message_id,
                "reply": reply,
            },
            "doc": live.doc if live is not None else None,
        }

    def _tell(self, job: Job, event: str, **fields) -> None:
        broadcast(event, {"session_id": job.session_id, "job_id": job.id, "revision": job.revision, **fields},
                  job.user, job.session_id)
