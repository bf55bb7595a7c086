// Browser test of the latency dashboard: the real server binary (admin and user keys), the
// built /dashboard page, headless Debian Chromium driven by playwright-core.
//
//   node web/tests/dashboard.spec.mjs       (after `npm run build` in web/ and `cargo build`)
//
// Environment as for widget.spec.mjs: DLLM_BIN, CHROMIUM, DLLM_SCREENSHOTS.
// tests/widget.rs runs it as part of `cargo test`.
//
// Checks: without a key the page says an admin key is needed (the feed refused it); a user key
// is refused too; with the admin key typed into the page (kept in localStorage) the feed is
// live; after replies through /v1/chat every chart draws non-empty series (latency quantiles,
// queue wait, steps, tokens, load, connections) and the tiles show the traffic; screenshots on a
// desktop and a phone (390x844, no horizontal scrolling).

import { spawn } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
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
const shotsDir = mkdtempSync(join(tmpdir(), "dllm-dashboard-shots-"));
const extraShots = process.env.DLLM_SCREENSHOTS;

const ADMIN_KEY = "dk_dashboard-admin-key-00000001";
const USER_KEY = "dk_dashboard-user-key-000000002";

let browser;
let child;

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

async function startServer() {
  for (const f of ["dashboard.js", "dashboard.html"]) {
    if (!existsSync(join(webDir, f))) throw new Error(`${join(webDir, f)} is missing: run npm run build in web/`);
  }
  const config = join(shotsDir, "config.toml");
  writeFileSync(
    config,
    `[auth]\nallow_query_key = true\n\n[[auth.keys]]\nname = "ops"\nkey = "${ADMIN_KEY}"\nadmin = true\n\n` +
      `[[auth.keys]]\nname = "widget"\nkey = "${USER_KEY}"\n`,
  );
  const port = await freePort();
  child = spawn(bin, ["serve", "--bind", `127.0.0.1:${port}`, "--model", "builtin:fixture"], {
    cwd: repo,
    env: { ...process.env, DLLM_CONFIG: config, DLLM_SERVER__WEB_DIR: webDir, DLLM_STORE__URL: "memory", RUST_LOG: "error" },
    stdio: ["ignore", "inherit", "inherit"],
  });
  const base = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`the server exited with ${child.exitCode}`);
    try {
      if ((await fetch(`${base}/ready`)).ok) return base;
    } catch {
      /* not listening yet */
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error("the server did not become ready in 60 s");
}

async function save(page, name) {
  const path = join(shotsDir, name);
  await page.screenshot({ path, fullPage: true });
  if (extraShots) {
    mkdirSync(extraShots, { recursive: true });
    copyFileSync(path, join(extraShots, name));
  }
}

/** `n` replies through /v1/chat from the page (a user key, as ?api_key=). */
async function traffic(page, n) {
  return page.evaluate(
    async ({ n, key }) => {
      const ws = new WebSocket(`ws://${location.host}/v1/chat?api_key=${key}`);
      const events = [];
      let wake = () => {};
      ws.onmessage = (m) => {
        events.push(JSON.parse(m.data));
        wake();
      };
      await new Promise((ok) => (ws.onopen = ok));
      const until = async (type) => {
        for (;;) {
          const i = events.findIndex((e) => e.type === type || e.type === "error");
          if (i >= 0) return events.splice(0, i + 1).at(-1);
          await new Promise((ok) => (wake = ok));
        }
      };
      ws.send(JSON.stringify({ type: "session.create" }));
      const { session_id } = await until("session.created");
      const statuses = [];
      for (let i = 0; i < n; i++) {
        ws.send(JSON.stringify({ type: "message.create", session_id, content: `question ${i}`, options: { max_tokens: 24 } }));
        statuses.push((await until("response.done")).status);
      }
      // Kept open: the connection shows on the dashboard.
      window.__chat = ws;
      return statuses;
    },
    { n, key: USER_KEY },
  );
}

async function charts(page) {
  return page.evaluate(() =>
    Object.fromEntries(
      [...document.querySelectorAll("[data-chart]")].map((c) => [
        c.dataset.chart,
        { points: Number(c.dataset.points), canvas: !!c.querySelector("canvas"), width: c.querySelector("canvas")?.width ?? 0 },
      ]),
    ),
  );
}

async function run() {
  const base = await startServer();
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));

  await page.goto(`${base}/dashboard`);
  await page.waitForFunction(() => document.querySelector("#status").dataset.state === "refused", null, { timeout: 10_000 });
  check(await page.locator("#key-form").evaluate((d) => d.open), "without a key the feed is refused and the key form opens");

  await page.fill("#key", USER_KEY);
  await page.click("#key-submit button");
  await page.waitForFunction(() => document.querySelector("#status").dataset.state === "refused", null, { timeout: 10_000 });
  check(true, "a user (non-admin) key is refused too");

  await page.fill("#key", ADMIN_KEY);
  await page.click("#key-submit button");
  await page.waitForFunction(() => document.querySelector("#status").dataset.state === "live", null, { timeout: 10_000 });
  check(
    (await page.evaluate(() => localStorage.getItem("dllm-dashboard-key"))) === ADMIN_KEY,
    "the admin key connects the feed and is kept in localStorage",
  );
  await page.reload();
  await page.waitForFunction(() => document.querySelector("#status").dataset.state === "live", null, { timeout: 10_000 });
  check(true, "after a reload the stored key connects at once");

  const statuses = await traffic(page, 6);
  check(statuses.every((s) => s === "completed"), "six replies through /v1/chat complete", statuses);
  await page.waitForFunction(
    () => [...document.querySelectorAll("[data-chart]")].every((c) => Number(c.dataset.points) > 0),
    null,
    { timeout: 10_000 },
  );
  await page.waitForTimeout(2500);
  const drawn = await charts(page);
  for (const [id, c] of Object.entries(drawn)) {
    check(c.canvas && c.width > 100 && c.points > 0, `chart ${id} draws non-empty series`, c);
  }
  const tiles = await page.evaluate(() =>
    Object.fromEntries([...document.querySelectorAll(".tile b")].map((b) => [b.id, b.textContent])),
  );
  check(tiles["t-replies"] === "6", "the tiles count the six replies", tiles);
  check(/ms$/.test(tiles["t-ttfr"]) && /ms$/.test(tiles["t-latency"]), "the tiles show p95 latencies", tiles);
  check(Number(tiles["t-connections"]) >= 1, "the tiles show the open chat connection", tiles);
  check(
    (await page.locator("#replica option").count()) === 2,
    "the replica picker lists the replica beside all replicas",
  );
  await save(page, "dashboard-desktop.png");

  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(1200);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 0, "on a phone (390 px) nothing scrolls sideways", { overflow });
  await save(page, "dashboard-phone.png");
  check(errors.length === 0, "no script errors on the page", errors);
  await context.close();
}

try {
  browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  await run();
  console.log(`screenshots in ${shotsDir}${extraShots ? ` and ${extraShots}` : ""}`);
  console.log("all dashboard checks passed");
} catch (e) {
  console.error(e);
  process.exitCode = 1;
} finally {
  await browser?.close();
  if (child && child.exitCode === null) child.kill("SIGTERM");
}
