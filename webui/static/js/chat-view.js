// The message list: Markdown bodies, per-message actions, editing in place, streaming text and an
// auto-scroll that lets go as soon as the user scrolls up to read.

import { $, autoGrow, formatTime, h } from './dom.js';
import { renderMarkdown } from './markdown.js';
import { confirmDialog } from './dialogs.js';
import { notify, notifyError } from './notices.js';

// Within this many pixels of the bottom counts as "at the bottom": the view follows new text.
const STICK_MARGIN_PX = 48;
// The most swipes one regenerate may ask for (the server's limit) and how many the ×N control starts at.
const MOST_AT_ONCE = 16;
const DEFAULT_AT_ONCE = 3;

export class ChatView {
  /** `actions.branch(messageId)` is the one action that leaves the session; the rest go through `session`. */
  constructor(session, actions) {
    this.session = session;
    this.actions = actions;
    this.scroller = $('#messages');
    this.list = $('#message-list');
    this.jump = $('#jump-latest');
    this.elements = new Map(); // message id -> {element, signature}
    this.editing = null; // {messageId, revision, originalText, textarea, editor}: the editor stands in for the body
    this.stick = true;
    this.pendingStream = new Set();
    this.atOnce = DEFAULT_AT_ONCE; // kept here: a message's controls are rebuilt when it becomes the last reply

    this.scroller.addEventListener('scroll', () => {
      this.stick = this.atBottom();
      this.jump.hidden = this.stick;
    });
    this.jump.addEventListener('click', () => this.followLatest());
    session.on('doc', () => this.render());
    session.on('job', () => this.render());
    session.on('stream', ({ message_id }) => this.queueStream(message_id));
    session.on('closed', () => this.render());
    session.on('refused', ({ error }) => {
      notify(`The alternative you picked was not kept: ${error.message}`, { code: error.code });
    });
  }

  atBottom() {
    const { scrollTop, scrollHeight, clientHeight } = this.scroller;
    return scrollHeight - scrollTop - clientHeight <= STICK_MARGIN_PX;
  }

  followLatest() {
    this.stick = true;
    this.jump.hidden = true;
    this.scroller.scrollTop = this.scroller.scrollHeight;
  }

  keepPinned() {
    if (this.stick) this.scroller.scrollTop = this.scroller.scrollHeight;
  }

  // --- rendering ---------------------------------------------------------------------------------

  render() {
    const doc = this.session.doc;
    $('#empty-chat').hidden = Boolean(doc && doc.messages.length);
    if (doc && !doc.messages.length) $('#empty-chat').textContent = 'No messages yet. Say something below.';
    else if (!doc) $('#empty-chat').textContent = this.session.id ? 'Loading…' : 'Pick a chat on the left or start a new one.';
    if (!doc) {
      this.list.replaceChildren();
      this.elements.clear();
      this.editing = null;
      return;
    }
    if (this.editing && !this.session.message(this.editing.messageId)) this.editing = null;
    const seen = new Set();
    const ordered = doc.messages.map((message, index) => {
      seen.add(message.id);
      return this.messageElement(message, index, doc.messages.length);
    });
    for (const id of [...this.elements.keys()]) if (!seen.has(id)) this.elements.delete(id);
    // Moving only what is out of place keeps an open editor (and its cursor) alive.
    ordered.forEach((element, index) => {
      if (this.list.children[index] !== element) this.list.insertBefore(element, this.list.children[index] || null);
    });
    while (this.list.children.length > ordered.length) this.list.lastElementChild.remove();
    this.keepPinned();
  }

  /** A message's element is made once and then updated in place, never replaced: a button swapped for a new
   *  one while the user presses it swallows the click (the browser sends it nowhere), and one that had the
   *  keyboard focus loses it. A reply's events redraw its message several times in a few milliseconds. */
  messageElement(message, index, count) {
    const state = this.messageState(message, index === count - 1);
    let known = this.elements.get(message.id);
    if (!known) {
      known = this.createMessage(message);
      this.elements.set(message.id, known);
    }
    const signature = JSON.stringify([message, state]);
    if (known.signature !== signature && this.editing?.messageId !== message.id) {
      this.updateMessage(known, message, state);
      known.signature = signature;
    }
    return known.element;
  }

  messageState(message, last) {
    const busy = this.session.busy;
    const shown = this.session.shownSwipe(message);
    return {
      last,
      busy,
      shown,
      live: Boolean(this.session.live && this.session.live.message_id === message.id),
      streaming: this.session.streaming(message, shown),
      // The swipes of the message a job writes can be flipped through before and while they grow; the server
      // takes no other choice until the job ends.
      flipLocked: busy && !this.session.holdsChoice(message.id),
    };
  }

  createMessage(message) {
    const author = h('span', { class: 'author' });
    const meta = h('span', { class: 'meta' });
    const body = h('div', { class: 'body markdown' });
    const element = h('article', { dataset: { id: message.id } }, h('header', {}, author, meta), body);
    // `text`: what the body shows; `layout`: which controls the footer has.
    return { element, author, meta, body, text: null, actions: null, controls: null, layout: null, signature: null };
  }

  updateMessage(known, message, state) {
    const swipe = message.swipes[state.shown];
    const stats = [formatTime(swipe.time)];
    if (swipe.tokens !== null) stats.push(`${swipe.tokens} tokens`);
    if (swipe.tokens_per_second !== null) stats.push(`${swipe.tokens_per_second.toFixed(1)} tokens/s`);
    known.element.className = `message ${message.is_user ? 'user' : 'bot'}${state.live ? ' live' : ''}`;
    known.element.dataset.author = message.author;
    known.author.textContent = message.author;
    known.meta.textContent = stats.filter(Boolean).join(' · ');
    this.showText(known, swipe.text);
    known.body.classList.toggle('streaming', state.streaming);

    const lastReply = state.last && !message.is_user;
    const layout = [!message.is_user && (message.swipes.length > 1 || lastReply), lastReply, state.last];
    if (known.layout !== layout.join()) {
      const { actions, controls } = this.buildActions(message.id, layout);
      if (known.actions) known.actions.replaceWith(actions);
      else known.element.append(actions);
      Object.assign(known, { actions, controls, layout: layout.join() });
    }
    this.updateActions(known.controls, message, state);
  }

  showText(known, text) {
    if (known.text === text) return;
    known.body.replaceChildren(renderMarkdown(text));
    known.text = text;
  }

  /** The footer's controls. Their handlers look the message up when clicked, since they outlive renders. */
  buildActions(messageId, [swipes, lastReply, last]) {
    const button = (action, label, title, handler) => h('button', {
      type: 'button', class: 'action', dataset: { action }, title, 'aria-label': title, onclick: handler,
    }, label);
    const regenerate = () => this.run(() => this.session.regenerate());
    const controls = {
      edit: button('edit', 'Edit', 'Edit this message', () => this.startEdit(messageId)),
      branch: button('branch', 'Branch', 'Start a new chat from the messages up to here',
        () => this.run(() => this.actions.branch(messageId))),
      delete: button('delete', 'Delete', 'Delete this message',
        () => this.run(() => this.session.deleteMessage(messageId))),
    };
    if (swipes) {
      controls.previous = button('swipe-left', '‹', 'Previous alternative', () => this.flip(messageId, -1));
      controls.count = h('span', { class: 'swipe-count', title: 'Alternative shown / alternatives' });
      // "Next alternative", or on the last swipe of the last reply "New alternative" (see updateActions).
      controls.next = button('swipe-right', '›', '', () => {
        if (controls.writes) regenerate();
        else this.flip(messageId, 1);
      });
    }
    if (lastReply) {
      controls.regenerate = button('regenerate', 'Regenerate', 'Write a new alternative', regenerate);
      controls.many = this.regenerateMany();
      controls.continue = button('continue', 'Continue', 'Let the bot write more of this reply',
        () => this.run(() => this.session.continueReply()));
    }
    if (!last) {
      controls.rewind = button('rewind', 'Rewind', 'Remove every message after this one', () => this.rewind(messageId));
    }
    const actions = h('footer', { class: 'actions' },
      swipes ? h('span', { class: 'swipes' }, controls.previous, controls.count, controls.next) : null,
      controls.edit, controls.regenerate, controls.many?.element, controls.continue, controls.rewind, controls.branch,
      controls.delete);
    return { actions, controls };
  }

  updateActions(controls, message, { last, busy, shown, flipLocked }) {
    for (const name of ['edit', 'regenerate', 'continue', 'rewind', 'delete']) {
      if (controls[name]) controls[name].disabled = busy;
    }
    if (controls.count) {
      const count = message.swipes.length;
      const writes = last && !message.is_user && shown === count - 1;
      const title = writes ? 'New alternative' : 'Next alternative';
      controls.previous.disabled = flipLocked || shown === 0;
      controls.count.textContent = `${shown + 1}/${count}`;
      controls.next.title = title;
      controls.next.setAttribute('aria-label', title);
      controls.writes = writes;
      controls.next.disabled = writes ? busy : flipLocked || shown >= count - 1;
    }
    controls.many?.update();
  }

  /** "×N": a number field for N and a button that asks for N new alternatives at once; Enter in the
   *  field asks too. An N out of range disables the button until it is fixed (or the field is left). */
  regenerateMany() {
    const field = h('input', {
      type: 'number', class: 'at-once', min: 2, max: MOST_AT_ONCE, step: 1, value: String(this.atOnce),
      'aria-label': 'How many alternatives to write at once', title: 'How many alternatives to write at once',
    });
    const go = h('button', { type: 'button', class: 'action', dataset: { action: 'regenerate-many' } });
    const typed = () => {
      const n = Number(field.value);
      return Number.isInteger(n) && n >= 2 && n <= MOST_AT_ONCE ? n : null;
    };
    const update = () => {
      const busy = this.session.busy;
      const title = `Write ${this.atOnce} alternatives at once`;
      go.textContent = `×${this.atOnce}`;
      go.title = title;
      go.setAttribute('aria-label', title);
      field.disabled = busy;
      go.disabled = busy || typed() === null;
    };
    const ask = () => {
      if (!this.session.busy && typed() !== null) this.run(() => this.session.regenerate(this.atOnce));
    };
    field.addEventListener('input', () => {
      const n = typed();
      if (n !== null) this.atOnce = n;
      update();
    });
    field.addEventListener('change', () => {
      if (typed() === null) field.value = String(this.atOnce);
      update();
    });
    field.addEventListener('keydown', (event) => {
      if (event.key === 'Enter') {
        event.preventDefault();
        ask();
      }
    });
    go.addEventListener('click', ask);
    return { element: h('span', { class: 'regenerate-many' }, field, go), update };
  }

  /** Streamed text is drawn once per frame, however many tokens arrived in it. */
  queueStream(messageId) {
    if (!this.pendingStream.size) requestAnimationFrame(() => this.flushStream());
    this.pendingStream.add(messageId);
  }

  flushStream() {
    const ids = [...this.pendingStream];
    this.pendingStream.clear();
    for (const id of ids) {
      const known = this.elements.get(id);
      const message = this.session.message(id);
      if (!known || !message || this.editing?.messageId === id) continue;
      this.showText(known, this.session.shownText(message));
      known.signature = null; // the next full render brings the rest of the message up to date
    }
    this.keepPinned();
  }

  // --- actions -----------------------------------------------------------------------------------

  async run(action) {
    try {
      await action();
    } catch (error) {
      notifyError(error);
    }
  }

  /** Shows the swipe `step` away from the one shown now. */
  flip(messageId, step) {
    const message = this.session.message(messageId);
    return this.run(() => this.session.chooseSwipe(messageId, this.session.shownSwipe(message) + step));
  }

  async rewind(messageId) {
    const doc = this.session.doc;
    const later = doc.messages.length - 1 - doc.messages.findIndex((m) => m.id === messageId);
    if (await confirmDialog(`Remove the ${later} message${later === 1 ? '' : 's'} after this one?`, 'Rewind')) {
      await this.run(() => this.session.rewind(messageId));
    }
  }

  startEdit(messageId) {
    if (this.editing) this.cancelEdit();
    const message = this.session.message(messageId);
    const known = this.elements.get(messageId);
    const originalText = this.session.shownText(message);
    const textarea = h('textarea', { class: 'editor', maxlength: 20000, 'aria-label': `Edit the message of ${message.author}` });
    textarea.value = originalText;
    const save = () => this.saveEdit();
    const cancel = () => this.cancelEdit();
    textarea.addEventListener('keydown', (event) => {
      if (event.key === 'Escape') {
        event.stopPropagation();
        cancel();
      } else if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        save();
      }
    });
    const editor = h('div', { class: 'edit-box' }, textarea,
      h('div', { class: 'row' },
        h('button', { type: 'button', class: 'primary', dataset: { action: 'save-edit' }, onclick: save }, 'Save'),
        h('button', { type: 'button', dataset: { action: 'cancel-edit' }, onclick: cancel }, 'Cancel'),
        h('span', { class: 'muted hint' }, 'Ctrl+Enter saves, Escape cancels')));
    known.body.replaceWith(editor);
    known.actions.hidden = true;
    known.element.classList.add('editing');
    this.editing = { messageId: message.id, revision: this.session.doc.revision, originalText, textarea, editor };
    autoGrow(textarea);
    textarea.focus();
  }

  async saveEdit() {
    const editing = this.editing;
    const message = this.session.message(editing.messageId);
    // The edit was based on the text the editor opened with. If only other parts of the session moved on
    // since, it still applies to the current revision; if this message itself changed (another tab), the
    // change goes with its original revision and the server refuses it as stale, which the user is told.
    const unchanged = message && this.session.shownText(message) === editing.originalText;
    const revision = unchanged ? this.session.doc.revision : editing.revision;
    try {
      await this.session.editMessage(editing.messageId, editing.textarea.value, revision);
      this.finishEdit();
    } catch (error) {
      if (error.code === 'stale_revision' && message) {
        // Keep the user's text; a second Save now knowingly replaces the other tab's version.
        editing.revision = this.session.doc.revision;
        editing.originalText = this.session.shownText(message);
        notify('This message was changed in another tab or window. Your text is still in the editor: '
          + 'Save again to replace the other version, or Cancel to keep it.', { code: error.code, seconds: 30, key: 'stale-edit' });
      } else {
        notifyError(error);
      }
    }
  }

  cancelEdit() {
    this.finishEdit();
  }

  finishEdit() {
    const editing = this.editing;
    this.editing = null;
    const known = editing && this.elements.get(editing.messageId);
    if (known) {
      editing.editor.replaceWith(known.body);
      known.actions.hidden = false;
      known.element.classList.remove('editing');
      known.signature = null;
    }
    this.render();
  }
}
