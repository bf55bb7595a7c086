// Turning reply text into DOM. A revision in flight is drawn as plain text with every masked
// position (the placeholder character) as a small shimmering block; only the final text is
// rendered as markdown, through marked and then DOMPurify (links open in a new tab with
// rel="noopener noreferrer").

import DOMPurify from "dompurify";
import { marked } from "marked";

/** The server's `prompt.mask_placeholder` default. */
export const MASK = "░";

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

/** Replaces `el`'s children with `text`, each masked position a placeholder block. */
export function renderRevision(el: HTMLElement, text: string): void {
  const frag = document.createDocumentFragment();
  let plain = "";
  let masked = 0;
  const flush = () => {
    if (plain) frag.append(document.createTextNode(plain));
    plain = "";
    if (masked) {
      const run = document.createElement("span");
      run.className = "masked";
      run.setAttribute("aria-hidden", "true");
      for (let i = 0; i < masked; i++) run.append(document.createElement("i"));
      frag.append(run);
    }
    masked = 0;
  };
  for (const ch of text) {
    if (ch === MASK) {
      if (plain) {
        frag.append(document.createTextNode(plain));
        plain = "";
      }
      masked++;
    } else {
      if (masked) flush();
      plain += ch;
    }
  }
  flush();
  el.replaceChildren(frag);
}

/** Replaces `el`'s children with `text` rendered as sanitized markdown. */
export function renderMarkdown(el: HTMLElement, text: string): void {
  const html = marked.parse(text.split(MASK).join(""), { async: false, gfm: true, breaks: true });
  el.innerHTML = DOMPurify.sanitize(html, { USE_PROFILES: { html: true } });
}
