// almond's rollout dashboard: reads GET /v1/dashboard once a second and
// draws every service (subsets, weights, endpoints, live figures), and for a
// service with a rollout a uPlot chart of canary vs stable with the steps
// and verdicts marked, its events, and on demand a "Live requests" panel
// (the tap `almond tap` reads). Actions call the same API as the CLI
// (src/ops.rs) with the operator token kept in sessionStorage.
'use strict';

(function () {
  const TOKEN_KEY = 'almond-token';
  const KEEP_SECONDS = 600;
  const CANARY = '#d9480f';
  const STABLE = '#1c7ed6';

  // Per service: { el: {...}, samples: [], chart, chartKey, events, subsetsKey }.
  const views = new Map();
  let since = 0;
  let busy = false;

  // --- small DOM helpers (no innerHTML: nothing from the API is parsed as HTML)
  function el(tag, props, ...kids) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === 'text') node.textContent = v;
      else if (k === 'class') node.className = v;
      else if (k.startsWith('data-')) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const kid of kids) if (kid != null) node.append(kid);
    return node;
  }
  const $ = (id) => document.getElementById(id);
  const fmt = (v, digits, unit) => (v == null ? '—' : v.toFixed(digits) + (unit || ''));

  function message(text, isError) {
    const m = $('message');
    m.textContent = text;
    m.className = isError ? 'error' : '';
    m.hidden = !text;
  }

  // --- the API, with the operator token when there is one
  function apiHeaders() {
    const headers = { 'x-almond-user': 'dashboard' };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers['Authorization'] = 'Bearer ' + token;
    return headers;
  }

  async function call(method, path, body) {
    const headers = apiHeaders();
    // Changes must say JSON, body or not: the control plane refuses other
    // types (what another site's page could send without a preflight).
    if (body !== undefined || method !== 'GET') headers['Content-Type'] = 'application/json';
    const resp = await fetch(path, {
      method,
      headers,
      cache: 'no-store',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await resp.text();
    return { status: resp.status, ok: resp.ok, text };
  }

  function showLogin(why) {
    $('login-why').textContent = why;
    $('login').hidden = false;
    $('services').hidden = true;
    $('token').focus();
  }

  // --- actions: the same calls as `almond shift/promote/rollback/rollout`
  async function act(service, what, method, path, body) {
    message(service + ': ' + what + '…', false);
    let r;
    try {
      r = await call(method, path, body);
    } catch (e) {
      message(service + ': ' + what + ' failed: ' + e, true);
      return;
    }
    if (r.ok) {
      message(service + ': ' + what + ' done', false);
    } else {
      message(service + ': ' + what + ' refused (' + r.status + '): ' + r.text.trim(), true);
      if (r.status === 401) showLogin('This action needs the operator token.');
    }
    refresh(true);
  }

  // A subset at 0 with no healthy instance is left out of a split sent:
  // the control plane knows only subsets it has endpoints for (or that
  // the split in force names), and leaving one out gives it no traffic,
  // as 0 does.
  function sendable(svc, weights) {
    for (const s of Object.keys(weights)) {
      if (weights[s] === 0 && svc && svc.subsets[s] && svc.subsets[s].healthy === 0) delete weights[s];
    }
    return weights;
  }

  function promote(name, subsets, subset, svc) {
    const weights = {};
    for (const s of subsets) weights[s] = 0;
    weights[subset] = 100;
    act(name, 'promote ' + subset, 'PUT', '/v1/services/' + encodeURIComponent(name) + '/split',
      { weights: sendable(svc, weights), action: 'promote' });
  }

  // `version`: the policy the inputs were filled from; a change made
  // since by someone else is refused (409), not silently overwritten.
  function shift(name, inputs, version, svc) {
    const weights = {};
    for (const input of inputs) {
      const n = Number(input.value);
      if (!Number.isInteger(n) || n < 0 || n > 100) {
        message(name + ': weight of ' + input.dataset.subset + ' must be a whole number 0..100', true);
        return;
      }
      weights[input.dataset.subset] = n;
    }
    act(name, 'shift', 'PUT', '/v1/services/' + encodeURIComponent(name) + '/split',
      { weights: sendable(svc, weights), version });
  }

  // --- live requests: one tap at a time (GET /v1/services/{svc}/tap, the
  // stream `almond tap` reads: one JSON summary per line, empty lines as
  // heartbeats), for the service whose panel is open; stopped when the
  // panel closes, another opens, or the service goes away.
  const TAP_ROWS = 200;
  let tap = null; // { name, v, ctrl }

  function stopTap(why) {
    if (!tap) return;
    const t = tap;
    tap = null;
    t.ctrl.abort();
    t.v.tapStart.hidden = false;
    t.v.tapStop.hidden = true;
    t.v.tapState.textContent = why || 'stopped';
  }

  function closeTap(v) {
    if (tap && tap.v === v) stopTap();
    v.tapPanel.hidden = true;
    v.tapToggle.textContent = 'live requests';
  }

  function openTap(name, v) {
    for (const other of views.values()) if (other !== v && !other.tapPanel.hidden) closeTap(other);
    v.tapPanel.hidden = false;
    v.tapToggle.textContent = 'close live requests';
    startTap(name, v);
  }

  function tapRow(v, e) {
    const time = new Date(e.time_ms).toLocaleTimeString() + '.' + String(e.time_ms % 1000).padStart(3, '0');
    const cells = [time, e.proxy, e.method, e.path, String(e.status), e.subset || '—', e.endpoint || '—',
      e.latency_ms + ' ms', e.request_id || '—'];
    const row = el('tr', { 'data-path': e.path, 'data-status': String(e.status), 'data-subset': e.subset || '' },
      ...cells.map((c) => el('td', { text: c == null ? '—' : String(c) })));
    if (e.status >= 500) row.className = 'error';
    if (v.tapHeaders.checked) {
      const h = e.headers || {};
      row.append(el('td', { class: 'headers', text: Object.keys(h).map((k) => k + ': ' + h[k]).join('\n') }));
    }
    // Newest first, at most TAP_ROWS kept.
    v.tapBody.prepend(row);
    while (v.tapBody.rows.length > TAP_ROWS) v.tapBody.lastElementChild.remove();
  }

  async function startTap(name, v) {
    stopTap();
    const q = new URLSearchParams();
    const path = v.tapPath.value.trim(), subset = v.tapSubset.value.trim(), status = v.tapStatus.value.trim();
    if (path) q.set('path', path);
    if (subset) q.set('subset', subset);
    if (status) q.set('status', status);
    if (v.tapHeaders.checked) q.set('headers', 'true');
    const ctrl = new AbortController();
    const mine = { name, v, ctrl };
    tap = mine;
    v.tapBody.replaceChildren();
    v.tapHead.replaceChildren(el('tr', {}, ...['time', 'proxy', 'method', 'path', 'status', 'subset', 'endpoint',
      'latency', 'request id'].concat(v.tapHeaders.checked ? ['headers'] : []).map((h) => el('th', { text: h }))));
    v.tapStart.hidden = true;
    v.tapStop.hidden = false;
    v.tapState.textContent = 'connecting…';
    let resp;
    try {
      resp = await fetch('/v1/services/' + encodeURIComponent(name) + '/tap?' + q, {
        headers: apiHeaders(), cache: 'no-store', signal: ctrl.signal,
      });
    } catch (e) {
      if (tap === mine) stopTap('tap failed: ' + e);
      return;
    }
    if (!resp.ok) {
      const text = (await resp.text()).trim();
      if (tap === mine) stopTap('tap refused (' + resp.status + '): ' + text);
      if (resp.status === 401) showLogin('The live requests need the operator token.');
      return;
    }
    v.tapState.textContent = 'live from ' + (resp.headers.get('x-almond-proxies') || '?') + ' proxies';
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let pending = '';
    const failed = []; // proxies whose stream failed or ended
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || tap !== mine) break;
        pending += decoder.decode(value, { stream: true });
        let end;
        while ((end = pending.indexOf('\n')) >= 0) {
          const line = pending.slice(0, end).trim();
          pending = pending.slice(end + 1);
          if (!line) continue; // heartbeat
          let e;
          try { e = JSON.parse(line); } catch (_) { continue; }
          if (e.error) { failed.push(e.proxy + ': ' + e.error); v.tapState.textContent = 'proxy ' + failed[failed.length - 1]; continue; }
          tapRow(v, e);
        }
      }
    } catch (e) {
      if (tap === mine) stopTap('tap ended: ' + e);
      return;
    }
    if (tap === mine) stopTap('the stream ended' + (failed.length ? ': ' + failed.join('; ') : ''));
  }

  function tapPanel(name) {
    const input = (placeholder, key) => el('input', { type: 'text', placeholder, 'data-tap': key, size: 12 });
    const tapPath = input('/path prefix', 'path');
    const tapSubset = input('subset', 'subset');
    const tapStatus = input('status: 5xx, 404', 'status');
    const tapHeaders = el('input', { type: 'checkbox', 'data-tap': 'headers' });
    const tapStart = el('button', { type: 'submit', text: 'start', 'data-action': 'tap-start' });
    const tapStop = el('button', { type: 'button', text: 'stop', 'data-action': 'tap-stop', hidden: true });
    const tapState = el('span', { class: 'muted tap-state', text: 'stopped' });
    const form = el('form', { class: 'tap-filters' }, tapPath, tapSubset, tapStatus,
      el('label', {}, tapHeaders, ' headers'), tapStart, tapStop, tapState);
    const tapHead = el('thead');
    const tapBody = el('tbody');
    const table = el('table', { class: 'tap-rows' }, tapHead, tapBody);
    const tapPanel = el('div', { class: 'tap', 'data-service': name, hidden: true },
      el('h3', { text: 'Live requests' }), form, el('div', { class: 'tap-scroll' }, table));
    return { tapPanel, form, tapPath, tapSubset, tapStatus, tapHeaders, tapStart, tapStop, tapState, tapHead, tapBody };
  }

  // --- one service's section, built once and updated every second
  function view(name) {
    let v = views.get(name);
    if (v) return v;
    const path = '/v1/services/' + encodeURIComponent(name);
    const title = el('h2', { text: name });
    const rollout = el('div', { class: 'rollout' });
    const table = el('table', { 'data-service': name });
    const shiftBox = el('span', { class: 'shift' });
    const button = (text, action, handler) =>
      el('button', { type: 'button', text, 'data-action': action, 'data-service': name, onclick: handler });
    const approve = button('approve gate', 'approve', () =>
      act(name, 'approve', 'POST', path + '/rollouts/approve', {}));
    const abort = button('abort rollout', 'abort', () =>
      act(name, 'abort', 'DELETE', path + '/rollouts', {}));
    const rollback = button('roll back', 'rollback', () =>
      act(name, 'rollback', 'POST', path + '/rollback', {}));
    const tapToggle = button('live requests', 'tap', () => {
      if (v.tapPanel.hidden) openTap(name, v); else closeTap(v);
    });
    const actions = el('div', { class: 'actions' }, rollback, approve, abort, shiftBox, tapToggle);
    const chart = el('div', { class: 'chart', 'data-service': name });
    const events = el('ol', { class: 'events' });
    const live = tapPanel(name);
    const section = el('section', { class: 'service', 'data-service': name },
      title, rollout, table, actions, live.tapPanel, chart, events);
    $('services').append(section);
    v = Object.assign({ section, rollout, table, shiftBox, approve, abort, chart, events, tapToggle,
      samples: [], plot: null, plotKey: '', marks: [], subsetsKey: '' }, live);
    live.form.addEventListener('submit', (ev) => { ev.preventDefault(); startTap(name, v); });
    live.tapStop.addEventListener('click', () => { if (tap && tap.v === v) stopTap(); });
    views.set(name, v);
    return v;
  }

  function renderSubsets(name, v, svc) {
    // What the buttons send is read from the newest data (`sendable`).
    v.svc = svc;
    const r = svc.rollout;
    const subsets = Object.keys(svc.subsets).sort();
    const head = el('tr', {}, ...['subset', 'weight', 'endpoints', 'rps', 'success', 'p99', ''].map(
      (h) => el('th', { text: h })));
    const rows = subsets.map((s) => {
      const info = svc.subsets[s];
      const live = svc.live[s] || {};
      const role = r && r.spec && s === r.spec.canary ? 'canary' : r && s === r.stable ? 'stable' : '';
      const bar = el('span', { class: 'weight-bar' });
      bar.style.width = (info.weight == null ? 0 : info.weight) + 'px';
      const weight = info.weight == null ? 'by endpoint' : info.weight + '%';
      return el('tr', { 'data-subset': s },
        el('td', { class: role, text: s + (role ? ' (' + role + ')' : '') }),
        el('td', { class: 'weight', 'data-weight': String(info.weight) }, bar, weight),
        el('td', { text: info.healthy + '/' + info.total }),
        el('td', { text: fmt(live.rps, 1) }),
        el('td', { text: live.success_rate == null ? '—' : fmt(100 * live.success_rate, 2, '%') }),
        el('td', { text: fmt(live.p99_ms, 1, ' ms') }),
        el('td', {}, el('button', {
          type: 'button', text: 'promote', 'data-action': 'promote', 'data-service': name,
          'data-subset': s, onclick: () => promote(name, subsets, s, v.svc),
        })));
    });
    v.table.replaceChildren(head, ...rows);
    // The shift inputs are rebuilt only when the subsets change, and
    // follow the weights in force (a rollout's steps, another operator's
    // shift) unless the operator is typing in them: typing is not lost to
    // the next refresh, and weights left untouched are never stale.
    const key = subsets.join(',');
    if (key !== v.subsetsKey) {
      v.subsetsKey = key;
      v.weightsKey = null;
      v.inputs = subsets.map((s) => el('input', {
        type: 'number', min: 0, max: 100, 'data-subset': s,
      }));
      const inputs = v.inputs;
      const labelled = subsets.flatMap((s, i) => [el('label', { text: ' ' + s + ' ' }), inputs[i]]);
      v.shiftBox.replaceChildren(...labelled, ' ', el('button', {
        type: 'button', text: 'shift weights', 'data-action': 'shift', 'data-service': name,
        onclick: () => shift(name, inputs, v.shownVersion, v.svc),
      }));
    }
    const weightsKey = subsets.map((s) => svc.subsets[s].weight).join(',');
    // Typing is focus in an input: a clicked button keeps the focus too
    // (Chrome, Firefox), and must not freeze the version the next shift
    // sends (it would be refused as stale).
    if (!v.inputs.includes(document.activeElement)) {
      // Other changes (a guard, a mirror) move the version too.
      v.shownVersion = svc.version;
      v.shiftBox.dataset.version = String(svc.version);
      if (weightsKey !== v.weightsKey) {
        v.weightsKey = weightsKey;
        v.inputs.forEach((input, i) => { input.value = svc.subsets[subsets[i]].weight || 0; });
      }
    }
  }

  function renderRollout(v, svc) {
    const r = svc.rollout;
    v.approve.hidden = !(r && r.phase === 'paused');
    v.abort.hidden = !(r && (r.phase === 'running' || r.phase === 'paused'));
    if (!r) {
      v.rollout.replaceChildren(el('span', { class: 'muted', text: 'no rollout' }));
      return;
    }
    const steps = r.spec.steps || [];
    // The canary's share in force, as the control plane reckons it
    // (Rollout::canary_weight): none in the shadow stage (mirrored copies
    // only) or once rolled back or aborted, all once succeeded, else the
    // step's.
    let share;
    if (r.phase === 'rolled_back' || r.phase === 'aborted') share = '0% canary';
    else if (r.shadowing) share = 'shadow: ' + (r.spec.shadow || 0) + '% mirrored, 0% canary';
    else if (r.phase === 'succeeded') share = '100% canary';
    else share = (steps[Math.min(r.step, steps.length - 1)] || 0) + '% canary';
    v.rollout.replaceChildren(
      'rollout of ', el('b', { text: r.spec.canary }), ' over ', el('b', { text: r.stable }), ': ',
      el('span', { class: 'phase ' + r.phase, 'data-phase': r.phase, text: r.phase }),
      ' step ' + (r.step + 1) + ' of ' + steps.length + ' (' + share + '; steps ' +
        steps.join(' → ') + '%)');
  }

  // Rollout events ("step_passed at 10%") and guard events ("blocked — POST
  // /api/giveaway* denied 503 (by ops)"), newest first.
  function renderEvents(v, svc) {
    v.events.replaceChildren(...(svc.events || []).slice().reverse().map((e) => el('li', {
      class: e.kind,
      text: new Date(e.at).toLocaleTimeString() + ' ' + e.kind +
        (e.percent == null ? '' : ' at ' + e.percent + '%') +
        (e.detail ? ' — ' + e.detail : '') + (e.by ? ' (by ' + e.by + ')' : ''),
    })));
  }

  // uPlot plugin: a vertical line and a label at each rollout event.
  function markers(v) {
    return {
      hooks: {
        draw: [(u) => {
          const ctx = u.ctx;
          const { top, height } = u.bbox;
          ctx.save();
          ctx.font = (10 * devicePixelRatio) + 'px system-ui, sans-serif';
          for (const m of v.marks) {
            const x = Math.round(u.valToPos(m.at / 1000, 'x', true));
            if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
            const bad = /failed|rolled_back|aborted/.test(m.kind);
            ctx.strokeStyle = bad ? '#c92a2a' : /passed|promoted/.test(m.kind) ? '#2b8a3e' : '#495057';
            ctx.fillStyle = ctx.strokeStyle;
            ctx.setLineDash([4, 4]);
            ctx.beginPath();
            ctx.moveTo(x, top);
            ctx.lineTo(x, top + height);
            ctx.stroke();
            ctx.fillText(m.kind.replace('step_', '') + ' ' + m.percent + '%', x + 3, top + 12 * devicePixelRatio);
          }
          ctx.restore();
        }],
      },
    };
  }

  function renderChart(v, svc) {
    const r = svc.rollout;
    if (!r) {
      if (v.plot) { v.plot.destroy(); v.plot = null; v.plotKey = ''; }
      return;
    }
    const canary = r.spec.canary;
    const stable = r.stable;
    v.marks = svc.events.filter((e) => e.canary === canary && !/inconclusive/.test(e.kind));
    const xs = [], cs = [], ss = [], cp = [], sp = [];
    for (const s of v.samples) {
      const c = s.subsets[canary] || {}, t = s.subsets[stable] || {};
      xs.push(s.at / 1000);
      cs.push(c.success_rate == null ? null : 100 * c.success_rate);
      ss.push(t.success_rate == null ? null : 100 * t.success_rate);
      cp.push(c.p99_ms == null ? null : c.p99_ms);
      sp.push(t.p99_ms == null ? null : t.p99_ms);
    }
    // Stable first, so the canary's lines are drawn on top of it.
    const data = [xs, ss, cs, sp, cp];
    const key = canary + '/' + stable;
    if (v.plot && v.plotKey === key) {
      v.plot.setData(data);
      return;
    }
    if (v.plot) v.plot.destroy();
    const width = Math.max(320, v.section.clientWidth - 30);
    v.plotKey = key;
    v.plot = new uPlot({
      width,
      height: 260,
      cursor: { drag: { x: false, y: false } },
      scales: {
        x: { time: true },
        // Success rates near 100 % are what matter: from the lowest seen
        // (at most 95 %) up to 100 %.
        pct: { range: (u, min) => [Math.max(0, Math.floor(Math.min(min == null ? 95 : min, 95))), 100] },
        ms: { range: (u, min, max) => [0, max == null ? 10 : max * 1.1] },
      },
      axes: [
        {},
        { scale: 'pct', label: 'success %', values: (u, vals) => vals.map((x) => x.toFixed(1)) },
        { scale: 'ms', label: 'p99 ms', side: 1, grid: { show: false } },
      ],
      series: [
        {},
        { label: stable + ' success %', scale: 'pct', stroke: STABLE, width: 2 },
        { label: canary + ' success %', scale: 'pct', stroke: CANARY, width: 2 },
        { label: stable + ' p99 ms', scale: 'ms', stroke: STABLE, dash: [6, 4] },
        { label: canary + ' p99 ms', scale: 'ms', stroke: CANARY, dash: [6, 4] },
      ],
      plugins: [markers(v)],
    }, data, v.chart);
  }

  function render(d) {
    const seen = new Set();
    for (const [name, svc] of Object.entries(d.services)) {
      seen.add(name);
      const v = view(name);
      v.samples.push(...svc.samples);
      const oldest = d.now - KEEP_SECONDS * 1000;
      while (v.samples.length && v.samples[0].at < oldest) v.samples.shift();
      renderSubsets(name, v, svc);
      renderRollout(v, svc);
      renderEvents(v, svc);
      renderChart(v, svc);
    }
    for (const [name, v] of views) {
      if (!seen.has(name)) {
        closeTap(v);
        if (v.plot) v.plot.destroy();
        v.section.remove();
        views.delete(name);
      }
    }
    for (const svc of Object.values(d.services)) {
      for (const s of svc.samples) since = Math.max(since, s.at);
    }
    $('updated').textContent = 'updated ' + new Date(d.now).toLocaleTimeString() +
      ' · ' + Object.keys(d.services).length + ' services · index ' + d.index;
  }

  // `force`: also while the login prompt shows (a new token, an action);
  // the timer does not poll a control plane that refused the token.
  let refreshFailed = false;
  async function refresh(force) {
    if (busy || (!force && !$('login').hidden)) return;
    busy = true;
    try {
      const r = await call('GET', '/v1/dashboard?since=' + since);
      if (r.status === 401) return showLogin('This control plane needs its operator token.');
      if (r.status === 403) return showLogin('Token refused: try again.');
      if (!r.ok) {
        refreshFailed = true;
        return message('the control plane answered ' + r.status + ': ' + r.text.trim(), true);
      }
      // The refresh's own error is over (an action's message stays).
      if (refreshFailed) {
        refreshFailed = false;
        message('');
      }
      $('login').hidden = true;
      $('services').hidden = false;
      render(JSON.parse(r.text));
    } catch (e) {
      $('updated').textContent = 'control plane unreachable (' + e + ')';
    } finally {
      busy = false;
    }
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('login').addEventListener('submit', (ev) => {
      ev.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $('token').value);
      $('token').value = '';
      message('', false);
      refresh(true);
    });
    $('change-token').addEventListener('click', () => showLogin('Enter the operator token.'));
    refresh(true);
    setInterval(() => refresh(false), 1000);
  });
})();
