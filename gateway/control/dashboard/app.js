/* Gateway dashboard: a dependency-free single-page app over the control plane's /v1 API.
 *
 * Views (hash routes): #/ services overview · #/service/NAME?range=1h|24h|7d|30d · #/incidents ·
 * #/incidents/ID · #/budgets · #/tenants[/ID]. The token lives in sessionStorage and goes out as a bearer token.
 * What is shown follows the role: /v1/me lists the caller's permissions, and a 403 or 404 from an
 * endpoint hides its section with a note instead of failing the page. Everything refreshes every
 * 10 s. DOM is built with createElement/textContent only (no innerHTML): API strings are never
 * parsed as HTML, and the strict Content-Security-Policy needs no exceptions. */
(function () {
  'use strict';

  const TOKEN_KEY = 'gateway.dashboard.token';
  const REFRESH_MS = 10000;
  const RANGES = {                         // range -> rollup window, seconds per bucket, span
    '1h': { window: '1m', step: 60, span: 3600 },
    '24h': { window: '5m', step: 300, span: 86400 },
    '7d': { window: '1h', step: 3600, span: 7 * 86400 },
    '30d': { window: '1h', step: 3600, span: 30 * 86400 },
  };
  const SEVERITY_RANK = { critical: 0, warning: 1, unknown: 2, healthy: 3 };
  const BREAKER_RANK = { open: 0, half_open: 1, closed: 2 };
  const COLORS = {
    p50: '#58a6ff', p95: '#d29922', p99: '#f85149', traffic: '#58a6ff', limited: '#bc8cff',
    e5xx: '#f85149', e4xx: '#d29922', cpu: '#3fb950', lag: '#bc8cff', inflight: '#58a6ff',
    text: '#8b949e', grid: '#30363d',
  };
  const POLICY_COLORS = ['#bc8cff', '#58a6ff', '#3fb950', '#d29922', '#f85149', '#39c5cf'];

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || '',
    me: null,
    view: null,          // the mounted view: {route, refresh(), destroy()}
    timer: null,
    busy: false,
    pending: false,
  };

  // -------------------------------------------------------------------------------------------
  // DOM helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function setAttrs(node, attrs) {
    if (!attrs) return;
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') node.setAttribute('class', v);
      else if (k === 'text') node.textContent = v;
      else if (k === 'dataset') Object.assign(node.dataset, v);
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : String(v));
    }
  }

  function append(node, children) {
    for (const c of children.flat(Infinity)) {
      if (c === undefined || c === null || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  function fill(node, ...children) {
    node.replaceChildren();
    append(node, children);
    return node;
  }

  const $ = (sel, root) => (root || document).querySelector(sel);

  // -------------------------------------------------------------------------------------------
  // Formatting

  function isNum(v) { return typeof v === 'number' && Number.isFinite(v); }
  function fmtInt(v) { return isNum(v) ? Math.round(v).toLocaleString('en-US') : '—'; }
  function fmtNum(v, digits) {
    if (!isNum(v)) return '—';
    const a = Math.abs(v);
    const d = digits !== undefined ? digits : a >= 100 ? 0 : a >= 10 ? 1 : 2;
    return v.toLocaleString('en-US', { minimumFractionDigits: d, maximumFractionDigits: d });
  }
  function fmtPct(frac, digits) { return isNum(frac) ? fmtNum(frac * 100, digits === undefined ? 2 : digits) + '%' : '—'; }
  function fmtMs(v) { return isNum(v) ? fmtNum(v) + ' ms' : '—'; }
  function fmtRate(v) { return isNum(v) ? fmtNum(v) + '/s' : '—'; }
  function fmtBytes(v) {
    if (!isNum(v)) return '—';
    const units = ['B', 'KB', 'MB', 'GB', 'TB'];
    let i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return fmtNum(v, i ? 1 : 0) + ' ' + units[i];
  }
  function fmtCents(c) {
    return isNum(c) ? '$' + (c / 100).toLocaleString('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 2 }) : '—';
  }
  function toSeconds(t) {
    if (isNum(t)) return t > 1e12 ? t / 1000 : t;
    if (typeof t === 'string' && t) {
      const ms = Date.parse(t);
      if (!Number.isNaN(ms)) return ms / 1000;
    }
    return null;
  }
  function fmtTime(t) {
    const s = toSeconds(t);
    if (s === null) return '—';
    return new Date(s * 1000).toLocaleString(undefined, { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit' });
  }
  function fmtAgo(t) {
    const s = toSeconds(t);
    if (s === null) return '';
    const d = Math.max(0, Date.now() / 1000 - s);
    if (d < 90) return Math.round(d) + ' s ago';
    if (d < 5400) return Math.round(d / 60) + ' min ago';
    if (d < 172800) return Math.round(d / 3600) + ' h ago';
    return Math.round(d / 86400) + ' d ago';
  }
  function fmtDuration(sec) {
    if (!isNum(sec)) return '—';
    if (sec < 120) return Math.round(sec) + ' s';
    if (sec < 7200) return Math.round(sec / 60) + ' min';
    if (sec < 172800) return fmtNum(sec / 3600, 1) + ' h';
    return fmtNum(sec / 86400, 1) + ' d';
  }
  /** The first of several candidate fields that is present (the issue-7/8 APIs evolve). */
  function pick(obj, ...names) {
    if (!obj) return undefined;
    for (const n of names) {
      const v = n.split('.').reduce((o, k) => (o === null || o === undefined ? undefined : o[k]), obj);
      if (v !== undefined && v !== null) return v;
    }
    return undefined;
  }
  function statusWord(s) { return String(s || 'unknown').toLowerCase(); }
  function statusBadge(s, extraClass) {
    const word = statusWord(s);
    return el('span', { class: 'status ' + word + (extraClass ? ' ' + extraClass : ''), text: word.replace(/_/g, ' ') });
  }
  function sevBadge(sev) {
    const s = String(sev || '').toUpperCase();
    const m = /(\d)/.exec(s);
    const cls = m ? 's' + m[1] : { CRITICAL: 's1', MAJOR: 's2', MINOR: 's3' }[s] || '';
    return el('span', { class: 'sev ' + cls, text: s || '—' });
  }

  // -------------------------------------------------------------------------------------------
  // API

  class ApiError extends Error {
    constructor(status, problem) {
      super((problem && (problem.detail || problem.title)) || 'HTTP ' + status);
      this.status = status;
      this.problem = problem;
    }
  }

  async function api(path, options) {
    const opts = options || {};
    const headers = { Accept: 'application/json', Authorization: 'Bearer ' + state.token };
    let body;
    if (opts.body !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(opts.body);
    }
    let resp;
    try {
      resp = await fetch(path, { method: opts.method || 'GET', headers, body, cache: 'no-store', credentials: 'omit' });
    } catch (err) {
      throw new ApiError(0, { detail: 'the control plane did not answer (' + err.message + ')' });
    }
    let doc = null;
    const text = await resp.text();
    if (text) {
      try { doc = JSON.parse(text); } catch (_) { doc = { detail: text.slice(0, 200) }; }
    }
    if (resp.status === 401 && !opts.signingIn) {
      signOut('Your token was not accepted (401). Sign in again.');
    }
    if (!resp.ok) throw new ApiError(resp.status, doc);
    return doc;
  }

  function qs(params) {
    const u = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') u.set(k, String(v));
    const s = u.toString();
    return s ? '?' + s : '';
  }

  /** What the caller's role may do with a resource: true, false, or null when the control plane
   *  defines no permission for it yet (then the endpoint is tried and a 404 hides the section). */
  function may(resource, kind) {
    const me = state.me;
    if (!me) return null;
    const all = me.all_permissions || me.permissions || [];
    const match = (p) => {
      const [res, verb] = String(p).split(':');
      if (!res.startsWith(resource)) return false;
      return kind === 'read' ? true : verb !== 'read';
    };
    const defined = all.filter(match);
    if (!defined.length) return null;
    return (me.permissions || []).some(match);
  }

  /** A section's data, or a note explaining why it is hidden. */
  async function load(path, section) {
    try {
      return { data: await api(path) };
    } catch (err) {
      if (err.status === 403) return { hidden: 'Not available to the ' + (state.me ? state.me.role : '') + ' role.' };
      if (err.status === 404) return { hidden: 'Not available on this control plane yet (' + path.split('?')[0] + ' answered 404).' };
      if (err.status === 401) return { hidden: 'Signed out.' };
      throw err;
    }
  }

  // -------------------------------------------------------------------------------------------
  // Sections and charts

  function section(title, hint, cls) {
    const body = el('div', { class: 'body' });
    const note = el('p', { class: 'note', hidden: true });
    const root = el('section', { class: 'section ' + (cls || '') },
      el('div', { class: 'head' }, el('h2', { text: title }), el('span', { class: 'hint', text: hint || '' })),
      note, body);
    return {
      root, body, note,
      hide(msg) { note.textContent = msg; note.hidden = false; body.hidden = true; root.dataset.state = 'hidden'; },
      show() { note.hidden = true; body.hidden = false; root.dataset.state = 'shown'; },
    };
  }

  /** A uPlot time-series chart that can be fed new data without being rebuilt. */
  class Chart {
    constructor(container, spec) {
      this.container = container;
      this.spec = spec;
      this.plot = null;
      this.key = '';
    }

    opts(width) {
      const s = this.spec;
      // wide enough for its longest label (the default clips "1,234.5 ms")
      const size = (u, values) => 22 + 7.5 * Math.max(4, ...(values || []).map((v) => String(v).length));
      const axis = (scale, side, fmtv) => ({
        scale, side, stroke: COLORS.text, size,
        grid: { stroke: side === 1 ? 'transparent' : COLORS.grid, width: 1 },
        ticks: { stroke: COLORS.grid, width: 1 },
        values: (u, splits) => splits.map((v) => (v === null ? '' : fmtv(v))),
      });
      const axes = [{ stroke: COLORS.text, grid: { stroke: COLORS.grid, width: 1 }, ticks: { stroke: COLORS.grid, width: 1 } },
        axis('y', 3, s.yFmt || fmtNum)];
      if (s.series.some((x) => x.scale === 'y2')) axes.push(axis('y2', 1, s.y2Fmt || fmtNum));
      return {
        width, height: s.height || 200, title: s.title,
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(s.yMin || 1, max > 0 ? max * 1.1 : 0)] },
          y2: { range: (u, min, max) => [0, Math.max(s.y2Min || 1, max > 0 ? max * 1.1 : 0)] } },
        series: [{ value: (u, v) => (v === null ? '—' : fmtTime(v)) }].concat(s.series.map((x) => ({
          label: x.label, stroke: x.color, width: 2, scale: x.scale || 'y',
          fill: x.fill || undefined, spanGaps: false,
          points: { size: 6, fill: x.color, filter: isolated },
          value: (u, v) => (v === null || v === undefined ? '—' : (x.fmt || s.yFmt || fmtNum)(v)),
        }))),
        axes, legend: { live: true }, cursor: { drag: { x: true, y: false } },
      };
    }

    update(data) {
      const points = data.slice(1).reduce((n, ys) => n + ys.filter((v) => v !== null && v !== undefined).length, 0);
      this.container.dataset.points = String(points);
      const width = this.width();
      const key = this.spec.series.length + ':' + data[0].length;
      if (!this.plot || typeof uPlot === 'undefined') {
        if (typeof uPlot === 'undefined') { fill(this.container, el('p', { class: 'note', text: 'Charting library missing.' })); return; }
        this.plot = new uPlot(this.opts(width), data, this.container);
      } else {
        this.plot.setData(data, true);
      }
      this.key = key;
    }

    resize() {
      if (this.plot) this.plot.setSize({ width: this.width(), height: this.spec.height || 200 });
    }

    /** The container's content width (its padding is not ours to draw on). */
    width() {
      const cs = getComputedStyle(this.container);
      const inner = this.container.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
      return Math.max(200, Math.floor(inner) || 600);
    }

    destroy() { if (this.plot) this.plot.destroy(); this.plot = null; }
  }

  /** uPlot points filter: when the line is drawn without points, still dot the buckets that have
   *  no neighbour (a lone minute of traffic would otherwise not show at all). */
  function isolated(u, si, show) {
    if (show) return null;
    const ys = u.data[si];
    const out = [];
    for (let i = 0; i < ys.length; i++) {
      if (ys[i] !== null && ys[i] !== undefined && (i === 0 || ys[i - 1] == null) && (i === ys.length - 1 || ys[i + 1] == null)) out.push(i);
    }
    return out.length ? out : null;
  }

  /** Rows keyed by bucket_start onto a full grid of buckets: absent buckets are gaps (null). */
  function grid(rows, step, since, until) {
    const start = Math.floor(since / step) * step;
    const xs = [];
    for (let t = start; t < until; t += step) xs.push(t);
    const byT = new Map(rows.map((r) => [Math.floor(r.bucket_start / step) * step, r]));
    return { xs, at: (t) => byT.get(t) };
  }

  /** Requests/s of an overview service over the overview's window: the window holds complete
   *  minutes only, so its `seconds` is the time the count really covers. */
  function perSecond(s, winS) {
    return isNum(s.requests_per_s) ? s.requests_per_s : s.request_count / winS;
  }

  function sparkline(rows, step, since, until) {
    const W = 160, H = 34, P = 2;
    const g = grid(rows, step, since, until);
    const traffic = g.xs.map((t) => { const r = g.at(t); return r ? r.request_count : 0; });
    const errors = g.xs.map((t) => { const r = g.at(t); return r ? r.error_count_5xx : 0; });
    const max = Math.max(1, ...traffic);
    const x = (i) => P + (i * (W - 2 * P)) / Math.max(1, g.xs.length - 1);
    const y = (v) => H - P - (v / max) * (H - 2 * P);
    const line = (vals) => vals.map((v, i) => x(i).toFixed(1) + ',' + y(v).toFixed(1)).join(' ');
    const total = traffic.reduce((a, b) => a + b, 0);
    return svg('svg', { class: 'spark', viewBox: '0 0 ' + W + ' ' + H, preserveAspectRatio: 'none', role: 'img',
      'aria-label': fmtInt(total) + ' requests in the last hour', dataset: { total: String(total) } },
    svg('polygon', { class: 'area', points: x(0) + ',' + (H - P) + ' ' + line(traffic) + ' ' + x(traffic.length - 1) + ',' + (H - P) }),
    svg('polyline', { class: 'traffic', points: line(traffic) }),
    errors.some((v) => v > 0) ? svg('polyline', { class: 'errors', points: line(errors) }) : null);
  }

  // -------------------------------------------------------------------------------------------
  // Views

  function worstBreaker(list) {
    const by = new Map();
    for (const b of list || []) {
      const cur = by.get(b.upstream);
      if (!cur || (BREAKER_RANK[b.state] ?? 3) < (BREAKER_RANK[cur.state] ?? 3)) by.set(b.upstream, b);
    }
    return [...by.values()].sort((a, b) => a.upstream.localeCompare(b.upstream));
  }

  function breakerChips(list) {
    const ups = worstBreaker(list);
    if (!ups.length) return el('span', { class: 'muted', text: '—' });
    return el('div', { class: 'breakers' }, ups.map((b) =>
      el('span', { class: 'chip ' + b.state, title: 'upstream ' + b.upstream + ': ' + b.state + ' (reported ' + fmtAgo(b.reported_at) + ')',
        dataset: { upstream: b.upstream, state: b.state } }, b.upstream + ' · ' + b.state.replace('_', ' '))));
  }

  function sortServices(services) {
    return services.slice().sort((a, b) =>
      (SEVERITY_RANK[a.health_status] ?? 2) - (SEVERITY_RANK[b.health_status] ?? 2)
      || worstBreakerRank(a) - worstBreakerRank(b)
      || (b.error_rate || 0) - (a.error_rate || 0)
      || (b.latency_p95_ms || 0) - (a.latency_p95_ms || 0)
      || a.service.localeCompare(b.service));
  }
  function worstBreakerRank(svc) {
    return Math.min(3, ...(svc.circuit_breakers || []).map((b) => BREAKER_RANK[b.state] ?? 3));
  }

  function activeIncidents(list) {
    return (list || []).filter((i) => !['resolved', 'closed'].includes(statusWord(i.status)));
  }

  function incidentList(items) {
    if (!items.length) return el('p', { class: 'muted', text: 'No active incidents.' });
    return el('div', { class: 'table-wrap' }, el('table', { class: 'data incidents' },
      el('thead', null, el('tr', null, ['Incident', 'Severity', 'Status', 'Service', 'Opened', 'Escalation'].map((h) => el('th', { text: h })))),
      el('tbody', null, items.map((i) => el('tr', { dataset: { incident: i.id } },
        el('td', null, el('a', { href: '#/incidents/' + encodeURIComponent(i.id) }, el('strong', { text: i.id })), ' ', i.title || ''),
        el('td', null, sevBadge(i.severity)),
        el('td', null, statusBadge(i.status)),
        el('td', null, i.affected_service ? el('a', { href: '#/service/' + encodeURIComponent(i.affected_service), text: i.affected_service }) : '—'),
        el('td', { title: fmtTime(i.created_at) }, fmtAgo(pick(i, 'created_at', 'opened_at', 'declared_at'))),
        el('td', { text: String(pick(i, 'escalation_level') ?? '—') }))))));
  }

  function overviewView() {
    const root = el('div', { class: 'view overview' });
    const head = el('div', { class: 'page-head' }, el('h1', { text: 'Services' }),
      el('span', { class: 'muted small', text: 'last 5 minutes · sorted worst first' }));
    const services = section('Health', '');
    const incidents = section('Active incidents', '');
    const breakers = section('Circuit breakers', 'as last reported by each gateway');
    root.append(head, incidents.root, services.root, breakers.root);
    fill($('#main'), root);

    async function refresh() {
      const [ov, br, inc] = await Promise.all([
        load('/v1/health/overview'),
        may('breakers', 'read') === false ? { hidden: 'Not available to the ' + state.me.role + ' role.' } : load('/v1/breakers'),
        may('incidents', 'read') === false ? { hidden: '' } : load('/v1/incidents' + qs({ active: 'true' })),
      ]);
      if (ov.hidden) { services.hide(ov.hidden); return; }
      const doc = ov.data;
      const svcs = sortServices(doc.services || []);
      const winS = (doc.window && doc.window.seconds) || 300;
      const now = doc.generated_at || Date.now() / 1000;
      const sparkSince = Math.floor(now / 60) * 60 - 59 * 60;
      const sparkRows = await Promise.all(svcs.map((s) =>
        api('/v1/signals' + qs({ service: s.service, window: '1m', since: sparkSince })).then((d) => d.rows, () => [])));
      services.show();
      services.root.querySelector('.hint').textContent = svcs.length + ' service' + (svcs.length === 1 ? '' : 's') + ' · updated ' + fmtTime(now);
      if (!svcs.length) {
        fill(services.body, el('p', { class: 'muted', text: 'No traffic has been reported yet. Send requests through a gateway whose control_plane.url points here.' }));
      } else {
        fill(services.body, el('div', { class: 'table-wrap' }, el('table', { class: 'data services' },
          el('thead', null, el('tr', null,
            el('th', { text: 'Service' }), el('th', { text: 'Health' }), el('th', { class: 'num', text: 'Requests/s' }),
            el('th', { class: 'num', text: 'Requests (5m)' }), el('th', { class: 'num', text: 'Error rate (5xx)' }),
            el('th', { class: 'num', text: 'p95' }), el('th', { class: 'num', text: 'p99' }),
            el('th', { text: 'Breakers' }), el('th', { text: 'Last hour' }))),
          el('tbody', null, svcs.map((s, i) => el('tr', { dataset: { service: s.service, health: s.health_status } },
            el('td', { class: 'service', 'data-label': 'Service' }, el('a', { href: '#/service/' + encodeURIComponent(s.service), text: s.service })),
            el('td', { class: 'health', 'data-label': 'Health' }, el('div', null, statusBadge(s.health_status),
              (s.reasons || []).length ? el('div', { class: 'reasons', text: s.reasons.map((r) => r.message).join(' · ') }) : null)),
            el('td', { class: 'num rate', 'data-label': 'Requests/s', dataset: { value: perSecond(s, winS) } }, fmtRate(perSecond(s, winS))),
            el('td', { class: 'num requests', 'data-label': 'Requests (5m)', dataset: { value: s.request_count } }, fmtInt(s.request_count)),
            el('td', { class: 'num errors', 'data-label': 'Error rate (5xx)', dataset: { value: s.error_rate } },
              el('span', null, fmtPct(s.error_rate), el('span', { class: 'muted small' }, ' (' + fmtInt(s.error_count_5xx) + ')'))),
            el('td', { class: 'num p95', 'data-label': 'p95', dataset: { value: s.latency_p95_ms ?? '' } }, fmtMs(s.latency_p95_ms)),
            el('td', { class: 'num p99', 'data-label': 'p99', dataset: { value: s.latency_p99_ms ?? '' } }, fmtMs(s.latency_p99_ms)),
            el('td', { class: 'breakers-cell', 'data-label': 'Breakers' }, breakerChips(s.circuit_breakers)),
            el('td', { class: 'spark-cell', 'data-label': 'Last hour' }, sparkline(sparkRows[i], 60, sparkSince, now + 1))))))));
      }

      // active incidents: from the incidents API when there is one this role may read, else the
      // overview's own list; the section is left out when neither has anything to say
      const fromApi = inc.data ? asList(inc.data, 'incidents', 'items') : null;
      const active = activeIncidents(fromApi || doc.incidents || []);
      incidents.root.hidden = !fromApi && !active.length;
      incidents.show();
      incidents.root.querySelector('.hint').textContent = active.length ? active.length + ' open' : '';
      fill(incidents.body, incidentList(active));

      if (br.hidden) { breakers.hide(br.hidden); } else {
        breakers.show();
        const bs = br.data.breakers || [];
        const tr = (br.data.transitions || []).slice(0, 8);
        fill(breakers.body, bs.length ? el('div', { class: 'table-wrap' }, el('table', { class: 'data' },
          el('thead', null, el('tr', null, el('th', { text: 'Upstream' }), el('th', { text: 'State' }), el('th', { class: 'wide-only', text: 'Gateway' }),
            el('th', { class: 'num', text: 'Pool in use (max)' }), el('th', { text: 'Reported' }))),
          el('tbody', null, bs.map((b) => el('tr', null,
            el('td', { text: b.upstream }), el('td', null, statusBadge(b.breaker_state)), el('td', { class: 'muted wide-only', text: b.gateway_id }),
            el('td', { class: 'num', text: fmtInt(b.pool_in_use_max) + ' / ' + fmtInt(b.pool_max) }),
            el('td', { class: 'muted', text: fmtAgo(b.reported_at) })))))) : el('p', { class: 'muted', text: 'No breaker reports yet.' }),
        tr.length ? el('div', { class: 'small muted' }, el('h3', { text: 'Recent transitions' }),
          el('ul', null, tr.map((t) => el('li', null, fmtTime(t.at) + ' · ' + t.upstream + ': ' + t.from_state + ' → ' + t.to_state + (t.reason ? ' (' + t.reason + ')' : ''))))) : null);
      }
    }
    return { refresh, destroy() {} };
  }

  // ---- service page

  function serviceView(route) {
    const name = route.arg;
    const range = RANGES[route.params.range] ? route.params.range : '1h';
    const root = el('div', { class: 'view service' });
    const badge = el('span');
    const rangeBar = el('div', { class: 'ranges', role: 'group', 'aria-label': 'time range' },
      Object.keys(RANGES).map((r) => el('button', { type: 'button', class: r === range ? 'active' : '', dataset: { range: r },
        onclick: () => { location.hash = '#/service/' + encodeURIComponent(name) + '?range=' + r; } }, r)));
    const head = el('div', { class: 'page-head' }, el('a', { href: '#/', text: '← Services' }),
      el('h1', { text: name }), badge, el('span', { class: 'spacer' }), rangeBar);
    const stats = el('div', { class: 'grid stats section' });
    const signals = section('Golden signals', 'window ' + RANGES[range].window + ' over the last ' + range);
    const chartsGrid = el('div', { class: 'grid charts' });
    signals.body.append(chartsGrid);
    const mk = (id, spec) => { const c = el('div', { class: 'chart card', id: 'chart-' + id, dataset: { chart: id } }); chartsGrid.append(c); return new Chart(c, spec); };
    const charts = {
      latency: mk('latency', { title: 'Latency (ms)', yFmt: (v) => fmtNum(v) + ' ms',
        series: [{ label: 'p50', color: COLORS.p50 }, { label: 'p95', color: COLORS.p95 }, { label: 'p99', color: COLORS.p99 }] }),
      traffic: mk('traffic', { title: 'Traffic (requests/s)', yFmt: (v) => fmtNum(v) + '/s',
        series: [{ label: 'requests/s', color: COLORS.traffic, fill: '#58a6ff22' }, { label: 'rate-limited/s', color: COLORS.limited }] }),
      errors: mk('errors', { title: 'Error rate (%)', yFmt: (v) => fmtNum(v) + '%',
        series: [{ label: '5xx', color: COLORS.e5xx, fill: '#f8514922' }, { label: '4xx', color: COLORS.e4xx }] }),
      saturation: mk('saturation', { title: 'Saturation', yMin: 10, yFmt: (v) => fmtNum(v) + '%', y2Fmt: (v) => fmtNum(v) + ' ms',
        series: [{ label: 'CPU %', color: COLORS.cpu }, { label: 'loop lag ms', color: COLORS.lag, scale: 'y2', fmt: (v) => fmtNum(v) + ' ms' }] }),
    };
    const overload = section('Overload protection', 'concurrency limits now; retries and refused requests over the last ' + range, 'overload');
    overload.root.hidden = true;
    const slos = section('SLOs and error budgets', '');
    const limits = section('Rate-limit decisions by policy', 'all policies, over the last ' + range);
    const limitsChart = el('div', { class: 'chart card', id: 'chart-limits', dataset: { chart: 'limits' } });
    const limitsTable = el('div');
    limits.body.append(limitsTable, limitsChart);
    let lChart = null;
    root.append(head, stats, signals.root, overload.root, slos.root, limits.root);
    fill($('#main'), root);
    const onResize = () => { Object.values(charts).forEach((c) => c.resize()); if (lChart) lChart.resize(); };
    window.addEventListener('resize', onResize);

    function stat(label, value, cls) {
      return el('div', { class: 'stat ' + (cls || '') }, el('div', { class: 'label', text: label }), el('div', { class: 'value', text: value }));
    }

    async function refreshSignals() {
      const r = RANGES[range];
      const now = Date.now() / 1000;
      const until = Math.floor(now / r.step) * r.step + r.step;
      const since = until - r.span;
      const res = await load('/v1/signals' + qs({ service: name, window: r.window, since, until }));
      if (res.hidden) { signals.hide(res.hidden); return; }
      signals.show();
      const g = grid(res.data.rows || [], r.step, since, until);
      const rows = g.xs.map(g.at);
      const val = (f) => rows.map((row) => (row ? f(row) : null));
      charts.latency.update([g.xs, val((x) => x.latency_p50_ms), val((x) => x.latency_p95_ms), val((x) => x.latency_p99_ms)]);
      // a rate only for buckets that have ended: the current one holds less than r.step seconds
      const ended = g.xs.map((t) => t + r.step <= now);
      charts.traffic.update([g.xs, rows.map((x, i) => (!ended[i] ? null : x ? x.request_count / r.step : 0)),
        rows.map((x, i) => (!ended[i] ? null : x ? (x.rate_limited || 0) / r.step : 0))]);
      // error rates of the admitted requests (what the gateway answered itself is counted apart)
      const admittedOf = (x) => (isNum(x.admitted_count) ? x.admitted_count : x.request_count);
      charts.errors.update([g.xs, val((x) => (admittedOf(x) ? 100 * x.error_count_5xx / admittedOf(x) : null)),
        val((x) => (admittedOf(x) ? 100 * x.error_count_4xx / admittedOf(x) : null))]);
      charts.saturation.update([g.xs, val((x) => x.saturation && x.saturation.cpu_percent), val((x) => x.saturation && x.saturation.loop_lag_ms)]);
      fill(overload.body, overloadBlock(res.data.overload));
      overload.root.hidden = !overload.body.firstChild;
    }

    async function refreshStats() {
      const res = await load('/v1/health/overview');
      if (res.hidden) { stats.hidden = true; return; }
      const s = (res.data.services || []).find((x) => x.service === name);
      const winS = (res.data.window && res.data.window.seconds) || 300;
      fill(badge, s ? statusBadge(s.health_status) : el('span', { class: 'muted', text: 'no recent traffic' }));
      if (!s) { fill(stats); return; }
      fill(stats,
        stat('Requests/s (5m)', fmtRate(perSecond(s, winS))),
        stat('Error rate 5xx', fmtPct(s.error_rate), s.error_rate > 0.05 ? 'critical' : ''),
        stat('4xx rate', fmtPct(s['4xx_rate'])),
        stat('p50', fmtMs(s.latency_p50_ms)), stat('p95', fmtMs(s.latency_p95_ms)), stat('p99', fmtMs(s.latency_p99_ms)),
        stat('Rate-limited', fmtInt(s.rate_limited)),
        stat('Answered by the gateway', fmtInt(s.local_answers ? s.local_answers.count : 0)),
        stat('CPU (max)', isNum(s.saturation && s.saturation.cpu_percent) ? fmtNum(s.saturation.cpu_percent) + '%' : '—'),
        el('div', { class: 'stat' }, el('div', { class: 'label', text: 'Breakers' }), el('div', { class: 'value-chips' }, breakerChips(s.circuit_breakers))));
    }

    async function refreshSlos() {
      if (may('slos', 'read') === false) { slos.hide('Not available to the ' + state.me.role + ' role.'); return; }
      const defs = await load('/v1/slos' + qs({ service: name }));
      if (defs.hidden) { slos.hide(defs.hidden); return; }
      slos.show();
      const sloList = asList(defs.data, 'slos').filter((x) => !x.service || x.service === name);
      if (!sloList.length) {
        fill(slos.body, el('p', { class: 'muted', text: 'No SLO is defined for this service (control.yaml slos: or POST /v1/slos).' }));
        return;
      }
      // only asked for once an SLO exists: both answer 404 for a service no SLO covers
      const [budgets, alerts, gate] = await Promise.all([
        may('error_budgets', 'read') === false ? { hidden: '' } : load('/v1/error-budgets/' + encodeURIComponent(name)),
        may('alerts', 'read') === false ? { hidden: '' } : load('/v1/alerts' + qs({ service: name, open: 'true' })),
        may('deploy_gate', 'read') === false ? { hidden: '' } : load('/v1/deploy-gate/' + encodeURIComponent(name)),
      ]);
      const budgetList = budgets.data ? asList(budgets.data, 'budgets') : [];
      const alertList = alerts.data ? asList(alerts.data, 'alerts') : [];
      const cards = await Promise.all(sloList.map(async (def) => {
        const report = budgetList.find((b) => b.slo_id === def.id || (b.name === def.name && b.service === def.service));
        const merged = Object.assign({}, def, report || {});
        return sloCard(merged, alertList.filter((a) => a.slo_id === def.id),
          report ? await budgetHistory(merged) : null);
      }));
      const g = gate.data;
      const gateNode = g ? el('div', { class: 'gate card small', dataset: { gate: g.decision } },
        el('strong', { text: 'Deploy gate ' }), statusBadge(g.decision), ' ',
        el('span', { class: 'muted', text: g.reason || '' })) : null;
      const others = alertList.filter((a) => !sloList.some((d) => d.id === a.slo_id));
      fill(slos.body, gateNode, el('div', { class: 'grid cards' }, cards),
        others.length ? el('div', { class: 'card small other-alerts' }, el('h3', { text: 'Other open alerts for ' + name }),
          others.map((a) => el('div', { dataset: { alertId: a.id } }, statusBadge(a.severity), ' ', a.title || a.dedup_key || '',
            el('span', { class: 'muted', text: ' · ' + (a.source || '') + ' · ' + a.status + ' ' + fmtAgo(a.started_at) })))) : null);
    }

    /** The remaining budget over the SLO's window, for the burn-down: the SLO history's daily
     *  snapshots (the budget left at the end of each day) inside the current window, then the
     *  API's remaining fraction now. Availability and latency SLOs alike: the control plane
     *  records what the budget was, nothing is rebuilt here from traffic. */
    async function budgetHistory(b) {
      const remaining = b.remaining_fraction;
      const w = b.window || {};
      const since = w.since, until = Date.now() / 1000;
      if (!isNum(remaining) || !isNum(since)) return null;
      const res = await load('/v1/slos/' + encodeURIComponent(b.slo_id || b.name) + '/history' +
        qs({ kind: 'day', since, until }));
      const rows = (res.data && res.data.history) || [];
      // a calendar window starts with the whole budget; a rolling one starts where it stood
      const pts = w.type === 'calendar' || !rows.length ? [[since, 1]] : [];
      for (const r of rows) if (isNum(r.budget_remaining)) pts.push([r.period_end, r.budget_remaining]);
      pts.push([until, remaining]);
      return pts;
    }

    async function refreshLimits() {
      if (may('limits', 'read') === false) { limits.hide('Not available to the ' + state.me.role + ' role.'); return; }
      const r = RANGES[range];
      const now = Date.now() / 1000;
      const until = Math.floor(now / r.step) * r.step + r.step;
      const since = until - r.span;
      const res = await load('/v1/limits' + qs({ window: r.window, since, until }));
      if (res.hidden) { limits.hide(res.hidden); return; }
      limits.show();
      const rows = res.data.rows || [];
      const byPolicy = new Map();
      for (const row of rows) {
        const p = byPolicy.get(row.policy) || { allowed: 0, limited: 0, shadow_limited: 0, store_error: 0, series: new Map() };
        p[row.decision] = (p[row.decision] || 0) + row.count;
        if (row.decision === 'limited' || row.decision === 'shadow_limited') {
          const t = Math.floor(row.bucket_start / r.step) * r.step;
          p.series.set(t, (p.series.get(t) || 0) + row.count);
        }
        byPolicy.set(row.policy, p);
      }
      const policies = [...byPolicy.keys()].sort();
      if (!policies.length) {
        fill(limitsTable, el('p', { class: 'muted', text: 'No rate-limit decisions in this range.' }));
        limitsChart.hidden = true;
        return;
      }
      fill(limitsTable, el('div', { class: 'table-wrap' }, el('table', { class: 'data limits' },
        el('thead', null, el('tr', null, el('th', { text: 'Policy' }), ['Allowed', 'Rejected', 'Shadow-rejected', 'Store errors', 'Rejected %'].map((h) => el('th', { class: 'num', text: h })))),
        el('tbody', null, policies.map((p) => {
          const v = byPolicy.get(p);
          const total = v.allowed + v.limited + v.shadow_limited;
          return el('tr', { dataset: { policy: p, limited: v.limited } }, el('td', { text: p }),
            el('td', { class: 'num', text: fmtInt(v.allowed) }), el('td', { class: 'num', text: fmtInt(v.limited) }),
            el('td', { class: 'num', text: fmtInt(v.shadow_limited) }), el('td', { class: 'num', text: fmtInt(v.store_error) }),
            el('td', { class: 'num', text: total ? fmtPct(v.limited / total) : '—' }));
        })))));
      limitsChart.hidden = false;
      const xs = [];
      for (let t = Math.floor(since / r.step) * r.step; t < until; t += r.step) xs.push(t);
      const data = [xs].concat(policies.map((p) => xs.map((t) => (byPolicy.get(p).series.get(t) || 0))));
      const key = policies.join(',');
      if (!lChart || lChart.spec.key !== key) {
        if (lChart) lChart.destroy();
        fill(limitsChart);
        lChart = new Chart(limitsChart, { key, title: 'Rejections per bucket', height: 160,
          series: policies.map((p, i) => ({ label: p, color: POLICY_COLORS[i % POLICY_COLORS.length], fmt: fmtInt })) });
      }
      lChart.update(data);
    }

    async function refresh() {
      await Promise.all([refreshStats(), refreshSignals(), refreshSlos(), refreshLimits()]);
    }
    return {
      refresh,
      destroy() { window.removeEventListener('resize', onResize); Object.values(charts).forEach((c) => c.destroy()); if (lChart) lChart.destroy(); },
    };
  }

  /** The service's overload protection (GET /v1/signals?service= `overload`): per upstream the
   *  adaptive concurrency limit the gateways last reported and the retries in the range, per
   *  route the requests refused by shedding or by a concurrency limit. Nothing (the section
   *  stays hidden) when the service has none of these configured or observed. */
  function overloadBlock(o) {
    const ups = (o && o.upstreams) || [];
    const routes = (o && o.routes) || [];
    const retries = (u, k) => (u.retries && u.retries[k]) || 0;
    const limitText = (u) => (!isNum(u.concurrency_limit) ? '—'
      : u.concurrency_limit_max > u.concurrency_limit ? fmtInt(u.concurrency_limit) + '–' + fmtInt(u.concurrency_limit_max)
        : fmtInt(u.concurrency_limit));
    const tables = [];
    if (ups.length) {
      tables.push(el('div', { class: 'table-wrap' }, el('table', { class: 'data overload-upstreams' },
        el('thead', null, el('tr', null, el('th', { text: 'Upstream' }),
          ['Concurrency limit', 'Retried', 'Succeeded', 'Failed', 'Budget exhausted'].map((h) => el('th', { class: 'num', text: h })))),
        el('tbody', null, ups.map((u) => el('tr', { dataset: { upstream: u.upstream, limit: isNum(u.concurrency_limit) ? u.concurrency_limit : '' } },
          el('td', null, u.upstream, u.saturated ? [' ', el('span', { class: 'status warning', text: 'saturated', title: 'the limit refused requests in the last interval' })] : null),
          el('td', { class: 'num', text: limitText(u), title: u.gateways ? u.gateways + ' gateway(s)' : '' }),
          el('td', { class: 'num', text: fmtInt(retries(u, 'retried')) }),
          el('td', { class: 'num', text: fmtInt(retries(u, 'succeeded')) }),
          el('td', { class: 'num', text: fmtInt(retries(u, 'failed')) }),
          el('td', { class: 'num', text: fmtInt(retries(u, 'budget_exhausted')) })))))));
    }
    if (routes.length) {
      tables.push(el('div', { class: 'table-wrap' }, el('table', { class: 'data overload-routes' },
        el('thead', null, el('tr', null, el('th', { text: 'Route' }),
          ['Shed', 'Refused at the concurrency limit'].map((h) => el('th', { class: 'num', text: h })))),
        el('tbody', null, routes.map((r) => el('tr', { dataset: { route: r.route, shed: r.shed || 0, concurrency: r.concurrency || 0 } },
          el('td', { text: r.route }), el('td', { class: 'num', text: fmtInt(r.shed || 0) }),
          el('td', { class: 'num', text: fmtInt(r.concurrency || 0) })))))));
    }
    return tables;
  }

  function asList(doc, ...keys) {
    if (!doc) return [];
    if (Array.isArray(doc)) return doc;
    for (const k of keys) if (Array.isArray(doc[k])) return doc[k];
    return typeof doc === 'object' && Object.keys(doc).length ? [doc] : [];
  }

  /** One SLO: objective, remaining budget with its burn-down, burn rates, alert state. */
  function sloCard(s, alerts, history) {
    const remaining = s.remaining_fraction;
    const burns = s.burn_rates || {};
    const open = (alerts || []).filter((a) => statusWord(a.status) !== 'resolved');
    const alertState = open.some((a) => a.severity === 'page') ? 'page' : open.some((a) => a.severity === 'ticket') ? 'ticket'
      : open.length ? statusWord(open[0].severity) : 'ok';
    const ev = s.events || {};
    const w = s.window;
    const windowText = w && typeof w === 'object' ? w.name + ' ' + w.type : w;
    const tte = s.time_to_exhaustion_s;
    return el('div', { class: 'card slo', dataset: { slo: s.id || s.name, alert: alertState } },
      el('div', { class: 'top-line' }, el('h3', { text: s.name || s.id }), statusBadge(alertState)),
      el('div', { class: 'muted small', text: [s.sli, s.route ? 'route ' + s.route : null, windowText,
        s.threshold_ms ? 'good < ' + s.threshold_ms + ' ms' : null, s.count_429 ? '429s count' : null].filter(Boolean).join(' · ') }),
      el('div', { class: 'top-line' },
        el('div', null, el('div', { class: 'muted small', text: 'objective' }), el('div', { class: 'big', text: isNum(s.objective) ? s.objective + '%' : '—' })),
        el('div', null, el('div', { class: 'muted small', text: 'error budget remaining' }),
          el('div', { class: 'big remaining' + (isNum(remaining) && remaining < 0.2 ? ' low' : ''), dataset: { remaining: remaining ?? '' },
            text: isNum(remaining) ? fmtPct(remaining, 1) : (s.consumed > 0 ? 'overspent' : '—') }),
          isNum(remaining) && remaining < 0 ? el('div', { class: 'muted small', text: 'overspent ' + fmtNum(1 - remaining, 1) + '× the budget' }) : null)),
      burndown(history, remaining),
      el('div', { class: 'burns', title: 'burn rate: how many times faster than the objective allows the budget is being spent' },
        Object.entries(burns).filter(([, v]) => isNum(v)).map(([win, v]) =>
          el('span', { class: 'chip' + (v > 1 ? ' hot' : ''), dataset: { window: win } }, win + ' ×' + fmtNum(v, v >= 10 ? 1 : 2)))),
      el('dl', { class: 'kv' },
        el('dt', { text: 'events good / total' }), el('dd', { text: fmtInt(ev.good) + ' / ' + fmtInt(ev.total) }),
        el('dt', { text: 'bad allowed / used' }), el('dd', { text: fmtNum(s.allowed_bad, 1) + ' / ' + fmtInt(s.consumed) }),
        el('dt', { text: 'budget exhausted in' }), el('dd', { text: isNum(tte) ? fmtDuration(tte) : (isNum(remaining) && remaining <= 0 ? 'exhausted' : 'not at this rate') })),
      open.length ? el('div', { class: 'small alerts' }, open.map((a) => el('div', { dataset: { alertId: a.id } },
        statusBadge(a.severity), ' ', a.title || a.dedup_key || '', el('span', { class: 'muted', text: ' · ' + a.status + ' ' + fmtAgo(a.started_at) })))) : null);
  }

  /** Remaining error budget over the SLO window as an SVG area, with the zero line. */
  function burndown(points, remaining) {
    const W = 300, H = 70, P = 3;
    const pts = (points || []).filter(([t, v]) => isNum(t) && isNum(v));
    if (pts.length < 2) return el('p', { class: 'muted small', text: isNum(remaining) ? '' : 'No budget data yet.' });
    const t0 = pts[0][0], t1 = pts[pts.length - 1][0];
    const lo = Math.max(-1, Math.min(0, ...pts.map((p) => p[1])));   // overspend beyond 100 % is clipped
    const x = (t) => P + ((t - t0) / Math.max(1e-9, t1 - t0)) * (W - 2 * P);
    const y = (v) => P + ((1 - v) / (1 - lo)) * (H - 2 * P);
    const line = pts.map(([t, v]) => x(t).toFixed(1) + ',' + y(Math.max(lo, v)).toFixed(1)).join(' ');
    const last = pts[pts.length - 1][1];
    return el('div', { class: 'burndown-wrap' },
      svg('svg', { class: 'burndown', viewBox: '0 0 ' + W + ' ' + H, preserveAspectRatio: 'none', role: 'img',
        'aria-label': 'error budget burn-down: ' + fmtPct(last, 1) + ' left', dataset: { points: pts.length } },
      svg('line', { class: 'axis', x1: P, x2: W - P, y1: y(0), y2: y(0) }),
      svg('polygon', { class: 'budget' + (last < 0.2 ? ' low' : ''), points: x(t0) + ',' + y(lo) + ' ' + line + ' ' + x(t1) + ',' + y(lo) })),
      el('div', { class: 'bar-legend' }, el('span', { text: fmtTime(t0) }), el('span', { text: 'budget left over the window' }), el('span', { text: 'now' })));
  }

  // ---- incidents

  function incidentsView() {
    const root = el('div', { class: 'view incidents' });
    const showAll = el('input', { type: 'checkbox', id: 'show-resolved' });
    const head = el('div', { class: 'page-head' }, el('h1', { text: 'Incidents' }), el('span', { class: 'spacer' }),
      el('label', { class: 'small' }, showAll, ' show resolved'));
    const list = section('Incidents', '');
    root.append(head, list.root);
    fill($('#main'), root);
    showAll.addEventListener('change', () => refresh());
    async function refresh() {
      const res = await load('/v1/incidents' + qs(showAll.checked ? { limit: 200 } : { active: 'true' }));
      if (res.hidden) { list.hide(res.hidden); return; }
      list.show();
      const all = asList(res.data, 'incidents', 'items');
      const items = showAll.checked ? all : activeIncidents(all);
      list.root.querySelector('h2').textContent = showAll.checked ? 'All incidents' : 'Active incidents';
      fill(list.body, items.length ? incidentList(items) : el('p', { class: 'muted', text: showAll.checked ? 'No incidents.' : 'No active incidents.' }));
    }
    return { refresh, destroy() {} };
  }

  function incidentView(route) {
    const id = route.arg;
    const root = el('div', { class: 'view incident' });
    const title = el('h1', { text: id });
    const head = el('div', { class: 'page-head' }, el('a', { href: '#/incidents', text: '← Incidents' }), title);
    const summary = section('Summary', '');
    const actions = section('Actions', '');
    const timeline = section('Timeline', '');
    root.append(head, summary.root, actions.root, timeline.root);
    fill($('#main'), root);
    const canWrite = may('incidents', 'write') !== false;
    const msg = el('p', { class: 'error', role: 'status', id: 'incident-message' });

    const post = async (what, body, button) => {
      msg.textContent = '';
      msg.className = 'error';
      if (button) button.disabled = true;
      try {
        await api('/v1/incidents/' + encodeURIComponent(id) + '/' + what, { method: 'POST', body });
        msg.className = 'muted';
        msg.textContent = { acknowledge: 'Acknowledged.', mitigate: 'Marked mitigated.', timeline: 'Note added.', resolve: 'Resolved.', escalate: 'Escalated.' }[what] || 'Done.';
        return true;
      } catch (err) {
        msg.textContent = (err.status === 403 ? 'Your role may not do this: ' : 'Failed: ') + err.message +
          (err.problem && Array.isArray(err.problem.errors) ? ' — ' + err.problem.errors.join('; ') : '');
        return false;
      } finally {
        if (button) button.disabled = false;
        await refresh(true);
      }
    };

    const ackBtn = el('button', { type: 'button', class: 'btn', id: 'ack', onclick: (e) => post('acknowledge', {}, e.currentTarget) }, 'Acknowledge');
    const mitBtn = el('button', { type: 'button', class: 'btn', id: 'mitigate', onclick: (e) => post('mitigate', {}, e.currentTarget) }, 'Mitigated');
    const escBtn = el('button', { type: 'button', class: 'btn', id: 'escalate', onclick: (e) => post('escalate', {}, e.currentTarget) }, 'Escalate');
    const note = el('textarea', { id: 'note', name: 'note', required: true, placeholder: 'What was seen, tried or decided' });
    const noteForm = el('form', { class: 'stack', id: 'note-form' }, el('label', { for: 'note', text: 'Add a note to the timeline' }), note,
      el('div', null, el('button', { type: 'submit', class: 'btn' }, 'Add note')));
    noteForm.addEventListener('submit', async (e) => {
      e.preventDefault();
      if (!note.value.trim()) return;
      if (await post('timeline', { text: note.value.trim() }, e.submitter)) note.value = '';
    });
    const rootCause = el('input', { id: 'root-cause', name: 'root_cause', required: true, placeholder: 'Required' });
    const resolution = el('textarea', { id: 'resolution-notes', name: 'resolution_notes', required: true, placeholder: 'Required: what fixed it' });
    const pmWrap = el('div', { class: 'stack', hidden: true });
    const postmortem = el('textarea', { id: 'postmortem', name: 'postmortem', placeholder: 'Post-mortem summary: impact, timeline, lessons, actions' });
    pmWrap.append(el('label', { for: 'postmortem', text: 'Post-mortem summary (SEV-1 and SEV-2 need one; leave empty to record it later)' }), postmortem);
    const resolveForm = el('form', { class: 'stack', id: 'resolve-form' },
      el('label', { for: 'root-cause', text: 'Root cause' }), rootCause,
      el('label', { for: 'resolution-notes', text: 'Resolution notes' }), resolution, pmWrap,
      el('div', null, el('button', { type: 'submit', class: 'btn danger' }, 'Resolve')));
    resolveForm.addEventListener('submit', async (e) => {
      e.preventDefault();
      if (!rootCause.value.trim()) { msg.textContent = 'A root cause is required to resolve.'; rootCause.focus(); return; }
      if (!resolution.value.trim()) { msg.textContent = 'Resolution notes are required to resolve.'; resolution.focus(); return; }
      const body = { root_cause: rootCause.value.trim(), resolution_notes: resolution.value.trim() };
      if (!pmWrap.hidden && postmortem.value.trim()) body.postmortem = { summary: postmortem.value.trim() };
      if (await post('resolve', body, e.submitter)) { rootCause.value = ''; resolution.value = ''; postmortem.value = ''; }
    });
    const respondCard = el('div', { class: 'card' }, el('h3', { text: 'Respond' }), el('div', { class: 'breakers' }, ackBtn, mitBtn, escBtn),
      el('p', { class: 'muted small', text: 'Acknowledge stops the automatic escalation; escalate raises the level by one.' }));
    const resolveCard = el('div', { class: 'card' }, resolveForm);
    if (canWrite) {
      fill(actions.body, msg, el('div', { class: 'actions' }, respondCard, el('div', { class: 'card' }, noteForm), resolveCard));
    } else {
      actions.hide('Your role (' + (state.me ? state.me.role : '?') + ') may read incidents but not act on them.');
    }

    async function refresh() {
      const res = await load('/v1/incidents/' + encodeURIComponent(id));
      if (res.hidden) { summary.hide(res.hidden); actions.root.hidden = true; timeline.root.hidden = true; return; }
      const inc = res.data.incident || res.data;
      summary.show();
      title.textContent = inc.id + ' · ' + (inc.title || '');
      const status = statusWord(inc.status);
      root.dataset.status = status;
      fill(summary.body, el('div', { class: 'grid stats' },
        el('div', { class: 'stat' }, el('div', { class: 'label', text: 'Status' }), el('div', { class: 'value', id: 'incident-status' }, statusBadge(status))),
        el('div', { class: 'stat' }, el('div', { class: 'label', text: 'Severity' }), el('div', { class: 'value' }, sevBadge(inc.severity))),
        el('div', { class: 'stat' }, el('div', { class: 'label', text: 'Service' }), el('div', { class: 'value' },
          inc.affected_service ? el('a', { href: '#/service/' + encodeURIComponent(inc.affected_service), text: inc.affected_service }) : '—')),
        el('div', { class: 'stat' }, el('div', { class: 'label', text: 'Escalation level' }), el('div', { class: 'value', text: String(pick(inc, 'escalation_level') ?? '—') })),
        el('div', { class: 'stat' }, el('div', { class: 'label', text: 'Opened' }), el('div', { class: 'value small', text: fmtTime(pick(inc, 'created_at', 'opened_at')) }))),
      inc.description ? el('p', { text: inc.description }) : null,
      inc.root_cause ? el('p', null, el('strong', { text: 'Root cause: ' }), inc.root_cause) : null,
      inc.resolution_notes ? el('p', null, el('strong', { text: 'Resolution: ' }), inc.resolution_notes) : null,
      inc.postmortem ? el('p', { class: 'small' }, el('strong', { text: 'Post-mortem: ' }), inc.postmortem.status || '',
        inc.postmortem.summary ? ' — ' + inc.postmortem.summary : '', inc.postmortem.due_at ? el('span', { class: 'muted', text: ' (due ' + fmtTime(inc.postmortem.due_at) + ')' }) : null) : null);
      const resolved = status === 'resolved' || status === 'closed';
      ackBtn.hidden = status !== 'investigating';
      mitBtn.hidden = !['investigating', 'acknowledged'].includes(status);
      escBtn.hidden = resolved;
      resolveCard.hidden = resolved;
      respondCard.hidden = resolved;
      pmWrap.hidden = !(inc.postmortem_required ?? /^(SEV-?[12]|critical|major)$/i.test(String(inc.severity || '')));
      const events = asList(pick(inc, 'timeline', 'events') || (res.data.timeline) || [], 'timeline');
      timeline.show();
      fill(timeline.body, events.length ? el('ol', { class: 'timeline' }, events.map((ev) => el('li', null,
        el('div', { class: 'when', text: fmtTime(pick(ev, 'at', 'time', 'created_at', 'timestamp')) + ' · ' + (pick(ev, 'actor', 'by') || 'system') }),
        el('div', null, el('strong', { text: String(pick(ev, 'kind', 'type', 'event', 'action') || 'event') }), ' ',
          String(pick(ev, 'message', 'note', 'text', 'detail', 'description') || ''))))) : el('p', { class: 'muted', text: 'No timeline entries yet.' }));
    }
    return { refresh, destroy() {}, editing: () => [note, rootCause, resolution, postmortem].some((f) => f.value.trim() || document.activeElement === f) };
  }

  // ---- cost budgets

  function budgetsView() {
    const root = el('div', { class: 'view budgets' });
    const head = el('div', { class: 'page-head' }, el('h1', { text: 'Cost budgets' }),
      el('span', { class: 'muted small', text: 'actual spend (solid), forecast to period end (hatched), alert thresholds (ticks)' }));
    const list = section('Budgets', '');
    root.append(head, list.root);
    fill($('#main'), root);
    async function refresh() {
      if (may('budgets', 'read') === false) { list.hide('Cost budgets are for admins only.'); return; }
      const res = await load('/v1/budgets');
      if (res.hidden) { list.hide(res.hidden); return; }
      list.show();
      const items = asList(res.data, 'budgets', 'items');
      const total = pick(res.data, 'total_budget_cents', 'totals.budget_cents');
      const used = pick(res.data, 'total_usage_cents', 'totals.usage_cents', 'totals.spent_cents');
      list.root.querySelector('.hint').textContent = isNum(total) && total > 0 ? 'total ' + fmtCents(used) + ' of ' + fmtCents(total) + ' (' + fmtPct(used / total, 1) + ')' : '';
      fill(list.body, items.length ? items.map(budgetRow) : el('p', { class: 'muted', text: 'No budgets defined (control.yaml budgets: or POST /v1/budgets).' }));
    }
    return { refresh, destroy() {} };
  }

  function fracOf(b, fracNames, pctNames, cents, amount) {
    const f = pick(b, ...fracNames);
    if (isNum(f)) return f;
    const p = pick(b, ...pctNames);
    if (isNum(p)) return p / 100;
    return isNum(cents) && isNum(amount) && amount > 0 ? cents / amount : null;
  }

  function budgetRow(b) {
    const amount = pick(b, 'effective_amount_cents', 'amount_cents', 'budget_amount_cents');
    const spent = pick(b, 'spent_cents', 'current_usage_cents', 'usage_cents', 'actual_cents');
    const forecast = pick(b, 'forecast_cents', 'forecast_usage_cents', 'forecast.cents');
    const util = fracOf(b, ['utilization', 'utilisation'], ['utilization_percent', 'utilisation_percent'], spent, amount) ?? 0;
    const futil = fracOf(b, ['forecast_utilization', 'forecast_utilisation'], ['forecast_utilization_percent'], forecast, amount);
    const thresholds = pick(b, 'alert_thresholds', 'thresholds') || [0.8, 0.9, 1.0];
    const scale = Math.max(1.2, util, futil || 0) * 1.02;
    const pos = (f) => Math.min(100, (100 * f) / scale) + '%';
    const level = util >= 1 ? 'critical' : util >= 0.8 ? 'warning' : '';
    const fillEl = el('div', { class: 'fill ' + level });
    fillEl.style.width = pos(util);
    const bar = el('div', { class: 'bar', role: 'meter', 'aria-valuemin': 0, 'aria-valuenow': fmtNum(util * 100, 1), 'aria-label': 'utilisation' }, fillEl);
    if (isNum(futil) && futil > util) {
      const f = el('div', { class: 'forecast', title: 'forecast ' + fmtPct(futil, 1) });
      f.style.left = pos(util);
      f.style.width = 'calc(' + pos(futil) + ' - ' + pos(util) + ')';
      bar.append(f);
    }
    for (const t of thresholds) {
      const tick = el('div', { class: 'tick' + (t >= 1 ? ' full' : ''), title: 'threshold ' + fmtPct(t, 0) });
      tick.style.left = pos(t);
      bar.append(tick);
    }
    const status = pick(b, 'usage_status', 'status') || (util >= 1 ? 'OVER_BUDGET' : util >= 0.9 ? 'HIGH_USAGE' : util >= 0.75 ? 'MODERATE_USAGE' : 'LOW_USAGE');
    const name = pick(b, 'name', 'budget_name') || '?';
    return el('div', { class: 'budget-row', dataset: { budget: name, utilization: util } },
      el('div', null, el('div', null, el('strong', { text: name })),
        el('div', { class: 'muted small', text: [[undefined, '*'].includes(pick(b, 'service', 'service_name')) ? 'all services' : pick(b, 'service', 'service_name'),
          pick(b, 'period', 'budget_period'), b.enforce ? 'enforce (' + (b.mode || 'enforce') + '): ' + (b.enforcement || '') : null,
          b.override && b.override.active ? 'override until ' + fmtTime(b.override.expires_at) : null].filter(Boolean).join(' · ') })),
      el('div', null, bar, el('div', { class: 'bar-legend' },
        el('span', { text: fmtCents(spent) + ' of ' + fmtCents(amount) + ' · ' + fmtPct(util, 1) }),
        el('span', { text: isNum(futil) ? 'forecast ' + fmtCents(forecast ?? futil * amount) + ' · ' + fmtPct(futil, 1) : 'forecast: too early in the period' }))),
      el('div', null, statusBadge(status)));
  }

  // ---- tenants: plan, usage bars per quota window, overrides; nearest their quota first

  function tenantsView(route) {
    const one = route.arg;
    const root = el('div', { class: 'view tenants' });
    const head = el('div', { class: 'page-head' },
      one ? el('a', { href: '#/tenants', text: '← Tenants' }) : null,
      el('h1', { text: one ? 'Tenant ' + one : 'Tenants' }),
      el('span', { class: 'muted small', text: 'admitted requests in the current quota window; tick at 80 % (the alert)' }));
    const list = section(one ? 'Plan and usage' : 'Nearest their quota first', '');
    const overrides = section('Overrides', 'newest in force wins; pending ones wait for their effective date');
    root.append(head, list.root);
    if (one) root.append(overrides.root);
    fill($('#main'), root);
    async function refresh() {
      if (may('tenants', 'read') === false) { list.hide('Tenants are not available to this role.'); return; }
      const res = await load(one ? '/v1/tenants/' + encodeURIComponent(one) : '/v1/tenants');
      if (res.hidden) { list.hide(res.hidden); return; }
      list.show();
      const items = one ? [res.data] : asList(res.data, 'tenants');
      list.root.querySelector('.hint').textContent = one ? '' : items.length + ' tenants';
      fill(list.body, items.length ? items.map(tenantRow) : el('p', { class: 'muted', text: 'No tenant usage reported yet (gateways ship it with their aggregates).' }));
      if (one) {
        const os = res.data.overrides || [];
        fill(overrides.body, os.length ? el('table', { class: 'table' },
          el('thead', null, el('tr', null, ...['state', 'qps', 'burst', 'daily', 'monthly', 'from', 'until', 'by', 'reason'].map((h) => el('th', { text: h })))),
          el('tbody', null, ...os.slice().reverse().map((o) => el('tr', null,
            el('td', null, statusBadge(o.active ? 'active' : o.pending ? 'pending' : 'inactive')),
            el('td', { text: isNum(o.qps) ? fmtNum(o.qps) : '—' }), el('td', { text: isNum(o.burst) ? fmtInt(o.burst) : '—' }),
            el('td', { text: isNum(o.daily_quota) ? fmtInt(o.daily_quota) : '—' }), el('td', { text: isNum(o.monthly_quota) ? fmtInt(o.monthly_quota) : '—' }),
            el('td', { text: fmtTime(o.effective_date) }), el('td', { text: o.expires_at ? fmtTime(o.expires_at) : '—' }),
            el('td', { text: o.actor || '' }), el('td', { text: o.reason || '' })))))
          : el('p', { class: 'muted', text: 'No overrides (POST /v1/tenants/' + one + '/quotas).' }));
      }
    }
    return { refresh, destroy() {} };
  }

  function tenantRow(t) {
    const bars = (t.usage || []).map((u) => {
      const frac = isNum(u.limit) && u.limit > 0 ? u.current_usage / u.limit : 0;
      const level = frac >= 1 ? 'critical' : frac >= 0.8 ? 'warning' : '';
      const fillEl = el('div', { class: 'fill ' + level });
      fillEl.style.width = Math.min(100, 100 * frac) + '%';
      const tick = el('div', { class: 'tick', title: '80 %' });
      tick.style.left = '80%';
      return el('div', { class: 'tenant-window', dataset: { window: u.window } },
        el('div', { class: 'bar', role: 'meter', 'aria-label': u.window + ' quota', 'aria-valuenow': fmtNum(frac * 100, 1) }, fillEl, tick),
        el('div', { class: 'bar-legend' },
          el('span', { text: u.window + ' ' + u.window_id }),
          el('span', { text: fmtInt(u.current_usage) + ' of ' + fmtInt(u.limit) + ' · ' + fmtPct(frac, 1) + (u.rejected ? ' · ' + fmtInt(u.rejected) + ' rejected' : '') })));
    });
    const o = t.override;
    return el('div', { class: 'budget-row tenant-row', dataset: { tenant: t.tenant } },
      el('div', null, el('div', null, el('a', { href: '#/tenants/' + encodeURIComponent(t.tenant) }, el('strong', { text: t.tenant }))),
        el('div', { class: 'muted small', text: ['plan ' + (t.plan || '—') + (t.plan_source ? ' (' + t.plan_source + ')' : ''),
          o ? 'override' + (o.daily_quota ? ' day ' + fmtInt(o.daily_quota) : '') + (o.monthly_quota ? ' month ' + fmtInt(o.monthly_quota) : '') + (o.qps ? ' ' + fmtNum(o.qps) + '/s' : '') : null].filter(Boolean).join(' · ') })),
      el('div', null, ...(bars.length ? bars : [el('span', { class: 'muted small', text: 'no quota windows reported' })])),
      el('div', null, statusBadge(isNum(t.nearest_quota_percent) ? (t.nearest_quota_percent >= 100 ? 'exhausted' : t.nearest_quota_percent >= 80 ? 'warning' : 'ok') : 'unknown')));
  }

  // -------------------------------------------------------------------------------------------
  // Routing, sign-in, refresh

  function parseRoute() {
    const raw = location.hash.replace(/^#\/?/, '');
    const [path, query] = raw.split('?');
    const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
    const params = Object.fromEntries(new URLSearchParams(query || ''));
    if (parts[0] === 'service' && parts[1]) return { name: 'service', arg: parts[1], params };
    if (parts[0] === 'incidents' && parts[1]) return { name: 'incident', arg: parts[1], params };
    if (parts[0] === 'incidents') return { name: 'incidents', params };
    if (parts[0] === 'budgets') return { name: 'budgets', params };
    if (parts[0] === 'tenants') return { name: 'tenants', arg: parts[1], params };
    return { name: 'overview', params };
  }

  const VIEWS = { overview: overviewView, service: serviceView, incidents: incidentsView, incident: incidentView, budgets: budgetsView, tenants: tenantsView };

  function mount() {
    if (state.view) state.view.destroy();
    const route = parseRoute();
    for (const a of document.querySelectorAll('#nav a')) {
      a.classList.toggle('active', a.dataset.nav === route.name || (a.dataset.nav === 'incidents' && route.name === 'incident') || (a.dataset.nav === 'overview' && route.name === 'service'));
    }
    state.view = VIEWS[route.name](route);
    state.view.route = route;
    document.title = (route.arg ? route.arg + ' · ' : '') + 'Gateway · control plane';
    return tick(true);
  }

  async function tick(force) {
    const view = state.view;
    if (!view) return;
    if (state.busy) {                    // a view just mounted must not wait for the next interval
      if (force) state.pending = true;
      return;
    }
    if (!force && (document.hidden || (view.editing && view.editing()))) return;
    state.busy = true;
    document.body.dataset.loading = 'true';
    try {
      await view.refresh();
      showBanner('');
      $('#updated').textContent = 'updated ' + new Date().toLocaleTimeString();
    } catch (err) {
      if (state.token) showBanner('Refresh failed: ' + err.message, err.status === 0 ? '' : 'warn');
    } finally {
      state.busy = false;
      if (state.pending) {
        state.pending = false;
        tick(true);
      } else {
        document.body.dataset.loading = 'false';
        document.body.dataset.refreshed = String(Date.now());
      }
    }
  }

  function showBanner(text, cls) {
    const b = $('#banner');
    b.textContent = text;
    b.className = 'banner ' + (cls || '');
    b.hidden = !text;
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = '';
    state.me = null;
    if (state.view) state.view.destroy();
    state.view = null;
    clearInterval(state.timer);
    showSignIn(message || '');
  }

  function showSignIn(message) {
    $('#nav').hidden = true;
    $('#session').hidden = true;
    showBanner('');
    const main = $('#main');
    fill(main, $('#signin-template').content.cloneNode(true));
    $('#signin-error').textContent = message || '';
    const form = $('#signin-form');
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const token = $('#token').value.trim();
      if (!token) return;
      state.token = token;
      try {
        await start(true);
      } catch (err) {
        state.token = '';
        $('#signin-error').textContent = err.status === 401 ? 'That token was not accepted.' : 'Sign-in failed: ' + err.message;
      }
    });
    $('#token').focus();
  }

  async function start(signingIn) {
    const me = await api('/v1/me', { signingIn });
    state.me = me;
    sessionStorage.setItem(TOKEN_KEY, state.token);
    $('#whoami').textContent = me.name + ' · ' + me.role;
    $('#whoami').dataset.role = me.role;
    $('#nav').hidden = false;
    $('#session').hidden = false;
    $('[data-nav="incidents"]').hidden = may('incidents', 'read') === false;
    $('[data-nav="budgets"]').hidden = may('budgets', 'read') === false;
    $('[data-nav="tenants"]').hidden = may('tenants', 'read') === false;
    await mount();
    clearInterval(state.timer);
    state.timer = setInterval(() => tick(false), REFRESH_MS);
  }

  function boot() {
    $('#signout').addEventListener('click', () => signOut('Signed out.'));
    window.addEventListener('hashchange', () => { if (state.me) mount(); });
    document.addEventListener('visibilitychange', () => { if (!document.hidden && state.me) tick(false); });
    if (!state.token) { showSignIn(''); return; }
    start(true).catch((err) => {
      if (err.status === 401) signOut('Your saved token was not accepted. Sign in again.');
      else showBanner('The control plane did not answer: ' + err.message);
    });
  }

  // exposed for the browser tests and for poking at in the console
  window.gatewayDashboard = { state, refresh: () => tick(true) };
  boot();
}());
