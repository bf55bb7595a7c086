// The widget's stylesheet, inside its shadow root: the host page's CSS cannot reach it, and
// `all: initial` on the host stops inherited properties (font, colour, line height) leaking in.

export const css = `
:host { all: initial; }
* { box-sizing: border-box; }
.root {
  --accent: #2f6f4f; --on-accent: #fff;
  --bg: #ffffff; --fg: #1d2330; --muted: #667085; --line: #e4e7ec;
  --bot: #f2f4f7; --user: var(--accent); --on-user: var(--on-accent);
  --mask: #b4bcc8; --mask-hi: #dfe3e9; --error: #b42318; --error-bg: #fef3f2; --banner: #fff4e5;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color: var(--fg);
}
.root.dark {
  --bg: #161b22; --fg: #e6edf3; --muted: #9aa4b2; --line: #30363d; --bot: #21262d;
  --mask: #3b434d; --mask-hi: #56606c; --error: #ff8c82; --error-bg: #3a1d1b; --banner: #3a2e12;
}
@media (prefers-color-scheme: dark) {
  .root.auto {
    --bg: #161b22; --fg: #e6edf3; --muted: #9aa4b2; --line: #30363d; --bot: #21262d;
    --mask: #3b434d; --mask-hi: #56606c; --error: #ff8c82; --error-bg: #3a1d1b; --banner: #3a2e12;
  }
}
button { font: inherit; color: inherit; cursor: pointer; }
:focus-visible { outline: 3px solid #4c9ffe; outline-offset: 2px; }

.launcher {
  position: fixed; bottom: 20px; right: 20px; z-index: 2147483000;
  width: 60px; height: 60px; border-radius: 50%; border: 0;
  background: var(--accent); color: var(--on-accent);
  box-shadow: 0 6px 20px rgba(16, 24, 40, .25); display: grid; place-items: center;
  transition: transform .15s ease;
}
.left .launcher { right: auto; left: 20px; }
.launcher:hover { transform: scale(1.05); }
.launcher svg { width: 28px; height: 28px; }
.badge {
  position: absolute; top: -4px; right: -4px; min-width: 22px; height: 22px; padding: 0 6px;
  border-radius: 11px; background: #d92d20; color: #fff; font-size: 12px; font-weight: 700;
  line-height: 22px; text-align: center; border: 2px solid #fff;
}
.badge[hidden] { display: none; }

.panel {
  position: fixed; bottom: 92px; right: 20px; z-index: 2147483001;
  width: 380px; height: min(620px, calc(100vh - 120px)); height: min(620px, calc(100dvh - 120px));
  display: flex; flex-direction: column; overflow: hidden;
  background: var(--bg); border: 1px solid var(--line); border-radius: 16px;
  box-shadow: 0 16px 48px rgba(16, 24, 40, .28);
}
.left .panel { right: auto; left: 20px; }
.panel[hidden] { display: none; }

header {
  display: flex; align-items: center; gap: 12px; padding: 14px 14px 14px 16px;
  background: var(--accent); color: var(--on-accent);
}
.avatar {
  width: 36px; height: 36px; border-radius: 50%; flex: none; display: grid; place-items: center;
  background: rgba(255, 255, 255, .18); font-weight: 700;
}
.heading { flex: 1; min-width: 0; }
.title { margin: 0; font-size: 16px; font-weight: 650; }
.subtitle { margin: 0; font-size: 12.5px; opacity: .85; }
.icon-button {
  width: 36px; height: 36px; border-radius: 8px; border: 0; background: transparent;
  color: inherit; display: grid; place-items: center;
}
.icon-button:hover { background: rgba(255, 255, 255, .15); }
.icon-button svg { width: 20px; height: 20px; }

.banner {
  padding: 8px 14px; font-size: 13px; background: var(--banner); border-bottom: 1px solid var(--line);
  display: flex; align-items: center; gap: 8px;
}
.banner[hidden] { display: none; }
.banner::before {
  content: ""; width: 12px; height: 12px; border-radius: 50%; flex: none;
  border: 2px solid currentColor; border-right-color: transparent; animation: spin .8s linear infinite;
}

.scroll { flex: 1; overflow-y: auto; padding: 16px 14px 8px; overscroll-behavior: contain; }
.log, .live, .queue { display: flex; flex-direction: column; gap: 10px; }
.log:not(:empty), .live:not(:empty) { margin-bottom: 10px; }
.msg { max-width: 85%; padding: 9px 13px; border-radius: 16px; overflow-wrap: anywhere; }
.msg.bot { align-self: flex-start; background: var(--bot); border-bottom-left-radius: 4px; }
.msg.user {
  align-self: flex-end; background: var(--user); color: var(--on-user);
  border-bottom-right-radius: 4px; white-space: pre-wrap;
}
.msg.pending { opacity: .7; }
.msg .body > :first-child { margin-top: 0; }
.msg .body > :last-child { margin-bottom: 0; }
.msg .body p, .msg .body ul, .msg .body ol { margin: 0 0 .5em; }
.msg .body ul, .msg .body ol { padding-left: 1.3em; }
.msg .body a { color: var(--accent); text-decoration: underline; }
.dark .msg .body a { color: #7cc4a0; }
.msg .body code { font-size: .9em; background: rgba(127, 127, 127, .15); padding: 0 .25em; border-radius: 4px; }
.msg.streaming .body { white-space: pre-wrap; }
.meta { font-size: 12px; color: var(--muted); margin-top: 4px; }
.msg.user .meta { color: inherit; opacity: .8; }
.msg.handover { border-left: 3px solid var(--accent); }
.handover-note { display: flex; gap: 6px; align-items: center; font-weight: 600; color: var(--fg); }
.handover-note::before {
  content: ""; flex: none; width: 8px; height: 8px; border-radius: 50%; background: var(--accent);
}
.greeting { margin-bottom: 10px; }

.masked { display: inline; }
.masked i {
  display: inline-block; width: .55em; height: .95em; margin: 0 1px; vertical-align: -.12em;
  border-radius: 3px; background: linear-gradient(90deg, var(--mask) 0%, var(--mask-hi) 50%, var(--mask) 100%);
  background-size: 200% 100%; animation: shimmer 1.2s ease-in-out infinite;
}
.dots { display: inline-flex; gap: 4px; padding: 4px 0; }
.dots i {
  width: 7px; height: 7px; border-radius: 50%; background: var(--muted);
  animation: bounce 1.1s infinite ease-in-out;
}
.dots i:nth-child(2) { animation-delay: .15s; }
.dots i:nth-child(3) { animation-delay: .3s; }

.error {
  align-self: stretch; display: flex; align-items: center; gap: 10px; padding: 9px 12px;
  border-radius: 10px; background: var(--error-bg); color: var(--error); font-size: 13.5px;
}
.error span { flex: 1; }
.error button {
  border: 1px solid currentColor; background: transparent; color: inherit; border-radius: 8px;
  padding: 4px 10px; font-size: 13px; white-space: nowrap;
}

form { display: flex; align-items: flex-end; gap: 8px; padding: 10px 12px; border-top: 1px solid var(--line); }
textarea {
  flex: 1; resize: none; max-height: 120px; min-height: 42px; padding: 10px 12px;
  font: inherit; font-size: 16px; line-height: 1.35; color: var(--fg); background: var(--bg);
  border: 1px solid var(--line); border-radius: 12px;
}
textarea:focus-visible { outline: 2px solid var(--accent); outline-offset: 0; border-color: var(--accent); }
.send, .stop {
  height: 42px; min-width: 42px; padding: 0 14px; border: 0; border-radius: 12px;
  background: var(--accent); color: var(--on-accent); font-size: 16px; font-weight: 600;
}
.stop { background: var(--fg); color: var(--bg); }
.send[hidden], .stop[hidden] { display: none; }
.footer { text-align: center; font-size: 11.5px; color: var(--muted); padding: 0 0 8px; }
.sr-only {
  position: absolute; width: 1px; height: 1px; margin: -1px; overflow: hidden;
  clip: rect(0 0 0 0); white-space: nowrap; border: 0;
}

@media (max-width: 670px) {
  .panel, .left .panel {
    inset: 0; width: 100%; height: 100vh; height: 100dvh; border-radius: 0; border: 0;
  }
  .root.open .launcher { display: none; }
}
@keyframes shimmer { 0% { background-position: 100% 0; } 100% { background-position: -100% 0; } }
@keyframes bounce { 0%, 80%, 100% { transform: translateY(0); opacity: .5; } 40% { transform: translateY(-4px); opacity: 1; } }
@keyframes spin { to { transform: rotate(360deg); } }
@media (prefers-reduced-motion: reduce) {
  .masked i, .dots i, .banner::before { animation: none; }
}
`;
