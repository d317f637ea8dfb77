// The Dispatch web console: one page, no framework, no build step, nothing fetched but the
// server's own API. Every value is put on the page as text (never as HTML), and the token
// lives in this tab's session storage only.
'use strict';
(() => {
  const S = {
    token: sessionStorage.getItem('dispatch.token'),
    ns: sessionStorage.getItem('dispatch.ns') || 'default',
    me: null,
    version: {},
    namespaces: [],
    stops: [], // what to stop when the page changes: abort controllers and timers
  };
  const main = document.getElementById('main');
  const FINAL_RUN = ['SUCCEEDED', 'FAILED', 'TIMEOUT', 'CANCELLED', 'DEAD'];
  const LIVE_JOB = ['Waiting', 'Active'];

  // ---- DOM ---------------------------------------------------------------------------
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else if (k === 'class') el.className = v;
      else el.setAttribute(k, v === true ? '' : v);
    }
    add(el, kids);
    return el;
  }
  function add(el, kids) {
    for (const k of kids.flat(Infinity)) {
      if (k === undefined || k === null || k === false) continue;
      el.append(k instanceof Node ? k : document.createTextNode(String(k)));
    }
    return el;
  }
  function svg(tag, attrs, ...kids) {
    const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
    return add(el, kids);
  }
  const link = (href, text) => h('a', { href }, text);
  const enc = encodeURIComponent;
  const pretty = (v) => (typeof v === 'string' ? v : JSON.stringify(v, null, 2));
  const canWrite = () => S.me && S.me.role !== 'viewer';
  const isClusterAdmin = () => S.me && S.me.role === 'admin' && S.me.allNamespaces;
  const nsPath = (rest) => `/v1/namespaces/${enc(S.ns)}${rest}`;

  function badge(text) {
    const t = String(text || '—');
    const ok = ['READY', 'CONNECTED', 'SUCCEEDED', 'Completed'];
    const bad = ['ERROR', 'FAILED', 'DEAD', 'TIMEOUT', 'Failed', 'Invalid'];
    const cls = ok.includes(t) ? 'ok' : bad.includes(t) ? 'bad' : t === '—' ? '' : 'warn';
    return h('span', { class: `badge ${cls}` }, t);
  }
  function ago(ts) {
    if (!ts) return '—';
    const s = Math.round((Date.now() - Date.parse(ts)) / 1000);
    const span = h('span', { title: ts });
    if (s < 0) span.textContent = `in ${fmtSecs(-s)}`;
    else span.textContent = s < 5 ? 'just now' : `${fmtSecs(s)} ago`;
    return span;
  }
  function fmtSecs(s) {
    if (s < 90) return `${s}s`;
    if (s < 5400) return `${Math.round(s / 60)}m`;
    if (s < 172800) return `${Math.round(s / 3600)}h`;
    return `${Math.round(s / 86400)}d`;
  }
  function took(a, b) {
    if (!a || !b) return '—';
    const ms = Date.parse(b) - Date.parse(a);
    return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(2)} s`;
  }
  function table(cols, rows, empty) {
    const head = h('tr', {}, cols.map(([name]) => h('th', {}, name)));
    const body = rows.length
      ? rows.map((r) => h('tr', {}, cols.map(([, cell, cls]) => h('td', { class: cls }, cell(r)))))
      : [h('tr', {}, h('td', { colspan: cols.length, class: 'muted' }, empty || 'None yet.'))];
    return h('div', { class: 'scroll' }, h('table', {}, h('thead', {}, head), h('tbody', {}, body)));
  }
  function kv(pairs) {
    return h('dl', { class: 'kv' }, pairs.filter(Boolean).map(([k, v]) => [h('dt', {}, k), h('dd', {}, v ?? '—')]));
  }
  const errorBox = (e) => h('div', { class: 'error', role: 'alert' }, e.message || String(e));
  function page(title, ...content) {
    main.replaceChildren(h('h1', {}, title));
    add(main, content);
  }
  function button(text, onclick, cls) {
    return h('button', { class: cls, type: 'button', onclick }, text);
  }
  // A button whose action may fail: the error shows beside it.
  function action(text, fn, cls) {
    const out = h('span', {});
    const b = button(text, async () => {
      b.disabled = true;
      out.replaceChildren();
      try { await fn(out); } catch (e) { out.replaceChildren(errorBox(e)); }
      b.disabled = false;
    }, cls);
    return [b, out];
  }
  function later(fn, ms) {
    const t = setTimeout(fn, ms);
    S.stops.push(() => clearTimeout(t));
  }
  function every(fn, ms) {
    const t = setInterval(fn, ms);
    S.stops.push(() => clearInterval(t));
  }
  function stopAll() {
    for (const s of S.stops.splice(0)) s();
  }

  // ---- API ---------------------------------------------------------------------------
  async function api(method, path, body, opts = {}) {
    const headers = S.token ? { Authorization: `Bearer ${S.token}` } : {};
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const r = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: opts.signal,
      cache: 'no-store',
    });
    if (opts.raw && r.ok) return r;
    const text = await r.text();
    let data = text;
    try { data = text ? JSON.parse(text) : null; } catch (_) { /* text */ }
    if (!r.ok) {
      const msg = data && data.error && data.error.message ? data.error.message : `${r.status} ${r.statusText}`;
      if (r.status === 401 && !opts.quiet) signOut(msg);
      const e = new Error(`${r.status}: ${msg}`);
      e.status = r.status;
      throw e;
    }
    return opts.withHeaders ? { data, headers: r.headers, status: r.status } : data;
  }
  // Reads an NDJSON stream, calling `each` with every object, until it ends or is stopped.
  async function follow(path, each) {
    const ctl = new AbortController();
    S.stops.push(() => ctl.abort());
    const r = await api('GET', path, undefined, { raw: true, signal: ctl.signal });
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = '';
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (line.trim()) each(JSON.parse(line));
        }
      }
    } catch (e) {
      if (e.name !== 'AbortError') throw e;
      return false;
    }
    return !ctl.signal.aborted;
  }

  // ---- charts ------------------------------------------------------------------------
  // `series`: columns of numbers (null: no value that minute), one line each.
  function chart(series, unit) {
    const W = 420, H = 120, L = 40, B = 16, T = 6;
    const vals = series.flat().filter((v) => v !== null && v !== undefined);
    const max = Math.max(1, ...vals);
    const n = Math.max(...series.map((s) => s.length), 2);
    const x = (i) => L + (i * (W - L - 4)) / (n - 1);
    const y = (v) => T + (H - B - T) * (1 - v / max);
    const el = svg('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img' });
    for (const f of [0, 0.5, 1]) {
      const v = max * f;
      el.append(svg('line', { class: 'grid-line', x1: L, x2: W, y1: y(v), y2: y(v) }));
      el.append(svg('text', { x: L - 4, y: y(v) + 3, 'text-anchor': 'end' }, fmtNum(v) + unit));
    }
    for (const [i, label] of [[0, '-60m'], [Math.floor((n - 1) / 2), '-30m'], [n - 1, 'now']]) {
      el.append(svg('text', { x: x(i), y: H - 2, 'text-anchor': i === 0 ? 'start' : i === n - 1 ? 'end' : 'middle' }, label));
    }
    series.forEach((s, k) => {
      el.append(svg('path', { class: `s${k}`, d: pathOf(s, x, y) }));
      // A minute alone (no value either side) is a dot: a line needs two.
      s.forEach((v, i) => {
        if (v === null || v === undefined || (s[i - 1] ?? null) !== null || (s[i + 1] ?? null) !== null) return;
        el.append(svg('circle', { class: `s${k}`, cx: x(i), cy: y(v), r: 2 }));
      });
    });
    return el;
  }
  function pathOf(s, x, y) {
    let d = '';
    let pen = false;
    s.forEach((v, i) => {
      if (v === null || v === undefined) { pen = false; return; }
      d += `${pen ? 'L' : 'M'}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    });
    return d || 'M0,0';
  }
  function spark(hour) {
    const W = 120, H = 24;
    const max = Math.max(1, ...hour.calls);
    const x = (i) => (i * W) / (hour.calls.length - 1);
    const y = (v) => H - 2 - ((H - 4) * v) / max;
    return svg('svg', { class: 'spark', viewBox: `0 0 ${W} ${H}`, role: 'img' },
      svg('path', { class: 's0', d: pathOf(hour.calls, x, y) }),
      svg('path', { class: 's1', d: pathOf(hour.errors, x, y) }));
  }
  function fmtNum(v) {
    if (v >= 1000) return `${(v / 1000).toFixed(v >= 10000 ? 0 : 1)}k`;
    return v >= 10 || Number.isInteger(v) ? String(Math.round(v)) : v.toFixed(1);
  }
  // The hour in words: totals, the call-weighted p50 and the worst minute's p99.
  function hourSummary(hour) {
    const sum = (a) => a.reduce((t, v) => t + v, 0);
    const calls = sum(hour.calls);
    let w = 0;
    hour.p50Ms.forEach((p, i) => { if (p !== null) w += p * hour.calls[i]; });
    const p99 = Math.max(0, ...hour.p99Ms.filter((p) => p !== null));
    return `${calls} calls · ${sum(hour.errors)} errors · ${sum(hour.coldStarts)} cold · p50 ${fmtMs(calls ? w / calls : 0)} · p99 ${fmtMs(p99)}`;
  }
  const fmtMs = (ms) => (ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(ms < 10 ? 2 : 0)} ms`);
  function legend(...names) {
    return h('div', { class: 'legend' }, names.map((n, i) => h('span', { class: `c${i}` }, `— ${n}`)));
  }
  function charts(hour) {
    if (!hour) return h('p', { class: 'muted' }, 'No calls in the last hour.');
    return h('div', { class: 'grid', id: 'charts' },
      h('div', { class: 'card' }, h('h2', {}, 'Requests / min'), legend('calls', 'errors'), chart([hour.calls, hour.errors], '')),
      h('div', { class: 'card' }, h('h2', {}, 'Latency'), legend('p50', 'p99'), chart([hour.p50Ms, hour.p99Ms], ' ms')),
      h('div', { class: 'card' }, h('h2', {}, 'Cold starts / min'), legend('cold starts'), chart([hour.coldStarts], '')));
  }

  // ---- shared pieces -----------------------------------------------------------------
  function gatewayBase() {
    const v = S.version;
    if (v.gatewayUrl && /^https?:\/\//.test(v.gatewayUrl)) return v.gatewayUrl.replace(/\/$/, '');
    return `${location.protocol}//${location.hostname}:${v.gatewayPort || 8081}`;
  }
  function traceLink(trace) {
    if (!trace || !trace.traceId) return '—';
    const t = S.version.traceUrl;
    if (t && /^https?:\/\//.test(t)) {
      return h('a', { href: t.replace('{traceId}', enc(trace.traceId)), target: '_blank', rel: 'noopener noreferrer' }, trace.traceId);
    }
    return h('code', {}, trace.traceId);
  }
  function runDots(runs) {
    return h('span', { class: 'dots' }, runs.map((r) => h('span', {
      class: r.status === 'SUCCEEDED' ? 'ok' : FINAL_RUN.includes(r.status) ? 'bad' : 'warn',
      title: `${r.status} ${r.createdAt}`,
    })));
  }
  function runsTable(runs, empty) {
    return table([
      ['Run', (r) => link(`#/runs/${enc(r.id)}`, r.id)],
      ['Function', (r) => link(`#/functions/${enc(r.function)}`, r.function)],
      ['Status', (r) => badge(r.status)],
      ['Trigger', (r) => `${r.trigger || ''}${r.async ? ' (async)' : ''}`],
      ['Created', (r) => ago(r.createdAt)],
      ['Took', (r) => took(r.startedAt, r.finishedAt)],
      ['Error', (r) => (r.error ? `${r.error.type}: ${r.error.message}` : ''), 'wrap'],
    ], runs, empty);
  }
  function objectsTable(objs, cols, empty) {
    return table([
      ['Name', (o) => o.metadata.name],
      ...cols,
      ['Status', (o) => badge(o.status && o.status.phase)],
      ['Reason', (o) => (o.status && o.status.reason) || '', 'wrap'],
      ['Updated', (o) => ago(o.metadata.updatedAt || o.metadata.createdAt)],
    ], objs, empty);
  }
  // "Create from JSON" for developers: a resource object, as `dispatch create -f` takes.
  function createBox(kind, example, done) {
    if (!canWrite()) return null;
    const ta = h('textarea', { 'aria-label': `New ${kind} as JSON`, spellcheck: 'false' }, JSON.stringify(example, null, 2));
    const [b, out] = action('Create', async () => {
      let obj;
      try { obj = JSON.parse(ta.value); } catch (e) { throw new Error(`not JSON: ${e.message}`); }
      await api('POST', nsPath(`/${kind}`), obj);
      done();
    }, 'primary create');
    return h('details', { class: 'card' }, h('summary', {}, `Create ${kind} from JSON`), ta, h('div', { class: 'row' }, b, out));
  }
  function deleteButton(kind, name, then) {
    if (!canWrite()) return null;
    return action('Delete', async () => {
      if (!confirm(`Delete ${kind} ${name}?`)) return;
      await api('DELETE', nsPath(`/${kind}/${enc(name)}`));
      then();
    }, 'danger delete');
  }
  function logsPre(logs) {
    const pre = h('pre', { class: 'logs', 'aria-label': 'Logs' });
    for (const l of (logs && logs.stdout) || []) pre.append(h('span', {}, `${l}\n`));
    for (const l of (logs && logs.stderr) || []) pre.append(h('span', { class: 'err' }, `${l}\n`));
    if (!pre.childNodes.length) pre.append(h('span', { class: 'muted' }, '(no output)'));
    return pre;
  }

  // ---- pages -------------------------------------------------------------------------
  async function functionsPage() {
    const [fns, stats, runs] = await Promise.all([
      api('GET', nsPath('/functions')),
      api('GET', nsPath('/stats')),
      api('GET', nsPath('/runs?limit=300')),
    ]);
    const hours = Object.fromEntries(stats.functions.map((f) => [f.name, f]));
    const recent = {};
    for (const r of runs) (recent[r.function] ||= []).length < 8 && recent[r.function].push(r);
    const versions = {};
    await Promise.all(fns.slice(0, 100).map(async (f) => {
      versions[f.metadata.name] = await api('GET', nsPath(`/functions/${enc(f.metadata.name)}/versions`)).catch(() => []);
    }));
    page('Functions',
      table([
        ['Name', (f) => link(`#/functions/${enc(f.metadata.name)}`, f.metadata.name)],
        ['Status', (f) => badge(f.status.phase)],
        ['Image', (f) => f.spec.image],
        ['Version', (f) => {
          const v = versions[f.metadata.name] || [];
          return v.length ? `v${v[0].version} (${v.length} kept)` : '—';
        }],
        ['Last runs', (f) => runDots((recent[f.metadata.name] || []).slice().reverse())],
        ['Last hour', (f) => {
          const hr = hours[f.metadata.name];
          return hr ? h('span', { title: hourSummary(hr) }, spark(hr), ' ', h('span', { class: 'muted' }, hourSummary(hr))) : h('span', { class: 'muted' }, 'no calls');
        }],
      ], fns, 'No functions in this namespace yet: `dispatch create function NAME FILE`.'),
      createBox('functions', {
        apiVersion: 'dispatch.dev/v1', kind: 'Function', metadata: { name: 'hello' },
        spec: { image: 'python3', source: 'sha256:… (POST …/functions/hello/source first, or use the CLI)' },
      }, render));
  }

  async function functionPage(name) {
    const base = `/functions/${enc(name)}`;
    const [fn, versions, stats, runs, endpoints, source] = await Promise.all([
      api('GET', nsPath(base)),
      api('GET', nsPath(`${base}/versions`)).catch(() => []),
      api('GET', nsPath(`/stats?function=${enc(name)}`)),
      api('GET', nsPath(`/runs?function=${enc(name)}&limit=20`)),
      api('GET', nsPath('/endpoints')),
      api('GET', nsPath(`${base}/source`)).catch((e) => e),
    ]);
    const mine = endpoints.filter((e) => e.spec.function === name || (e.spec.function || '').startsWith(`${name}@`));
    const chartBox = h('div', {}, charts(stats.functions[0]));
    every(async () => {
      const s = await api('GET', nsPath(`/stats?function=${enc(name)}`)).catch(() => null);
      if (s) chartBox.replaceChildren(charts(s.functions[0]));
    }, 10000);
    page(h('span', {}, `Function ${name} `, badge(fn.status.phase), h('span', { class: 'actions' }, deleteButton('functions', name, () => { location.hash = '#/functions'; }))),
      fn.status.reason ? h('p', { class: 'muted' }, fn.status.reason) : null,
      chartBox,
      canWrite() ? execBox(name) : null,
      h('div', { class: 'grid' },
        h('div', { class: 'card' }, h('h2', {}, 'Settings'),
          kv(Object.entries(fn.spec).map(([k, v]) => [k, typeof v === 'object' ? h('code', {}, JSON.stringify(v)) : String(v)]))),
        h('div', { class: 'card' }, h('h2', {}, 'Source files'),
          source instanceof Error
            ? h('p', { class: 'muted' }, source.message)
            : table([['Path', (f) => h('code', {}, f.path)], ['Size', (f) => `${f.size} B`], ['Mode', (f) => (f.executable ? 'executable' : '')]], source.files))),
      h('h2', {}, 'Endpoints'), endpointsTable(mine),
      h('h2', {}, 'Versions'),
      table([
        ['Version', (v) => `v${v.version}`],
        ['Digest', (v) => h('code', {}, (v.digest || '').slice(0, 19))],
        ['Made', (v) => ago(v.createdAt)],
        ['By', (v) => v.createdBy || ''],
      ], versions, 'No versions kept (spec.keepVersions).'),
      h('h2', {}, 'Last runs ', link(`#/runs?function=${enc(name)}`, '(all)')),
      runsTable(runs));
  }

  function execBox(name) {
    const input = h('textarea', { 'aria-label': 'Payload (JSON)', spellcheck: 'false', id: 'exec-input' }, '{"name": "Dispatch"}');
    const isAsync = h('input', { type: 'checkbox', id: 'exec-async' });
    const out = h('div', { id: 'exec-out' });
    const [b, err] = action('Exec', async () => {
      let payload;
      try { payload = JSON.parse(input.value || 'null'); } catch (e) { throw new Error(`the payload is not JSON: ${e.message}`); }
      const q = isAsync.checked ? '?wait=false' : '';
      const r = await api('POST', nsPath(`/functions/${enc(name)}/runs${q}`), { input: payload }, { withHeaders: true });
      const id = r.headers.get('x-dispatch-run-id') || (r.data && r.data.id);
      out.replaceChildren(
        h('p', {}, r.status === 202 ? 'Accepted as ' : 'Run ', id ? link(`#/runs/${enc(id)}`, id) : '—'),
        h('pre', { class: 'envelope' }, pretty(r.data)));
    }, 'primary exec');
    return h('div', { class: 'card' }, h('h2', {}, 'Exec'), input,
      h('div', { class: 'row' }, b, h('label', {}, isAsync, ' async (answer 202 at once; follow the run)'), err), out);
  }

  function endpointsTable(eps) {
    const gw = gatewayBase();
    return table([
      ['Name', (e) => e.metadata.name],
      ['Function', (e) => link(`#/functions/${enc((e.spec.function || '').split('@')[0])}`, e.spec.function)],
      ['URL', (e) => (e.spec.paths || []).map((p) => h('div', {}, h('a', { href: gw + p, target: '_blank', rel: 'noopener noreferrer', class: 'endpoint-url' }, gw + p)))],
      ['Methods', (e) => (e.spec.methods || []).join(', ') || 'any'],
      ['Protocol', (e) => e.spec.protocol || 'http'],
      ['Auth', (e) => e.spec.auth || 'public'],
      ['Status', (e) => badge(e.status && e.status.phase)],
    ], eps);
  }

  async function endpointsPage() {
    const eps = await api('GET', nsPath('/endpoints'));
    page('Endpoints', endpointsTable(eps),
      createBox('endpoints', { apiVersion: 'dispatch.dev/v1', kind: 'Endpoint', metadata: { name: 'hello' }, spec: { function: 'hello', methods: ['GET', 'POST'], paths: ['/hello'] } }, render));
  }

  async function runsPage() {
    const q = new URLSearchParams(location.hash.split('?')[1] || '');
    const fn = h('input', { placeholder: 'function', value: q.get('function') || '', 'aria-label': 'Function' });
    const st = h('select', { 'aria-label': 'Status' }, h('option', { value: '' }, 'any status'),
      ['QUEUED', 'RUNNING', ...FINAL_RUN].map((s) => h('option', { value: s, selected: q.get('status') === s }, s)));
    const go = () => {
      const p = new URLSearchParams();
      if (fn.value.trim()) p.set('function', fn.value.trim());
      if (st.value) p.set('status', st.value);
      location.hash = `#/runs${p.toString() ? `?${p}` : ''}`;
    };
    const list = new URLSearchParams();
    for (const k of ['function', 'status']) if (q.get(k)) list.set(k, q.get(k));
    list.set('limit', '50');
    const box = h('div', {});
    let last = null;
    const more = async () => {
      const p = new URLSearchParams(list);
      if (last) p.set('after', last);
      const runs = await api('GET', nsPath(`/runs?${p}`));
      if (runs.length) last = runs[runs.length - 1].id;
      box.append(runsTable(runs, last ? 'No more runs.' : 'No runs match.'));
      moreBtn.hidden = runs.length < 50;
    };
    const [moreBtn, moreErr] = action('More', more);
    await more();
    page('Runs',
      h('form', { class: 'row', onsubmit: (e) => { e.preventDefault(); go(); } }, fn, st, h('button', { type: 'submit' }, 'Filter')),
      box, h('div', { class: 'row' }, moreBtn, moreErr));
  }

  async function runPage(id) {
    const run = await api('GET', nsPath(`/runs/${enc(id)}`));
    const live = !FINAL_RUN.includes(run.status);
    const logs = logsPre(run.logs);
    const cancel = canWrite() && live && run.async
      ? action('Cancel', async () => { await api('DELETE', nsPath(`/runs/${enc(id)}`)); render(); }, 'danger cancel')
      : null;
    page(h('span', {}, `Run ${id} `, h('span', { id: 'run-status' }, badge(run.status)), h('span', { class: 'actions' }, cancel)),
      h('div', { class: 'card' }, kv([
        ['Function', link(`#/functions/${enc(run.function)}`, run.function)],
        ['Trigger', `${run.trigger}${run.async ? ' (async)' : ''}`],
        ['Attempts', String(run.attempts)],
        ['Created', ago(run.createdAt)],
        ['Took', took(run.startedAt, run.finishedAt)],
        ['Cold start', run.cold ? `yes${run.coldStart ? ` (${run.coldStart.method}, ${fmtMs(run.coldStart.totalMs || 0)})` : ''}` : 'no'],
        ['Version', run.version ? `v${run.version}` : '—'],
        ['Trace', traceLink(run.trace)],
      ])),
      run.error ? h('div', { class: 'error' }, `${run.error.type}: ${run.error.message}`, run.error.stacktrace ? h('pre', {}, [].concat(run.error.stacktrace).join('\n')) : null) : null,
      h('div', { class: 'grid' },
        h('div', { class: 'card' }, h('h2', {}, 'Input'), h('pre', { class: 'input' }, pretty(run.input))),
        h('div', { class: 'card' }, h('h2', {}, 'Output'), h('pre', { class: 'output' }, run.output === undefined ? '—' : pretty(run.output)))),
      h('h2', {}, live ? 'Logs (live)' : 'Logs'), logs);
    if (live) {
      followRun(id, logs).catch((e) => logs.after(errorBox(e)));
    }
  }

  // Follows a run's lines as printed; when the attempt ends (or runs elsewhere), reads the
  // record again and follows the next attempt until the run is final.
  async function followRun(id, pre) {
    for (;;) {
      let got = false;
      const shown = [];
      const ok = await follow(nsPath(`/runs/${enc(id)}/logs?follow=true`), (l) => {
        if (l.lagged) return;
        if (!got) { pre.replaceChildren(); got = true; }
        shown.push(l);
        pre.append(h('span', { class: l.stream === 'stderr' ? 'err' : '' }, `${l.line}\n`));
      }).catch(() => false);
      if (!ok || !main.contains(pre)) return;
      const run = await api('GET', nsPath(`/runs/${enc(id)}`));
      if (FINAL_RUN.includes(run.status)) { render(); return; }
      await new Promise((r) => later(r, got ? 50 : 500));
    }
  }

  async function imagesPage() {
    const [bases, images] = await Promise.all([api('GET', nsPath('/baseimages')), api('GET', nsPath('/images'))]);
    page('Images',
      h('h2', {}, 'Images'),
      objectsTable(images, [
        ['Build log', (o) => link(`#/images/${enc(o.metadata.name)}`, 'log')],
        ['Base', (o) => o.spec.baseImage || ''],
      ]),
      createBox('images', { apiVersion: 'dispatch.dev/v1', kind: 'Image', metadata: { name: 'py' }, spec: { baseImage: 'python3', runtimeDependencies: { manifest: 'requests==2.32.3' } } }, render),
      h('h2', {}, 'Base images'),
      objectsTable(bases, [['Language', (o) => o.spec.language || ''], ['Image', (o) => o.spec.image || '']]));
  }

  async function imagePage(name) {
    const img = await api('GET', nsPath(`/images/${enc(name)}`));
    const log = h('pre', { class: 'build-log' }, '…');
    const phase = h('span', {}, badge(img.status.phase));
    page(h('span', {}, `Image ${name} `, phase, h('span', { class: 'actions' }, deleteButton('images', name, () => { location.hash = '#/images'; }))),
      h('div', { class: 'card' }, kv(Object.entries(img.spec).map(([k, v]) => [k, typeof v === 'object' ? JSON.stringify(v) : String(v)]))),
      h('h2', {}, 'Build log'), log);
    const building = (p) => !['READY', 'ERROR'].includes(p);
    const refresh = async () => {
      const [o, text] = await Promise.all([
        api('GET', nsPath(`/images/${enc(name)}`)),
        api('GET', nsPath(`/images/${enc(name)}/logs`)).catch((e) => e.message),
      ]);
      phase.replaceChildren(badge(o.status.phase));
      log.textContent = text || '(no build log yet)';
      if (building(o.status.phase)) later(() => refresh().catch((e) => log.after(errorBox(e))), 1000);
    };
    await refresh();
  }

  async function jobsPage() {
    const [templates, execs] = await Promise.all([api('GET', nsPath('/jobtemplates')), api('GET', nsPath('/jobexecutions?limit=100'))]);
    page('Jobs',
      h('h2', {}, 'Job templates'),
      objectsTable(templates, [['Executions', (o) => String(execs.filter((e) => e.name === o.metadata.name).length)]]),
      h('h2', {}, 'Executions'),
      table([
        ['Execution', (j) => link(`#/jobs/${enc(j.uuid)}`, j.uuid)],
        ['Template', (j) => j.name],
        ['Phase', (j) => badge(j.phase)],
        ['Created', (j) => ago(j.createdAt)],
        ['Took', (j) => took(j.startedAt, j.finishedAt)],
        ['Exit', (j) => (j.exitCode ?? '—')],
        ['Reason', (j) => j.reason || '', 'wrap'],
      ], execs));
  }

  async function jobPage(uuid) {
    const j = await api('GET', nsPath(`/jobexecutions/${enc(uuid)}`));
    let logs = logsPre(j.logs);
    const live = LIVE_JOB.includes(j.phase);
    const cancel = canWrite() && live
      ? action('Cancel', async () => { await api('DELETE', nsPath(`/jobexecutions/${enc(uuid)}`)); render(); }, 'danger cancel')
      : null;
    page(h('span', {}, `Job execution ${uuid} `, badge(j.phase), h('span', { class: 'actions' }, cancel)),
      h('div', { class: 'card' }, kv([
        ['Template', j.name], ['Reason', j.reason || '—'], ['Attempts', String(j.attempts)],
        ['Created', ago(j.createdAt)], ['Took', took(j.startedAt, j.finishedAt)], ['Exit code', j.exitCode ?? '—'],
        ['Trace', traceLink(j.trace)],
      ])),
      h('div', { class: 'card' }, h('h2', {}, 'Payload'), h('pre', {}, j.payload || '—')),
      h('h2', {}, live ? 'Logs (live)' : 'Logs'), logs);
    if (live) {
      later(async function poll() {
        const now = await api('GET', nsPath(`/jobexecutions/${enc(uuid)}`)).catch(() => null);
        if (!now) return;
        if (!LIVE_JOB.includes(now.phase)) { render(); return; }
        const fresh = logsPre(now.logs);
        logs.replaceWith(fresh);
        logs = fresh;
        later(poll, 1000);
      }, 1000);
    }
  }

  async function eventsPage() {
    const [subs, events] = await Promise.all([api('GET', nsPath('/subscriptions')), api('GET', nsPath('/events?limit=100'))]);
    page('Events',
      h('h2', {}, 'Subscriptions'),
      objectsTable(subs, [
        ['Event type', (o) => o.spec.eventType || (o.spec.filter && JSON.stringify(o.spec.filter)) || ''],
        ['Function', (o) => o.spec.function || ''],
      ]),
      createBox('subscriptions', { apiVersion: 'dispatch.dev/v1', kind: 'Subscription', metadata: { name: 'on-upload' }, spec: { eventType: 'file.uploaded', function: 'hello' } }, render),
      h('h2', {}, 'Events'),
      table([
        ['Id', (e) => h('code', {}, e.event.id)],
        ['Type', (e) => e.event.type],
        ['Source', (e) => e.event.source, 'wrap'],
        ['Received', (e) => ago(e.receivedAt)],
        ['Deliveries', (e) => `${(e.matched || []).length}${e.pending ? ' (pending)' : ''}`],
      ], events));
  }

  async function driversPage() {
    const drivers = await api('GET', nsPath('/eventdrivers'));
    page('Event drivers',
      objectsTable(drivers, [
        ['Type', (o) => o.spec.type || ''],
        ['Next fire', (o) => (o.status && o.status.nextFire ? ago(o.status.nextFire) : '—')],
      ]),
      createBox('eventdrivers', { apiVersion: 'dispatch.dev/v1', kind: 'EventDriver', metadata: { name: 'every-minute' }, spec: { type: 'cron', schedule: '* * * * *', eventType: 'tick' } }, render));
  }

  async function adminPage() {
    if (!isClusterAdmin()) {
      page('Admin', h('p', { class: 'muted' }, 'Tokens and the audit log are for admins of every namespace.'));
      return;
    }
    const [tokens, audit] = await Promise.all([api('GET', '/v1/tokens'), api('GET', '/v1/audit?limit=100')]);
    const name = h('input', { placeholder: 'name', 'aria-label': 'Token name' });
    const role = h('select', { 'aria-label': 'Role' }, ['viewer', 'developer', 'admin'].map((r) => h('option', { value: r }, r)));
    const ns = h('input', { placeholder: 'namespace or *', value: S.ns, 'aria-label': 'Namespace' });
    const expires = h('input', { placeholder: 'expires (30d)', 'aria-label': 'Expires' });
    const [mint, minted] = action('Create token', async (out) => {
      const body = { name: name.value.trim(), role: role.value, namespace: ns.value.trim() || S.ns };
      if (expires.value.trim()) body.expires = expires.value.trim();
      const t = await api('POST', '/v1/tokens', body);
      out.replaceChildren(h('div', { class: 'card' }, 'Its secret, shown once: ', h('code', { class: 'secret' }, t.token)));
    }, 'primary create');
    page('Admin',
      h('h2', {}, 'API tokens'),
      table([
        ['Name', (t) => t.name], ['Role', (t) => t.role], ['Namespace', (t) => t.namespace],
        ['Created', (t) => ago(t.createdAt)], ['Expires', (t) => (t.expiresAt ? ago(t.expiresAt) : 'never')],
        ['', (t) => action('Revoke', async () => {
          if (!confirm(`Revoke token ${t.name}?`)) return;
          await api('DELETE', `/v1/tokens/${enc(t.name)}`);
          render();
        }, 'danger delete')],
      ], tokens),
      h('div', { class: 'row' }, name, role, ns, expires, mint), minted,
      h('h2', {}, 'Audit log'),
      table([
        ['At', (a) => ago(a.at)], ['Who', (a) => a.who], ['Method', (a) => a.method],
        ['Path', (a) => h('code', {}, a.path), 'wrap'], ['Status', (a) => String(a.status)],
      ], audit));
  }

  // ---- sign-in, navigation -----------------------------------------------------------
  function loginPage(message) {
    document.getElementById('nav').replaceChildren();
    document.getElementById('who').replaceChildren();
    const input = h('input', { type: 'password', id: 'token', autocomplete: 'off', placeholder: 'dispatch API token', 'aria-label': 'API token' });
    const out = h('div', {}, message ? errorBox({ message }) : null);
    const form = h('form', {
      class: 'card login',
      onsubmit: async (e) => {
        e.preventDefault();
        S.token = input.value.trim();
        try {
          await signIn();
          sessionStorage.setItem('dispatch.token', S.token);
          render();
        } catch (err) {
          S.token = null;
          out.replaceChildren(errorBox(err));
        }
      },
    },
    h('h1', {}, 'Sign in'),
    h('p', {}, 'Paste an API token: `dispatch token create NAME --role viewer`, or the first admin token in the server\'s DATA_DIR/admin-token. It is kept in this tab only (session storage) and sent to this server alone.'),
    input, h('div', { class: 'row' }, h('button', { class: 'primary', type: 'submit' }, 'Sign in')), out);
    main.replaceChildren(form);
    input.focus();
  }

  async function signIn(quiet) {
    const [me, version] = await Promise.all([api('GET', '/v1/whoami', undefined, { quiet }), api('GET', '/v1/version')]);
    S.me = me;
    S.version = version || {};
    S.namespaces = await api('GET', '/v1/namespaces').then((l) => l.map((n) => n.metadata.name)).catch(() => []);
    if (!me.allNamespaces && me.namespace) S.ns = me.namespace;
    if (S.namespaces.length && !S.namespaces.includes(S.ns)) S.ns = S.namespaces.includes('default') ? 'default' : S.namespaces[0];
    sessionStorage.setItem('dispatch.ns', S.ns);
  }

  function signOut(message) {
    sessionStorage.removeItem('dispatch.token');
    S.token = null;
    S.me = null;
    stopAll();
    loginPage(message);
  }

  const SECTIONS = [
    ['functions', 'Functions'], ['runs', 'Runs'], ['endpoints', 'Endpoints'], ['images', 'Images'],
    ['jobs', 'Jobs'], ['events', 'Events'], ['drivers', 'Drivers'], ['admin', 'Admin'],
  ];
  function chrome(section) {
    document.getElementById('nav').replaceChildren(...SECTIONS
      .filter(([id]) => id !== 'admin' || isClusterAdmin())
      .map(([id, label]) => h('a', { href: `#/${id}`, class: id === section ? 'on' : '' }, label)));
    const pick = h('select', {
      'aria-label': 'Namespace',
      onchange: () => { S.ns = pick.value; sessionStorage.setItem('dispatch.ns', S.ns); render(); },
    }, (S.namespaces.length ? S.namespaces : [S.ns]).map((n) => h('option', { value: n, selected: n === S.ns }, n)));
    document.getElementById('who').replaceChildren(pick,
      h('span', { title: `token ${S.me.name}` }, `${S.me.name} (${S.me.role})`),
      button('Sign out', () => signOut()));
  }

  const ROUTES = [
    [/^functions\/([^/?]+)$/, functionPage],
    [/^functions$/, functionsPage],
    [/^runs\/([^/?]+)$/, runPage],
    [/^runs(?:\?(.*))?$/, runsPage],
    [/^endpoints$/, endpointsPage],
    [/^images\/([^/?]+)$/, imagePage],
    [/^images$/, imagesPage],
    [/^jobs\/([^/?]+)$/, jobPage],
    [/^jobs$/, jobsPage],
    [/^events$/, eventsPage],
    [/^drivers$/, driversPage],
    [/^admin$/, adminPage],
  ];

  async function render() {
    stopAll();
    if (!S.token && !S.me) {
      // A server without tokens (--insecure-no-auth) answers without one: no sign-in then.
      try { await signIn(true); } catch (_) { loginPage(); return; }
    }
    if (!S.me) {
      try { await signIn(); } catch (e) { if (S.token) signOut(e.message); return; }
    }
    const route = location.hash.replace(/^#\/?/, '') || 'functions';
    chrome(route.split(/[/?]/)[0]);
    const hit = ROUTES.map(([re, fn]) => [route.match(re), fn]).find(([m]) => m);
    if (!hit) { page('Not found', h('p', {}, 'No such page: ', link('#/functions', 'functions'))); return; }
    const [m, fn] = hit;
    main.replaceChildren(h('p', { class: 'muted' }, 'Loading…'));
    try {
      await fn(...m.slice(1).map((x) => (x === undefined ? x : decodeURIComponent(x))));
    } catch (e) {
      if (S.me) main.replaceChildren(errorBox(e));
    }
  }

  window.addEventListener('hashchange', render);
  render();
})();
