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
    this.editing = null; // {messageId, revision, originalText, textarea}
    this.stick = true;
    this.pendingStream = new Set();
    this.atOnce = DEFAULT_AT_ONCE; // kept here: the message's controls are rebuilt whenever it changes

    this.scroller.addEventListener('scroll', () => {
      this.stick = this.atBottom();
      this.jump.hidden = this.stick;
    });
    this.jump.addEventListener('click', () => this.followLatest());
    session.on('doc', () => this.render());
    session.on('job', () => this.render());
    session.on('stream', ({ message_id }) => this.queueStream(message_id));
    session.on('closed', () => this.render());
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

  messageElement(message, index, count) {
    const busy = this.session.busy;
    const live = Boolean(this.session.live && this.session.live.message_id === message.id);
    const shown = this.session.shownSwipe(message);
    const streaming = this.session.streaming(message, shown);
    const last = index === count - 1;
    const signature = JSON.stringify([message, last, busy, live, shown, streaming]);
    const known = this.elements.get(message.id);
    if (known && (known.signature === signature || this.editing?.messageId === message.id)) return known.element;
    const element = this.buildMessage(message, { last, busy, live, shown, streaming });
    if (known) known.element.replaceWith(element);
    this.elements.set(message.id, { element, signature });
    return element;
  }

  buildMessage(message, { last, busy, live, shown, streaming }) {
    const swipe = message.swipes[shown];
    const stats = [formatTime(swipe.time)];
    if (swipe.tokens !== null) stats.push(`${swipe.tokens} tokens`);
    if (swipe.tokens_per_second !== null) stats.push(`${swipe.tokens_per_second.toFixed(1)} tokens/s`);
    const body = h('div', { class: 'body markdown' });
    body.append(renderMarkdown(swipe.text));
    if (streaming) body.classList.add('streaming');

    return h('article', {
      class: `message ${message.is_user ? 'user' : 'bot'}${live ? ' live' : ''}`,
      dataset: { id: message.id, author: message.author },
    },
    h('header', {},
      h('span', { class: 'author' }, message.author),
      h('span', { class: 'meta' }, stats.filter(Boolean).join(' · '))),
    body,
    this.messageActions(message, { last, busy, live, shown }));
  }

  messageActions(message, { last, busy, live, shown }) {
    const count = message.swipes.length;
    const lastReply = last && !message.is_user;
    // The swipes of a message being written can be flipped through while they grow.
    const flipLocked = busy && !live;
    const button = (action, label, title, handler, disabled = busy) => h('button', {
      type: 'button', class: 'action', dataset: { action }, title, 'aria-label': title, disabled, onclick: handler,
    }, label);
    const swipes = [];
    if (!message.is_user && (count > 1 || lastReply)) {
      swipes.push(
        button('swipe-left', '‹', 'Previous alternative', () => this.choose(message, shown - 1), flipLocked || shown === 0),
        h('span', { class: 'swipe-count', title: 'Alternative shown / alternatives' }, `${shown + 1}/${count}`),
        lastReply && shown === count - 1
          ? button('swipe-right', '›', 'New alternative', () => this.run(() => this.session.regenerate()))
          : button('swipe-right', '›', 'Next alternative', () => this.choose(message, shown + 1), flipLocked || shown >= count - 1),
      );
    }
    return h('footer', { class: 'actions' },
      swipes.length ? h('span', { class: 'swipes' }, swipes) : null,
      button('edit', 'Edit', 'Edit this message', () => this.startEdit(message)),
      lastReply ? button('regenerate', 'Regenerate', 'Write a new alternative', () => this.run(() => this.session.regenerate())) : null,
      lastReply ? this.regenerateMany(busy) : null,
      lastReply ? button('continue', 'Continue', 'Let the bot write more of this reply', () => this.run(() => this.session.continueReply())) : null,
      !last ? button('rewind', 'Rewind', 'Remove every message after this one', () => this.rewind(message)) : null,
      button('branch', 'Branch', 'Start a new chat from the messages up to here', () => this.run(() => this.actions.branch(message.id)), false),
      button('delete', 'Delete', 'Delete this message', () => this.run(() => this.session.deleteMessage(message.id))));
  }

  /** "×N": a number field for N and a button that asks for N new alternatives at once; Enter in the
   *  field asks too. An N out of range disables the button until it is fixed (or the field is left). */
  regenerateMany(busy) {
    const field = h('input', {
      type: 'number', class: 'at-once', min: 2, max: MOST_AT_ONCE, step: 1, value: String(this.atOnce), disabled: busy,
      'aria-label': 'How many alternatives to write at once', title: 'How many alternatives to write at once',
    });
    const go = h('button', { type: 'button', class: 'action', dataset: { action: 'regenerate-many' }, disabled: busy });
    const label = () => {
      const title = `Write ${this.atOnce} alternatives at once`;
      go.textContent = `×${this.atOnce}`;
      go.title = title;
      go.setAttribute('aria-label', title);
    };
    const typed = () => {
      const n = Number(field.value);
      return Number.isInteger(n) && n >= 2 && n <= MOST_AT_ONCE ? n : null;
    };
    const ask = () => {
      if (!busy && typed() !== null) this.run(() => this.session.regenerate(this.atOnce));
    };
    field.addEventListener('input', () => {
      const n = typed();
      if (n !== null) this.atOnce = n;
      go.disabled = busy || n === null;
      label();
    });
    field.addEventListener('change', () => {
      if (typed() === null) field.value = String(this.atOnce);
      go.disabled = busy;
    });
    field.addEventListener('keydown', (event) => {
      if (event.key === 'Enter') {
        event.preventDefault();
        ask();
      }
    });
    go.addEventListener('click', ask);
    label();
    return h('span', { class: 'regenerate-many' }, field, go);
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
      const body = known.element.querySelector('.body');
      body.replaceChildren(renderMarkdown(this.session.shownText(message)));
      known.signature = null; // the next full render rebuilds it from the document
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

  choose(message, swipe) {
    return this.run(() => this.session.chooseSwipe(message.id, swipe));
  }

  async rewind(message) {
    const doc = this.session.doc;
    const later = doc.messages.length - 1 - doc.messages.findIndex((m) => m.id === message.id);
    if (await confirmDialog(`Remove the ${later} message${later === 1 ? '' : 's'} after this one?`, 'Rewind')) {
      await this.run(() => this.session.rewind(message.id));
    }
  }

  startEdit(message) {
    if (this.editing) this.cancelEdit();
    const known = this.elements.get(message.id);
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
    known.element.querySelector('.body').replaceWith(editor);
    known.element.querySelector('.actions').hidden = true;
    known.element.classList.add('editing');
    this.editing = { messageId: message.id, revision: this.session.doc.revision, originalText, textarea };
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
    if (editing) {
      const known = this.elements.get(editing.messageId);
      if (known) known.signature = null;
    }
    this.render();
  }
}
