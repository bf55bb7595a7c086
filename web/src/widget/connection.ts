// One WebSocket to `/v1/chat` that keeps itself open: after a close it reconnects with jittered
// exponential backoff (0.5 s doubling, capped at 30 s), and at once when the browser says the
// network or the page came back (`online`, `visibilitychange` to visible, `pageshow`), which is
// what a phone waking from sleep sends. The owner sees only open / message / close.

export interface ConnectionHandlers {
  open(): void;
  message(event: Record<string, any>): void;
  close(): void;
}

const BASE_MS = 500;
const CAP_MS = 30_000;

export class Connection {
  private ws: WebSocket | null = null;
  private attempt = 0;
  private timer: number | undefined;
  private stopped = false;

  constructor(private readonly url: string, private readonly on: ConnectionHandlers) {
    window.addEventListener("online", () => this.recycle());
    // The browser knows the network is gone before TCP does: drop the socket now, so the
    // banner shows and the reply's state is fetched again once the network is back.
    window.addEventListener("offline", () => this.drop());
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") this.now();
    });
    window.addEventListener("pageshow", () => this.now());
  }

  get isOpen(): boolean {
    return this.ws?.readyState === WebSocket.OPEN;
  }

  start(): void {
    this.connect();
  }

  /** Sends one event; false when the socket is not open (the caller keeps it for later). */
  send(event: Record<string, unknown>): boolean {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(event));
    return true;
  }

  /** Reconnects now unless a socket is open or opening. */
  now(): void {
    if (this.stopped) return;
    const state = this.ws?.readyState;
    if (state === WebSocket.OPEN || state === WebSocket.CONNECTING) return;
    this.connect();
  }

  /** The network changed: a socket that looks open may be dead, so open a fresh one now. */
  private recycle(): void {
    if (this.ws) this.drop();
    this.attempt = 0;
    this.connect();
  }

  /** Forgets the current socket without waiting for its closing handshake. */
  private drop(): void {
    const ws = this.ws;
    if (!ws) return;
    this.ws = null;
    ws.onopen = ws.onmessage = ws.onclose = null;
    ws.close(4000, "network changed");
    this.on.close();
    this.schedule();
  }

  private connect(): void {
    window.clearTimeout(this.timer);
    this.timer = undefined;
    let ws: WebSocket;
    try {
      ws = new WebSocket(this.url);
    } catch {
      this.schedule();
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
      this.on.open();
    };
    ws.onmessage = (e) => {
      let event: unknown;
      try {
        event = JSON.parse(String(e.data));
      } catch {
        return;
      }
      if (event && typeof event === "object") this.on.message(event as Record<string, any>);
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.on.close();
      this.schedule();
    };
  }

  private schedule(): void {
    if (this.stopped || this.timer !== undefined) return;
    const ceiling = Math.min(CAP_MS, BASE_MS * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 16);
    // Half fixed, half random: clients cut off together do not all come back together.
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this.timer = window.setTimeout(() => {
      this.timer = undefined;
      this.connect();
    }, delay);
  }
}
