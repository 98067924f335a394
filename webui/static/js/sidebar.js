// The list of chats and what one does with a whole chat: new, open, rename, duplicate, export, import,
// delete. A damaged session file is listed with its problem rather than hidden.

import { $, formatTime, h } from './dom.js';
import { del, get, patch, post, ServerError } from './api.js';
import { confirmDialog, promptDialog } from './dialogs.js';
import { notify, notifyError } from './notices.js';

const MAX_IMPORT_BYTES = 8 * 1024 * 1024;

export class Sidebar {
  /** `openSession(id)` shows a chat. */
  constructor(session, openSession) {
    this.session = session;
    this.openSession = openSession;
    this.sessions = [];
    this.renderedFor = undefined;
    this.menuFor = null;
    this.renderedFor = undefined; // the open chat when the list was last drawn
    this.refreshTimer = null;
    this.onDelete = () => {}; // told the id of a chat about to be deleted from here
    $('[data-action="new-session"]').addEventListener('click', () => this.create());
    $('[data-action="import-session"]').addEventListener('click', () => $('#import-file').click());
    $('#import-file').addEventListener('change', (event) => this.importFile(event.target));
    // Titles and message counts change as the open chat does.
    session.on('doc', () => this.refreshSoon());
  }

  async refresh() {
    let sessions;
    try {
      sessions = (await get('/api/sessions')).sessions;
    } catch (error) {
      // Offline is already on show, and the list is fetched again on reconnecting.
      if (error.code !== 'login_required' && error.code !== 'offline') notifyError(error, { key: 'session-list' });
      return;
    }
    const unchanged = JSON.stringify(sessions) === JSON.stringify(this.sessions);
    this.sessions = sessions;
    // Redrawing an unchanged list would close nothing but still lose hover and focus.
    if (!unchanged || this.renderedFor !== this.session.id) this.render();
  }

  clear() {
    this.sessions = [];
    this.menuFor = null;
    $('#session-list').replaceChildren();
  }

  refreshSoon() {
    clearTimeout(this.refreshTimer);
    this.refreshTimer = setTimeout(() => this.refresh(), 300);
  }

  render() {
    this.renderedFor = this.session.id;
    const items = this.sessions.map((summary) => this.item(summary));
    if (!items.length) items.push(h('li', { class: 'muted empty' }, 'No chats yet.'));
    $('#session-list').replaceChildren(...items);
  }

  item(summary) {
    const current = summary.id === this.session.id;
    if (summary.error) {
      return h('li', { class: 'session damaged', dataset: { id: summary.id } },
        h('button', { type: 'button', class: 'open', onclick: () => notify(summary.error.message, { code: summary.error.code }) },
          h('span', { class: 'title' }, 'Damaged chat'),
          h('span', { class: 'meta' }, summary.error.message)));
    }
    const menuOpen = this.menuFor === summary.id;
    const menu = menuOpen ? h('div', { class: 'session-menu' },
      h('button', { type: 'button', dataset: { action: 'rename-session' }, onclick: () => this.rename(summary) }, 'Rename'),
      h('button', { type: 'button', dataset: { action: 'duplicate-session' }, onclick: () => this.duplicate(summary) }, 'Duplicate'),
      h('a', { class: 'button', dataset: { action: 'export-session' }, href: `/api/sessions/${summary.id}/export`, download: `session-${summary.id}.json` }, 'Export'),
      h('button', { type: 'button', class: 'danger', dataset: { action: 'delete-session' }, onclick: () => this.remove(summary) }, 'Delete')) : null;
    const people = summary.participants.join(', ');
    return h('li', { class: `session${current ? ' current' : ''}`, dataset: { id: summary.id } },
      h('div', { class: 'session-row' },
        h('button', { type: 'button', class: 'open', 'aria-current': current ? 'true' : undefined, onclick: () => this.openSession(summary.id) },
          h('span', { class: 'title' }, summary.title),
          h('span', { class: 'meta' }, `${summary.message_count} msg · ${formatTime(summary.updated)} · ${people}`)),
        h('button', {
          type: 'button', class: 'icon', dataset: { action: 'session-menu' }, 'aria-expanded': String(menuOpen),
          'aria-label': `Actions for ${summary.title}`, title: 'Rename, duplicate, export, delete',
          onclick: () => { this.menuFor = menuOpen ? null : summary.id; this.render(); },
        }, '⋯')),
      menu);
  }

  revisionOf(summary) {
    return summary.id === this.session.id && this.session.doc ? this.session.doc.revision : summary.revision;
  }

  async create() {
    try {
      const { session } = await post('/api/sessions', {});
      this.menuFor = null;
      await this.openSession(session.id);
      await this.refresh();
      $('#message-input').focus();
    } catch (error) {
      notifyError(error);
    }
  }

  async rename(summary) {
    const title = await promptDialog('New title for this chat:', summary.title);
    if (title === null || title.trim() === summary.title) return;
    await this.changeFromMenu(async () => {
      const { session } = await patch(`/api/sessions/${summary.id}`, { revision: this.revisionOf(summary), title });
      this.session.takeDoc(session);
    });
  }

  async duplicate(summary) {
    try {
      const { session } = await post(`/api/sessions/${summary.id}/duplicate`);
      this.menuFor = null;
      await this.openSession(session.id);
      await this.refresh();
    } catch (error) {
      notifyError(error);
    }
  }

  async remove(summary) {
    if (!(await confirmDialog(`Delete “${summary.title}” for good?`, 'Delete'))) return;
    await this.changeFromMenu(async () => {
      this.onDelete(summary.id);
      await del(`/api/sessions/${summary.id}?revision=${this.revisionOf(summary)}`);
    });
  }

  /** A change to a chat from its menu; afterwards the list shows what the server has, failed or not. */
  async changeFromMenu(change) {
    try {
      await change();
      this.menuFor = null;
      await this.refresh();
    } catch (error) {
      notifyError(error);
      this.refresh();
    }
  }

  async importFile(input) {
    const file = input.files[0];
    input.value = ''; // choosing the same file again still fires "change"
    if (!file) return;
    try {
      if (file.size > MAX_IMPORT_BYTES) throw new ServerError('too_large', 'An import may be at most 8 MB.');
      let doc;
      try {
        doc = JSON.parse(await file.text());
      } catch {
        throw new ServerError('bad_request', `${file.name} is not a session export (it is not JSON).`);
      }
      const { session } = await post('/api/sessions/import', doc);
      await this.openSession(session.id);
      await this.refresh();
      notify(`Imported “${session.title}”.`, { kind: 'info' });
    } catch (error) {
      notifyError(error);
    }
  }
}
