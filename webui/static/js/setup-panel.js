// The setup panel: participants (names, personas, who is the user, which LoRA adapter a bot speaks with),
// generation settings and the fixed prompt. Each form shows the session as it is until the user starts changing it; from then on it keeps
// the user's input and the revision it started from, so saving over another tab's change is refused
// (stale_revision) instead of silently undoing it.

import { $, $$, h } from './dom.js';
import { get, patch } from './api.js';
import { notify, notifyError } from './notices.js';

// Every generation setting the server knows (webui/schema.py SETTINGS), with what the user sees.
const SETTINGS = [
  { name: 'temperature', label: 'Temperature', min: 0, max: 5, step: 0.05, help: '0 always takes the likeliest token' },
  { name: 'top_k', label: 'Top K', min: 0, max: 1000, step: 1, help: '0 turns it off' },
  { name: 'top_p', label: 'Top P', min: 0, max: 1, step: 0.01, help: '1 turns it off' },
  { name: 'min_p', label: 'Min P', min: 0, max: 1, step: 0.01, help: '0 turns it off' },
  { name: 'typical', label: 'Typical P', min: 0, max: 1, step: 0.01, help: '1 turns it off' },
  { name: 'repetition_penalty', label: 'Repetition penalty', min: 0.5, max: 3, step: 0.01, help: '1 turns it off' },
  { name: 'repetition_sustain', label: 'Repetition range', min: 0, max: 65536, step: 1, help: 'tokens penalised in full' },
  { name: 'repetition_decay', label: 'Repetition decay', min: 0, max: 65536, step: 1, help: 'tokens over which it fades' },
  { name: 'frequency_penalty', label: 'Frequency penalty', min: -2, max: 2, step: 0.05 },
  { name: 'presence_penalty', label: 'Presence penalty', min: -2, max: 2, step: 0.05 },
  { name: 'seed', label: 'Seed', min: 0, step: 1, optional: true, help: 'empty: a new one every time' },
  { name: 'max_reply_tokens', label: 'Max reply tokens', min: 1, max: 4096, step: 1 },
  { name: 'end_on_newline', label: 'End the reply at a line break', kind: 'checkbox' },
  { name: 'prompt_format', label: 'Prompt format', kind: 'select',
    options: [['roleplay', 'Roleplay: any number of bots'], ['chat_template', "The model's chat template: one bot"]],
    help: 'Roleplay sends the fixed prompt, the personas and "Name: text" lines' },
];

/**
 * Fill an adapter select: `noneLabel` (no adapter of its own), every adapter the server loaded, and the
 * current choice even when this server did not load it, so that saving never drops it unseen. Hidden while
 * there is nothing to choose.
 */
function fillAdapterSelect(select, names, current) {
  const options = [['', select.dataset.none], ...names.map((name) => [name, name])];
  if (current && !names.includes(current)) options.push([current, `${current} (not loaded)`]);
  select.replaceChildren(...options.map(([value, label]) => h('option', { value }, label)));
  select.value = current || '';
  select.closest('label').hidden = !names.length && !current;
}

class SetupForm {
  constructor(session, form, { fill, read }) {
    this.session = session;
    this.form = form;
    this.fillFields = fill;
    this.read = read;
    this.dirty = false;
    this.revision = null;
    this.status = form.querySelector('.form-status');
    this.statusTimer = null;
    const changed = () => {
      this.dirty = true;
      this.showStatus('Not saved yet');
    };
    form.addEventListener('input', changed);
    form.addEventListener('change', changed);
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      this.save();
    });
    session.on('doc', () => this.refresh());
    session.on('closed', () => this.refresh());
  }

  showStatus(text, seconds = 0) {
    clearTimeout(this.statusTimer);
    this.status.textContent = text;
    if (seconds) this.statusTimer = setTimeout(() => { this.status.textContent = ''; }, seconds * 1000);
  }

  refresh(force = false) {
    const doc = this.session.doc;
    for (const control of this.form.elements) control.disabled = !doc;
    if (!doc || (this.dirty && !force)) return;
    this.dirty = false;
    this.revision = doc.revision;
    this.fillFields(doc);
    if (this.status.textContent === 'Not saved yet') this.showStatus('');
  }

  async save() {
    const id = this.session.id;
    try {
      const answer = await patch(`/api/sessions/${id}`, { revision: this.revision, ...this.read() });
      this.dirty = false;
      this.session.takeDoc(answer.session);
      this.refresh(true);
      this.showStatus('Saved', 4);
    } catch (error) {
      if (error.code === 'stale_revision') {
        this.refresh(true);
        notify('This chat was changed in another tab or window. The panel now shows the latest version; make your change again.',
          { code: error.code, seconds: 30 });
      } else {
        notifyError(error);
      }
    }
  }
}

export class SetupPanel {
  constructor(session) {
    this.session = session;
    this.panel = $('#setup');
    this.adapters = []; // the LoRA adapters the server loaded, from GET /api/model
    for (const tab of $$('[data-tab]', this.panel)) tab.addEventListener('click', () => this.showTab(tab.dataset.tab));
    this.buildSettingsFields();
    this.participants = new SetupForm(session, $('#participants-form'), {
      fill: (doc) => this.fillParticipants(doc),
      read: () => ({ participants: this.readParticipants() }),
    });
    this.settings = new SetupForm(session, $('#settings-form'), {
      fill: (doc) => this.fillSettings(doc),
      read: () => ({ settings: this.readSettings() }),
    });
    this.prompt = new SetupForm(session, $('#prompt-form'), {
      fill: (doc) => {
        const form = $('#prompt-form');
        form.elements.fixed_prompt.value = doc.fixed_prompt;
        form.elements.keep_fixed_prompt.checked = doc.keep_fixed_prompt;
      },
      read: () => {
        const form = $('#prompt-form');
        return { fixed_prompt: form.elements.fixed_prompt.value, keep_fixed_prompt: form.elements.keep_fixed_prompt.checked };
      },
    });
    $('[data-action="add-participant"]').addEventListener('click', () => {
      const rows = $('#participant-rows');
      const taken = new Set(this.readParticipants().map((p) => p.name.toLowerCase()));
      let number = rows.children.length;
      while (taken.has(`bot ${number}`)) number += 1;
      rows.append(this.participantRow({ name: `Bot ${number}`, persona: '', is_user: false }));
      this.participants.dirty = true;
      this.participants.showStatus('Not saved yet');
      rows.lastElementChild.querySelector('input[name="name"]').select();
    });
  }

  /** Called once logged in: with --auth, the server tells nobody else which adapters it has. */
  async loadAdapters() {
    try {
      this.adapters = (await get('/api/model')).adapters || [];
    } catch {
      return; // no model, or an older server: there are no adapters to offer
    }
    for (const select of $$('select[name="adapter"]', this.panel)) fillAdapterSelect(select, this.adapters, select.value);
  }

  get open() {
    return !this.panel.hidden;
  }

  toggle(show = !this.open) {
    this.panel.hidden = !show;
  }

  showTab(name) {
    for (const tab of $$('[data-tab]', this.panel)) tab.setAttribute('aria-selected', String(tab.dataset.tab === name));
    for (const panel of $$('[data-panel]', this.panel)) panel.hidden = panel.dataset.panel !== name;
  }

  // --- participants ------------------------------------------------------------------------------

  participantRow(participant) {
    const row = h('fieldset', { class: 'participant' },
      h('div', { class: 'row' },
        h('input', { name: 'name', value: participant.name, maxlength: 40, required: true, 'aria-label': 'Name' }),
        h('label', { class: 'check' },
          h('input', { type: 'radio', name: 'is_user', checked: participant.is_user }), 'You'),
        h('button', {
          type: 'button', class: 'icon', dataset: { action: 'remove-participant' }, 'aria-label': 'Remove', title: 'Remove',
          onclick: () => {
            row.remove();
            this.participants.dirty = true;
            this.participants.showStatus('Not saved yet');
          },
        }, '×')),
      h('textarea', { name: 'persona', rows: 3, maxlength: 4000, placeholder: 'Persona: who this is, how they talk', 'aria-label': 'Persona' }),
      h('label', { class: 'wide bot-adapter', title: 'The LoRA adapter this bot speaks with' }, 'Adapter',
        h('select', { name: 'adapter', dataset: { none: 'The session default' } })));
    row.querySelector('textarea').value = participant.persona;
    fillAdapterSelect(row.querySelector('select[name="adapter"]'), this.adapters, participant.adapter);
    return row;
  }

  fillParticipants(doc) {
    $('#participant-rows').replaceChildren(...doc.participants.map((participant) => this.participantRow(participant)));
  }

  readParticipants() {
    return $$('#participant-rows .participant').map((row) => ({
      name: row.querySelector('input[name="name"]').value.trim(),
      persona: row.querySelector('textarea').value,
      is_user: row.querySelector('input[type="radio"]').checked,
      adapter: row.querySelector('select[name="adapter"]').value || null,
    }));
  }

  // --- settings ----------------------------------------------------------------------------------

  buildSettingsFields() {
    const fields = SETTINGS.map((spec) => {
      const id = `setting-${spec.name}`;
      let control;
      if (spec.kind === 'checkbox') {
        return h('label', { class: 'check wide' }, h('input', { type: 'checkbox', id, name: spec.name }), spec.label);
      }
      if (spec.kind === 'select') {
        control = h('select', { id, name: spec.name }, spec.options.map(([value, label]) => h('option', { value }, label)));
        return h('label', { class: 'wide' }, spec.label, control, h('small', { class: 'muted' }, spec.help));
      }
      control = h('input', {
        type: 'number', id, name: spec.name, step: spec.step, min: spec.min, max: spec.max,
        required: !spec.optional, placeholder: spec.optional ? 'random' : undefined,
      });
      return h('label', { title: spec.help || '' }, spec.label, control, spec.help ? h('small', { class: 'muted' }, spec.help) : null);
    });
    fields.push(h('label', { class: 'wide', hidden: true }, 'LoRA adapter',
      h('select', { id: 'setting-adapter', name: 'adapter', dataset: { none: 'None: the model as it is' } }),
      h('small', { class: 'muted' }, "What the bots speak with, unless a bot's own adapter says otherwise")));
    $('#settings-fields').replaceChildren(...fields);
  }

  fillSettings(doc) {
    const form = $('#settings-form');
    for (const spec of SETTINGS) {
      const control = form.elements[spec.name];
      const value = doc.settings[spec.name];
      if (spec.kind === 'checkbox') control.checked = Boolean(value);
      else control.value = value === null || value === undefined ? '' : String(value);
    }
    fillAdapterSelect(form.elements.adapter, this.adapters, doc.settings.adapter);
  }

  readSettings() {
    const form = $('#settings-form');
    const settings = {};
    for (const spec of SETTINGS) {
      const control = form.elements[spec.name];
      if (spec.kind === 'checkbox') settings[spec.name] = control.checked;
      else if (spec.kind === 'select') settings[spec.name] = control.value;
      else settings[spec.name] = control.value.trim() === '' ? null : Number(control.value);
    }
    settings.adapter = form.elements.adapter.value || null;
    return settings;
  }
}
