// The open chat as the server sees it: its document, the job writing in it, and the reply streaming now.
// It follows the server's broadcasts (the protocol section of README.md) and sends the user's changes,
// each with the revision it was based on. Views listen for:
//   "doc"     the document changed (any part of it)
//   "stream"  {message_id}: the streaming reply got more text (in any of its swipes)
//   "job"     the job, its queue position or the streaming target changed
//   "stats"   a reply finished (this.lastReply)
//   "closed"  {reason}: the session went away ("deleted") or was closed by the page
// A regenerate with a count streams several swipes of one message at once. The server takes no choice of
// swipe while they stream, so flipping between them is held here (`peek`) and asked for when the job ends.

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
    this.job = null; // {job_id, state: "queued" | "running", ahead}
    this.live = null; // {message_id, swipes: Set of swipe indices, author}: the reply streaming now
    this.peek = null; // {message_id, swipe}: the streaming swipe the user flipped to, shown instead of `chosen`
    this.removed = []; // indices of swipes this job removed for being empty: later indices move down
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
    this.emit('doc');
  }

  onSnapshot({ session, job }) {
    this.doc = session;
    this.job = job ? { job_id: job.job_id, state: job.state, ahead: job.ahead } : null;
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

  onQueuePosition({ job_id, ahead }) {
    if (this.finishedJobs.has(job_id)) return;
    this.job = { job_id, state: 'queued', ahead };
    this.emit('job');
  }

  onGenerationStarted({ job_id, message_id, swipe, author, text }) {
    this.job = { job_id, state: 'running', ahead: 0 };
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
    if (data.kept === false) this.removed.push(data.swipe);
    if (this.live && this.live.message_id === data.message_id) this.live.swipes.delete(data.swipe);
    if (this.live && !this.live.swipes.size) this.live = null;
    this.emit('stats');
    this.emit('job');
  }

  onJobFinished({ job_id }) {
    this.finishedJobs.add(job_id);
    if (this.job && this.job.job_id === job_id) {
      const peek = this.settledPeek();
      this.job = null;
      this.live = null;
      this.peek = peek;
      this.removed = [];
      this.emit('job');
      // The swipe the user was reading as the job ended stays shown, now as the session's choice; until the
      // server has it the peek holds it on screen.
      if (peek) this.chooseSwipe(peek.message_id, peek.swipe).catch(() => {}).finally(() => this.dropPeek(peek));
    }
  }

  dropPeek(peek) {
    if (this.peek !== peek) return;
    this.peek = null;
    this.emit('doc');
  }

  /** The peeked swipe under its index after the job's empty swipes were removed; null if it went too. */
  settledPeek() {
    const peek = this.peek;
    if (!peek || this.removed.includes(peek.swipe)) return null;
    const swipe = peek.swipe - this.removed.filter((index) => index < peek.swipe).length;
    const message = this.message(peek.message_id);
    return message && swipe < message.swipes.length && swipe !== message.chosen ? { message_id: peek.message_id, swipe } : null;
  }

  /** A job we asked for: its acknowledgement can arrive after the job's first events, or even its end. */
  noteQueued({ job_id, ahead }) {
    if (this.finishedJobs.has(job_id) || (this.job && this.job.job_id === job_id)) return;
    this.job = { job_id, state: ahead > 0 ? 'queued' : 'running', ahead };
    this.emit('job');
  }

  message(id) {
    return this.doc ? this.doc.messages.find((message) => message.id === id) : undefined;
  }

  swipeEntry(messageId, swipe) {
    const message = this.message(messageId);
    return message ? message.swipes[swipe] : undefined;
  }

  /** The index of the swipe shown for `message`: the one the user flipped to while it streams, else `chosen`. */
  shownSwipe(message) {
    const peek = this.peek;
    return peek && peek.message_id === message.id && peek.swipe < message.swipes.length ? peek.swipe : message.chosen;
  }

  shownText(message) {
    return message.swipes[this.shownSwipe(message)].text;
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

  /** Shows another swipe: only here while the message streams (the server is busy), else for good. */
  chooseSwipe(messageId, swipe) {
    if (this.live && this.live.message_id === messageId) {
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
