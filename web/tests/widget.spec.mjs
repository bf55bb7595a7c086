// Browser test of the support widget: the real server binary, the built widget, the demo page,
// headless Debian Chromium driven by playwright-core (no browser download).
//
//   node web/tests/widget.spec.mjs          (after `npm run build` in web/ and `cargo build`)
//
// Environment: DLLM_BIN (the dllm-chat binary; default target/debug/dllm-chat),
// CHROMIUM (default /usr/bin/chromium), DLLM_SCREENSHOTS (also save the screenshots there).
// tests/widget.rs runs it as part of `cargo test`.
//
// Checks, in order (each throws on failure):
//  1. the host page's CSS does not reach the widget (Shadow DOM);
//  2. a question gets one bubble keyed by response_id: a thinking state, at least two revisions
//     with masked placeholders replacing the content of the *same* element, aria-busy and outside
//     the log while streaming, then the final markdown text moved into role="log" once;
//  3. a reload restores the history (session.resume) without duplicates;
//  4. a reload while a reply runs continues that reply in its bubble (`running`);
//  5. going offline mid-reply shows the reconnecting banner; a message typed meanwhile waits in
//     the outbox; back online the widget reconnects at once, the reply and the queued message
//     complete, nothing is shown twice;
//  6. a socket cut right after the server stored a message (its message.accepted never arrives):
//     the widget resends it with the same client_message_id, the server answers duplicate:true
//     and the message and its reply are shown once;
//  7. the stop button (response.cancel), the keyboard (Escape closes), the unread badge, the JS API (open / close / events);
//     embedding from another origin under a strict CSP; markdown sanitized, links in a new tab;
//  7b. a rate_limited message: the error in plain words, "Try again" resends it, shown once;
//  8. screenshots with the bundled Northwind model: mid-reply, final, reconnecting, closed with
//     an unread badge, phone 390x844 (full screen), phone in dark mode with German strings.

import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, copyFileSync, existsSync } from "node:fs";
import { createServer as createHttpServer } from "node:http";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../..");
const webDir = resolve(repo, "web/dist");
const bin = process.env.DLLM_BIN || resolve(repo, "target/debug/dllm-chat");
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const shotsDir = mkdtempSync(join(tmpdir(), "dllm-widget-shots-"));
const extraShots = process.env.DLLM_SCREENSHOTS;

const children = [];
let browser;

function check(condition, message, detail) {
  if (!condition) {
    const extra = detail === undefined ? "" : `\n${typeof detail === "string" ? detail : JSON.stringify(detail, null, 2)}`;
    throw new Error(`check failed: ${message}${extra}`);
  }
  console.log(`ok - ${message}`);
}

async function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
    s.on("error", fail);
  });
}

async function startServer(model, env = {}) {
  for (const f of ["widget.js", "index.html"]) {
    if (!existsSync(join(webDir, f))) throw new Error(`${join(webDir, f)} is missing: run npm run build in web/`);
  }
  if (!existsSync(bin)) throw new Error(`${bin} is missing: run cargo build (or set DLLM_BIN)`);
  const port = await freePort();
  const child = spawn(bin, ["serve", "--bind", `127.0.0.1:${port}`, "--model", model], {
    cwd: repo,
    env: { ...process.env, DLLM_SERVER__WEB_DIR: webDir, DLLM_STORE__URL: "memory", RUST_LOG: "warn", ...env },
    stdio: ["ignore", "inherit", "inherit"],
  });
  children.push(child);
  const base = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`the server exited with ${child.exitCode}`);
    try {
      const r = await fetch(`${base}/ready`);
      if (r.ok) return { base, child };
    } catch {
      /* not listening yet */
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error("the server did not become ready in 60 s");
}

function stop(child) {
  if (child.exitCode === null) child.kill("SIGTERM");
}

/** The widget's shadow root content, queried from the page. */
const W = "#dllm-chat-widget";

/** Records every state of every reply bubble (element identity, revision, text, placement). */
async function observeReplies(page) {
  await page.waitForFunction(() => document.querySelector("#dllm-chat-widget")?.shadowRoot);
  await page.evaluate(() => {
    const root = document.querySelector("#dllm-chat-widget").shadowRoot;
    const ids = new WeakMap();
    let next = 1;
    window.__replies = [];
    const record = () => {
      for (const el of root.querySelectorAll("[data-response-id]")) {
        if (!ids.has(el)) ids.set(el, next++);
        const entry = {
          rid: el.dataset.responseId,
          el: ids.get(el),
          revision: Number(el.dataset.revision),
          text: el.querySelector(".body").textContent,
          masked: el.querySelectorAll(".masked i").length,
          thinking: !!el.querySelector(".dots"),
          busy: el.getAttribute("aria-busy"),
          inLog: !!el.closest('[role="log"]'),
          inLive: !!el.closest("[aria-live]"),
          status: el.dataset.status || null,
        };
        const last = window.__replies.filter((o) => o.rid === entry.rid).at(-1);
        if (!last || JSON.stringify({ ...last, t: 0 }) !== JSON.stringify({ ...entry, t: 0 })) {
          window.__replies.push({ ...entry, t: performance.now() });
        }
      }
    };
    new MutationObserver(record).observe(root, { subtree: true, childList: true, attributes: true, characterData: true });
  });
}

/** Waits until a running reply shows a revision with masked positions. */
async function waitMidReply(page) {
  await page.waitForFunction(() => document.querySelector("#dllm-chat-widget").shadowRoot.querySelector('.live [data-revision]:not([data-revision="0"]) .masked'));
}

/** Reloads the page while the reply caught by waitMidReply runs, and watches the reloaded
 *  widget. The server process is stopped (SIGSTOP) except while it serves the page and the
 *  widget's script, so the reply is still running when the widget resumes the session, however
 *  fast this machine decodes. The page itself comes from the server: Chromium lets only a page
 *  served from a local address open a socket to one. */
async function reloadMidReply(page, child) {
  const ours = (url) => url.pathname === "/" || url.pathname === "/widget.js";
  child.kill("SIGSTOP");
  await page.route(ours, async (route) => {
    child.kill("SIGCONT");
    if (route.request().resourceType() === "document") return route.continue();
    const response = await route.fetch();
    child.kill("SIGSTOP");
    return route.fulfill({ response });
  });
  try {
    await page.reload();
    await observeReplies(page);
  } finally {
    child.kill("SIGCONT");
    await page.unroute(ours);
  }
}

/** Clicks the stop button with the server stopped, so the reply caught by waitMidReply is still
 *  running when the cancel reaches the server. */
async function stopMidReply(page, child) {
  child.kill("SIGSTOP");
  try {
    await page.locator(`${W} .stop`).click();
  } finally {
    child.kill("SIGCONT");
  }
}

async function conversation(page) {
  return page.evaluate(() => {
    const root = document.querySelector("#dllm-chat-widget").shadowRoot;
    const log = root.querySelector('[role="log"]');
    return {
      log: [...log.children].map((el) => ({
        role: el.classList.contains("user") ? "user" : "assistant",
        id: el.dataset.id || null,
        rid: el.dataset.responseId || null,
        status: el.dataset.status || null,
        text: el.querySelector(".body")?.textContent ?? "",
      })),
      live: root.querySelector(".live").children.length,
      queue: [...root.querySelector(".queue").children].map((el) => el.textContent),
      banner: !root.querySelector(".banner").hidden,
    };
  });
}

async function ask(page, text) {
  const input = page.locator(`${W} textarea`);
  await input.fill(text);
  await input.press("Enter");
}

/** Waits until the log holds `n` finished assistant messages. */
async function waitAnswers(page, n, timeout = 60_000) {
  try {
    await waitAnswersOnly(page, n, timeout);
  } catch (e) {
    await save(page, `failure-${Date.now()}.png`).catch(() => {});
    console.error("the conversation when it failed:", JSON.stringify(await conversation(page).catch(() => null), null, 2));
    throw e;
  }
}

async function waitAnswersOnly(page, n, timeout) {
  await page.waitForFunction(
    (n) => {
      const log = document.querySelector("#dllm-chat-widget").shadowRoot.querySelector('[role="log"]');
      return [...log.children].filter((el) => el.classList.contains("bot") && el.dataset.status).length >= n;
    },
    n,
    { timeout },
  );
}

function assertNoDuplicates(conv, users, answers, what) {
  const u = conv.log.filter((m) => m.role === "user");
  const a = conv.log.filter((m) => m.role === "assistant");
  check(u.length === users && a.length === answers, `${what}: ${users} user and ${answers} assistant messages, each once`, conv);
  const ids = conv.log.map((m) => m.id).filter(Boolean);
  check(new Set(ids).size === ids.length, `${what}: no message id shown twice`, conv);
  check(new Set(u.map((m) => m.text)).size === u.length, `${what}: no user text shown twice`, conv);
}

async function newContext(options = {}) {
  return browser.newContext({ viewport: { width: 1280, height: 820 }, ...options });
}

/** Patches the demo page's dllmChatSettings, e.g. a slow decode (one position per step) so
 *  the test can act while a reply runs. */
async function overrideSettings(context, patch) {
  await context.addInitScript((patch) => {
    let value;
    Object.defineProperty(window, "dllmChatSettings", {
      configurable: true,
      get: () => value,
      set: (v) => (value = { ...v, ...patch }),
    });
  }, patch);
}

async function slowReplies(context, options) {
  await overrideSettings(context, { options });
}

async function save(page, name) {
  const path = join(shotsDir, name);
  await page.screenshot({ path });
  if (extraShots) {
    mkdirSync(extraShots, { recursive: true });
    copyFileSync(path, join(extraShots, name));
  }
  console.log(`screenshot ${path}`);
}

async function mechanics() {
  const { base, child } = await startServer("builtin:fixture");
  const context = await newContext();
  const slow = { policy: "fixed", max_tokens: 96, steps: 96, block_length: 96 };
  await slowReplies(context, slow);
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(base);
  await page.locator(`${W} .launcher`).waitFor();

  // 1. Shadow DOM: the shop styles every button in uppercase Georgia; the widget's are untouched.
  const style = await page.evaluate(() => {
    const b = document.querySelector("#dllm-chat-widget").shadowRoot.querySelector(".send");
    const s = getComputedStyle(b);
    return { transform: s.textTransform, font: s.fontFamily };
  });
  check(style.transform === "none" && !/georgia/i.test(style.font), "the host page's CSS does not reach the widget", style);

  const ready = waitReady(page);
  await page.locator(`${W} .launcher`).click();
  await page.locator(`${W} .panel`).waitFor({ state: "visible" });
  const focused = await page.evaluate(() => document.querySelector("#dllm-chat-widget").shadowRoot.activeElement?.tagName);
  check(focused === "TEXTAREA", "opening the panel focuses the message box", focused);
  const inputFont = await page.evaluate(() => parseFloat(getComputedStyle(document.querySelector("#dllm-chat-widget").shadowRoot.querySelector("textarea")).fontSize));
  check(inputFont >= 16, "the message box has a font of at least 16 px (no zoom on iOS)", inputFont);
  await ready;

  // 2. One bubble per reply, replaced in place by every revision.
  await observeReplies(page);
  const messages = page.evaluate(() => new Promise((ok) => {
    const seen = [];
    window.dllmChat.on("message", (m) => {
      seen.push(m);
      if (m.role === "assistant") ok(seen);
    });
  }));
  await ask(page, "Where is my order NW-12345?");
  await waitAnswers(page, 1);
  const states = await page.evaluate(() => window.__replies);
  const rids = [...new Set(states.map((s) => s.rid))];
  check(rids.length === 1, "one reply bubble for one question", rids);
  const elements = new Set(states.map((s) => s.el));
  check(elements.size === 1, "every state of the reply is the same DOM element", states);
  check(states[0].thinking && states[0].revision === 0, "a thinking indicator shows before the first revision", states[0]);
  const streamed = states.filter((s) => s.revision > 0 && s.busy === "true");
  const revisions = new Set(streamed.map((s) => s.revision));
  check(revisions.size >= 2, `at least two revisions replaced the bubble's content (saw ${revisions.size})`, streamed.slice(0, 5));
  check(streamed.some((s) => s.masked > 0), "masked positions are drawn as placeholder blocks", streamed.slice(0, 3));
  check(streamed.every((s) => !s.inLog && !s.inLive), "the streaming bubble is aria-busy and outside any live region", streamed.slice(0, 3));
  const final = states.at(-1);
  check(final.status === "completed" && final.inLog && final.busy === null && final.masked === 0 && final.text.length > 0,
    "the final text is in the log, not busy, with no placeholders", final);
  const entered = states.filter((s, i) => s.inLog && (i === 0 || !states[i - 1].inLog)).length;
  check(entered === 1, "the final reply entered the log exactly once (announced once)", entered);
  const seen = await messages;
  check(seen.length === 2 && seen[0].role === "user" && seen[1].responseId === final.rid && seen[1].text.length > 0, "dllmChat 'message' events for the question and the answer", seen);
  const before = await conversation(page);
  assertNoDuplicates(before, 1, 1, "after the first answer");
  const sessionId = await page.evaluate(() => Object.entries(localStorage).find(([k]) => k.endsWith(":session"))?.[1]);
  check(/^"sess_/.test(sessionId || ""), "the session id is kept in localStorage", sessionId);

  // 3. A reload restores the history.
  await page.reload();
  await page.locator(`${W} .panel`).waitFor({ state: "visible" }); // it was open: it stays open
  await waitAnswers(page, 1);
  const restored = await conversation(page);
  assertNoDuplicates(restored, 1, 1, "after a reload");
  check(restored.log[0].text === before.log[0].text && restored.log[1].text === before.log[1].text,
    "the reload shows the same conversation", { before: before.log, restored: restored.log });

  // 4. A reload while a reply runs: the reply continues after it.
  await ask(page, "Do gift cards expire?");
  await waitMidReply(page);
  await reloadMidReply(page, child);
  await waitAnswers(page, 2);
  const resumed = await page.evaluate(() => window.__replies);
  check(resumed.some((s) => s.busy === "true" && s.revision > 0 && s.masked > 0),
    "after the reload the running reply continued streaming in its bubble", resumed.slice(0, 3));
  check(new Set(resumed.map((s) => s.el)).size === 1, "the continued reply stayed one element", resumed);
  assertNoDuplicates(await conversation(page), 2, 2, "after a reload mid-reply");

  // 5. Offline mid-reply: banner; a message typed meanwhile is queued; online again: all once.
  await observeReplies(page);
  await ask(page, "How do I return boots that don't fit?");
  await waitMidReply(page);
  await context.setOffline(true);
  await page.locator(`${W} .banner`).waitFor({ state: "visible", timeout: 10_000 });
  check(true, "going offline shows the reconnecting banner");
  await ask(page, "Is there a store in Denver?");
  const offline = await conversation(page);
  check(offline.queue.length === 1 && offline.queue[0].includes("Denver"), "a message typed offline waits in the outbox", offline);
  await page.waitForTimeout(1500);
  const t0 = Date.now();
  await context.setOffline(false);
  await page.locator(`${W} .banner`).waitFor({ state: "hidden", timeout: 10_000 });
  check(Date.now() - t0 < 5000, `back online, the widget reconnected at once (${Date.now() - t0} ms)`);
  await waitAnswers(page, 4);
  const after = await conversation(page);
  assertNoDuplicates(after, 4, 4, "after going offline and back");
  check(after.queue.length === 0 && after.live === 0, "nothing left queued or streaming", after);
  check(after.log.every((m) => m.role === "user" || m.status === "completed"), "every reply completed", after.log);

  // The stop button cancels the running reply.
  await ask(page, "Tell me about your tents");
  await waitMidReply(page);
  await stopMidReply(page, child);
  await waitAnswers(page, 5);
  const stopped = (await conversation(page)).log.at(-1);
  check(stopped.status === "cancelled" && (await page.locator(`${W} [role="log"] .msg.bot:last-child .meta`).textContent()) === "Stopped",
    "the stop button sends response.cancel; the reply ends as stopped", stopped);

  // 7. The keyboard, the unread badge and the JS API.
  await ask(page, "Can I change my delivery address?");
  await page.keyboard.press("Escape");
  await page.locator(`${W} .panel`).waitFor({ state: "hidden" });
  check(true, "Escape closes the panel");
  await waitAnswers(page, 6);
  const badge = await page.evaluate(() => {
    const root = document.querySelector("#dllm-chat-widget").shadowRoot;
    const b = root.querySelector(".badge");
    return { hidden: b.hidden, text: b.textContent, label: root.querySelector(".launcher").getAttribute("aria-label") };
  });
  check(!badge.hidden && badge.text === "1" && /1 unread/.test(badge.label), "a reply that finished while closed shows an unread badge", badge);
  await page.evaluate(() => window.dllmChat.open());
  await page.locator(`${W} .panel`).waitFor({ state: "visible" });
  check(await page.locator(`${W} .badge`).isHidden(), "opening clears the badge");
  await page.evaluate(() => window.dllmChat.close());
  await page.locator(`${W} .panel`).waitFor({ state: "hidden" });
  check(true, "dllmChat.open() and close() work");
  // setUser on a session that already exists: stored as its metadata.user (session.update).
  await page.evaluate(() => window.dllmChat.setUser({ id: "u-42", name: "Ada", email: "ada@example.com" }));
  let metadata = {};
  for (let i = 0; i < 50 && metadata.user?.id !== "u-42"; i++) {
    await page.waitForTimeout(100);
    metadata = (await storedSession(page, base)).metadata ?? {};
  }
  check(metadata.user?.id === "u-42" && metadata.user?.name === "Ada" && metadata.user?.email === "ada@example.com" && metadata.page === "/",
    "dllmChat.setUser() stores the user in the session's metadata", metadata);
  check(errors.length === 0, "no page errors", errors);
  await context.close();

  // 6. The socket dies right after the server stored a message: its message.accepted is lost.
  await duplicateResend(base);
  await strictCsp(base);
  await sanitizedMarkdown(base);
  stop(child);
}

/** Final text is markdown through DOMPurify: formatting kept, scripts gone, links in a new tab. */
async function sanitizedMarkdown(base) {
  const context = await newContext();
  const page = await context.newPage();
  let toPage;
  await page.routeWebSocket(/\/v1\/chat/, (ws) => {
    const server = ws.connectToServer();
    ws.onMessage((m) => server.send(m));
    server.onMessage((m) => ws.send(m));
    toPage = ws;
  });
  await page.goto(base);
  await page.locator(`${W} .launcher`).click();
  await waitReady(page);
  // A reply as a hostile or confused model might write it, injected as server frames.
  const text = '**Bold** and a [size guide](https://example.com/sizes). <img src=x onerror="window.__xss=1"><script>window.__xss=2</script>';
  const rid = "resp_markdown_test";
  toPage.send(JSON.stringify({ type: "response.created", response_id: rid, session_id: "s", message_id: "m" }));
  toPage.send(JSON.stringify({ type: "response.revision", response_id: rid, revision: 1, step: 1, text: "**Bold** ░░ ░ [size ░░░░░", masked: 5 }));
  toPage.send(JSON.stringify({ type: "response.done", response_id: rid, status: "completed", text, usage: {}, timings: {} }));
  await waitAnswers(page, 1);
  const html = await page.evaluate((rid) => {
    const el = document.querySelector("#dllm-chat-widget").shadowRoot.querySelector(`[data-response-id="${rid}"] .body`);
    const a = el.querySelector("a");
    return { strong: !!el.querySelector("strong"), href: a?.href, target: a?.target, rel: a?.rel,
      img: el.querySelector("img")?.outerHTML ?? null, script: !!el.querySelector("script"), xss: window.__xss ?? null };
  }, rid);
  check(html.strong && html.href === "https://example.com/sizes" && html.target === "_blank" && /noopener/.test(html.rel),
    "the final text is rendered as markdown; links open in a new tab with rel=noopener", html);
  check(!html.script && html.xss === null && (html.img === null || !/onerror/.test(html.img)),
    "markup in a reply is sanitized (no script, no event handlers)", html);
  await context.close();
}

/** Resolves with the widget's `ready` event, or fails after 20 s. */
async function waitReady(page) {
  const ready = page.evaluate(() => new Promise((ok) => window.dllmChat.on("ready", ok)));
  const late = new Promise((_, fail) => setTimeout(() => fail(new Error("the widget was not ready in 20 s")), 20_000));
  return Promise.race([ready, late]);
}

/** Another site (another origin) with the strict CSP README documents embeds the widget. */
async function strictCsp(base) {
  const ws = base.replace("http", "ws");
  const csp = `default-src 'none'; script-src ${base}; connect-src ${ws}`;
  const shop = createHttpServer((_, res) => {
    res.writeHead(200, { "content-type": "text/html", "content-security-policy": csp });
    res.end(`<!doctype html><title>Another shop</title><h1>Another shop</h1><script src="${base}/widget.js" async></script>`);
  });
  await new Promise((ok) => shop.listen(0, "127.0.0.1", ok));
  const context = await newContext();
  const page = await context.newPage();
  const violations = [];
  page.on("console", (m) => /Content Security Policy|ERR_BLOCKED/i.test(m.text()) && violations.push(m.text()));
  try {
    await page.goto(`http://127.0.0.1:${shop.address().port}/`);
    await page.locator(`${W} .launcher`).waitFor();
    const position = await page.evaluate(() => getComputedStyle(document.querySelector("#dllm-chat-widget").shadowRoot.querySelector(".launcher")).position);
    await page.locator(`${W} .launcher`).click();
    const ready = await waitReady(page);
    check(position === "fixed" && /^sess_/.test(ready.sessionId) && violations.length === 0,
      `another origin under "${csp}": the widget is styled and connects to its own origin, no CSP violation`, { position, violations });
  } finally {
    await context.close();
    shop.close();
  }
}

/** What the server stored for the page's session (`session.resumed`), asked on a socket of our own. */
async function storedSession(page, base) {
  return page.evaluate(async (base) => {
    const sid = JSON.parse(Object.entries(localStorage).find(([k]) => k.endsWith(":session"))[1]);
    const ws = new WebSocket(base.replace("http", "ws") + "/v1/chat");
    await new Promise((ok) => (ws.onopen = ok));
    ws.send(JSON.stringify({ type: "session.resume", session_id: sid }));
    const e = await new Promise((ok) => (ws.onmessage = (m) => ok(JSON.parse(m.data))));
    ws.close();
    return e;
  }, base);
}

async function duplicateResend(base) {
  const context = await newContext();
  const page = await context.newPage();
  const fromServer = [];
  let cut = false;
  await page.routeWebSocket(/\/v1\/chat/, (ws) => {
    const server = ws.connectToServer();
    ws.onMessage((m) => server.send(m));
    server.onMessage((m) => {
      const event = JSON.parse(m);
      fromServer.push(event);
      if (!cut && event.type === "message.accepted") {
        cut = true; // stored on the server; the widget never hears it
        ws.close();
        server.close();
        return;
      }
      ws.send(m);
    });
  });
  await page.goto(base);
  await page.locator(`${W} .launcher`).click();
  await waitReady(page);
  await ask(page, "What are your opening hours?");
  await waitAnswers(page, 1);
  await page.waitForFunction(() => document.querySelector("#dllm-chat-widget").shadowRoot.querySelector(".queue").children.length === 0);
  const accepted = fromServer.filter((e) => e.type === "message.accepted");
  check(cut && accepted.length === 2 && accepted[1].duplicate === true && accepted[0].message_id === accepted[1].message_id,
    "the resend after the cut carried the same client_message_id (the server said duplicate: true)", accepted);
  const stored = (await storedSession(page, base)).messages.map((m) => ({ role: m.role, status: m.status }));
  check(stored.length === 2 && stored[0].role === "user" && stored[1].status === "completed",
    "the server stored the message and its reply once", stored);
  assertNoDuplicates(await conversation(page), 1, 1, "after the lost message.accepted");
  await context.close();
}

/** A refused message shows its error in plain words; "Try again" resends it, shown once. */
async function rateLimited() {
  // One message at once, one more every ten seconds.
  const { base, child } = await startServer("builtin:fixture", {
    DLLM_LIMITS__MESSAGE_BURST: "1",
    DLLM_LIMITS__MESSAGES_PER_MINUTE: "6",
  });
  const context = await newContext();
  const page = await context.newPage();
  await page.goto(base);
  await page.locator(`${W} .launcher`).click();
  await waitReady(page);
  await page.evaluate(() => window.dllmChat.on("error", (e) => (window.__errors = [...(window.__errors || []), e])));
  const first = Date.now();
  await ask(page, "Do gift cards expire?");
  await waitAnswers(page, 1);
  await ask(page, "And store credit?");
  const error = page.locator(`${W} .queue .error[data-code="rate_limited"]`);
  await error.waitFor({ timeout: 10_000 });
  const text = await error.textContent();
  check(/too quickly/.test(text) && (await page.evaluate(() => window.__errors?.[0]?.code)) === "rate_limited",
    "rate_limited is shown in plain words and reaches dllmChat.on('error')", text);
  await save(page, "widget-error.png");
  await page.waitForTimeout(Math.max(0, first + 11_000 - Date.now()));
  await error.locator("button.retry").click();
  await waitAnswers(page, 2);
  const conv = await conversation(page);
  assertNoDuplicates(conv, 2, 2, "after 'Try again'");
  check(conv.queue.length === 0, "the retried message left the outbox", conv);
  await context.close();
  stop(child);
}

/** A reply that hands over to a person is drawn as one, live and after a reload. */
async function handover(base) {
  const context = await newContext();
  const page = await context.newPage();
  await page.goto(base);
  await page.locator(`${W} .launcher`).click();
  await waitReady(page);
  await ask(page, "Can I talk to a human?");
  await waitAnswers(page, 1);
  const note = `${W} [role="log"] .msg.bot.handover .handover-note`;
  const shown = await page.locator(note).textContent({ timeout: 1000 }).catch(() => null);
  check(/a person will reply/.test(shown ?? ""), "a hand-over reply is shown as a hand-over", { shown, conv: await conversation(page) });
  await save(page, "widget-handover.png");
  await page.reload();
  await page.locator(`${W} .launcher`).click();
  await waitReady(page);
  await waitAnswers(page, 1);
  check((await page.locator(note).count()) === 1, "the restored history shows the hand-over too");
  await context.close();
}

async function screenshots() {
  const { base, child } = await startServer("builtin:northwind");
  for (const [name, options] of [
    ["desktop", {}],
    ["phone", { viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true }],
    ["phone-dark", { viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true, colorScheme: "dark" }],
  ]) {
    const context = await newContext(options);
    await overrideSettings(context, {
      options: { policy: "fixed", max_tokens: 48, steps: 24 },
      ...(name === "phone-dark" ? { darkMode: "auto", locale: "de", position: "left" } : {}),
    });
    const page = await context.newPage();
    // Hold the server's frames once a revision with masked positions arrived, so the screenshot
    // shows a real mid-reply state of the bundled model; then let the rest through.
    let armed = false;
    let hold = false;
    let held = [];
    let release;
    const midReply = new Promise((ok) => (release = ok));
    await page.routeWebSocket(/\/v1\/chat/, (ws) => {
      const server = ws.connectToServer();
      ws.onMessage((m) => server.send(m));
      server.onMessage((m) => {
        if (hold) return held.push(m);
        ws.send(m);
        const e = JSON.parse(m);
        if (armed && e.type === "response.revision" && e.revision >= 3 && e.masked > 4) {
          hold = true;
          armed = false;
          release(() => {
            hold = false;
            for (const h of held) ws.send(h);
            held = [];
          });
        }
      });
    });
    await page.goto(base);
    await page.locator(`${W} .launcher`).click();
    await waitReady(page);
    if (name === "desktop") {
      await ask(page, "Do gift cards expire?");
      await waitAnswers(page, 1);
      armed = true;
      await ask(page, "Where is my order NW-12345?");
      const go = await midReply;
      await page.waitForTimeout(300);
      await save(page, "widget-mid-reply.png");
      go();
      await waitAnswers(page, 2);
      await save(page, "widget-final.png");
      await page.context().setOffline(true);
      await page.locator(`${W} .banner`).waitFor({ state: "visible" });
      await save(page, "widget-reconnecting.png");
      await page.context().setOffline(false);
      await page.locator(`${W} .banner`).waitFor({ state: "hidden" });
      await ask(page, "What size pack do I need for three days?");
      await page.evaluate(() => window.dllmChat.close());
      await waitAnswers(page, 3);
      await page.mouse.move(0, 0);
      await save(page, "widget-closed-unread.png");
    } else {
      const geometry = await page.evaluate(() => {
        const panel = document.querySelector("#dllm-chat-widget").shadowRoot.querySelector(".panel").getBoundingClientRect();
        return { width: panel.width, height: panel.height, vw: innerWidth, vh: innerHeight };
      });
      check(geometry.width === geometry.vw && Math.abs(geometry.height - geometry.vh) <= 1,
        `${name}: below 670 px the panel fills the screen`, geometry);
      await ask(page, name === "phone" ? "How do I return boots that don't fit?" : "Do gift cards expire?");
      await waitAnswers(page, 1);
      await save(page, `widget-${name}.png`);
    }
    await context.close();
  }
  await handover(base);
  stop(child);
}

try {
  browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  await mechanics();
  await rateLimited();
  await screenshots();
  console.log(`screenshots in ${shotsDir}${extraShots ? ` and ${extraShots}` : ""}`);
  console.log("all widget checks passed");
} catch (e) {
  console.error(e);
  process.exitCode = 1;
} finally {
  await browser?.close();
  for (const c of children) stop(c);
}
