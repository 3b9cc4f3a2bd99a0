// berth's web console: plain DOM on the HTTP/JSON API (/v1/…), no build
// step. Every string from the API reaches the page as text (textContent);
// the one exception is Markdown, rendered and sanitized by the dispatcher
// (POST /ui/markdown), under a Content-Security-Policy that runs no inline
// script.
'use strict';

const KEY = 'berth.token';
const token = () => sessionStorage.getItem(KEY);
let stopView = () => {};

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v === null || v === undefined) continue;
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined && c !== false) e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

class ApiError extends Error {
  constructor(status, error) {
    super((error && error.message) || ('HTTP ' + status));
    this.status = status;
    this.error = error || {};
  }
}

async function api(method, path, body) {
  const headers = { Authorization: 'Bearer ' + token() };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let data = {};
  try { data = text ? JSON.parse(text) : {}; } catch (_) { data = { error: { message: text } }; }
  if (r.status === 401) { sessionStorage.removeItem(KEY); location.hash = '#/login'; }
  if (!r.ok) throw new ApiError(r.status, data.error);
  return data;
}

function toast(text) {
  const t = document.getElementById('toast');
  t.textContent = text;
  t.className = 'show';
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.className = ''; }, 4000);
}

function failed(e) { toast(e instanceof ApiError ? e.message : String(e)); }

/// Markdown → sanitized HTML, rendered by the dispatcher, in batches.
const markdownQueue = [];
function markdown(target, text) {
  target.textContent = text;
  markdownQueue.push([target, text]);
  if (markdownQueue.length === 1) setTimeout(flushMarkdown, 0);
}
async function flushMarkdown() {
  const batch = markdownQueue.splice(0, 200);
  if (!batch.length) return;
  try {
    const r = await api('POST', '/ui/markdown', { texts: batch.map(b => b[1]) });
    batch.forEach(([target], i) => { target.innerHTML = r.html[i]; });
  } catch (_) { /* the text stays as plain text */ }
  if (markdownQueue.length) flushMarkdown();
}

function short(name) { return (name || '').replace(/^sessions\//, ''); }
function statusName(s) { return (s || '').replace(/^SESSION_STATUS_/, '').toLowerCase(); }
function activityName(a) { return (a || '').replace(/^ACTIVITY_/, '').toLowerCase().replace('unspecified', ''); }
function age(ts) {
  if (!ts) return '';
  const s = Math.max(0, (Date.now() - Date.parse(ts)) / 1000);
  if (s < 90) return Math.round(s) + 's';
  if (s < 5400) return Math.round(s / 60) + 'm';
  if (s < 172800) return Math.round(s / 3600) + 'h';
  return Math.round(s / 86400) + 'd';
}
function usd(x) { return '$' + Number(x || 0).toFixed(4); }

// ---- sign-in ----

function loginView(main) {
  const input = el('input', { type: 'password', id: 'key', autocomplete: 'off', placeholder: 'berth_…', 'aria-label': 'API key', required: true });
  const error = el('p', { class: 'error', role: 'alert' });
  const form = el('form', { class: 'inline', onsubmit: async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, input.value.trim());
    try {
      const me = await api('GET', '/v1/whoami');
      toast('Signed in as ' + (me.displayName || me.name));
      location.hash = '#/';
    } catch (e) {
      sessionStorage.removeItem(KEY);
      error.textContent = e.message;
    }
  } }, el('label', { for: 'key' }, 'API key'), input, el('button', { class: 'primary', type: 'submit' }, 'Sign in'));
  main.replaceChildren(el('h1', {}, 'Sign in'),
    el('p', { class: 'muted' }, 'Paste an API key. It is kept in this tab only (session storage).'), form, error);
  input.focus();
}

// ---- sessions ----

function sessionsView(main) {
  let filter = '';
  const body = el('tbody');
  const image = el('input', { type: 'text', id: 'new-image', 'aria-label': 'Image', placeholder: 'image', value: localStorage.getItem('berth.image') || '' });
  const message = el('input', { type: 'text', id: 'new-message', 'aria-label': 'First message', placeholder: 'first message' });
  const create = el('form', { class: 'inline', onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      localStorage.setItem('berth.image', image.value);
      const s = await api('POST', '/v1/sessions', { spec: { image: image.value }, initialMessage: message.value });
      location.hash = '#/s/' + short(s.name);
    } catch (e) { failed(e); }
  } }, image, message, el('button', { class: 'primary', type: 'submit' }, 'Start session'));
  const select = el('select', { 'aria-label': 'Filter by status', onchange: () => { filter = select.value; refresh(); } },
    ['', 'PENDING', 'RUNNING', 'IDLE', 'PAUSED', 'STOPPED', 'FAILED', 'COMPLETED'].map(s =>
      el('option', { value: s ? 'SESSION_STATUS_' + s : '' }, s ? s.toLowerCase() : 'any status')));
  const waiting = el('input', { type: 'checkbox', id: 'waiting', onchange: () => refresh() });
  main.replaceChildren(
    el('h1', {}, 'Sessions'), create,
    el('div', { class: 'bar' }, select, el('label', {}, waiting, ' waiting for me')),
    el('table', {}, el('thead', {}, el('tr', {},
      el('th', {}, 'Session'), el('th', {}, 'Status'), el('th', {}, 'Activity'),
      el('th', { class: 'wide' }, 'Agent'), el('th', {}, 'Cost'), el('th', { class: 'wide' }, 'Age'))), body));
  async function refresh() {
    const q = new URLSearchParams({ pageSize: '100' });
    if (filter) q.set('status', filter);
    if (waiting.checked) q.set('activity', 'ACTIVITY_WAITING_INPUT');
    try {
      const r = await api('GET', '/v1/sessions?' + q);
      body.replaceChildren(...(r.sessions || []).map(s => {
        const open = () => { location.hash = '#/s/' + short(s.name); };
        return el('tr', { class: 'row', tabindex: '0', onclick: open, onkeydown: (ev) => { if (ev.key === 'Enter') open(); } },
          el('td', {}, el('a', { href: '#/s/' + short(s.name) }, s.displayName || short(s.name))),
          el('td', {}, el('span', { class: 'status' }, statusName(s.status))),
          el('td', {}, activityName(s.activity)),
          el('td', { class: 'wide' }, s.agent || (s.spec && s.spec.image) || ''),
          el('td', {}, usd(s.usage && s.usage.costUsd)),
          el('td', { class: 'wide' }, age(s.createTime)));
      }));
    } catch (e) { failed(e); }
  }
  refresh();
  const timer = setInterval(refresh, 3000);
  return () => clearInterval(timer);
}

// ---- one session ----

function sessionView(main, id) {
  const name = 'sessions/' + id;
  const head = el('div');
  const actions = el('div', { class: 'bar' });
  const pending = el('div', { id: 'pending' });
  const transcript = el('div', { class: 'transcript', id: 'transcript', 'aria-live': 'polite' });
  const text = el('textarea', { id: 'composer', 'aria-label': 'Message', placeholder: 'Message the agent (Ctrl+Enter sends)' });
  const send = async () => {
    if (!text.value.trim()) return;
    try { await api('POST', '/v1/' + name + ':sendMessage', { text: text.value }); text.value = ''; } catch (e) { failed(e); }
  };
  text.addEventListener('keydown', (ev) => { if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); send(); } });
  main.replaceChildren(head, actions, transcript, pending,
    el('form', { onsubmit: (ev) => { ev.preventDefault(); send(); } }, text,
      el('div', { class: 'bar' }, el('button', { class: 'primary', type: 'submit' }, 'Send'))));
  const tools = new Map();
  const abort = new AbortController();
  // Cleared when the view is left: a reply that lands later (the session
  // just deleted, say) must not draw over the next view.
  let live = true;
  let shownPending = '';

  function act(label, verb, opts = {}) {
    const button = el('button', { type: 'button', class: opts.danger ? 'danger' : '', onclick: async () => {
      if (opts.confirm) {
        // Asked in the page: no browser dialog.
        const sure = el('span', { class: 'card', role: 'alertdialog', 'aria-label': opts.confirm }, opts.confirm, ' ',
          el('button', { type: 'button', class: 'danger', onclick: () => { sure.remove(); run(); } }, 'Yes, ' + label.toLowerCase()),
          ' ', el('button', { type: 'button', onclick: () => { sure.remove(); button.focus(); } }, 'Cancel'));
        button.after(sure);
        sure.querySelector('button').focus();
        return;
      }
      run();
    } }, label);
    async function run() {
      try {
        const r = await api(opts.method || 'POST', '/v1/' + name + (verb ? ':' + verb : ''), opts.method === 'DELETE' ? undefined : {});
        if (opts.then) opts.then(r); else refresh();
      } catch (e) { failed(e); }
    }
    return button;
  }
  async function exportAs(format, ext, type) {
    try {
      const r = await api('GET', '/v1/' + name + ':export?format=' + format);
      const bytes = r.data ? Uint8Array.from(atob(r.data), c => c.charCodeAt(0)) : new TextEncoder().encode(r.content);
      const a = el('a', { href: URL.createObjectURL(new Blob([bytes], { type })), download: id + '.' + ext });
      document.body.append(a); a.click(); a.remove();
    } catch (e) { failed(e); }
  }
  actions.append(
    act('Interrupt', 'interrupt'), act('Stop', 'stop'), act('Pause', 'pause'), act('Resume', 'resume'),
    act('Clone', 'clone', { then: (s) => { location.hash = '#/s/' + short(s.name); } }),
    act('Archive', 'archive'),
    el('button', { type: 'button', onclick: () => exportAs('EXPORT_FORMAT_MARKDOWN', 'md', 'text/markdown') }, 'Export Markdown'),
    el('button', { type: 'button', onclick: () => exportAs('EXPORT_FORMAT_PDF', 'pdf', 'application/pdf') }, 'Export PDF'),
    act('Delete', '', { method: 'DELETE', danger: true, confirm: 'Delete this session and all its events?', then: () => { location.hash = '#/'; } }));

  async function refresh() {
    try {
      const s = await api('GET', '/v1/' + name);
      if (!live) return;
      head.replaceChildren(
        el('h1', {}, s.displayName || id),
        el('p', { class: 'muted', id: 'state' }, statusName(s.status), ' · ', activityName(s.activity) || '—', ' · ',
          usd(s.usage && s.usage.costUsd), ' · ', (s.usage && s.usage.turns) || 0, ' turns · ', s.agent || (s.spec && s.spec.image)));
      const key = JSON.stringify(s.pendingToolRequests || []);
      if (key !== shownPending) {
        shownPending = key;
        pending.replaceChildren(...(s.pendingToolRequests || []).map(r =>
          r.toolName === 'AskUserQuestion' ? questionPanel(name, r) : approvalCard(name, r)));
      }
    } catch (e) {
      if (!live) return;
      if (e.status === 404) main.replaceChildren(el('p', {}, 'No such session.')); else failed(e);
    }
  }

  function row(node) { transcript.append(node); node.scrollIntoView({ block: 'nearest' }); }
  function onEvent(e) {
    let p = {};
    try { p = JSON.parse(e.payloadJson || '{}'); } catch (_) { /* kept as {} */ }
    switch (e.type) {
      case 'user.message': case 'agent.message': {
        const who = e.type === 'user.message' ? 'user' : 'agent';
        const body = el('div', { class: 'body' });
        markdown(body, p.text || '');
        row(el('div', { class: 'msg ' + who, 'data-seq': e.seq }, el('div', { class: 'who' }, who === 'user' ? 'You' : 'Agent'), body));
        break;
      }
      case 'agent.thinking':
        row(el('details', { class: 'thinking' }, el('summary', {}, 'Thinking'), el('pre', {}, p.text || '')));
        break;
      case 'agent.tool_use': {
        const result = el('pre', { class: 'result muted' }, '(running)');
        const d = el('details', { class: 'tool', 'data-tool': p.tool_use_id },
          el('summary', {}, 'Tool: ', el('strong', {}, p.name || '?')),
          el('div', { class: 'note' }, 'Input'), el('pre', {}, JSON.stringify(p.input, null, 2)),
          el('div', { class: 'note' }, 'Result'), result);
        tools.set(p.tool_use_id, result);
        row(d);
        break;
      }
      case 'agent.tool_result': {
        const c = p.content;
        const out = typeof c === 'string' ? c : Array.isArray(c) ? c.map(b => b.text || JSON.stringify(b)).join('\n') : JSON.stringify(c);
        const target = tools.get(p.tool_use_id);
        if (target) { target.textContent = out; target.className = 'result' + (p.is_error ? ' error' : ''); }
        else row(el('pre', {}, out));
        break;
      }
      case 'agent.tool_permission':
        row(el('div', { class: 'note' }, 'The agent asks to run ', p.tool_name, p.reason ? ': ' + p.reason : ''));
        break;
      case 'agent.question':
        row(el('div', { class: 'note' }, 'The agent asks: ',
          ((p.input && p.input.questions) || []).map(q => q.question).join(' · ')));
        break;
      case 'user.tool_confirmation': {
        const answers = p.updated_input && p.updated_input.answers;
        row(el('div', { class: 'note' }, answers
          ? 'Answered: ' + Object.entries(answers).map(([q, a]) => q + ' → ' + a).join(' · ')
          : (p.decision === 'allow' ? 'Allowed ' : 'Denied ') + (p.tool_name || '') + (p.by === 'timeout' ? ' (timed out)' : '')));
        refresh();
        break;
      }
      case 'session.usage':
        row(turnFooter(name, p.turn || {}));
        refresh();
        break;
      default:
        if (e.type.startsWith('session.status_')) {
          row(el('div', { class: 'note' }, 'Session ', e.type.slice('session.status_'.length), p.reason ? ' (' + p.reason + ')' : ''));
          refresh();
        }
    }
  }

  // The live tail: Server-Sent Events over fetch (it carries the key),
  // resumed after the last seq seen when the connection drops.
  let last = 0;
  async function tail() {
    while (!abort.signal.aborted) {
      try {
        const headers = { Authorization: 'Bearer ' + token(), Accept: 'text/event-stream' };
        if (last) headers['Last-Event-ID'] = String(last);
        const r = await fetch('/v1/' + name + '/events:stream', { headers, signal: abort.signal });
        if (!r.ok) { const j = await r.json().catch(() => ({})); throw new ApiError(r.status, j.error); }
        const reader = r.body.getReader();
        const decoder = new TextDecoder();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += decoder.decode(value, { stream: true });
          let i;
          while ((i = buf.indexOf('\n\n')) >= 0) {
            const block = buf.slice(0, i); buf = buf.slice(i + 2);
            const fields = {};
            for (const line of block.split('\n')) {
              if (line.startsWith(':')) continue;
              const c = line.indexOf(':');
              if (c > 0) fields[line.slice(0, c)] = line.slice(c + 1).replace(/^ /, '');
            }
            if (fields.event === 'end') { refresh(); return; }
            if (fields.data) { const e = JSON.parse(fields.data); last = Number(e.seq); onEvent(e); }
          }
        }
      } catch (e) {
        if (abort.signal.aborted) return;
        if (e instanceof ApiError && e.status < 500) { failed(e); return; }
      }
      await new Promise(r => setTimeout(r, 1000));
    }
  }
  refresh();
  tail();
  const timer = setInterval(refresh, 2000);
  return () => { live = false; clearInterval(timer); abort.abort(); };
}

function turnFooter(name, turn) {
  const comment = el('input', { type: 'text', 'aria-label': 'Comment', placeholder: 'comment (optional)', hidden: true });
  let rating = 0;
  const rate = (value, label, symbol) => el('button', { type: 'button', 'aria-label': label, title: label, onclick: () => {
    rating = value; comment.hidden = false; submit.hidden = false; comment.focus();
  } }, symbol);
  const submit = el('button', { type: 'button', hidden: true, onclick: async () => {
    try {
      await api('POST', '/v1/' + name + '/feedback', { turn: String(turn.number || 0), rating, comment: comment.value });
      footer.replaceChildren(el('span', {}, 'Turn ' + (turn.number || '') + ' rated ' + (rating > 3 ? 'good' : 'bad') + ', thank you'));
    } catch (e) { failed(e); }
  } }, 'Rate');
  const footer = el('div', { class: 'turn', 'data-turn': turn.number },
    el('span', {}, 'Turn ' + (turn.number || '?') + ' · ' + (turn.input_tokens || 0) + ' in / ' + (turn.output_tokens || 0) +
      ' out tokens · ' + usd(turn.cost_usd) + (turn.model ? ' · ' + turn.model : '')),
    rate(5, 'Good turn', '+ Good'), rate(1, 'Bad turn', '− Bad'), comment, submit);
  return footer;
}

function approvalCard(name, r) {
  const message = el('input', { type: 'text', 'aria-label': 'Why not (told to the agent)', placeholder: 'why not (told to the agent)' });
  const answer = (decision, always) => async () => {
    try {
      await api('POST', '/v1/' + name + ':confirmTool', { toolUseId: r.toolUseId, decision, always, message: decision === 'TOOL_DECISION_DENY' ? message.value : '' });
    } catch (e) { failed(e); }
  };
  let input = r.inputJson;
  try { input = JSON.stringify(JSON.parse(r.inputJson), null, 2); } catch (_) { /* shown as sent */ }
  return el('section', { class: 'card approval', 'aria-label': 'Approval' },
    el('strong', {}, 'The agent asks to run ' + r.toolName), r.reason ? el('div', { class: 'note' }, r.reason) : null,
    el('pre', {}, input),
    el('div', { class: 'bar' },
      el('button', { type: 'button', class: 'primary', onclick: answer('TOOL_DECISION_ALLOW', false) }, 'Allow'),
      el('button', { type: 'button', onclick: answer('TOOL_DECISION_ALLOW', true) }, 'Allow always'),
      message,
      el('button', { type: 'button', class: 'danger', onclick: answer('TOOL_DECISION_DENY', false) }, 'Deny')));
}

function questionPanel(name, r) {
  let questions = [];
  try { questions = JSON.parse(r.inputJson).questions || []; } catch (_) { /* none */ }
  const state = questions.map(() => ({ labels: new Set(), other: '' }));
  let current = 0;
  const counter = el('span', { class: 'note' });
  const tabs = el('div', { class: 'tabs', role: 'tablist' });
  const pane = el('div', { role: 'tabpanel' });
  const error = el('p', { class: 'error', role: 'alert' });
  function answered(i) { return state[i].labels.size > 0 || state[i].other.trim() !== ''; }
  function drawTabs() {
    counter.textContent = questions.filter((_, i) => answered(i)).length + ' of ' + questions.length + ' answered';
    tabs.replaceChildren(...questions.map((q, i) => el('button', { type: 'button', role: 'tab', 'aria-selected': String(i === current),
      onclick: () => { current = i; draw(); } }, (answered(i) ? '✓ ' : '') + (q.header || 'Question ' + (i + 1)))));
  }
  function draw() {
    drawTabs();
    const q = questions[current];
    const s = state[current];
    const kind = q.multiSelect ? 'checkbox' : 'radio';
    const group = 'q' + current;
    const options = (q.options || []).map((o, j) => el('label', {},
      el('input', { type: kind, name: group, value: o.label, checked: s.labels.has(o.label), onchange: (ev) => {
        if (!q.multiSelect) { s.labels.clear(); s.other = ''; other.value = ''; }
        if (ev.target.checked) s.labels.add(o.label); else s.labels.delete(o.label);
        drawTabs();
      } }), ' ', el('strong', {}, o.label), o.description ? el('span', { class: 'muted' }, ' — ' + o.description) : null));
    const other = el('input', { type: 'text', 'aria-label': 'Other', placeholder: (q.options || []).length ? 'Other…' : 'Your answer', value: s.other,
      oninput: (ev) => {
        s.other = ev.target.value;
        if (!q.multiSelect && s.other) { s.labels.clear(); pane.querySelectorAll('input[type=radio]').forEach(r => { r.checked = false; }); }
        drawTabs();
      } });
    pane.replaceChildren(el('p', {}, el('strong', {}, q.question), q.multiSelect ? el('span', { class: 'note' }, ' (choose any)') : null),
      el('div', { class: 'options' }, options), el('label', {}, 'Other: ', other));
  }
  async function submit() {
    const answers = questions.map((q, i) => ({ question: q.question, labels: [...state[i].labels], text: state[i].other.trim() }));
    try {
      await api('POST', '/v1/' + name + ':answerQuestion', { toolUseId: r.toolUseId, answers });
    } catch (e) { error.textContent = e.message; }
  }
  draw();
  return el('section', { class: 'card question', 'aria-label': 'Questions' },
    el('div', { class: 'bar' }, el('strong', {}, 'The agent asks'), counter), tabs, pane, error,
    el('div', { class: 'bar' }, el('button', { type: 'button', class: 'primary', onclick: submit }, 'Send answers')));
}

// ---- routing ----

function route() {
  stopView();
  stopView = () => {};
  const main = document.getElementById('main');
  const nav = document.getElementById('nav');
  const hash = location.hash || '#/';
  if (!token()) {
    nav.replaceChildren();
    loginView(main);
    return;
  }
  nav.replaceChildren(el('a', { href: '#/' }, 'Sessions'),
    el('button', { type: 'button', onclick: () => { sessionStorage.removeItem(KEY); location.hash = '#/login'; route(); } }, 'Sign out'));
  const m = hash.match(/^#\/s\/([^/]+)$/);
  if (m) stopView = sessionView(main, decodeURIComponent(m[1]));
  else if (hash === '#/login') loginView(main);
  else stopView = sessionsView(main);
  main.focus();
}

window.addEventListener('hashchange', route);
document.addEventListener('DOMContentLoaded', route);
