// Builds the widget into one classic script, dist/widget.js (an IIFE: it must run from a plain
// `<script async>` on any site), and copies public/ (the demo storefront) beside it.
import { defineConfig } from "vite";

export default defineConfig({
  build: {
    outDir: "dist",
    emptyOutDir: true,
    target: "es2020",
    sourcemap: false,
    lib: {
      entry: "src/widget/index.ts",
      formats: ["iife"],
      name: "dllmChatWidget",
      fileName: () => "widget.js",
    },
  },
});
