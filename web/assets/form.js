// The operation form: checks the target name as it is typed, posts the operation, and goes to
// its monitor page. A bad name never leaves the browser.
"use strict";

(function () {
  // Same rule as dialect::AppName (1-64 letters, digits, '-', '_', starting with a letter).
  const APP_NAME = /^[A-Za-z][A-Za-z0-9_-]{0,63}$/;

  const form = document.getElementById("op-form");
  if (!form) return; // operations are unavailable: the page says why and offers nothing
  const csrf = document.querySelector('meta[name="mig-csrf"]').content;
  // The HTTP contract the page was served with (actors::api): paths by name, the CSRF header.
  const API = JSON.parse(document.querySelector('meta[name="mig-api"]').content);
  const route = (name) => API.routes[name];
  const name = document.getElementById("target-app");
  const nameError = document.getElementById("target-app-error");
  const grid = document.getElementById("target-grid");
  const submit = document.getElementById("submit");
  const formError = document.getElementById("form-error");
  const submitHint = document.getElementById("submit-hint");
  const maxRate = document.getElementById("max-rate");
  const checkButton = document.getElementById("check");
  const checksBox = document.getElementById("checks");
  const checkList = document.getElementById("check-list");

  function nameProblem(value) {
    if (value.length === 0) return "Enter the name the application will have on the target grid.";
    if (value.length > 64) return "At most 64 characters (this one has " + value.length + ").";
    if (!/^[A-Za-z]/.test(value)) return "The name must start with a letter.";
    const bad = value.match(/[^A-Za-z0-9_-]/);
    if (bad) return "“" + bad[0] + "” is not allowed: use letters, digits, “-” and “_”.";
    if (!APP_NAME.test(value)) return "Use 1 to 64 letters, digits, “-” or “_”, starting with a letter.";
    return null;
  }

  function kind() {
    const checked = form.querySelector('input[name="kind"]:checked');
    return checked ? checked.value : null;
  }

  function label() {
    const k = kind() === "snapshot" ? "Snapshot" : "Migrate";
    const target = name.value && !nameProblem(name.value) ? " as " + name.value : "";
    const g = grid.value ? " to " + grid.value : "";
    submit.textContent = k + target + g;
  }

  // Shows the problem while typing, but only marks the field invalid once there is something to
  // judge, so an empty form does not greet the user with an error.
  function check(showEmpty) {
    const problem = nameProblem(name.value);
    const shown = problem && (showEmpty || name.value.length > 0) ? problem : "";
    nameError.textContent = shown;
    name.setAttribute("aria-invalid", shown ? "true" : "false");
    label();
    return problem === null;
  }

  name.addEventListener("input", function () { check(false); });
  grid.addEventListener("change", label);
  form.addEventListener("change", label);

  // An empty limit is left out, so the MIG's own max_rate property applies.
  function request() {
    const r = { kind: kind(), target_app: name.value, target_grid: grid.value };
    if (maxRate && maxRate.value.trim()) r.max_rate = maxRate.value.trim();
    return r;
  }
  // Whether the form names a valid target and a grid; if not, says what to fix and where.
  function ready() {
    formError.hidden = true;
    if (!check(true)) {
      name.focus();
      return false;
    }
    if (!grid.value) {
      formError.textContent = "Choose a target grid.";
      formError.hidden = false;
      return false;
    }
    return true;
  }

  // The dry run: every check the operation needs, run on the grids without changing anything,
  // shown as a list before Submit.
  checkButton.addEventListener("click", async function () {
    if (!ready()) return;
    checkButton.disabled = true;
    submitHint.textContent = "Checking…";
    checkList.replaceChildren();
    try {
      const resp = await fetch(location.origin + route("start"), {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", [API.csrf_header]: csrf },
        body: JSON.stringify(Object.assign(request(), { dry_run: true })),
      });
      let body = null;
      try { body = await resp.json(); } catch (_) { body = null; }
      if (resp.status === 200 && body && Array.isArray(body.checks)) {
        for (const c of body.checks) {
          const li = document.createElement("li");
          li.className = c.ok ? "ok" : "failed";
          li.dataset.check = c.name;
          const b = document.createElement("strong");
          b.textContent = c.name;
          li.append(b, document.createTextNode(": " + c.detail));
          checkList.append(li);
        }
        const failed = body.checks.filter((c) => !c.ok).length;
        submitHint.textContent = failed ? failed + " check(s) failed: fix them before you start." : "Every check passed.";
        checksBox.hidden = false;
      } else {
        submitHint.textContent = "";
        formError.textContent = "The checks did not run: " +
          (body && body.error ? body.error : "MIG answered " + resp.status + " " + resp.statusText);
        formError.hidden = false;
      }
    } catch (e) {
      submitHint.textContent = "";
      formError.textContent = "Could not reach MIG: " + e.message + ". Check the connection and try again.";
      formError.hidden = false;
    }
    checkButton.disabled = false;
  });

  form.addEventListener("submit", async function (ev) {
    ev.preventDefault();
    if (!ready()) return;
    submit.disabled = true;
    submitHint.textContent = "Starting…";
    try {
      // From the origin, not relative: a page opened as http://user:pass@host/ would otherwise
      // build a URL with credentials, which fetch refuses. The browser still sends the
      // credentials it holds for this origin.
      const resp = await fetch(location.origin + route("start"), {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", [API.csrf_header]: csrf },
        body: JSON.stringify(request()),
      });
      let body = null;
      try { body = await resp.json(); } catch (_) { body = null; }
      if (resp.status === 202 && body && body.monitor_url) {
        submitHint.textContent = "Started; opening the monitor…";
        window.location.assign(body.monitor_url);
        return;
      }
      const why = body && body.error ? body.error : "MIG answered " + resp.status + " " + resp.statusText;
      const lead = {
        400: "MIG refused the request: ",
        403: "Not allowed: ",
        409: "Another operation is running: ",
        412: "A check failed, so nothing was started: ",
      }[resp.status] || "The operation did not start: ";
      formError.textContent = lead + why;
    } catch (e) {
      formError.textContent = "Could not reach MIG: " + e.message + ". Check the connection and try again.";
    }
    formError.hidden = false;
    submit.disabled = false;
    submitHint.textContent = "";
  });

  label();
})();
