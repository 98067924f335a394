// Visible notices at the top of the page: errors from the server, a lost connection, a stale tab.
// A notice with a key replaces the earlier one with that key, so a repeated problem shows once.

import { $, h } from './dom.js';

const DEFAULT_SECONDS = { error: 15, info: 5 };
const MAX_SHOWN = 4;

export function notify(message, { kind = 'error', key = null, seconds = DEFAULT_SECONDS[kind], code = null } = {}) {
  const area = $('#notices');
  if (key) dismiss(key);
  const notice = h('div', { class: `notice ${kind}`, role: kind === 'error' ? 'alert' : 'status', dataset: { key: key || '', code: code || '' } },
    h('span', { class: 'notice-text' }, message),
    h('button', { type: 'button', class: 'icon', 'aria-label': 'Dismiss', onclick: () => notice.remove() }, '×'));
  area.append(notice);
  while (area.children.length > MAX_SHOWN) area.firstElementChild.remove();
  if (seconds) setTimeout(() => notice.remove(), seconds * 1000);
  return notice;
}

export function dismiss(key) {
  for (const notice of document.querySelectorAll('#notices .notice')) {
    if (notice.dataset.key === key) notice.remove();
  }
}

/** Show what went wrong with a request: a ServerError's message, or a generic line for anything else. */
export function notifyError(error, options = {}) {
  if (error && error.code) return notify(error.message, { code: error.code, ...options });
  console.error(error);
  return notify('Something went wrong in the page; details are in the browser console.', options);
}
