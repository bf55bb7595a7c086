// What the widget keeps in the host page's localStorage, namespaced by the chat service's origin:
// the session id (an opaque random token from the server), messages not yet accepted (the
// outbox, resent with the same client_message_id after a reload or reconnect), and which
// client_message_id each stored user message had, so a failed reply can be retried without
// storing the message twice. Every access tolerates storage being unavailable (private modes).

export interface Outgoing {
  cmid: string;
  content: string;
}

const MAX_SENT = 100;

export class WidgetStorage {
  constructor(private readonly namespace: string) {}

  private key(name: string): string {
    return `dllmChat:${this.namespace}:${name}`;
  }

  private read<T>(name: string, fallback: T): T {
    try {
      const raw = localStorage.getItem(this.key(name));
      return raw ? (JSON.parse(raw) as T) : fallback;
    } catch {
      return fallback;
    }
  }

  private write(name: string, value: unknown): void {
    try {
      if (value === null) localStorage.removeItem(this.key(name));
      else localStorage.setItem(this.key(name), JSON.stringify(value));
    } catch {
      /* storage full or blocked: the widget still works for this page view */
    }
  }

  get sessionId(): string | null {
    return this.read<string | null>("session", null);
  }
  set sessionId(id: string | null) {
    this.write("session", id);
  }

  get outbox(): Outgoing[] {
    return this.read<Outgoing[]>("outbox", []);
  }
  set outbox(items: Outgoing[]) {
    this.write("outbox", items.length ? items : null);
  }

  /** message_id -> the client_message_id and content it was sent with. */
  get sent(): Record<string, Outgoing> {
    return this.read<Record<string, Outgoing>>("sent", {});
  }
  remember(messageId: string, item: Outgoing): void {
    const sent = this.sent;
    sent[messageId] = item;
    const keys = Object.keys(sent);
    for (const k of keys.slice(0, Math.max(0, keys.length - MAX_SENT))) delete sent[k];
    this.write("sent", sent);
  }

  get open(): boolean {
    try {
      return sessionStorage.getItem(this.key("open")) === "1";
    } catch {
      return false;
    }
  }
  set open(value: boolean) {
    try {
      sessionStorage.setItem(this.key("open"), value ? "1" : "0");
    } catch {
      /* ignore */
    }
  }
}
