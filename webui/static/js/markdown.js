// Message text to safe DOM: Markdown (marked), code highlighting (highlight.js), then DOMPurify over the
// result. HTML written inside a message is shown as text, not interpreted: a chat transcript should show
// what the model or the user wrote. DOMPurify still runs over everything as the last line of defence
// (e.g. against javascript: links), and the page's Content-Security-Policy backs it up.

import { Marked } from '../vendor/marked-18.2.1/marked.esm.js';
import DOMPurify from '../vendor/dompurify-3.4.18/purify.es.mjs';
import hljs from '../vendor/highlight.js-11.12.0/highlight.min.js';

// Guessing the language costs time on every streamed token; beyond this size only named languages light up.
const AUTO_HIGHLIGHT_LIMIT = 4000;

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);
}

function highlighted(code, lang) {
  const language = (lang || '').trim().split(/\s+/)[0];
  try {
    if (language && hljs.getLanguage(language)) return hljs.highlight(code, { language, ignoreIllegals: true }).value;
    if (!language && code.length <= AUTO_HIGHLIGHT_LIMIT) return hljs.highlightAuto(code).value;
  } catch {
    // A grammar that chokes on odd text: show it plain.
  }
  return escapeHtml(code);
}

const marked = new Marked({
  gfm: true,
  breaks: true, // chat text: a line break is meant as one
  renderer: {
    html({ text }) {
      return escapeHtml(text);
    },
    code({ text, lang }) {
      const language = (lang || '').trim().split(/\s+/)[0];
      const label = language ? ` data-lang="${escapeHtml(language)}"` : '';
      return `<pre${label}><code class="hljs">${highlighted(text.replace(/\n$/, ''), language)}</code></pre>\n`;
    },
  },
});

const PURIFY = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ['style', 'form', 'input', 'button', 'textarea', 'select', 'option', 'dialog'],
  FORBID_ATTR: ['style', 'id', 'name'],
  RETURN_DOM_FRAGMENT: true,
};

DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A' && node.hasAttribute('href')) {
    node.setAttribute('target', '_blank');
    node.setAttribute('rel', 'noopener noreferrer nofollow');
  }
});

/** A sanitized DocumentFragment showing `text` as Markdown. */
export function renderMarkdown(text) {
  let html;
  try {
    html = marked.parse(text);
  } catch {
    html = `<p>${escapeHtml(text)}</p>`;
  }
  return DOMPurify.sanitize(html, PURIFY);
}
