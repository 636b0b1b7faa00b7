// IdentityMesh Admin UI. Pages are rendered by the server; this script only sends forms and
// buttons to the Admin API as JSON with the session's CSRF token, shows the API's answer (a
// problem with its field paths, a rule error marked at its position), and follows runs live.
// Data is only ever written with textContent.
"use strict";
(() => {
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";

  async function call(method, path, body, contentType) {
    const headers = { Accept: "application/json", "X-CSRF-Token": csrf };
    let payload;
    if (body !== undefined) {
      headers["Content-Type"] = contentType || "application/json";
      payload = contentType ? body : JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
    } catch (e) {
      return { ok: false, status: 0, data: { detail: `the server could not be reached (${e.message}); try again` } };
    }
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text.slice(0, 500) }; }
    return { ok: res.ok, status: res.status, data };
  }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  // The value at a path such as `object_types.people.flows[0].expression` in `root`.
  function at(root, path) {
    let v = root;
    for (const part of path.match(/[^.[\]]+/g) || []) {
      if (v === null || typeof v !== "object") return undefined;
      v = v[/^\d+$/.test(part) ? Number(part) : part];
    }
    return v;
  }

  // One entry of a problem's `errors`: the field path, and for an expression the text with
  // the character at the error's position marked.
  function errorItem(msg, form) {
    const li = el("li");
    const m = /^([A-Za-z_][\w.[\]-]*): (?:position (\d+): )?([\s\S]*)$/.exec(msg);
    if (!m) { li.textContent = msg; return li; }
    const [, path, pos, why] = m;
    li.append(el("code", path, "path"), document.createTextNode(pos ? ` at position ${pos}: ${why}` : `: ${why}`));
    const field = form && path.split(/[.[]/)[0];
    const input = field && form.querySelector(`[name="${field}"]`);
    if (input) input.setAttribute("aria-invalid", "true");
    if (pos && input && input.dataset.kind === "json") {
      let root;
      try { root = JSON.parse(input.value); } catch { root = undefined; }
      const src = at(root, path.slice(field.length + 1));
      if (typeof src === "string") {
        const p = Math.min(Number(pos), src.length);
        const chars = Array.from(src);
        const show = el("code", undefined, "expr");
        show.append(document.createTextNode(chars.slice(0, p).join("")),
          el("mark", chars[p] === undefined ? " " : chars[p]),
          document.createTextNode(chars.slice(p + 1).join("")));
        li.append(el("br"), show);
      }
    }
    return li;
  }

  function outcomeBox(from) {
    return from.querySelector(":scope > .outcome") || from.parentElement.querySelector(".outcome");
  }

  function showProblem(box, r, form) {
    if (!box) { alert(r.data?.detail || `failed (${r.status})`); return; }
    box.replaceChildren();
    box.className = "outcome problem";
    box.setAttribute("role", "alert");
    box.append(el("p", r.data?.detail || `The server answered ${r.status}.`));
    const errors = Array.isArray(r.data?.errors) ? r.data.errors : [];
    if (errors.length) {
      const ul = el("ul", undefined, "errors");
      for (const e of errors) ul.append(errorItem(String(e), form));
      box.append(ul);
    }
    box.focus?.();
  }

  function showAnswer(box, data) {
    box.replaceChildren();
    box.className = "outcome answer";
    box.removeAttribute("role");
    if (data && data.ok === false && data.error) box.append(el("p", `Failed: ${data.error}`, "bad"));
    box.append(el("pre", JSON.stringify(data, null, 2), "json"));
  }

  // `go:/connectors/{id}` → the path with the answer's fields filled in.
  function goal(how, data) {
    return how.slice(3).replace(/\{(\w+)\}/g, (_, k) => encodeURIComponent(data?.[k] ?? ""));
  }

  function then(how, data, box) {
    // Saved, with something that could not be checked now: say so before moving on.
    const warnings = Array.isArray(data?.warnings) ? data.warnings : [];
    if (warnings.length && box) {
      box.replaceChildren(el("p", "Saved, with warnings:"));
      box.className = "outcome warning";
      const ul = el("ul", undefined, "errors");
      for (const w of warnings) ul.append(el("li", String(w)));
      const next = how && how.startsWith("go:") ? goal(how, data) : location.pathname;
      const a = el("a", "Continue");
      a.href = next;
      box.append(ul, a);
      return;
    }
    if (!how || how === "reload") { location.reload(); return; }
    if (how === "show") { showAnswer(box, data); return; }
    if (how.startsWith("go:")) {
      location.assign(goal(how, data));
    }
  }

  function formBody(form) {
    const body = {};
    let path = form.dataset.api.split(" ")[1];
    for (const input of form.elements) {
      if (!input.name || input.disabled) continue;
      input.removeAttribute("aria-invalid");
      if ("inPath" in input.dataset) {
        path = path.replace(`{${input.name}}`, encodeURIComponent(input.value.trim()));
        continue;
      }
      if (input.type === "checkbox") { body[input.name] = input.checked; continue; }
      if (input.dataset.kind === "optional" && input.value === "") continue;
      if (input.dataset.kind === "json") {
        if (input.value.trim() === "") continue;
        try { body[input.name] = JSON.parse(input.value); } catch (e) {
          input.setAttribute("aria-invalid", "true");
          throw new Error(`${input.name}: not valid JSON (${e.message})`);
        }
        continue;
      }
      body[input.name] = input.value;
    }
    return { path, body };
  }

  document.addEventListener("submit", async (ev) => {
    const form = ev.target;
    if (form.matches("form[data-signin]")) {
      ev.preventDefault();
      const token = form.elements.token.value;
      const r = await call("POST", "/auth/login", new URLSearchParams({ token }).toString(),
        "application/x-www-form-urlencoded");
      if (r.ok) location.assign(form.dataset.signin || "/"); else showProblem(outcomeBox(form), r, form);
      return;
    }
    if (!form.matches("form[data-api]")) return;
    ev.preventDefault();
    const box = outcomeBox(form);
    let req;
    try { req = formBody(form); } catch (e) { showProblem(box, { status: 0, data: { detail: e.message } }, form); return; }
    const submit = form.querySelector('[type="submit"]');
    if (submit) submit.disabled = true;
    const r = await call(form.dataset.api.split(" ")[0], req.path, req.body);
    if (submit) submit.disabled = false;
    if (r.ok) then(form.dataset.then, r.data, box); else showProblem(box, r, form);
  });

  document.addEventListener("click", async (ev) => {
    const b = ev.target.closest("button[data-api], button[data-signout]");
    if (!b) return;
    if ("signout" in b.dataset) {
      const r = await call("POST", "/auth/logout");
      location.assign(r.ok && r.data?.end_session_url ? r.data.end_session_url : "/signin");
      return;
    }
    if (b.dataset.confirm && !confirm(b.dataset.confirm)) return;
    const [method, path] = b.dataset.api.split(" ");
    const body = b.dataset.body ? JSON.parse(b.dataset.body) : undefined;
    b.disabled = true;
    const r = await call(method, path, body);
    b.disabled = false;
    const box = outcomeBox(b.parentElement);
    if (r.ok) then(b.dataset.then, r.data, box); else showProblem(box, r);
  });

  // A new connector's config follows the kind until someone edits it.
  for (const kind of document.querySelectorAll("select[data-templates]")) {
    const templates = JSON.parse(kind.dataset.templates);
    const config = kind.form?.elements.config;
    kind.addEventListener("change", () => {
      if (config && Object.values(templates).includes(config.value)) config.value = templates[kind.value] || "";
    });
  }

  // Runs in progress: counts refreshed every second until the run ends.
  for (const row of document.querySelectorAll("[data-watch-run]")) {
    const id = row.dataset.watchRun;
    const tick = async () => {
      const r = await call("GET", `/api/runs/${encodeURIComponent(id)}`);
      if (!r.ok) return;
      for (const f of row.querySelectorAll("[data-field]")) {
        const v = at(r.data, f.dataset.field);
        if (v !== undefined) f.textContent = String(v);
      }
      if (r.data.status === "running") setTimeout(tick, 1000);
      else if ("reloadWhenDone" in row.dataset) location.reload();
    };
    setTimeout(tick, 1000);
  }
})();
