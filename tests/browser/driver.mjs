// Browser-test driver: playwright-core drives Debian's chromium (/usr/bin/chromium, never a
// downloaded browser) for the Rust tests (crates/test-support/src/browser.rs).
//
//   node driver.mjs --user-data-dir DIR --artifacts DIR [--chromium PATH] [--timeout-ms N]
//
// One browser context (a persistent one on the fresh DIR) lives as long as the driver, so a
// test can act on the servers between steps and the browser keeps its cookies. Protocol, one
// JSON object per line:
//   out: {"ready":true,"chromium":"<version>","browser_pids":[..],"args":[..]}  once, first
//   in:  {"id":N,"op":"<op>", ...}                                               one step
//   out: {"id":N,"op":"<op>","ok":true, ...result}   or   {"id":N,"ok":false,"error":"..."}
// Steps run one at a time, in order. A failed step is answered (with a screenshot of the page
// at that moment) and the driver waits for the next; end of input or {"op":"close"} closes the
// browser and exits 0. Diagnostics (page console, page errors, failed requests) go to stderr.
// The ops and their fields are listed at OPS below.

import { chromium } from 'playwright-core';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';

// The only chromium switches: the project's fixed set, the fresh profile, and the DevTools pipe
// playwright talks over (Playwright's own default switches are not used).
const FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
];

function parseArgs(argv) {
  const out = { chromium: '/usr/bin/chromium', timeoutMs: 30000 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = () => {
      if (i + 1 >= argv.length) fatal(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--user-data-dir') out.userDataDir = v();
    else if (a === '--artifacts') out.artifacts = v();
    else if (a === '--chromium') out.chromium = v();
    else if (a === '--timeout-ms') out.timeoutMs = Number(v());
    else fatal(`unknown argument ${a}`);
  }
  if (!out.userDataDir) fatal('--user-data-dir DIR is required (a fresh, empty folder)');
  if (!out.artifacts) fatal('--artifacts DIR is required (screenshots go there)');
  return out;
}

function fatal(msg) {
  process.stderr.write(`driver: ${msg}\n`);
  process.stdout.write(JSON.stringify({ ready: false, error: msg }) + '\n');
  process.exit(2);
}

function send(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function log(msg) {
  process.stderr.write(`driver: ${msg}\n`);
}

// Children of this process (the chromium the launch started): the Rust side stops their
// process groups if the driver itself is killed.
function childPids() {
  const pids = [];
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${d}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === process.pid) pids.push(Number(d));
    } catch {
      // the process ended meanwhile
    }
  }
  return pids;
}

const opts = parseArgs(process.argv.slice(2));
if (!fs.existsSync(opts.chromium)) {
  fatal(`${opts.chromium} not found: install Debian's chromium (apt-get install chromium, or run cargo xtask test)`);
}
if (fs.existsSync(opts.userDataDir) && fs.readdirSync(opts.userDataDir).length > 0) {
  fatal(`--user-data-dir ${opts.userDataDir} is not empty: each run needs a fresh profile`);
}
fs.mkdirSync(opts.userDataDir, { recursive: true });
fs.mkdirSync(opts.artifacts, { recursive: true });

const args = [...FLAGS, `--user-data-dir=${opts.userDataDir}`, '--remote-debugging-pipe', 'about:blank'];
let context;
try {
  context = await chromium.launchPersistentContext(opts.userDataDir, {
    executablePath: opts.chromium,
    headless: true,
    ignoreDefaultArgs: true,
    args,
    // The servers under test have self-signed loopback certificates; this is the DevTools
    // setting (Security.setIgnoreCertificateErrors), not a command-line switch.
    ignoreHTTPSErrors: true,
    viewport: { width: 1280, height: 900 },
    timeout: opts.timeoutMs,
    handleSIGINT: false,
    handleSIGTERM: false,
    handleSIGHUP: false,
  });
} catch (e) {
  fatal(`launching ${opts.chromium}: ${e.message}`);
}

let page = context.pages()[0] ?? (await context.newPage());
context.setDefaultTimeout(opts.timeoutMs);
context.setDefaultNavigationTimeout(opts.timeoutMs);
let browserClosed = false;
context.on('close', () => {
  browserClosed = true;
});
function watch(p) {
  p.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') log(`console.${m.type()}: ${m.text()}`);
  });
  p.on('pageerror', (e) => log(`page error: ${e.message}`));
  p.on('requestfailed', (r) => log(`request failed: ${r.method()} ${r.url()}: ${r.failure()?.errorText}`));
}
context.pages().forEach(watch);
context.on('page', watch);

let version = '';
try {
  version = context.browser()?.version() ?? '';
} catch {
  // persistent contexts may not expose the browser
}
send({ ready: true, chromium: version, browser_pids: childPids(), args });

let shots = 0;
function shotPath(name) {
  shots += 1;
  const safe = String(name).replace(/[^A-Za-z0-9._-]+/g, '-');
  return path.join(opts.artifacts, `${String(shots).padStart(2, '0')}-${safe}.png`);
}

// A target names one element: exactly one of selector (CSS or Playwright selector), label
// (its <label> text), placeholder, text (visible text), or role with name (accessible role and
// name, e.g. {"role":"button","name":"Sign In"}). Matches must be unique (strict).
function locate(s) {
  const exact = s.exact !== false;
  if (s.selector) return page.locator(s.selector);
  if (s.label) return page.getByLabel(s.label, { exact });
  if (s.placeholder) return page.getByPlaceholder(s.placeholder, { exact });
  if (s.role) return page.getByRole(s.role, s.name !== undefined ? { name: s.name, exact } : {});
  if (s.text) return page.getByText(s.text, { exact });
  throw new Error('the step names no element: give selector, label, placeholder, role (+name) or text');
}

async function bodyText() {
  return page.evaluate(() => (document.body ? document.body.innerText : ''));
}

function excerpt(t, n = 600) {
  t = t.replace(/\s+/g, ' ').trim();
  return t.length > n ? t.slice(0, n) + '…' : t;
}

function urlMatches(url, s) {
  if (s.contains !== undefined) return url.includes(s.contains);
  if (s.prefix !== undefined) return url.startsWith(s.prefix);
  if (s.regex !== undefined) return new RegExp(s.regex).test(url);
  throw new Error('wait_url needs contains, prefix or regex');
}

const OPS = {
  // {url, wait_until?: load|domcontentloaded|networkidle|commit} -> {url, status, title}
  async goto(s) {
    let r;
    for (let attempt = 0; ; attempt++) {
      try {
        r = await page.goto(s.url, { waitUntil: s.wait_until ?? 'load', timeout: s.timeout_ms });
        break;
      } catch (e) {
        // Chromium aborts a navigation when the host's interfaces change (a test harness
        // creating network namespaces beside it); the request never reached the server.
        if (attempt >= 2 || !String(e.message).includes('ERR_NETWORK_CHANGED')) throw e;
      }
    }
    return { url: page.url(), status: r ? r.status() : null, title: await page.title() };
  },
  // {<target>, value} -> {}
  async fill(s) {
    await locate(s).fill(String(s.value), { timeout: s.timeout_ms });
    return {};
  },
  // {<target>} -> {url} (the page's URL once the click's navigation, if any, has loaded)
  async click(s) {
    await locate(s).click({ timeout: s.timeout_ms });
    await page.waitForLoadState('load', { timeout: s.timeout_ms });
    return { url: page.url() };
  },
  // {key, <target>?} -> {}  (e.g. "Enter"; without a target, to the focused element)
  async press(s) {
    if (s.selector || s.label || s.placeholder || s.role || s.text) {
      await locate(s).press(s.key, { timeout: s.timeout_ms });
    } else {
      await page.keyboard.press(s.key);
    }
    return {};
  },
  // {contains | prefix | regex, timeout_ms?} -> {url}  waits until the page's URL matches
  async wait_url(s) {
    await page.waitForURL((u) => urlMatches(u.toString(), s), { timeout: s.timeout_ms, waitUntil: 'load' });
    return { url: page.url() };
  },
  // {text, timeout_ms?} -> {url}  waits until the text is visible on the page
  async wait_text(s) {
    try {
      await page.getByText(s.text, { exact: false }).first().waitFor({ state: 'visible', timeout: s.timeout_ms });
    } catch (e) {
      throw new Error(`text ${JSON.stringify(s.text)} not visible at ${page.url()}; the page says: ${excerpt(await bodyText())}`);
    }
    return { url: page.url() };
  },
  // {text, present: bool (default true), timeout_ms?} -> {url}
  // present: as wait_text. Absent: the page's text (document.body.innerText, once loaded) does
  // not contain it now.
  async expect_text(s) {
    if (s.present !== false) return OPS.wait_text(s);
    await page.waitForLoadState('load', { timeout: s.timeout_ms });
    const t = await bodyText();
    if (t.includes(s.text)) {
      throw new Error(`text ${JSON.stringify(s.text)} is on ${page.url()} but should not be; the page says: ${excerpt(t)}`);
    }
    return { url: page.url() };
  },
  // {<target>?} -> {text, url}  innerText of the element, or of the whole page
  async text(s) {
    const has = s.selector || s.label || s.placeholder || s.role || s.text;
    const t = has ? await locate(s).innerText({ timeout: s.timeout_ms }) : await bodyText();
    return { text: t, url: page.url() };
  },
  // {} -> {url, title}
  async url() {
    return { url: page.url(), title: await page.title() };
  },
  // {name, full_page?: bool (default true)} -> {path}  <artifacts>/NN-name.png
  async screenshot(s) {
    const p = shotPath(s.name ?? 'page');
    await page.screenshot({ path: p, fullPage: s.full_page !== false, timeout: s.timeout_ms });
    return { path: p };
  },
  // {url (absolute or relative to the page), method?, headers?, body? (string, or JSON which is
  // sent as application/json)} -> {status, url, body, json}
  // fetch() run in the page: the page's origin, its cookies (credentials: same-origin).
  async fetch(s) {
    return page.evaluate(async (s) => {
      const init = { method: s.method ?? 'GET', headers: { ...(s.headers ?? {}) }, credentials: 'same-origin' };
      if (s.body !== undefined && s.body !== null) {
        if (typeof s.body === 'string') init.body = s.body;
        else {
          init.body = JSON.stringify(s.body);
          init.headers['content-type'] = init.headers['content-type'] ?? 'application/json';
        }
      }
      const r = await fetch(s.url, init);
      const body = await r.text();
      let json = null;
      try {
        json = JSON.parse(body);
      } catch {
        // not JSON
      }
      return { status: r.status, url: r.url, body, json };
    }, s);
  },
  // {expression} -> {value}  a JavaScript expression evaluated in the page (promises awaited)
  async eval(s) {
    return { value: await page.evaluate(s.expression) };
  },
  // {urls?: [..]} -> {cookies: [{name, value, domain, path, secure, httpOnly, sameSite, expires}]}
  async cookies(s) {
    return { cookies: await context.cookies(s.urls) };
  },
  // {} -> {url}  a new tab in the same context (same cookies); later steps act on it
  async new_page() {
    page = await context.newPage();
    return { url: page.url() };
  },
  // {} -> {closed: true}; the driver then exits 0
  async close() {
    return { closed: true };
  },
};

async function step(line) {
  let s;
  try {
    s = JSON.parse(line);
  } catch (e) {
    return { id: null, ok: false, error: `not a JSON step: ${e.message}: ${line.slice(0, 200)}` };
  }
  const base = { id: s.id ?? null, op: s.op };
  const fn = Object.prototype.hasOwnProperty.call(OPS, s.op) ? OPS[s.op] : null;
  if (!fn) return { ...base, ok: false, error: `unknown op ${JSON.stringify(s.op)}; ops: ${Object.keys(OPS).join(', ')}` };
  if (browserClosed) return { ...base, ok: false, error: 'the browser has closed (crashed or was killed)' };
  const t0 = Date.now();
  try {
    const r = await fn(s);
    return { ...base, ok: true, ms: Date.now() - t0, ...r };
  } catch (e) {
    const out = { ...base, ok: false, ms: Date.now() - t0, error: String(e && e.message ? e.message : e) };
    try {
      out.url = page.url();
      const p = shotPath(`failed-${s.op}`);
      await page.screenshot({ path: p, fullPage: true, timeout: 5000 });
      out.screenshot = p;
    } catch {
      // no page to show
    }
    return out;
  }
}

async function shutdown(code) {
  try {
    await context.close();
  } catch (e) {
    log(`closing the browser: ${e.message}`);
  }
  process.exit(code);
}

const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of rl) {
  if (!line.trim()) continue;
  const r = await step(line);
  send(r);
  if (r.ok && r.op === 'close') break;
}
await shutdown(0);
