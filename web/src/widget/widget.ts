// The widget: a launcher bubble and a chat panel in a shadow root, driven by one `/v1/chat`
// connection.
//
// The conversation has three stacked areas inside the scroller:
// - `log` (role="log", polite live region): finished messages only, so assistive technology
//   announces each message once, when it is finished;
// - `live`: the reply being denoised, one bubble keyed by response_id, `aria-busy`, outside any
//   live region; every revision replaces its content in place, and when the reply is done the
//   same element moves into the log;
// - `queue`: the user's messages not yet accepted by the server (the outbox). Each carries a
//   client_message_id and is resent with it after a reload or reconnect; the server answers a
//   resend with `duplicate: true` and the first message's id, which the log already shows when
//   the history came back first, so nothing appears twice.
//
// On every (re)connection the widget resumes its session (the id is kept in localStorage) and
// reconciles the history with what it shows: stored messages it already has are skipped, a
// reply it watched stream adopts its stored message, a reply still running (`running`)
// continues in its bubble.

import { Connection } from "./connection";
import { stringsFor, type Strings } from "./i18n";
import { renderMarkdown, renderRevision } from "./render";
import { type Outgoing, WidgetStorage } from "./storage";
import { css } from "./styles";

export interface Settings {
  title?: string;
  greeting?: string;
  color?: string;
  position?: "left" | "right";
  darkMode?: "auto" | "on" | "off";
  locale?: string;
  /** The chat service's origin; default: where widget.js was loaded from. */
  serverUrl?: string;
  /** Sent as `?api_key=` when the service has keys configured (visible to every visitor). */
  apiKey?: string;
  /** Decode options sent with every message (see docs/protocol.md). */
  options?: Record<string, unknown>;
}

export interface User {
  id?: string;
  name?: string;
  email?: string;
}

type Listener = (detail: any) => void;

interface Reply {
  el: HTMLElement;
  body: HTMLElement;
  revision: number;
}

const ICON_CHAT =
  '<svg viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2" stroke-linecap="round" stroke-linejoin="round" aria-hidden="true"><path d="M21 12a8 8 0 0 1-11.6 7.1L4 20l1-4.6A8 8 0 1 1 21 12z"/></svg>';
const ICON_DOWN =
  '<svg viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2.2" stroke-linecap="round" stroke-linejoin="round" aria-hidden="true"><path d="M6 9l6 6 6-6"/></svg>';
const ICON_CLOSE =
  '<svg viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2.2" stroke-linecap="round" aria-hidden="true"><path d="M6 6l12 12M18 6L6 18"/></svg>';

function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") el.className = v;
    else el.setAttribute(k, v);
  }
  el.append(...children);
  return el;
}

function randomId(): string {
  if (typeof crypto !== "undefined" && typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Black or white, whichever reads better on `color` (any CSS colour the browser knows). */
function textOn(color: string): string {
  const probe = document.createElement("canvas").getContext("2d");
  if (!probe) return "#fff";
  probe.fillStyle = color;
  const hex = String(probe.fillStyle);
  const m = /^#([0-9a-f]{6})$/i.exec(hex);
  if (!m) return "#fff";
  const n = parseInt(m[1], 16);
  const lin = (c: number) => {
    const s = c / 255;
    return s <= 0.03928 ? s / 12.92 : ((s + 0.055) / 1.055) ** 2.4;
  };
  const lum = 0.2126 * lin(n >> 16) + 0.7152 * lin((n >> 8) & 255) + 0.0722 * lin(n & 255);
  return lum > 0.45 ? "#111" : "#fff";
}

export class Widget {
  private readonly t: Strings;
  private readonly store: WidgetStorage;
  private readonly conn: Connection;
  private readonly settings: Settings;

  private readonly root: HTMLElement;
  private readonly launcher: HTMLButtonElement;
  private readonly badge: HTMLElement;
  private readonly panel: HTMLElement;
  private readonly banner: HTMLElement;
  private readonly scroller: HTMLElement;
  private readonly log: HTMLElement;
  private readonly live: HTMLElement;
  private readonly queue: HTMLElement;
  private readonly notice: HTMLElement;
  private readonly input: HTMLTextAreaElement;
  private readonly sendButton: HTMLButtonElement;
  private readonly stopButton: HTMLButtonElement;

  private sessionId: string | null;
  private user: User | null = null;
  /** Whether the session's metadata holds `user`: set on create, by session.update, or found so on resume. */
  private userState: "unsent" | "sent" | "stored" = "stored";
  /** The session is created or resumed on the current connection. */
  private ready = false;
  private announcedReady = false;
  /** The reply running in the session, if any. */
  private running: string | null = null;
  private readonly replies = new Map<string, Reply>();
  /** Outbox items sent on this connection and not yet answered. */
  private readonly inflight = new Set<string>();
  /** Outbox items that failed and wait for the user's "Try again". */
  private readonly held = new Set<string>();
  private unread = 0;
  private isOpen = false;
  private everConnected = false;
  private flushTimer: number | undefined;
  private readonly listeners = new Map<string, Set<Listener>>();

  constructor(settings: Settings, serviceOrigin: string, host: HTMLElement) {
    this.settings = settings;
    this.t = stringsFor(settings.locale);
    this.store = new WidgetStorage(serviceOrigin);
    this.sessionId = this.store.sessionId;

    const shadow = host.attachShadow({ mode: "open" });
    // A constructed stylesheet is not an inline style to CSP, so embedding sites need no
    // `style-src 'unsafe-inline'`; browsers without them get a <style> element.
    let style: HTMLStyleElement | null = null;
    if ("adoptedStyleSheets" in Document.prototype && "replaceSync" in CSSStyleSheet.prototype) {
      const sheet = new CSSStyleSheet();
      sheet.replaceSync(css);
      shadow.adoptedStyleSheets = [sheet];
    } else {
      style = h("style");
      style.textContent = css;
    }
    const dark = settings.darkMode === "on" ? "dark" : settings.darkMode === "off" ? "light" : "auto";
    this.root = h("div", { class: `root ${dark} ${settings.position === "left" ? "left" : "right"}` });
    if (settings.color) {
      this.root.style.setProperty("--accent", settings.color);
      this.root.style.setProperty("--on-accent", textOn(settings.color));
    }
    const title = settings.title || this.t.title;

    this.badge = h("span", { class: "badge", hidden: "", "aria-hidden": "true" });
    this.launcher = h("button", {
      class: "launcher",
      type: "button",
      "aria-label": this.t.open,
      "aria-expanded": "false",
      "aria-controls": "dllm-chat-panel",
    });
    this.launcher.innerHTML = ICON_CHAT;
    this.launcher.append(this.badge);

    const close = h("button", { class: "icon-button close", type: "button", "aria-label": this.t.close });
    close.innerHTML = ICON_CLOSE;
    const header = h(
      "header",
      {},
      h("div", { class: "avatar", "aria-hidden": "true" }, title.trim().charAt(0).toUpperCase() || "?"),
      h(
        "div",
        { class: "heading" },
        h("h2", { class: "title", id: "dllm-chat-title" }, title),
        h("p", { class: "subtitle" }, this.t.subtitle),
      ),
      close,
    );
    this.banner = h("div", { class: "banner", role: "status", hidden: "" }, this.t.reconnecting);
    const greeting = h(
      "div",
      { class: "msg bot greeting" },
      h("div", { class: "body" }, settings.greeting || this.t.greeting),
    );
    this.log = h("div", { class: "log", role: "log", "aria-live": "polite", "aria-label": title });
    this.live = h("div", { class: "live" });
    this.queue = h("div", { class: "queue" });
    this.notice = h("div", { class: "notice", role: "alert" });
    this.scroller = h("div", { class: "scroll" }, greeting, this.log, this.live, this.queue, this.notice);
    this.input = h("textarea", {
      rows: "1",
      "aria-label": this.t.placeholder,
      placeholder: this.t.placeholder,
      maxlength: "4000",
      enterkeyhint: "send",
    });
    this.sendButton = h("button", { class: "send", type: "submit" }, this.t.send);
    this.stopButton = h("button", { class: "stop", type: "button", hidden: "" }, this.t.stop);
    const form = h("form", {}, this.input, this.stopButton, this.sendButton);
    const footer = h("div", { class: "footer" }, "Powered by dllm-chat");
    this.panel = h(
      "div",
      { class: "panel", id: "dllm-chat-panel", role: "dialog", "aria-labelledby": "dllm-chat-title", hidden: "" },
      header,
      this.banner,
      this.scroller,
      form,
      footer,
    );
    this.root.append(this.panel, this.launcher);
    if (style) shadow.append(style);
    shadow.append(this.root);

    this.launcher.addEventListener("click", () => (this.isOpen ? this.close() : this.open()));
    close.addEventListener("click", () => this.close());
    this.panel.addEventListener("keydown", (e) => {
      if (e.key === "Escape") {
        e.preventDefault();
        this.close();
      }
    });
    this.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        this.submit();
      }
    });
    this.input.addEventListener("input", () => this.autosize());
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.submit();
    });
    this.stopButton.addEventListener("click", () => {
      if (this.running) this.conn.send({ type: "response.cancel", response_id: this.running });
    });
    this.followVisualViewport();

    // Messages a previous page view could not send.
    for (const item of this.store.outbox) this.queue.append(this.userBubble(item.content, { cmid: item.cmid }));

    const ws = new URL("/v1/chat", serviceOrigin);
    ws.protocol = ws.protocol === "https:" ? "wss:" : "ws:";
    if (settings.apiKey) ws.searchParams.set("api_key", settings.apiKey);
    this.conn = new Connection(ws.toString(), {
      open: () => this.onOpen(),
      message: (e) => this.onEvent(e),
      close: () => this.onClose(),
    });
    this.conn.start();
    if (this.store.open) this.open(false);
  }

  // ----- public API -------------------------------------------------------------------------

  open(focus = true): void {
    this.isOpen = true;
    this.store.open = true;
    this.panel.hidden = false;
    this.root.classList.add("open");
    this.launcher.innerHTML = ICON_DOWN;
    this.launcher.append(this.badge);
    this.launcher.setAttribute("aria-expanded", "true");
    this.launcher.setAttribute("aria-label", this.t.close);
    this.setUnread(0);
    this.scrollToEnd(true);
    if (focus) this.input.focus();
  }

  close(): void {
    const active = (this.root.getRootNode() as ShadowRoot).activeElement;
    const hadFocus = !!active && this.panel.contains(active);
    this.isOpen = false;
    this.store.open = false;
    this.panel.hidden = true;
    this.root.classList.remove("open");
    this.launcher.innerHTML = ICON_CHAT;
    this.launcher.append(this.badge);
    this.launcher.setAttribute("aria-expanded", "false");
    this.setUnread(this.unread);
    if (hadFocus) this.launcher.focus();
  }

  setUser(user: User): void {
    this.user = { id: user?.id, name: user?.name, email: user?.email };
    this.userState = "unsent";
    this.syncUser();
  }

  /** Stores the page's user in the session's metadata once there is a session to hold it. */
  private syncUser(): void {
    if (!this.user || this.userState !== "unsent" || !this.ready || !this.sessionId) return;
    this.userState = "sent";
    this.conn.send({ type: "session.update", session_id: this.sessionId, metadata: { user: this.user }, event_id: "user" });
  }

  private holdsUser(metadata: Record<string, any> | undefined): boolean {
    const stored = metadata?.user ?? {};
    const user = this.user ?? {};
    return (["id", "name", "email"] as const).every((k) => (stored[k] ?? null) === (user[k] ?? null));
  }

  on(name: string, fn: Listener): () => void {
    let set = this.listeners.get(name);
    if (!set) this.listeners.set(name, (set = new Set()));
    set.add(fn);
    // A page that subscribes after the widget became ready still hears about it.
    if (name === "ready" && this.announcedReady) queueMicrotask(() => fn({ sessionId: this.sessionId }));
    return () => set!.delete(fn);
  }

  private emit(name: string, detail: unknown): void {
    for (const fn of this.listeners.get(name) ?? []) {
      try {
        fn(detail);
      } catch (e) {
        console.error("dllmChat listener failed", e);
      }
    }
    window.dispatchEvent(new CustomEvent(`dllmchat:${name}`, { detail }));
  }

  // ----- connection -------------------------------------------------------------------------

  private onOpen(): void {
    this.everConnected = true;
    this.ready = false;
    this.inflight.clear();
    this.startSession();
  }

  private startSession(): void {
    if (this.sessionId) {
      this.conn.send({ type: "session.resume", session_id: this.sessionId, event_id: "resume" });
    } else {
      const metadata: Record<string, unknown> = { page: location.pathname };
      if (this.user) {
        metadata.user = this.user;
        this.userState = "sent";
      }
      this.conn.send({ type: "session.create", metadata, event_id: "create" });
    }
  }

  private onClose(): void {
    this.ready = false;
    this.inflight.clear();
    if (this.userState === "sent") this.userState = "unsent";
    if (this.everConnected) this.banner.hidden = false;
    this.updateControls();
  }

  private becomeReady(): void {
    this.ready = true;
    this.banner.hidden = true;
    this.notice.replaceChildren();
    if (!this.announcedReady) {
      this.announcedReady = true;
      this.emit("ready", { sessionId: this.sessionId });
    }
    this.updateControls();
    this.syncUser();
    this.flush();
  }

  private onEvent(e: Record<string, any>): void {
    switch (e.type) {
      case "session.created":
        this.sessionId = e.session_id;
        this.store.sessionId = e.session_id;
        if (this.userState === "sent") this.userState = "stored";
        this.becomeReady();
        break;
      case "session.resumed":
        if (this.user && this.userState !== "stored") this.userState = this.holdsUser(e.metadata) ? "stored" : "unsent";
        this.reconcile(e.messages ?? [], e.running ?? null);
        this.becomeReady();
        break;
      case "session.updated":
        if (this.holdsUser(e.metadata)) this.userState = "stored";
        break;
      case "message.accepted":
        this.accepted(e.event_id, e.message_id, !!e.duplicate);
        break;
      case "response.created":
        this.ensureReply(e.response_id, e.message_id);
        this.running = e.response_id;
        window.clearTimeout(this.flushTimer);
        this.updateControls();
        break;
      case "response.revision": {
        const reply = this.ensureReply(e.response_id, null);
        this.applyRevision(reply, e.text, e.revision);
        break;
      }
      case "response.done":
        this.finish(e.response_id, e.text ?? "", e.status, e.error, e.handover === true);
        break;
      case "error":
        this.failed(e.error ?? {});
        break;
    }
  }

  // ----- sending ----------------------------------------------------------------------------

  private submit(): void {
    const content = this.input.value.trim();
    if (!content) return;
    const item: Outgoing = { cmid: randomId(), content };
    this.store.outbox = [...this.store.outbox, item];
    this.queue.append(this.userBubble(content, { cmid: item.cmid }));
    this.input.value = "";
    this.autosize();
    this.scrollToEnd(true);
    this.flush();
  }

  /** Sends the oldest unsent message when the session is ready and no reply runs. */
  private flush(): void {
    if (!this.ready || this.running || this.inflight.size > 0) return;
    const next = this.store.outbox.find((item) => !this.held.has(item.cmid));
    if (!next) return;
    const event: Record<string, unknown> = {
      type: "message.create",
      session_id: this.sessionId,
      content: next.content,
      client_message_id: next.cmid,
      event_id: next.cmid,
    };
    if (this.settings.options) event.options = this.settings.options;
    if (this.conn.send(event)) this.inflight.add(next.cmid);
  }

  private accepted(cmid: string | undefined, messageId: string, duplicate: boolean): void {
    const item = this.store.outbox.find((o) => o.cmid === cmid);
    if (cmid) {
      this.inflight.delete(cmid);
      this.store.outbox = this.store.outbox.filter((o) => o.cmid !== cmid);
    }
    if (item) this.store.remember(messageId, item);
    const pending = cmid ? this.queue.querySelector<HTMLElement>(`[data-cmid="${CSS.escape(cmid)}"]`) : null;
    if (this.byId(messageId)) {
      pending?.remove(); // the history already showed it
    } else {
      const el = pending ?? this.userBubble(item?.content ?? "", { cmid });
      el.dataset.id = messageId;
      el.classList.remove("pending");
      el.querySelector(".meta")?.remove();
      el.querySelector(".error")?.remove();
      this.log.append(el);
      this.emit("message", { role: "user", id: messageId, text: item?.content ?? el.textContent ?? "" });
    }
    if (duplicate) {
      // A resend: a reply is generated now only if the message had none; otherwise nothing
      // follows, so do not wait long for a response.created.
      window.clearTimeout(this.flushTimer);
      this.flushTimer = window.setTimeout(() => this.flush(), 1500);
    }
    this.scrollToEnd();
  }

  private failed(error: { code?: string; message?: string; event_id?: string }): void {
    const code = error.code ?? "internal";
    const eventId = error.event_id;
    this.emit("error", { code, message: error.message ?? "" });
    if (eventId === "resume" && code === "session_not_found") {
      // Expired or unknown: start over with a new session; unsent messages go to it.
      this.sessionId = null;
      this.store.sessionId = null;
      this.log.replaceChildren();
      this.live.replaceChildren();
      this.replies.clear();
      this.running = null;
      this.startSession();
      return;
    }
    if (eventId === "user") {
      if (this.userState === "sent") this.userState = "unsent";
      return; // tried again on the next connection
    }
    if (eventId === "resume" || eventId === "create") {
      window.setTimeout(() => this.conn.isOpen && !this.ready && this.startSession(), 1000 + Math.random() * 1000);
      return;
    }
    const outgoing = eventId ? this.store.outbox.find((o) => o.cmid === eventId) : undefined;
    if (outgoing) {
      this.inflight.delete(outgoing.cmid);
      if (code === "shutting_down") return; // resent after the reconnect
      if (code === "busy" && this.running) return; // resent after the running reply ends
      this.held.add(outgoing.cmid);
      const el = this.queue.querySelector<HTMLElement>(`[data-cmid="${CSS.escape(outgoing.cmid)}"]`);
      if (el) {
        el.querySelector(".meta")?.remove();
        el.after(
          this.errorRow(code, () => {
            this.held.delete(outgoing.cmid);
            el.append(h("div", { class: "meta" }, this.t.sending));
            this.flush();
          }, el),
        );
      }
      return;
    }
    if (code === "generator_lost" || code === "response_not_found" || code === "context_overflow") return; // response.done follows, or nothing to show
    this.notice.replaceChildren(this.errorRow(code, null));
  }

  /** A plain-words error line, with "Try again" when `retry` is given. */
  private errorRow(code: string, retry: (() => void) | null, owner?: HTMLElement): HTMLElement {
    const text = this.t.errors[code] ?? this.t.errors.default;
    const row = h("div", { class: "error", "data-code": code }, h("span", {}, text));
    if (retry) {
      const button = h("button", { type: "button", class: "retry" }, this.t.retry);
      button.addEventListener("click", () => {
        row.remove();
        retry();
      });
      row.append(button);
    }
    if (owner) row.dataset.for = owner.dataset.cmid ?? owner.dataset.id ?? "";
    return row;
  }

  // ----- replies ----------------------------------------------------------------------------

  private ensureReply(responseId: string, messageId: string | null): Reply {
    const known = this.replies.get(responseId);
    if (known) return known;
    const body = h("div", { class: "body" }, h("span", { class: "dots", "aria-hidden": "true" }, h("i"), h("i"), h("i")), h("span", { class: "sr-only" }, this.t.thinking));
    const el = h("div", { class: "msg bot streaming thinking", "aria-busy": "true", "data-response-id": responseId }, body);
    if (messageId) el.dataset.answers = messageId;
    el.dataset.revision = "0";
    this.live.append(el);
    const reply = { el, body, revision: 0 };
    this.replies.set(responseId, reply);
    this.updateControls();
    this.scrollToEnd();
    return reply;
  }

  private applyRevision(reply: Reply, text: string, revision: number): void {
    if (revision <= reply.revision || !reply.el.classList.contains("streaming")) return;
    reply.revision = revision;
    reply.el.dataset.revision = String(revision);
    reply.el.classList.remove("thinking");
    renderRevision(reply.body, text);
    this.scrollToEnd();
  }

  private finish(
    responseId: string,
    text: string,
    status: string,
    error?: { code?: string },
    handover = false,
  ): void {
    const reply = this.ensureReply(responseId, null);
    const el = reply.el;
    if (!el.classList.contains("streaming")) return; // already finished (a replayed done)
    el.classList.remove("streaming", "thinking");
    el.removeAttribute("aria-busy");
    el.dataset.status = status;
    this.fillFinal(el, reply.body, text, status, error?.code, handover);
    this.log.append(el); // the same element; announced once, now that it is final
    if (this.running === responseId) this.running = null;
    if (!this.isOpen && status !== "failed") this.setUnread(this.unread + 1);
    this.emit("message", { role: "assistant", responseId, id: el.dataset.id, text, status, handover });
    this.updateControls();
    this.scrollToEnd();
    this.flush();
  }

  private fillFinal(
    el: HTMLElement,
    body: HTMLElement,
    text: string,
    status: string,
    code?: string,
    handover = false,
  ): void {
    if (status === "failed") {
      el.classList.add("failed");
      body.replaceChildren();
      body.append(
        this.errorRow(code || "generator_lost", el.dataset.answers ? () => this.retryAnswer(el) : null),
      );
      return;
    }
    renderMarkdown(body, text);
    if (status === "cancelled") el.append(h("div", { class: "meta" }, this.t.stopped));
    if (handover) {
      // The service marked this reply as handing the conversation to a person.
      el.classList.add("handover");
      el.append(h("div", { class: "meta handover-note" }, this.t.handover));
    }
  }

  /** Sends again the user message a failed reply answered, with its client_message_id. */
  private retryAnswer(el: HTMLElement): void {
    const messageId = el.dataset.answers!;
    const sent = this.store.sent[messageId];
    const user = this.byId(messageId);
    const item: Outgoing = sent ?? { cmid: randomId(), content: user?.dataset.text ?? "" };
    if (!item.content) return;
    el.remove();
    if (!this.store.outbox.some((o) => o.cmid === item.cmid)) this.store.outbox = [...this.store.outbox, item];
    this.held.delete(item.cmid);
    this.flush();
  }

  /** Merges the stored history into what is shown; `running` is the reply still in progress. */
  private reconcile(
    messages: { id: string; role: string; content: string; status?: string; handover?: boolean }[],
    running: { response_id: string; message_id: string; revision: number; text: string } | null,
  ): void {
    let lastUser: string | null = null;
    messages.forEach((m, i) => {
      if (this.byId(m.id)) {
        if (m.role === "user") lastUser = m.id;
        return;
      }
      if (m.role === "user") {
        this.log.append(this.userBubble(m.content, { id: m.id }));
        lastUser = m.id;
        return;
      }
      const status = m.status ?? "completed";
      const local = [...this.log.children, ...this.live.children].find(
        (el) => el instanceof HTMLElement && el.dataset.answers === lastUser && !el.dataset.id && el.dataset.responseId,
      ) as HTMLElement | undefined;
      if (local) {
        local.dataset.id = m.id;
        if (local.classList.contains("streaming")) {
          this.finish(local.dataset.responseId!, m.content, status, undefined, m.handover === true);
        }
        return;
      }
      // A failed reply that a later message superseded is of no use to show.
      if (status === "failed" && i !== messages.length - 1) return;
      const body = h("div", { class: "body" });
      const el = h("div", { class: "msg bot", "data-id": m.id, "data-status": status }, body);
      if (lastUser) el.dataset.answers = lastUser;
      this.fillFinal(el, body, m.content, status, undefined, m.handover === true);
      this.log.append(el);
    });
    // A reply watched streaming that neither finished in the history nor still runs stored
    // nothing (the engine failed): offer to send its message again.
    for (const [id, reply] of this.replies) {
      if (reply.el.classList.contains("streaming") && id !== running?.response_id) {
        this.finish(id, "", "failed", { code: "generator_lost" });
      }
    }
    this.running = null;
    if (running) {
      const reply = this.ensureReply(running.response_id, running.message_id);
      if (running.revision > 0) this.applyRevision(reply, running.text, running.revision);
      this.running = running.response_id;
    }
    this.scrollToEnd(true);
  }

  // ----- view helpers -----------------------------------------------------------------------

  private userBubble(content: string, key: { id?: string; cmid?: string }): HTMLElement {
    const el = h("div", { class: "msg user" }, h("div", { class: "body" }, content));
    el.dataset.text = content;
    if (key.id) el.dataset.id = key.id;
    if (key.cmid) {
      el.dataset.cmid = key.cmid;
      if (!key.id) {
        el.classList.add("pending");
        el.append(h("div", { class: "meta" }, this.t.sending));
      }
    }
    return el;
  }

  private byId(id: string): HTMLElement | null {
    return this.log.querySelector<HTMLElement>(`[data-id="${CSS.escape(id)}"]`);
  }

  private updateControls(): void {
    const streaming = !!this.running;
    this.stopButton.hidden = !streaming;
    this.sendButton.hidden = streaming && !this.input.value.trim();
    this.stopButton.disabled = !this.conn?.isOpen;
  }

  private setUnread(n: number): void {
    this.unread = this.isOpen ? 0 : n;
    this.badge.hidden = this.unread === 0;
    this.badge.textContent = this.unread > 9 ? "9+" : String(this.unread);
    const label = this.isOpen ? this.t.close : this.unread ? `${this.t.open} (${this.t.unread(this.unread)})` : this.t.open;
    this.launcher.setAttribute("aria-label", label);
  }

  private scrollToEnd(force = false): void {
    const s = this.scroller;
    const near = s.scrollHeight - s.scrollTop - s.clientHeight < 120;
    if (force || near) requestAnimationFrame(() => (s.scrollTop = s.scrollHeight));
  }

  private autosize(): void {
    this.input.style.height = "auto";
    this.input.style.height = `${Math.min(this.input.scrollHeight + 2, 120)}px`;
    this.updateControls();
  }

  /** On phones the keyboard shrinks the visual viewport, not the layout one: follow it. */
  private followVisualViewport(): void {
    const vv = window.visualViewport;
    if (!vv) return;
    const small = window.matchMedia("(max-width: 670px)");
    const fit = () => {
      this.panel.style.height = small.matches ? `${vv.height}px` : "";
      this.panel.style.top = small.matches ? `${vv.offsetTop}px` : "";
    };
    vv.addEventListener("resize", fit);
    vv.addEventListener("scroll", fit);
    small.addEventListener("change", fit);
  }
}
