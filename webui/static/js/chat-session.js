// The open chat as the server sees it: its document, the job writing in it, and the reply streaming now.
// It follows the server's broadcasts (the protocol section of README.md) and sends the user's changes,
// each with the revision it was based on. Views listen for:
//   "doc"     the document changed (any part of it)
//   "stream"  {message_id}: the streaming reply got more text (in any of its swipes)
//   "job"     the job, its queue position or the streaming target changed
//   "stats"   a reply finished (this.lastReply)
//   "closed"  {reason}: the session went away ("deleted") or was closed by the page
//   "refused" {error}: the server refused the swipe the user picked while a job wrote its message
// A regenerate with a count streams several swipes of one message at once. The server takes no choice of
// swipe while a job runs, so flipping through the swipes of the message it writes (or is about to) is held
// here (`peek`) and asked for when the job ends.

export class ChatSession {
  constructor(connection) {
    this.connection = connection;
    this.listeners = new Map();
    this.finishedJobs = new Set();
    this.reset(null);
    const events = {
      snapshot: (data) => this.onSnapshot(data),
      session_updated: (data) => this.takeDoc(data.session),
      session_deleted: () => this.onDeleted(),
      queue_position: (data) => this.onQueuePosition(data),
      generation_started: (data) => this.onGenerationStarted(data),
      token: (data) => this.onToken(data),
      generation_finished: (data) => this.onGenerationFinished(data),
      job_finished: (data) => this.onJobFinished(data),
    };
    for (const [name, handler] of Object.entries(events)) {
      connection.on(name, (data) => {
        if (data && data.session_id === this.id) handler(data);
      });
    }
  }

  reset(id) {
    this.id = id;
    this.doc = null;
    // {job_id, state: "queued" | "running", ahead, message_id}: message_id is the message the job writes, once
    // known (a regenerate's or continue's from the start, a new reply's when it starts streaming)
    this.job = null;
    this.live = null; // {message_id, swipes: Set of swipe indices, author}: the reply streaming now
    this.peek = null; // {message_id, swipe}: the swipe flipped to on the job's message, shown instead of `chosen`
    this.removed = []; // {message_id, swipe, revision}: empty swipes the job's final save removes, until `doc` has it
    this.settling = null; // the id of the message whose peek is on its way to the server as its choice
    this.lastReply = null; // the statistics of the last reply finished while watching
  }

  on(name, callback) {
    if (!this.listeners.has(name)) this.listeners.set(name, []);
    this.listeners.get(name).push(callback);
  }

  emit(name, detail) {
    for (const callback of this.listeners.get(name) || []) callback(detail);
  }

  get busy() {
    return this.job !== null;
  }

  /** Watch session `id`: its snapshot arrives as an event, then every broadcast after it. */
  open(id) {
    this.reset(id);
    this.emit('doc');
    this.emit('job');
    return this.join();
  }

  close() {
    this.reset(null);
    this.emit('closed', { reason: 'closed' });
  }

  /** (Re)join the room; after a reconnect the snapshot brings back the text so far of a running reply. */
  join() {
    if (!this.id || !this.connection.connected) return Promise.resolve();
    return this.connection.request('join', { session_id: this.id });
  }

  // --- what the server tells -----------------------------------------------------------------------

  /** Keep `doc` unless it is older than the one held: broadcasts from different sources can cross. */
  takeDoc(doc) {
    if (!doc || doc.id !== this.id) return;
    if (this.doc && doc.revision < this.doc.revision) return;
    this.doc = doc;
    this.followRemovals();
    this.emit('doc');
  }

  /** The peek keeps to its swipe once `doc` is the saved session without the job's empty swipes: the server
   *  announces them (generation_finished) just before it sends that session. Later swipes move down; a peek
   *  on a removed one goes, and the swipe the server chose is shown. */
  followRemovals() {
    const done = this.removed.filter((removal) => removal.revision <= this.doc.revision);
    if (!done.length) return;
    this.removed = this.removed.filter((removal) => !done.includes(removal));
    const peek = this.peek;
    if (!peek) return;
    const gone = done.filter((removal) => removal.message_id === peek.message_id).map((removal) => removal.swipe);
    const earlier = gone.filter((swipe) => swipe < peek.swipe).length;
    this.peek = gone.includes(peek.swipe) ? null : { message_id: peek.message_id, swipe: peek.swipe - earlier };
  }

  onSnapshot({ session, job }) {
    this.doc = session;
    this.job = job ? { job_id: job.job_id, state: job.state, ahead: job.ahead, message_id: job.message_id } : null;
    this.peek = null;
    this.removed = [];
    const reply = job && job.reply;
    this.live = reply ? {
      message_id: reply.message_id,
      swipes: new Set((reply.swipes || [reply]).map((entry) => entry.swipe)),
      author: this.message(reply.message_id)?.author ?? null,
    } : null;
    this.emit('doc');
    this.emit('job');
  }

  onDeleted() {
    const id = this.id;
    this.reset(null);
    this.emit('closed', { reason: 'deleted', id });
  }

  onQueuePosition({ job_id, ahead, message_id }) {
    if (this.finishedJobs.has(job_id)) return;
    this.job = { job_id, state: 'queued', ahead, message_id };
    this.emit('job');
  }

  onGenerationStarted({ job_id, message_id, swipe, author, text }) {
    this.job = { job_id, state: 'running', ahead: 0, message_id };
    // The swipes of one regenerate start one after another on the same message and stream side by side.
    if (this.live && this.live.message_id === message_id) this.live.swipes.add(swipe);
    else this.live = { message_id, swipes: new Set([swipe]), author };
    const entry = this.swipeEntry(message_id, swipe);
    if (entry) entry.text = text;
    this.emit('job');
    this.emit('stream', { message_id });
  }

  onToken({ message_id, swipe, offset, text }) {
    const entry = this.swipeEntry(message_id, swipe);
    if (!entry) return;
    if (offset === entry.text.length) {
      entry.text += text;
      this.emit('stream', { message_id });
    } else if (offset > entry.text.length || entry.text.slice(offset, offset + text.length) !== text) {
      // A gap (or text that disagrees with ours): the snapshot of a fresh join has it all.
      this.join().catch(() => {});
    } // else: a piece already held, e.g. around a reconnect
  }

  onGenerationFinished(data) {
    this.lastReply = data;
    if (data.kept === false) {
      this.removed.push({ message_id: data.message_id, swipe: data.swipe, revision: data.revision });
    }
    if (this.live && this.live.message_id === data.message_id) this.live.swipes.delete(data.swipe);
    if (this.live && !this.live.swipes.size) this.live = null;
    this.emit('stats');
    this.emit('job');
  }

  onJobFinished({ job_id }) {
    this.finishedJobs.add(job_id);
    if (this.job && this.job.job_id === job_id) {
      this.job = null;
      this.live = null;
      this.removed = [];
      this.emit('job');
      if (this.peek) this.settle();
    }
  }

  /** The swipe the user was reading as the job ended stays shown, now as the session's choice: the peek holds
   *  it on screen until the server has it. Flips meanwhile are held too, and the last one is sent after it.
   *  A refusal is told ("refused") and the session's own choice is shown again. */
  async settle() {
    const id = this.id;
    let peek = this.peek;
    this.settling = peek.message_id;
    try {
      // A new job (asked for meanwhile) takes the peek over, to settle when it ends.
      while (peek && this.job === null) {
        const message = this.message(peek.message_id);
        if (!message || peek.swipe >= message.swipes.length || peek.swipe === message.chosen) break;
        // The session_updated of the change arrives before its acknowledgement, so `doc` has it after this.
        await this.change('choose_swipe', { message_id: peek.message_id, swipe: peek.swipe });
        peek = this.peek; // none once another chat was opened meanwhile
      }
    } catch (error) {
      if (this.id === id) this.emit('refused', { error });
    } finally {
      if (this.id === id) {
        this.settling = null;
        if (this.job === null && this.peek) {
          this.peek = null;
          this.emit('doc');
        }
      }
    }
  }

  /** A job we asked for: its acknowledgement can arrive after the job's first events, or even its end. */
  noteQueued({ job_id, ahead, message_id }) {
    if (this.finishedJobs.has(job_id) || (this.job && this.job.job_id === job_id)) return;
    this.job = { job_id, state: ahead > 0 ? 'queued' : 'running', ahead, message_id };
    this.emit('job');
  }

  message(id) {
    return this.doc ? this.doc.messages.find((message) => message.id === id) : undefined;
  }

  swipeEntry(messageId, swipe) {
    const message = this.message(messageId);
    return message ? message.swipes[swipe] : undefined;
  }

  /** The index of the swipe shown for `message`: the one the user flipped to while a job writes it, else `chosen`. */
  shownSwipe(message) {
    const peek = this.peek;
    return peek && peek.message_id === message.id && peek.swipe < message.swipes.length ? peek.swipe : message.chosen;
  }

  shownText(message) {
    return message.swipes[this.shownSwipe(message)].text;
  }

  /** Whether a choice of swipe on this message is held here for now: the session's job writes it (or is about
   *  to) and the server takes no change until the job ends, or the choice is on its way to the server. */
  holdsChoice(messageId) {
    return (this.job !== null && this.job.message_id === messageId) || this.settling === messageId;
  }

  /** Whether swipe `swipe` of this message is being written now. */
  streaming(message, swipe) {
    return Boolean(this.live && this.live.message_id === message.id && this.live.swipes.has(swipe));
  }

  // --- what the user asks for ----------------------------------------------------------------------

  async change(event, fields = {}, revision = this.doc.revision) {
    return this.connection.request(event, { session_id: this.id, revision, ...fields });
  }

  async queue(event, fields) {
    const answer = await this.change(event, fields);
    this.noteQueued(answer);
    return answer;
  }

  send(text, nextSpeaker) {
    return this.queue('send', nextSpeaker ? { text, next_speaker: nextSpeaker } : { text });
  }

  /** `count` new swipes of the last reply, written side by side. */
  regenerate(count = 1) {
    return this.queue('regenerate', count > 1 ? { count } : {});
  }

  continueReply() {
    return this.queue('continue');
  }

  stop() {
    return this.connection.request('stop', { session_id: this.id });
  }

  /** Shows another swipe: only here while the choice is held (see holdsChoice), else for good. */
  chooseSwipe(messageId, swipe) {
    if (this.holdsChoice(messageId)) {
      this.peek = { message_id: messageId, swipe };
      this.emit('doc');
      return Promise.resolve();
    }
    return this.change('choose_swipe', { message_id: messageId, swipe });
  }

  editMessage(messageId, text, revision) {
    return this.change('edit_message', { message_id: messageId, text }, revision);
  }

  deleteMessage(messageId) {
    return this.change('delete_message', { message_id: messageId });
  }

  rewind(messageId) {
    return this.change('rewind', { message_id: messageId });
  }
}

export function botNames(doc) {
  return doc ? doc.participants.filter((p) => !p.is_user).map((p) => p.name) : [];
}
