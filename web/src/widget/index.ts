// Entry point of widget.js. Embed with one tag:
//   <script src="https://chat.example.com/widget.js" async></script>
// and optionally, before it, `window.dllmChatSettings = {title, greeting, color, position,
// darkMode, locale, …}`. The widget connects to the origin it was loaded from and installs
// `window.dllmChat` ({open, close, setUser, on}).

import { type Settings, type User, Widget } from "./widget";

declare global {
  interface Window {
    dllmChatSettings?: Settings;
    dllmChat?: DllmChatApi;
  }
}

export interface DllmChatApi {
  open(): void;
  close(): void;
  setUser(user: User): void;
  /** Events: "ready" ({sessionId}), "message" ({role, id, text, …}), "error" ({code, message}). */
  on(name: "ready" | "message" | "error", fn: (detail: any) => void): () => void;
}

// Captured now: document.currentScript is only set while this script first runs.
const script = document.currentScript as HTMLScriptElement | null;

function serviceOrigin(settings: Settings): string {
  if (settings.serverUrl) return new URL(settings.serverUrl, location.href).origin;
  const src =
    script?.src ||
    Array.from(document.scripts).find((s) => /\/widget\.js(\?|#|$)/.test(s.src))?.src ||
    location.href;
  return new URL(src, location.href).origin;
}

function start(): void {
  if ((window as any).__dllmChatLoaded) return;
  (window as any).__dllmChatLoaded = true;
  const settings: Settings = { ...(window.dllmChatSettings ?? {}) };
  const host = document.createElement("div");
  host.id = "dllm-chat-widget";
  document.body.append(host);
  const widget = new Widget(settings, serviceOrigin(settings), host);
  window.dllmChat = {
    open: () => widget.open(),
    close: () => widget.close(),
    setUser: (user) => widget.setUser(user),
    on: (name, fn) => widget.on(name, fn),
  };
}

if (document.body) start();
else document.addEventListener("DOMContentLoaded", start, { once: true });
