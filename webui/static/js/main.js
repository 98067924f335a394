// The chat page: logs in when the server wants it, then ties together the connection, the open chat, the
// chat list, the message view, the composer and the setup panel.

import { $, autoGrow } from './dom.js';
import { get, onLoginRequired, post } from './api.js';
import { Connection } from './connection.js';
import { ChatSession, botNames } from './chat-session.js';
import { ChatView } from './chat-view.js';
import { Sidebar } from './sidebar.js';
import { SetupPanel } from './setup-panel.js';
import { askLogin } from './login.js';
import { dismiss, notify, notifyError } from './notices.js';

const SESSION_ID = /^[0-9a-f]{32}$/;
const narrow = window.matchMedia('(max-width: 800px)');

const connection = new Connection();
const session = new ChatSession(connection);
const sidebar = new Sidebar(session, openSession);
const view = new ChatView(session, { branch });
const setup = new SetupPanel(session);
const input = $('#message-input');
const fitInput = autoGrow(input);
let me = null;
let everConnected = false;
let loggingIn = false;
let sending = false; // a message is on its way; a second Enter must not send it twice
const deletedHere = new Set();

// --- starting, logging in and out -----------------------------------------------------------------

async function boot() {
  try {
    me = await get('/auth/me');
  } catch (error) {
    notifyError(error, { key: 'connection', seconds: 0 });
    setTimeout(boot, 3000);
    return;
  }
  dismiss('connection');
  if (me.auth && !me.user) {
    await logIn();
    return;
  }
  start();
}

async function logIn() {
  if (loggingIn) return;
  loggingIn = true;
  $('#app').hidden = true;
  me.user = await askLogin(me.allow_register);
  loggingIn = false;
  start();
}

function start() {
  $('#app').hidden = false;
  $('#user-name').textContent = me.auth ? `Logged in as ${me.user}` : '';
  $('#logout-button').hidden = !me.auth;
  $('.sidebar-foot').hidden = !me.auth;
  connection.open();
  sidebar.refresh().then(() => {
    if (session.id) return; // a chat was opened meanwhile (a link followed while the list loaded)
    const wanted = location.hash.slice(1);
    const newest = sidebar.sessions.find((summary) => !summary.error);
    if (SESSION_ID.test(wanted)) openSession(wanted);
    else if (newest) openSession(newest.id);
  });
  showModelInfo();
  setup.loadAdapters();
}

/** Back to the login screen: the connection closes itself, since the server keeps it open. */
function loggedOut() {
  if (!me || !me.auth || loggingIn) return;
  connection.close();
  session.close();
  sidebar.clear(); // nothing of this user's stays in the page for the next one
  history.replaceState(null, '', location.pathname);
  logIn();
}

onLoginRequired(loggedOut);

$('#logout-button').addEventListener('click', async () => {
  try {
    await post('/auth/logout');
  } catch (error) {
    notifyError(error);
    return;
  }
  loggedOut();
});

/** The model's name and context, from GET /api/model ({name, context, device, kv_cache}); hidden where the server
 *  has no such route. */
async function showModelInfo() {
  const chip = $('#model-info');
  try {
    const model = await get('/api/model');
    chip.textContent = `${model.name} · ${model.context} ctx`;
    chip.title = `Model ${model.name} on ${model.device}, context ${model.context} tokens, ${model.kv_cache} KV cache`;
    chip.hidden = false;
  } catch {
    chip.hidden = true; // a server without the model route: nothing to show
  }
}

// --- which chat is open ---------------------------------------------------------------------------

async function openSession(id) {
  closeDrawers();
  if (id === session.id) return; // open already: opening it again would only blank it until the snapshot
  history.replaceState(null, '', `#${id}`);
  const opening = session.open(id);
  sidebar.render();
  try {
    await opening;
  } catch (error) {
    notifyError(error);
    if (error.code === 'not_found' && session.id === id) {
      session.close();
      history.replaceState(null, '', location.pathname);
    }
  }
}

// A link to another chat, or an address typed in: the part after # names the chat.
window.addEventListener('hashchange', () => {
  const wanted = location.hash.slice(1);
  if (SESSION_ID.test(wanted) && wanted !== session.id && !$('#app').hidden) openSession(wanted);
});

async function branch(messageId) {
  const { session: copy } = await post(`/api/sessions/${session.id}/branch`, { message_id: messageId });
  await openSession(copy.id);
  await sidebar.refresh();
  notify(`Branched into “${copy.title}”.`, { kind: 'info' });
}

session.on('closed', async ({ reason, id }) => {
  if (reason !== 'deleted') return;
  if (!deletedHere.delete(id)) notify('This chat was deleted, perhaps in another tab.', { code: 'deleted' });
  history.replaceState(null, '', location.pathname);
  await sidebar.refresh();
  const newest = sidebar.sessions.find((summary) => !summary.error);
  if (newest) openSession(newest.id);
});
sidebar.onDelete = (id) => deletedHere.add(id); // our own deletion needs no notice


// --- the connection -------------------------------------------------------------------------------

function showConnection(state) {
  const dot = $('#connection-status');
  dot.className = `dot ${state}`;
  dot.title = { online: 'Connected', offline: 'Not connected; retrying', connecting: 'Connecting' }[state];
  updateComposer();
}

connection.on('connect', () => {
  showConnection('online');
  dismiss('connection');
  if (everConnected) {
    notify('Reconnected.', { kind: 'info', key: 'connection', seconds: 3 });
    sidebar.refresh();
  }
  everConnected = true;
  // A fresh join brings the session as it is now, including a reply that went on while we were away.
  session.join().catch((error) => notifyError(error));
});

connection.on('disconnect', () => {
  showConnection('offline');
  if (connection.wanted) notify('Connection to the server lost; reconnecting…', { key: 'connection', seconds: 0, code: 'offline' });
});

connection.on('connect_error', async () => {
  showConnection('offline');
  if (me && me.auth) {
    const now = await get('/auth/me').catch(() => null);
    if (now && !now.user) {
      loggedOut();
      return;
    }
  }
  // After a lost connection its notice stays up while retrying; this one is for a page that never got through.
  if (!everConnected) notify('Cannot reach the server; retrying…', { key: 'connection', seconds: 0, code: 'offline' });
});

connection.on('chat_error', (error) => {
  // A refused request of ours also comes back in its acknowledgement, where it is shown.
  if (error.event) return;
  if (!error.session_id || error.session_id === session.id) notify(error.message, { code: error.code });
});

// --- the composer and the status line -------------------------------------------------------------

function updateComposer() {
  const doc = session.doc;
  const ready = Boolean(doc) && connection.connected;
  input.disabled = !doc;
  $('[data-action="send"]').disabled = !ready || session.busy || sending;
  $('[data-action="stop"]').hidden = !session.busy;
  const bots = botNames(doc);
  const picker = $('#next-speaker');
  $('#speaker-picker').hidden = bots.length < 2;
  const options = [['', 'Whoever the model picks'], ...bots.map((name) => [name, name])];
  const chosen = picker.value;
  if (picker.options.length !== options.length || [...picker.options].some((option, i) => option.value !== options[i][0])) {
    picker.replaceChildren(...options.map(([value, label]) => new Option(label, value)));
    picker.value = bots.includes(chosen) ? chosen : '';
  }
}

/** " 3 alternatives" while a regenerate writes several at once, else nothing. */
function writingMany() {
  const count = session.live.swipes.size;
  return count > 1 ? ` ${count} alternatives` : '';
}

function updateStatus() {
  const job = session.job;
  const chip = $('#job-status');
  chip.hidden = !job;
  if (job) {
    chip.textContent = job.state === 'queued'
      ? `Queued: ${job.ahead} ahead`
      : session.live ? `${session.live.author || 'The bot'} is writing${writingMany()}…` : 'Working…';
  }
  updateComposer();
}

function updateStats() {
  const chip = $('#reply-stats');
  let stats = session.lastReply;
  if (!stats && session.doc) {
    const lastBot = [...session.doc.messages].reverse().find((message) => !message.is_user);
    const swipe = lastBot && lastBot.swipes[lastBot.chosen];
    if (swipe && swipe.tokens_per_second) stats = swipe;
  }
  chip.hidden = !stats;
  if (stats) {
    chip.textContent = `${stats.tokens_per_second.toFixed(1)} tokens/s`;
    chip.title = stats.prompt_tokens !== undefined
      ? `Last reply: ${stats.tokens} tokens at ${stats.tokens_per_second} tokens/s; prompt ${stats.prompt_tokens} tokens, ${stats.reused_tokens} of them cached; ended by ${stats.stop_reason}`
      : `Last reply: ${stats.tokens} tokens at ${stats.tokens_per_second} tokens/s`;
  }
}

session.on('doc', () => {
  const doc = session.doc;
  $('#chat-title').textContent = doc ? doc.title : session.id ? 'Loading…' : 'No chat open';
  document.title = doc ? `${doc.title} – Chat` : 'Chat';
  updateComposer();
  updateStats();
});
session.on('job', updateStatus);
session.on('stats', updateStats);
session.on('closed', () => {
  $('#chat-title').textContent = 'No chat open';
  document.title = 'Chat';
  updateStatus();
  updateStats();
});

async function send() {
  if (!session.doc || session.busy || sending) return;
  const text = input.value;
  const speaker = $('#next-speaker').value || undefined;
  sending = true;
  updateComposer();
  try {
    await session.send(text, speaker);
    input.value = '';
    fitInput();
    view.followLatest();
  } catch (error) {
    notifyError(error);
  } finally {
    sending = false;
    updateComposer();
  }
}

async function stop() {
  if (!session.busy) return;
  try {
    await session.stop();
  } catch (error) {
    notifyError(error);
  }
}

$('#composer').addEventListener('submit', (event) => {
  event.preventDefault();
  send();
});
input.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
$('[data-action="stop"]').addEventListener('click', stop);
document.addEventListener('keydown', (event) => {
  if (event.key === 'Escape' && !document.querySelector('dialog[open]')) stop();
});

$('#chat-title').addEventListener('click', () => {
  const doc = session.doc;
  if (doc) sidebar.rename({ id: doc.id, title: doc.title, revision: doc.revision });
});

// --- drawers on narrow screens, the setup panel ----------------------------------------------------

function closeDrawers() {
  $('#app').classList.remove('sidebar-open');
  if (narrow.matches) setup.toggle(false);
  $('#scrim').hidden = true;
}

for (const button of document.querySelectorAll('[data-action="toggle-sidebar"]')) {
  button.addEventListener('click', () => {
    const app = $('#app');
    if (narrow.matches) {
      const open = app.classList.toggle('sidebar-open');
      if (open) setup.toggle(false);
      $('#scrim').hidden = !open;
    } else {
      app.classList.toggle('sidebar-hidden');
    }
  });
}
for (const button of document.querySelectorAll('[data-action="toggle-setup"]')) {
  button.addEventListener('click', () => {
    setup.toggle();
    if (narrow.matches) {
      $('#app').classList.remove('sidebar-open');
      $('#scrim').hidden = !setup.open;
    }
  });
}
$('#scrim').addEventListener('click', closeDrawers);

boot();
