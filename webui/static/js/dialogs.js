// Small modal questions (confirm a deletion, ask for a new title) in the page's own <dialog>, instead of
// the browser's alert boxes, which block the page and cannot be styled.

import { $ } from './dom.js';

function ask(text, { input = null, ok = 'OK' } = {}) {
  const dialog = $('#dialog');
  const field = $('#dialog-input');
  $('#dialog-text').textContent = text;
  $('#dialog-ok').textContent = ok;
  field.hidden = input === null;
  field.required = input !== null;
  field.value = input ?? '';
  dialog.returnValue = '';
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => {
      const accepted = dialog.returnValue === 'ok';
      resolve(input === null ? accepted : accepted ? field.value : null);
    }, { once: true });
    dialog.showModal();
    if (input !== null) field.select();
  });
}

/** Resolves true when the user confirms. */
export function confirmDialog(text, ok = 'OK') {
  return ask(text, { ok });
}

/** Resolves with the text entered, or null when cancelled. */
export function promptDialog(text, value, ok = 'Save') {
  return ask(text, { input: value, ok });
}
