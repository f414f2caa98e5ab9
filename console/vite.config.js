import { defineConfig } from 'vite';

// Built into api/assets/console, which the binary embeds (rust-embed), so
// `cargo build` needs no Node. `npm run check` rebuilds into a scratch
// directory and compares, so the committed build matches these sources.
export default defineConfig(({ mode }) => ({
  base: '/',
  build: {
    outDir: process.env.CONSOLE_OUT_DIR ?? '../api/assets/console',
    emptyOutDir: true,
    target: 'es2022',
    sourcemap: false,
    // One stylesheet and a few scripts; no inline code, so the page's
    // Content-Security-Policy can forbid inline scripts and styles.
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    chunkSizeWarningLimit: 1024,
  },
  server: {
    // `npm run dev` against a local `agentledger serve`.
    proxy: {
      '/graphql': { target: 'http://127.0.0.1:8080', ws: true },
      '/console': 'http://127.0.0.1:8080',
    },
  },
}));
