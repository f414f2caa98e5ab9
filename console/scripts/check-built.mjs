// Rebuilds the console into a scratch directory and compares it with the
// committed build in api/assets/console, which the binary embeds: fails,
// naming the files, when the sources changed without `npm run build`.

import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = fileURLToPath(new URL('..', import.meta.url));
const committed = join(here, '..', 'api', 'assets', 'console');
const scratch = mkdtempSync(join(tmpdir(), 'agentledger-console-'));

function files(root, dir = root) {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? files(root, path) : [relative(root, path)];
  });
}

try {
  execFileSync('npx', ['vite', 'build', '--logLevel', 'warn'], {
    cwd: here,
    env: { ...process.env, CONSOLE_OUT_DIR: scratch },
    stdio: 'inherit',
  });
  const built = new Set(files(scratch));
  const kept = new Set(files(committed));
  const differ = [...new Set([...built, ...kept])].filter(
    (f) => !built.has(f) || !kept.has(f) || !readFileSync(join(scratch, f)).equals(readFileSync(join(committed, f))),
  );
  if (differ.length > 0) {
    console.error(`api/assets/console does not match console/src: ${differ.join(', ')}`);
    console.error('Run `npm run build` in console/ and commit api/assets/console.');
    process.exit(1);
  }
  console.log(`api/assets/console matches console/src (${built.size} files)`);
} finally {
  rmSync(scratch, { recursive: true, force: true });
}
