import { defineConfig } from "vite";

// The gateway serves index.html at / and the hashed assets under /ui/assets/ (tuneforge_gateway/web.py).
export default defineConfig({
  base: "/ui/",
  build: {
    outDir: "../services/gateway/tuneforge_gateway/web",
    emptyOutDir: true,
    assetsDir: "assets",
    sourcemap: true,
    chunkSizeWarningLimit: 400,
  },
  server: {
    // `npx vite` against a running gateway: the API calls go to it.
    proxy: { "/api": process.env.TUNEFORGE_URL ?? "http://127.0.0.1:8080" },
  },
});
