// The operation monitor: shows the three monitors of one operation and follows it live from
// whichever instance owns it (source MIG, then MigHelper, then the final MIG), by server-sent
// events, with polling of the operation's public view as the fallback. The page keeps the copy with the
// highest `version` and never goes back to an older one.
"use strict";

(function () {
  const POLL_MS = 200;          // a step change reaches the page within about this
  const FETCH_TIMEOUT_MS = 1500; // a dead instance must not stall the others
  const RATE_WINDOW_MS = 5000;   // the transfer rate is measured over this much recent history
  const STALL_MS = 5000;         // no new bytes for this long: say so instead of a rate
  const WATCHDOG_MS = 1000;      // how often a page on a silent stream checks the other instances

  const main = document.getElementById("monitor");
  const opId = main.dataset.opId;
  // The HTTP contract the page was served with (actors::api): paths by name, the CSRF header and
  // the stream's event name. Every instance of the operation runs the same MIG, so its paths.
  const API = JSON.parse(document.querySelector('meta[name="mig-api"]').content);
  const route = (name, id) => API.routes[name].replace("{id}", id);
  const el = {
    plan: document.getElementById("plan"),
    summary: document.getElementById("summary"),
    following: document.getElementById("following"),
    outcome: document.getElementById("outcome"),
    monitors: document.getElementById("monitors"),
    cancelBox: document.getElementById("cancel-box"),
    cancel: document.getElementById("cancel"),
    cancelHint: document.getElementById("cancel-hint"),
  };

  let best = null;       // the newest copy of the operation seen
  let finished = false;  // the operation reached a final state
  let stopStream = null; // closes the open stream, if any
  const samples = {};    // step name -> [{t, bytes}] for the rate
  let maxRate = null;    // the copy's bandwidth limit (plan.max_rate), bytes/s, shown by the rate

  const STATE_LABEL = {
    pending: "pending",
    running: "running",
    done: "done",
    failed: "failed",
    rolled_back: "rolled back",
    cancelled: "cancelled",
  };
  const ROLE_NAME = { source: "the source MIG", helper: "MigHelper", target: "the final MIG" };

  // ---- formatting -------------------------------------------------------------------------

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let v = n;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? String(v) : v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)) + " " + units[i];
  }

  function duration(ms) {
    if (!(ms >= 0)) return "";
    const s = ms / 1000;
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 60) return Math.round(s) + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + " min " + Math.round(s - m * 60) + " s";
    return Math.floor(m / 60) + " h " + (m % 60) + " min";
  }

  function clock(d) {
    const p = (x) => String(x).padStart(2, "0");
    return p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
  }

  function node(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "dataset") Object.assign(e.dataset, v);
      else e.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      e.append(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return e;
  }

  // ---- the transfer rate --------------------------------------------------------------------

  function sample(op) {
    const now = Date.now();
    for (const m of op.monitors) {
      for (const s of m.steps) {
        if (s.bytes_done === null || s.bytes_done === undefined) continue;
        const list = samples[s.name] || (samples[s.name] = []);
        const last = list[list.length - 1];
        if (!last || last.bytes !== s.bytes_done) list.push({ t: now, bytes: s.bytes_done });
        while (list.length > 2 && now - list[0].t > RATE_WINDOW_MS) list.shift();
      }
    }
  }

  // Bytes per second: over the recent samples when there are two, else since the step started.
  function rate(step) {
    const list = samples[step.name] || [];
    if (list.length >= 2) {
      const a = list[0];
      const b = list[list.length - 1];
      if (b.t > a.t) return ((b.bytes - a.bytes) * 1000) / (b.t - a.t);
    }
    if (step.started_at && step.bytes_done) {
      const end = step.ended_at ? Date.parse(step.ended_at) : Date.now();
      const ms = end - Date.parse(step.started_at);
      if (ms > 0) return (step.bytes_done * 1000) / ms;
    }
    return null;
  }

  // ---- rendering ----------------------------------------------------------------------------

  function stepTimes(s) {
    if (!s.started_at) return null;
    const start = new Date(s.started_at);
    const end = s.ended_at ? Date.parse(s.ended_at) : Date.now();
    const took = duration(end - start.getTime());
    return node(
      "div",
      { class: "times" },
      "started ",
      node("time", { datetime: s.started_at }, clock(start)),
      " · ",
      node("span", { class: "duration" }, (s.ended_at ? "took " : "") + took),
    );
  }

  // Set through the CSSOM: the page's CSP forbids inline style attributes.
  function fill(pct) {
    const f = node("div", { class: "fill" });
    f.style.width = pct.toFixed(1) + "%";
    return f;
  }

  function stepProgress(s) {
    if (s.bytes_total === null || s.bytes_total === undefined) return null;
    const done = s.bytes_done || 0;
    const total = s.bytes_total;
    const pct = total > 0 ? Math.min(100, (done * 100) / total) : s.state === "done" ? 100 : 0;
    const r = rate(s);
    let figures = bytes(done) + " of " + bytes(total) + " (" + Math.floor(pct) + "%)";
    const list = samples[s.name] || [];
    const still = list.length ? Date.now() - list[list.length - 1].t : 0;
    if (s.state === "running" && done < total && still > STALL_MS) {
      // A rate from before a stall would promise an end that is not coming.
      figures += " · no progress for " + duration(still);
    } else if (r !== null && r > 0) {
      figures += " · " + bytes(r) + "/s";
      if (s.state === "running") figures += " · ETA " + duration(((total - done) * 1000) / r);
    }
    if (maxRate) figures += " · limit " + bytes(maxRate) + "/s";
    return node(
      "div",
      { class: "progress" },
      node(
        "div",
        {
          class: "track",
          role: "progressbar",
          "aria-label": "bytes moved",
          "aria-valuemin": "0",
          "aria-valuemax": "100",
          "aria-valuenow": String(Math.floor(pct)),
        },
        fill(pct),
      ),
      node("div", { class: "figures" }, figures),
    );
  }

  function monitorState(m) {
    const st = m.steps.map((s) => s.state);
    if (st.includes("failed")) return "failed";
    if (st.includes("running")) return "running";
    if (st.every((x) => x === "done")) return "done";
    if (st.every((x) => x === "pending")) return "pending";
    if (st.every((x) => x === "rolled_back" || x === "done") && st.includes("rolled_back")) return "rolled_back";
    return "running";
  }

  function renderMonitors(op) {
    maxRate = op.plan && op.plan.max_rate ? op.plan.max_rate : null;
    const frag = document.createDocumentFragment();
    op.monitors.forEach((m, i) => {
      const state = monitorState(m);
      const titleId = "monitor-" + i + "-title";
      const steps = node("ol", {});
      for (const s of m.steps) {
        steps.append(
          node(
            "li",
            { class: "step", dataset: { step: s.name, state: s.state } },
            node(
              "div",
              { class: "top" },
              node("span", { class: "badge " + s.state }, STATE_LABEL[s.state] || s.state),
              node("span", { class: "name" }, s.name),
            ),
            stepTimes(s),
            s.detail ? node("div", { class: "detail" }, s.detail) : null,
            stepProgress(s),
          ),
        );
      }
      frag.append(
        node(
          "section",
          { class: "monitor", "aria-labelledby": titleId, dataset: { monitor: m.name, state: state } },
          node(
            "header",
            {},
            node("h2", { id: titleId }, m.name),
            node("span", { class: "grid" }, "grid " + m.grid),
          ),
          steps,
        ),
      );
    });
    el.monitors.replaceChildren(frag);
  }

  function allSteps(op) {
    return op.monitors.flatMap((m) => m.steps);
  }

  function summaryText(op) {
    const kind = op.kind === "snapshot" ? "Snapshot" : "Migrate";
    const p = op.plan;
    if (op.state === "succeeded") {
      return kind + " succeeded: " + p.target_app + " is on grid " + p.target_grid + ".";
    }
    if (op.state === "rolled_back") return kind + " failed and was rolled back.";
    if (op.state === "cancelled") return kind + " cancelled and rolled back.";
    if (op.state === "failed") return kind + " failed.";
    const running = allSteps(op).find((s) => s.state === "running");
    if (op.rolling_back) return "Rolling back" + (running ? ": " + running.name : "") + "…";
    return running ? "Now " + running.name + "…" : kind + " running…";
  }

  function renderOutcome(op) {
    const p = op.plan;
    if (op.state === "running") {
      el.outcome.replaceChildren();
      return;
    }
    if (op.state === "succeeded") {
      const snapshot = op.kind === "snapshot";
      const linkText = snapshot
        ? "Open the GUI of " + p.source_app + " on grid " + p.source_grid
        : "Open the GUI of " + p.target_app + " on grid " + p.target_grid;
      el.outcome.replaceChildren(
        node(
          "section",
          { class: "notice ok", id: "outcome-success", "aria-labelledby": "outcome-title" },
          node("h2", { id: "outcome-title" }, snapshot ? "Snapshot done" : "Migration done"),
          node(
            "p",
            {},
            snapshot
              ? p.target_app + " is a stopped copy on grid " + p.target_grid + "; " + p.source_app +
                  " runs again on grid " + p.source_grid + "."
              : p.target_app + " runs on grid " + p.target_grid + "; " + p.source_app +
                  " is gone from grid " + p.source_grid + ".",
          ),
          norm(p.final_mig_url)
            ? node("a", { id: "target-link", class: "big-link", href: norm(p.final_mig_url) }, linkText)
            : node("p", { id: "no-link" }, "The final MIG's address in the plan is not an http(s) URL: " +
                String(p.final_mig_url)),
        ),
      );
      return;
    }
    const steps = allSteps(op);
    const failed = steps.find((s) => s.state === "failed");
    const undone = steps.filter((s) => s.state === "rolled_back");
    const undoneState = op.state === "rolled_back" || op.state === "cancelled";
    const title = op.state === "cancelled"
      ? "Cancelled — rolled back"
      : (failed ? "Failed at “" + failed.name + "”" : "The operation failed") +
        (op.state === "rolled_back" ? " — rolled back" : "");
    const reason = (failed && failed.detail) || op.error || "no reason was recorded";
    const parts = [
      node("h2", { id: "outcome-title" }, title),
      node("p", { class: "reason", id: "failure-reason" }, reason),
    ];
    if (op.error && op.error !== reason) parts.push(node("p", { id: "failure-error" }, op.error));
    if (undone.length) {
      parts.push(node("h3", {}, "Rolled back"));
      parts.push(
        node(
          "ul",
          { id: "rolled-back" },
          ...undone.map((s) => node("li", {}, s.name + (s.detail ? ": " + s.detail : ""))),
        ),
      );
    }
    parts.push(node("h3", {}, "Where the applications are now"));
    parts.push(
      node(
        "p",
        { id: "end-state" },
        undoneState
          ? p.source_app + " runs on grid " + p.source_grid + " as before; nothing of it was lost. " +
              (op.leftovers && op.leftovers.length
                ? "Part of the attempt is left over: see below."
                : p.target_app + " was not left on grid " + p.target_grid + ".")
          : "The operation stopped after the cut-over: " + p.target_app + " is on grid " +
              p.target_grid + ". See what is left over below.",
      ),
    );
    if (op.leftovers && op.leftovers.length) {
      parts.push(node("h3", {}, "Left over, to clear by hand"));
      parts.push(node("ul", { id: "leftovers" }, ...op.leftovers.map((l) => node("li", { class: "leftover" }, l))));
      // The public view names what is left, not the commands (they name the grid controllers).
      parts.push(
        node(
          "p",
          { id: "leftover-commands", class: "small" },
          "The commands that clear them are in the operation's full record, for an operator " +
            "with MIG's GUI credentials: mig status --url " + (ownerUrl(op) || location.origin) +
            " --user USER " + op.id,
        ),
      );
    }
    el.outcome.replaceChildren(
      node("section", { class: "notice error", id: "outcome-failure", role: "alert", "aria-labelledby": "outcome-title" }, ...parts),
    );
  }

  let lastSummary = "";
  let outcomeShown = false;

  function render() {
    const op = best;
    if (!op) return;
    const p = op.plan;
    el.plan.textContent =
      (op.kind === "snapshot" ? "Snapshot of " : "Migration of ") + p.source_app + " on grid " +
      p.source_grid + " to " + p.target_app + " on grid " + p.target_grid + ".";
    main.dataset.state = op.state;
    document.title = {
      running: "Running",
      succeeded: "Done",
      failed: "Failed",
      rolled_back: "Rolled back",
      cancelled: "Cancelled",
    }[op.state] + " · MIG operation " + opId.slice(0, 8);
    renderCancel(op);
    main.dataset.version = String(op.version);
    renderMonitors(op);
    renderTraceLink(op);
    // The live region speaks only when the summary changes, not on every byte count.
    const text = summaryText(op);
    if (text !== lastSummary) {
      el.summary.textContent = text;
      lastSummary = text;
    }
    if (op.state !== "running" && !outcomeShown) {
      renderOutcome(op);
      outcomeShown = true;
    }
  }

  // ---- cancel -------------------------------------------------------------------------------

  // Offered while a cancel can still win: running, not rolling back, before the cut-over (the
  // step that starts the target, or re-starts the source of a snapshot). The server decides;
  // this only hides a button that would be refused.
  function cancellable(op) {
    if (op.state !== "running" || op.rolling_back || op.owner === "target") return false;
    const cut = allSteps(op).find(
      (s) => s.name === "starting the target application" || s.name === "re-starting the source application",
    );
    return !cut || cut.state === "pending";
  }

  function renderCancel(op) {
    if (!el.cancelBox) return;
    if (cancellable(op)) {
      el.cancelBox.hidden = false;
      return;
    }
    // Past the point where a cancel can win: no button, but an answer already shown stays.
    el.cancel.disabled = true;
    if (!el.cancelHint.textContent) el.cancelBox.hidden = true;
  }

  // Asked of this page's own instance (same origin, the credentials the browser holds, its CSRF
  // token); it forwards the cancel to the instance that drives the operation.
  async function cancelOp() {
    const op = best;
    if (!op) return;
    const what = op.kind === "snapshot" ? "snapshot" : "migration";
    if (!window.confirm("Cancel this " + what + "? It rolls back: " + op.plan.source_app +
      " runs again on grid " + op.plan.source_grid + ".")) return;
    el.cancel.disabled = true;
    el.cancelHint.textContent = "Cancelling…";
    try {
      const t = await fetch(location.origin + route("csrf"), { credentials: "same-origin" });
      if (!t.ok) throw new Error("this MIG answered " + t.status + " for its CSRF token");
      const csrf = (await t.json()).csrf;
      const resp = await fetch(location.origin + route("cancel", opId), {
        method: "POST",
        credentials: "same-origin",
        headers: { [API.csrf_header]: csrf },
      });
      let body = null;
      try { body = await resp.json(); } catch (_) { body = null; }
      if (resp.status === 202 && body && body.cancelled) {
        el.cancelHint.textContent = "Cancelled by " + body.cancelled.user + "; rolling back…";
        return;
      }
      el.cancelHint.textContent = "Not cancelled: " +
        (body && body.error ? body.error : "MIG answered " + resp.status);
    } catch (e) {
      // The source MIG stops with its application during the copy: say where to ask instead.
      const owner = ownerUrl(op);
      el.cancelHint.replaceChildren(
        "This MIG did not answer (" + e.message + "). Cancel it on the instance that drives it now: ",
        owner ? node("a", { id: "cancel-elsewhere", href: owner + route("monitor_page", opId) }, owner + route("monitor_page", opId)) : "",
      );
      el.cancel.disabled = false;
    }
  }

  if (el.cancel) el.cancel.addEventListener("click", cancelOp);

  // ---- following the operation --------------------------------------------------------------

  function accept(op) {
    if (!op || op.id !== opId) return false;
    if (best && op.version <= best.version) return false; // never go back to an older copy
    best = op;
    sample(op);
    render();
    if (op.state !== "running") {
      finished = true;
      if (stopStream) stopStream();
      el.following.textContent = "";
    }
    return true;
  }

  // The instance that drives the operation now: it streams it, and it serves the whole timeline
  // (steps, handoffs, grid commands of every instance). During a roll-back after the handoff to
  // the final MIG, that is the re-started source. Only http(s) URLs are followed or linked: the
  // plan comes over the network, and a "javascript:" link would run in this page.
  function ownerUrl(op) {
    const p = op.plan;
    if (op.owner === "source") return norm(p.source_mig_url);
    if (op.owner === "helper") return norm(p.helper_url);
    return norm(op.rolling_back ? p.source_mig_url : p.final_mig_url);
  }

  function renderTraceLink(op) {
    const base = ownerUrl(op);
    let a = document.getElementById("trace-link");
    if (!base) {
      if (a) a.remove();
      return;
    }
    if (!a) {
      a = node("a", { id: "trace-link", class: "small" }, "Timeline of this operation");
      el.following.after(a);
    }
    a.setAttribute("href", base + route("trace_page", opId));
  }

  function norm(url) {
    const u = String(url || "").replace(/\/+$/, "");
    return /^https?:\/\/[^\s]+$/i.test(u) ? u : "";
  }

  // The instances in the order the operation visits them.
  function instances() {
    if (!best) return [location.origin];
    const p = best.plan;
    const list = [];
    for (const u of [location.origin, p.source_mig_url, p.helper_url, p.final_mig_url].map(norm)) {
      if (u && !list.includes(u)) list.push(u);
    }
    return list;
  }

  function sleep(ms) {
    return new Promise((r) => setTimeout(r, ms));
  }

  async function fetchOp(base) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    try {
      const resp = await fetch(base + route("op", opId), { signal: ctl.signal, cache: "no-store" });
      if (!resp.ok) return null;
      return await resp.json();
    } catch (_) {
      return null;
    } finally {
      clearTimeout(timer);
    }
  }

  // Streams from `base` until the stream ends or fails. Resolves with the number of events.
  function stream(base) {
    return new Promise((resolve) => {
      let count = 0;
      const es = new EventSource(base + route("events", opId));
      const onOp = (ev) => {
        count++;
        try { accept(JSON.parse(ev.data)); } catch (_) { /* a bad event is skipped */ }
      };
      es.addEventListener(API.event, onOp);
      es.onmessage = onOp;
      es.onopen = () => {
        el.following.textContent = "Live from " + describe(base) + ".";
      };
      // An instance that lost the operation without a word (a hard stop, a cut link) may hold
      // its stream open forever: every so often ask the others whether they know better.
      const watchdog = setInterval(async () => {
        const others = instances().filter((u) => u !== base);
        const answers = await Promise.all(others.map(fetchOp));
        answers.forEach((op) => accept(op));
        if (!finished && best && ownerUrl(best) !== base) stop();
      }, WATCHDOG_MS);
      const stop = () => {
        clearInterval(watchdog);
        es.close();
        if (stopStream === stop) stopStream = null;
        resolve(count);
      };
      stopStream = stop;
      // The server ends the stream when it no longer owns the operation; EventSource would
      // reconnect to the same place, so close it and decide where to go next.
      es.onerror = stop;
    });
  }

  function describe(base) {
    if (!best) return base;
    for (const role of ["helper", "target", "source"]) {
      // Each role at its own URL: during a roll-back the source is not "the final MIG".
      const u = ownerUrl(Object.assign({}, best, { owner: role, rolling_back: false }));
      if (u === base) return ROLE_NAME[role] + " (" + base.replace(/^https?:\/\//, "") + ")";
    }
    return base;
  }

  // Polls every instance until one that owns the operation answers, and returns its URL.
  let misses = 0;

  async function findOwner() {
    for (;;) {
      const bases = instances();
      const answers = await Promise.all(bases.map(fetchOp));
      answers.forEach((op) => accept(op));
      if (finished) return null;
      if (!best) {
        // Nobody knows this id yet: a mistyped link, or an operation that is just starting.
        misses++;
        el.summary.textContent =
          misses * POLL_MS < 5000
            ? "Looking for operation " + opId.slice(0, 8) + "…"
            : "This MIG knows no operation " + opId + ". Check the link; the page keeps looking.";
        await sleep(misses * POLL_MS < 5000 ? POLL_MS : 1000);
        continue;
      }
      const owner = ownerUrl(best);
      const i = bases.indexOf(owner);
      if (i >= 0 && answers[i] && answers[i].owner && ownerUrl(answers[i]) === owner) return owner;
      el.following.textContent = "Waiting for " + describe(owner) + " to answer…";
      await sleep(POLL_MS);
    }
  }

  async function follow() {
    let base = location.origin; // the instance that served this page, until the plan says more
    for (;;) {
      const got = await stream(base);
      if (finished) return;
      if (got === 0) await sleep(POLL_MS); // a stream that gives nothing: poll instead
      const next = await findOwner();
      if (finished || next === null) return;
      base = next;
    }
  }

  // Running steps show a growing duration between events.
  setInterval(() => {
    if (best && !finished && allSteps(best).some((s) => s.state === "running")) renderMonitors(best);
  }, 1000);

  follow();
})();
