// Builds the latency dashboard into dist/dashboard.js (one classic script, uPlot and its CSS
// bundled in) beside the widget; dashboard.html comes from public/ with the widget's build.
import { defineConfig } from "vite";

export default defineConfig({
  publicDir: false,
  build: {
    outDir: "dist",
    emptyOutDir: false,
    target: "es2020",
    sourcemap: false,
    lib: {
      entry: "src/dashboard/index.ts",
      formats: ["iife"],
      name: "dllmDashboard",
      fileName: () => "dashboard.js",
    },
  },
});
