/* resrl view: draws the data blob computed by resrl_analysis/view (Python). The browser only colours and
   filters; every number shown was computed before the page was written. No network access (see the CSP). */
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("resrl-view-data").textContent);
  const $ = (id) => document.getElementById(id);
  const PAGE = 40; // groups drawn at once; "show more" draws the next ones
  const Q = new Map(D.quantities.map((q) => [q.key, q]));
  const NEG = [202, 0, 32], POS = [5, 113, 176];
  const VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142], [31, 158, 137],
    [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]];
  const S = { step: "", left: 0, right: D.runs.length > 1 ? 1 : -1, q: "", pair: "", mixed: false, lld: false,
    reward: "all", sort: "run", search: "", limit: PAGE };
  let neutral = [244, 244, 244], sharedRGB = [201, 138, 0], roving = null;

  // ------------------------------------------------------------------ helpers
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
  const fmt = (v) => (v === null || v === undefined ? "—" : Number(v).toPrecision(D.meta.digits || 4));
  function cssColour(name, fallback) {
    const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    const m = /^#([0-9a-f]{6})$/i.exec(v);
    return m ? [0, 2, 4].map((i) => parseInt(m[1].slice(i, i + 2), 16)) : fallback;
  }
  function readTheme() { neutral = cssColour("--neutral", neutral); sharedRGB = cssColour("--shared", sharedRGB); }
  const mix = (a, b, t) => a.map((x, i) => Math.round(x + (b[i] - x) * t));
  function stops(list, t) {
    const x = Math.min(1, Math.max(0, t)) * (list.length - 1), i = Math.min(list.length - 2, Math.floor(x));
    return mix(list[i], list[i + 1], x - i);
  }
  const rgb = (c) => "rgb(" + c.join(",") + ")";
  function textOn(c) { // black or white, whichever reads better on c
    const l = c.map((x) => { x /= 255; return x <= 0.04045 ? x / 12.92 : Math.pow((x + 0.055) / 1.055, 2.4); });
    return 0.2126 * l[0] + 0.7152 * l[1] + 0.0722 * l[2] > 0.2 ? "#000" : "#fff";
  }
  /** The colour of value v under quantity q (null: no value). */
  function colour(q, v) {
    if (v === null || v === undefined) return null;
    if (q.scale === "categorical") return String(v) === "1" ? sharedRGB : neutral;
    const d = q.domain;
    if (!d) return null;
    if (q.scale === "diverging") {
      const t = Math.max(-1, Math.min(1, v / d[1]));
      return mix(neutral, t < 0 ? NEG : POS, Math.abs(t));
    }
    return stops(VIRIDIS, (v - d[0]) / (d[1] - d[0]));
  }
  function valueOf(q, resp, p) {
    if (q.builtin === "shared") return p < resp.n ? 1 : 0;
    if (q.pairwise) {
      const by = resp.d && resp.d[q.key], arr = by && by[S.pair];
      return arr ? arr[p] : null;
    }
    const arr = resp.q && resp.q[q.key];
    return arr ? arr[p] : null;
  }
  const textCache = new Map();
  function tokenText(runIdx, id) {
    const key = runIdx + ":" + id;
    let t = textCache.get(key);
    if (t === undefined) {
      const raw = D.runs[runIdx].vocab[id];
      t = raw === undefined ? "#" + id : raw === "" ? "∅" : raw.replace(/\n/g, "↵").replace(/\t/g, "→").replace(/\r/g, "␍");
      textCache.set(key, t);
    }
    return t;
  }
  const sides = () => [S.left, S.right].filter((i) => i >= 0);
  const entryOf = (runIdx) => D.runs[runIdx].entries[S.step];
  const stepInfo = () => D.steps.find((s) => s.key === S.step) || { label: S.step, kind: "", step: "" };

  // ------------------------------------------------------------------ controls
  function option(value, label, selected) {
    const o = document.createElement("option");
    o.value = value; o.textContent = label; o.selected = !!selected;
    return o;
  }
  function fillSelect(el, items) { el.replaceChildren(...items); }
  function pairsShown() {
    const seen = new Map();
    for (const i of sides()) for (const p of D.runs[i].pairs) seen.set(p.key, p);
    return [...seen.values()].sort((a, b) => a.from - b.from || a.to - b.to);
  }
  function hasValues(q, stepKey) {
    if (q.builtin) return true;
    for (const i of sides()) {
      const e = D.runs[i].entries[stepKey];
      for (const g of e ? e.groups : []) for (const r of g.r) {
        if (q.pairwise ? r.d && r.d[q.key] : r.q && r.q[q.key]) return true;
      }
    }
    return false;
  }
  function setupControls() {
    fillSelect($("step"), D.steps.map((s) => option(s.key, s.label, s.key === S.step)));
    fillSelect($("left"), D.runs.map((r, i) => option(i, r.name, i === S.left)));
    fillSelect($("right"), [option(-1, "— none —", S.right < 0), ...D.runs.map((r, i) => option(i, r.name, i === S.right))]);
    $("right").disabled = D.runs.length < 2;
    fillQuantities();
    fillPairs();
  }
  function fillQuantities() {
    fillSelect($("quantity"), D.quantities.map((q) => option(q.key,
      q.label + (q.units ? " (" + q.units + ")" : "") + (hasValues(q, S.step) ? "" : " — no values here"), q.key === S.q)));
  }
  function fillPairs() {
    const pairs = pairsShown();
    if (!pairs.some((p) => p.key === S.pair)) {
      const first = pairs.length ? pairs[0].from : null;
      const span = pairs.filter((p) => p.from === first);
      S.pair = span.length ? span[span.length - 1].key : "";
    }
    fillSelect($("pair"), pairs.length ? pairs.map((p) => option(p.key, "checkpoint " + p.from + " → " + p.to, p.key === S.pair))
      : [option("", "— no probed checkpoints —", true)]);
    $("pair").disabled = !pairs.length;
  }

  // ------------------------------------------------------------------ rows, filters, sorting
  function rows() {
    const out = [], byKey = new Map();
    sides().forEach((runIdx, side) => {
      const e = entryOf(runIdx);
      (e ? e.groups : []).forEach((g, gi) => {
        let row = byKey.get(g.k);
        if (!row) { row = { key: g.k, g: [null, null], gi: [-1, -1], n: out.length }; byKey.set(g.k, row); out.push(row); }
        row.g[side] = g; row.gi[side] = gi;
      });
    });
    return out;
  }
  const keepResp = (r) => S.reward === "all" || (S.reward === "pos" ? r.reward > 0 : !(r.reward > 0));
  function passes(row) {
    const gs = row.g.filter(Boolean);
    if (S.mixed && !gs.some((g) => g.status === "mixed")) return false;
    if (S.lld && !gs.some((g) => g.lld && g.lld[S.pair] === true)) return false;
    if (S.search && !gs.some((g) => (g.prompt || "").toLowerCase().includes(S.search))) return false;
    if (S.reward !== "all" && !gs.some((g) => g.r.some(keepResp))) return false;
    return true;
  }
  function deltaOf(row) {
    for (const g of row.g) if (g && g.delta && g.delta[S.pair] !== undefined && g.delta[S.pair] !== null) return g.delta[S.pair];
    return null;
  }
  function sorted(list) {
    if (S.sort === "run") return list;
    const sign = S.sort === "asc" ? 1 : -1;
    return list.slice().sort((a, b) => {
      const x = deltaOf(a), y = deltaOf(b);
      if (x === null || y === null) return (x === null) - (y === null) || a.n - b.n;
      return sign * (x - y) || a.n - b.n;
    });
  }

  // ------------------------------------------------------------------ drawing
  function respHTML(runIdx, resp, ri, q) {
    const pos = resp.reward > 0, cells = [[], []];
    let drawn = 0;
    for (let p = 0; p < resp.ids.length; p++) {
      const c = colour(q, valueOf(q, resp, p));
      const cls = "t" + (p < resp.n ? " sh" : "") + (c ? "" : " na");
      const style = c ? ' style="background:' + rgb(c) + ";color:" + textOn(c) + '"' : "";
      cells[p < resp.n ? 0 : 1].push('<span class="' + cls + '" tabindex="-1" data-p="' + p + '"' + style + ">" +
        esc(tokenText(runIdx, resp.ids[p])) + "</span>");
      drawn++;
    }
    const meta = (pos ? "✓" : "✗") + " r " + fmt(resp.reward) + (resp.adv !== undefined ? " · A " + fmt(resp.adv) : "");
    return ['<div class="resp" data-r="' + ri + '"><span class="rmeta ' + (pos ? "pos" : "neg") + '" title="response ' +
      resp.i + (pos ? ", positive" : ", negative") + '">' + meta + '</span><span class="pre">' + cells[0].join("") +
      '</span><span class="part' + (resp.n ? "" : " none") + '" title="where this response parts from the other sign">│</span>' +
      '<span class="rest">' + cells[1].join("") + (resp.ids.length ? "" : '<span class="muted">(no tokens)</span>') +
      "</span></div>", drawn];
  }
  function groupHTML(side, runIdx, g, gi, q, pair) {
    const run = D.runs[runIdx], npos = g.r.filter((r) => r.reward > 0).length;
    const d = g.delta ? g.delta[S.pair] : undefined, inLLD = g.lld && g.lld[S.pair] === true;
    let tokens = 0;
    const body = g.r.map((r, ri) => {
      if (!keepResp(r)) return "";
      const [h, n] = respHTML(runIdx, r, ri, q); tokens += n; return h;
    }).join("");
    const meta = ['<span class="run">' + esc(run.name) + "</span>", "group " + esc(g.id), esc(g.uid),
      esc(g.status.replace("_", " ")) + " · " + npos + "+ / " + (g.r.length - npos) + "−"];
    if (d !== undefined && d !== null && pair) meta.push("Δ⁺ " + pair.from + "→" + pair.to + " = " + fmt(d) + " nats");
    if (inLLD) meta.push('<span class="badge lld" title="Δ⁺ ≤ ε (' + fmt(run.eps) + ') between the checkpoints">LLD</span>');
    const label = run.name + ", group " + g.id + ", " + g.status.replace("_", " ") + ", " + npos + " positive of " + g.r.length;
    return ['<section class="group" data-side="' + side + '" data-run="' + runIdx + '" data-g="' + gi + '" data-gid="' + esc(g.id) +
      '"><header class="ghead" tabindex="0" aria-label="' + esc(label) + '"><div class="meta">' + meta.join(" · ") +
      '</div><div class="prompt">' + esc(g.prompt || "(prompt text not recorded)") + "</div>" +
      (g.gt !== null && g.gt !== undefined ? '<div class="gt">ground truth: <code>' + esc(g.gt) + "</code></div>" : "") +
      '</header><div class="resps">' + body + "</div></section>", tokens];
  }
  function emptyPane(runIdx) {
    const st = stepInfo(), run = D.runs[runIdx];
    if (!entryOf(runIdx)) return '<div class="pane empty">' + esc(run.name) + ": nothing at " + esc(st.label) + "</div>";
    return '<div class="pane empty">' + esc(run.name) + ": no group with this prompt at this step</div>";
  }
  function render() {
    const q = Q.get(S.q), all = rows(), two = sides().length === 2, pair = pairsShown().find((p) => p.key === S.pair);
    const shown = sorted(all.filter(passes));
    let html = "", tokens = 0, groups = 0;
    for (const row of shown.slice(0, S.limit)) {
      const panes = sides().map((runIdx, side) => {
        const g = row.g[side];
        if (!g) return emptyPane(runIdx);
        const [h, n] = groupHTML(side, runIdx, g, row.gi[side], q, pair);
        tokens += n; groups++;
        return '<div class="pane">' + h + "</div>";
      });
      html += '<div class="row' + (two ? " two" : "") + '">' + panes.join("") + "</div>";
    }
    const main = $("groups");
    main.innerHTML = html || '<p class="muted">No group matches the filters at this step.</p>';
    main.dataset.groups = groups; main.dataset.tokens = tokens;
    roving = null;
    const first = main.querySelector(".t");
    if (first) { first.tabIndex = 0; roving = first; }
    const more = $("more"), left = shown.length - Math.min(shown.length, S.limit);
    more.hidden = left <= 0;
    more.textContent = "Show " + Math.min(PAGE, left) + " more (" + left + " not drawn yet)";
    const filters = [S.mixed && "mixed only", S.lld && "in LLD (" + (S.pair || "no pair") + ")",
      S.reward !== "all" && (S.reward === "pos" ? "positive responses" : "negative responses"),
      S.search && "prompt contains “" + S.search + "”"].filter(Boolean);
    $("status").textContent = stepInfo().label + ": " + Math.min(shown.length, S.limit) + " of " + all.length +
      " prompt rows drawn (" + groups + " groups, " + tokens + " tokens)" + (filters.length ? "; filters: " + filters.join(", ") : "");
    legend(q);
    hideTip();
  }
  function legend(q) {
    const parts = [];
    const pair = pairsShown().find((p) => p.key === S.pair);
    const title = esc(q.label) + (q.units ? " <span class=\"muted\">(" + esc(q.units) + ")</span>" : "") +
      (q.pairwise ? (pair ? ", checkpoint " + pair.from + " → " + pair.to : ", no checkpoint pair") : "");
    if (q.scale === "categorical") {
      parts.push("<div><strong>" + title + '</strong><div class="keys">' + q.categories.map((c) =>
        '<span><span class="sw" style="background:' + rgb(colour(q, c[0])) + '"></span>' + esc(c[1]) + "</span>").join("") + "</div></div>");
    } else if (q.domain) {
      const n = 24, grad = [];
      for (let i = 0; i <= n; i++) grad.push(rgb(colour(q, q.domain[0] + (q.domain[1] - q.domain[0]) * i / n)) + " " + (100 * i / n) + "%");
      const mid = q.scale === "diverging" ? 0 : (q.domain[0] + q.domain[1]) / 2;
      parts.push("<div><strong>" + title + '</strong><div class="bar" role="img" aria-label="colour bar from ' + fmt(q.domain[0]) +
        " to " + fmt(q.domain[1]) + '" style="background:linear-gradient(to right,' + grad.join(",") + ')"></div>' +
        '<div class="ticks"><span>≤ ' + fmt(q.domain[0]) + "</span><span>" + fmt(mid) + "</span><span>≥ " + fmt(q.domain[1]) +
        "</span></div></div>");
    } else {
      parts.push("<div><strong>" + title + "</strong><div class=\"muted\">no values of this quantity in the page</div></div>");
    }
    const range = q.scale === "categorical" ? "" : q.domain && q.key !== "resrl_weight" && q.key !== "nthr_weight" ?
      " Colour range: 2%–98% of the values in the page" + (q.scale === "diverging" ? ", symmetric around 0" : "") + "." : "";
    parts.push('<div class="qdesc">' + esc(q.description) + "." + range + "</div>");
    parts.push('<div class="keys"><span><span class="sw na"></span>no value for this token</span>' +
      '<span><span class="sw sh"></span>shared prefix (same tokens as a response of the other sign)</span>' +
      '<span><span class="part">│</span> where a response parts from the other sign</span>' +
      '<span class="rmeta pos">✓ positive (reward &gt; 0)</span><span class="rmeta neg">✗ negative</span>' +
      '<span><span class="badge lld">LLD</span> the group\'s positives lost likelihood (Δ⁺ ≤ ε) between the checkpoints</span>' +
      "<span>r reward · A sequence advantage</span></div>");
    $("legend").innerHTML = parts.join("");
  }

  // ------------------------------------------------------------------ hover and focus
  const tip = $("tip");
  function locate(el) {
    const group = el.closest(".group"), resp = el.closest(".resp");
    if (!group || !resp) return null;
    const runIdx = +group.dataset.run, g = D.runs[runIdx].entries[S.step].groups[+group.dataset.g];
    return { runIdx, g, resp: g.r[+resp.dataset.r], p: +el.dataset.p };
  }
  function tipHTML(x) {
    const { runIdx, g, resp, p } = x, id = resp.ids[p], run = D.runs[runIdx];
    const raw = run.vocab[id];
    const rows = [["token id", id], ["position", p + " of " + resp.ids.length], ["response", resp.i + (resp.reward > 0 ? " (positive)" : " (negative)")],
      ["reward", fmt(resp.reward)]];
    if (resp.adv !== undefined) rows.push(["sequence advantage", fmt(resp.adv)]);
    for (const q of D.quantities) {
      if (q.builtin === "shared") { rows.push([q.label, p < resp.n ? "shared prefix" : "unique"]); continue; }
      if (q.pairwise) {
        const by = resp.d && resp.d[q.key];
        if (!by) { rows.push([q.label, "—"]); continue; }
        for (const pk of Object.keys(by)) {
          const [a, b] = pk.split("-");
          if (pk === S.pair || Object.keys(by).length <= 4) rows.push([q.label + " " + a + "→" + b, fmt(by[pk][p]) + " " + q.units]);
        }
        continue;
      }
      const v = valueOf(q, resp, p);
      rows.push([q.label, v === null || v === undefined ? "—" : fmt(v) + (q.units ? " " + q.units : "")]);
    }
    const text = raw === undefined ? "#" + id : JSON.stringify(raw);
    return '<div class="tt">' + esc(text) + '</div><div class="muted">' + esc(run.name) + " · group " + esc(g.id) + " · " +
      esc(stepInfo().label) + "</div><table>" + rows.map((r) => "<tr><td>" + esc(r[0]) + '</td><td class="v">' + esc(r[1]) +
      "</td></tr>").join("") + "</table>";
  }
  function showTip(el) {
    const x = locate(el);
    if (!x) return;
    tip.innerHTML = tipHTML(x);
    tip.hidden = false;
    const r = el.getBoundingClientRect(), w = tip.offsetWidth, h = tip.offsetHeight;
    tip.style.left = Math.max(4, Math.min(r.left, window.innerWidth - w - 8)) + "px";
    tip.style.top = (r.bottom + h + 8 < window.innerHeight ? r.bottom + 6 : Math.max(4, r.top - h - 6)) + "px";
    $("details").textContent = tip.textContent;
  }
  function hideTip() { tip.hidden = true; }
  const main = $("groups");
  main.addEventListener("mouseover", (ev) => { const t = ev.target.closest(".t"); if (t) showTip(t); });
  main.addEventListener("mouseout", (ev) => { if (ev.target.closest(".t") && document.activeElement !== ev.target) hideTip(); });
  main.addEventListener("focusin", (ev) => {
    const t = ev.target.closest(".t");
    if (!t) return;
    if (roving && roving !== t) roving.tabIndex = -1;
    t.tabIndex = 0; roving = t;
    showTip(t);
  });
  main.addEventListener("focusout", hideTip);

  // ------------------------------------------------------------------ keyboard
  const tokensOf = (resp) => [...resp.querySelectorAll(".t")];
  function moveToken(t, key) {
    const resp = t.closest(".resp"), group = t.closest(".group"), list = tokensOf(resp), i = list.indexOf(t);
    const resps = [...group.querySelectorAll(".resp")].filter((r) => r.querySelector(".t"));
    const k = resps.indexOf(resp);
    let target = null;
    if (key === "ArrowRight") target = list[i + 1] || (resps[k + 1] && tokensOf(resps[k + 1])[0]);
    else if (key === "ArrowLeft") target = list[i - 1] || (resps[k - 1] && tokensOf(resps[k - 1]).slice(-1)[0]);
    else if (key === "Home") target = list[0];
    else if (key === "End") target = list[list.length - 1];
    else if (key === "ArrowDown" || key === "ArrowUp") {
      const other = resps[k + (key === "ArrowDown" ? 1 : -1)];
      if (other) { const o = tokensOf(other); target = o[Math.min(+t.dataset.p, o.length - 1)]; }
      else {
        const groups = [...main.querySelectorAll(".group")], j = groups.indexOf(group) + (key === "ArrowDown" ? 1 : -1);
        const g = groups[j];
        if (g) { const r = [...g.querySelectorAll(".resp")].filter((x) => x.querySelector(".t")); const rr = key === "ArrowDown" ? r[0] : r[r.length - 1]; if (rr) target = tokensOf(rr)[0]; }
      }
    } else if (key === "Escape") target = group.querySelector(".ghead");
    if (target) { target.focus(); target.scrollIntoView({ block: "nearest", inline: "nearest" }); return true; }
    return false;
  }
  function moveGroup(dir) {
    const heads = [...main.querySelectorAll(".ghead")];
    if (!heads.length) return;
    const cur = document.activeElement && document.activeElement.closest ? document.activeElement.closest(".group") : null;
    const i = cur ? heads.indexOf(cur.querySelector(".ghead")) : -1;
    const h = heads[Math.max(0, Math.min(heads.length - 1, i + dir))] || heads[0];
    h.focus(); h.scrollIntoView({ block: "nearest" });
  }
  main.addEventListener("keydown", (ev) => {
    const t = ev.target;
    if (t.classList.contains("t") && ["ArrowRight", "ArrowLeft", "ArrowUp", "ArrowDown", "Home", "End", "Escape"].includes(ev.key)) {
      if (moveToken(t, ev.key)) ev.preventDefault();
    } else if (t.classList.contains("ghead") && ["Enter", "ArrowRight", "ArrowDown"].includes(ev.key)) {
      const first = t.closest(".group").querySelector(".t");
      if (first) { first.focus(); ev.preventDefault(); }
    }
  });
  document.addEventListener("keydown", (ev) => {
    const tag = ev.target.tagName;
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.key === "j" || ev.key === "k") { moveGroup(ev.key === "j" ? 1 : -1); ev.preventDefault(); }
    else if (ev.key === "[" || ev.key === "]") {
      const i = D.steps.findIndex((s) => s.key === S.step) + (ev.key === "]" ? 1 : -1);
      if (i >= 0 && i < D.steps.length) { S.step = D.steps[i].key; $("step").value = S.step; changed(); }
      ev.preventDefault();
    } else if (ev.key === "/") { $("search").focus(); ev.preventDefault(); }
    else if (ev.key === "?") { $("help").open = !$("help").open; ev.preventDefault(); }
  });

  // ------------------------------------------------------------------ wiring
  function changed() { S.limit = PAGE; fillQuantities(); fillPairs(); render(); }
  $("step").addEventListener("change", (e) => { S.step = e.target.value; changed(); });
  $("left").addEventListener("change", (e) => { S.left = +e.target.value; changed(); });
  $("right").addEventListener("change", (e) => { S.right = +e.target.value; changed(); });
  $("quantity").addEventListener("change", (e) => { S.q = e.target.value; render(); });
  $("pair").addEventListener("change", (e) => { S.pair = e.target.value; render(); });
  $("mixed").addEventListener("change", (e) => { S.mixed = e.target.checked; S.limit = PAGE; render(); });
  $("lld").addEventListener("change", (e) => { S.lld = e.target.checked; S.limit = PAGE; render(); });
  $("reward").addEventListener("change", (e) => { S.reward = e.target.value; render(); });
  $("sort").addEventListener("change", (e) => { S.sort = e.target.value; render(); });
  let timer = 0;
  $("search").addEventListener("input", (e) => {
    clearTimeout(timer);
    timer = setTimeout(() => { S.search = e.target.value.trim().toLowerCase(); S.limit = PAGE; render(); }, 120);
  });
  $("more").addEventListener("click", () => { S.limit += PAGE; render(); });
  if (window.matchMedia) {
    window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => { readTheme(); render(); });
  }

  // ------------------------------------------------------------------ start
  $("title").textContent = D.meta.title;
  $("subtitle").textContent = D.runs.length + " run(s), written " + D.meta.created + "; numbers at " +
    (D.meta.digits || 4) + " significant digits; where each run is: below";
  const notes = D.runs.flatMap((r) => r.notes.map((n) => r.name + ": " + n));
  const paths = D.runs.map((r) => r.name + ": " + r.kind + " run at " + r.path);
  const lines = D.meta.omitted.concat(notes, paths);
  $("omitted-summary").textContent = (D.meta.omitted.length ? "Left out: " + D.meta.omitted[0] :
    "Nothing left out: every group of the steps shown is in this page") + " (details: " + lines.length + " line(s))";
  $("omitted").replaceChildren(...lines.map((t) => { const li = document.createElement("li"); li.textContent = t; return li; }));
  if (!D.steps.length) { $("status").textContent = "Nothing to show."; return; }
  readTheme();
  // The first view: the page's defaults, or what the address's #fragment asks for
  // (e.g. view.html#step=probe:8&q=delta_logp&pair=0-8&left=0&right=2&mixed=1).
  const H = new URLSearchParams(location.hash.slice(1));
  const idx = (k, n) => (H.has(k) && +H.get(k) >= -1 && +H.get(k) < n ? +H.get(k) : null);
  if (idx("left", D.runs.length) !== null && idx("left", D.runs.length) >= 0) S.left = idx("left", D.runs.length);
  if (idx("right", D.runs.length) !== null) S.right = idx("right", D.runs.length);
  S.step = (D.steps.find((s) => s.key === H.get("step")) || D.steps.find((s) => D.runs[S.left].entries[s.key]) ||
    D.steps[0]).key;
  S.q = Q.has(H.get("q")) ? H.get("q") : (D.quantities.find((q) => hasValues(q, S.step)) || D.quantities[0]).key;
  S.pair = H.get("pair") || "";
  S.mixed = $("mixed").checked = H.get("mixed") === "1";
  if (["run", "asc", "desc"].includes(H.get("sort"))) S.sort = $("sort").value = H.get("sort");
  setupControls();
  render();
  void $("groups").offsetHeight; // layout done: the first view is drawn (bench/view_bench.py reads this time)
  document.documentElement.dataset.firstViewMs = Math.round(performance.now());
  document.documentElement.dataset.ready = "1";
})();
