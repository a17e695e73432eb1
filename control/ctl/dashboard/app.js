// meshlet dashboard: reads /api/overview (relayed to control by
// meshletctl dashboard) every REFRESH_MS and draws it. Every string from
// the mesh goes in through textContent: request paths in denials are
// whatever a caller sent.
"use strict";

const REFRESH_MS = 2000;
const EXPIRY_WARN_S = 600;
const SVG = "http://www.w3.org/2000/svg";
// What a proxy's "degraded" names mean (GET /v1/proxies).
const DEGRADED = { renewal: "renewal refused", expiry: "certificate expiring" };

function $(id) { return document.getElementById(id); }

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}

function rate(x) { return x === undefined || x === null ? "–" : Number(x).toFixed(2); }
function ms(x) { return x === undefined || x === null ? "–" : Number(x).toFixed(1); }

function fillTable(id, rows, empty) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", empty, "empty");
    td.colSpan = $(id).tHead.rows[0].cells.length;
    tr.append(td);
    body.append(tr);
    return;
  }
  for (const r of rows) {
    const tr = el("tr", null, r.cls || "");
    for (const c of r.cells) {
      const td = el("td", c.text === undefined ? c : c.text, c.cls || "");
      if (c.title) td.title = c.title;
      tr.append(td);
    }
    body.append(tr);
  }
}

function expiresIn(iso) {
  const t = Date.parse(iso);
  return isNaN(t) ? null : (t - Date.now()) / 1000;
}

function human(s) {
  if (s === null) return "";
  if (s < 0) return "expired";
  if (s < 120) return Math.round(s) + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  if (s < 172800) return Math.round(s / 3600) + " h";
  return Math.round(s / 86400) + " d";
}

function drawGraph(services, edges) {
  const g = $("graph");
  g.replaceChildren();
  const defs = svg("defs", {});
  const colour = { ok: "#2f7d4f", denied: "#c0392b", errors: "#d97706" };
  for (const kind in colour) {
    const m = svg("marker", { id: "arrow-" + kind, viewBox: "0 0 10 10", refX: "10", refY: "5",
      markerUnits: "userSpaceOnUse", markerWidth: "12", markerHeight: "12",
      orient: "auto-start-reverse" });
    m.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: colour[kind] }));
    defs.append(m);
  }
  g.append(defs);
  if (!services.length) {
    g.append(svg("text", { x: 400, y: 180, "text-anchor": "middle", fill: "#6b7280" },
      "no services yet"));
    return;
  }
  const W = 800, H = 360, R = 28, cx = W / 2, cy = H / 2;
  const rad = services.length === 1 ? 0 : Math.min(W, H) / 2 - R - 24;
  const pos = {};
  services.forEach((s, i) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / services.length;
    pos[s] = { x: cx + rad * 1.6 * Math.cos(a), y: cy + rad * Math.sin(a) };
  });
  for (const e of edges) {
    const a = pos[e.from], b = pos[e.to];
    if (!a || !b || a === b) continue;
    const kind = e.denied > 0 ? "denied" : e.errors_5xx > 0 ? "errors" : "ok";
    const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy) || 1;
    const x1 = a.x + (dx / len) * R, y1 = a.y + (dy / len) * R;
    const x2 = b.x - (dx / len) * (R + 2), y2 = b.y - (dy / len) * (R + 2);
    const width = 1.5 + Math.min(6, Math.log2(1 + (e.request_rate || 0) * 4));
    const line = svg("line", { x1, y1, x2, y2, class: "edge " + kind,
      "stroke-width": width, "marker-end": "url(#arrow-" + kind + ")" });
    line.append(svg("title", {}, `${e.from} → ${e.to}`));
    g.append(line);
    const label = `${rate(e.request_rate)} req/s` +
      (e.denied > 0 ? `, ${rate(e.denial_rate)} denied/s` : "") +
      (e.errors_5xx > 0 ? `, ${rate(e.error_rate)} 5xx/s` : "");
    // Beside the line, on its right-hand side as it runs.
    const nx = -dy / len, ny = dx / len;
    g.append(svg("text", { x: (x1 + x2) / 2 + nx * 14, y: (y1 + y2) / 2 + ny * 14 + 4,
      "text-anchor": Math.abs(nx) > 0.3 ? (nx > 0 ? "start" : "end") : "middle",
      class: "edge-label" + (e.denied > 0 ? " denied" : "") }, label));
  }
  for (const s of services) {
    const n = svg("g", { class: "node" });
    n.append(svg("circle", { cx: pos[s].x, cy: pos[s].y, r: R }));
    n.append(svg("text", { x: pos[s].x, y: pos[s].y + R + 16 }, s));
    g.append(n);
  }
}

function render(o) {
  const stats = o.stats || { edges: [], recent_denials: [], services: [] };
  const proxies = (o.proxies && o.proxies.proxies) || [];
  const policies = (o.policies && o.policies.policies) || [];
  const certs = (o.certs && o.certs.certs) || [];
  const traffic = (o.traffic && o.traffic.traffic) || [];
  const endpoints = (o.endpoints && o.endpoints.endpoints) || [];
  const edges = (stats.edges || []).filter((e) => e.from !== "(other)" || e.requests > 0);

  const names = new Set();
  for (const p of policies) names.add(p.service);
  for (const p of proxies) names.add(p.service);
  for (const e of edges) { names.add(e.from); names.add(e.to); }
  const services = [...names].sort();

  $("ca-phase").textContent = (o.ca && o.ca.phase) || "–";
  $("n-services").textContent = services.length;
  $("n-proxies").textContent = proxies.length;
  $("n-rate").textContent = rate(edges.reduce((s, e) => s + (e.request_rate || 0), 0));
  $("n-denied").textContent = rate(edges.reduce((s, e) => s + (e.denial_rate || 0), 0));
  $("window").textContent = stats.window_s ? `(rates over the last ${stats.window_s} s)` : "";
  drawGraph(services, edges);

  fillTable("edges", edges.map((e) => ({
    cls: e.denied > 0 ? "bad" : e.errors_5xx > 0 ? "warn" : "",
    cells: [e.from, e.to, { text: rate(e.request_rate), cls: "num" },
      { text: rate(e.denial_rate), cls: "num" + (e.denied > 0 ? " deny" : "") },
      { text: rate(e.error_rate), cls: "num" }, { text: ms(e.p50_ms), cls: "num" },
      { text: ms(e.p99_ms), cls: "num" },
      Object.entries(e.denied_by_rule || {}).map(([r, n]) => `${r}: ${n}`).join(", ")],
  })), "no traffic reported in the last minutes");

  fillTable("denials", (stats.recent_denials || []).map((d) => ({
    cells: [d.at, d.from, d.to, { text: d.rule, cls: "deny" }, d.method || "(tcp)", d.path],
  })), "no denials");

  const inbound = {};
  for (const s of stats.services || []) inbound[s.name] = s;
  const policyOf = {}, trafficOf = {}, instancesOf = {};
  for (const p of policies) policyOf[p.service] = p;
  for (const t of traffic) trafficOf[t.service] = t.version;
  for (const e of endpoints) {
    if (e.live) instancesOf[e.service] = (instancesOf[e.service] || 0) + 1;
  }
  fillTable("services", services.filter((s) => s !== "(other)").map((s) => {
    const mine = proxies.filter((p) => p.service === s);
    const stale = mine.filter((p) => !p.up_to_date).length;
    const pol = policyOf[s];
    return {
      cls: stale ? "warn" : "",
      cells: [s, pol ? pol.version : "none (deny all)",
        trafficOf[s] !== undefined ? trafficOf[s] : "none",
        { text: instancesOf[s] || 0, cls: "num" },
        { text: mine.length, cls: "num" },
        mine.length ? (stale ? `no: ${stale} of ${mine.length} behind` : "yes") : "–",
        { text: rate(inbound[s] && inbound[s].request_rate), cls: "num" },
        { text: rate(inbound[s] && inbound[s].denial_rate), cls: "num" }],
    };
  }), "no services");

  fillTable("proxies", proxies.map((p) => {
    const left = expiresIn(p.cert_expires_at);
    const warn = left !== null && left < EXPIRY_WARN_S;
    const degraded = (p.degraded || []).map((d) => DEGRADED[d] || d);
    return {
      cls: warn || !p.connected || degraded.length ? "bad" : !p.up_to_date ? "warn" : "",
      cells: [p.service, p.address || "–", { text: p.config_version, cls: "num" },
        p.up_to_date ? "yes" : `no (current ${p.current_version})`,
        p.connected ? "yes" : "no",
        degraded.length ? { text: "degraded: " + degraded.join(", "), cls: "deny" } : "ok",
        { text: `${p.cert_expires_at} (${human(left)})` + (warn ? " ⚠ expiring" : ""),
          cls: warn ? "deny" : "" },
        p.last_seen],
    };
  }), "no proxies seen");

  fillTable("certs", certs.filter((c) => expiresIn(c.expires_at) > -3600).map((c) => ({
    cls: c.revoked ? "bad" : "",
    cells: [c.serial, c.service, c.issued_at, `${c.expires_at} (${human(expiresIn(c.expires_at))})`,
      c.root, c.via, c.parent || "–", c.lineage === c.serial ? "(itself)" : (c.lineage || "–"),
      { text: c.renewals, cls: "num" }, c.revoked ? "yes" : "no"],
  })), "no certificates");
}

function setStatus(ok, text) {
  const s = $("status");
  s.textContent = text;
  s.className = "status " + (ok ? "ok" : "down");
}

async function refresh() {
  try {
    const r = await fetch("/api/overview", { cache: "no-store" });
    if (!r.ok) throw new Error("the dashboard answered HTTP " + r.status);
    const o = await r.json();
    if (o.control && o.control.reachable) {
      setStatus(true, "control connected");
      render(o);
    } else {
      const why = Object.values(o.errors || {})[0] || "no answer";
      setStatus(false, "control unreachable: " + why);
    }
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    setStatus(false, "dashboard unreachable: " + e.message);
  }
  setTimeout(refresh, REFRESH_MS);
}

refresh();
