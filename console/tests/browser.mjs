// The console driven the way people use it, in Chromium (playwright-core),
// against a real `agentledger serve` on PostgreSQL that tests/console.rs
// starts. It reads from the environment:
//
//   AGENTLEDGER_URL        the server, e.g. http://127.0.0.1:40123
//   KEY_SUBMITTER          a key with roles submitter and operator ("ada")
//   KEY_OPERATOR           a key with role operator ("grace")
//   KEY_AUDITOR            a key with role auditor ("alan")
//   ADMIN_DATABASE_URL     the database owner, to tamper with one event
//   OIDC_ISSUER_HOST       the host the OpenID Connect sign-in button names
//   CHROMIUM               the browser (default /usr/bin/chromium)
//   ARTIFACTS              where screenshots and downloads go
//
// Every step prints what it did; any failed expectation ends the run with
// a non-zero status and a screenshot of the page as it was.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';

import { chromium } from 'playwright-core';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const base = env('AGENTLEDGER_URL');
const keys = { ada: env('KEY_SUBMITTER'), grace: env('KEY_OPERATOR'), alan: env('KEY_AUDITOR') };
const artifacts = env('ARTIFACTS');
mkdirSync(artifacts, { recursive: true });
const axeSource = readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');

const ENGLISH = 'Summarise the attached quarterly report. Then count the words of the summary.';
const KOREAN = '다음 글을 요약해 주세요. 그다음 단어 수를 세어 주세요.';
const ESCALATES = 'Delete the old notes.';
const LONG = 30_000;

const started = Date.now();
const log = (what) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)} s] ${what}`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, acceptDownloads: true });
const page = await context.newPage();
page.setDefaultTimeout(LONG);
const consoleErrors = [];
page.on('console', (m) => m.type() === 'error' && consoleErrors.push(m.text()));
page.on('pageerror', (e) => consoleErrors.push(String(e)));

async function shot(name, p = page) {
  const path = join(artifacts, `${name}.png`);
  await p.screenshot({ path, fullPage: true });
  log(`screenshot ${path}`);
}

/** Fails on any serious or critical WCAG 2 A/AA violation axe-core finds. */
async function accessible(what, p = page) {
  await p.evaluate(axeSource);
  const result = await p.evaluate(() =>
    // eslint-disable-next-line no-undef
    axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21aa'] } }),
  );
  const serious = result.violations.filter((v) => ['serious', 'critical'].includes(v.impact));
  assert.deepEqual(
    serious.map((v) => `${v.id}: ${v.help} (${v.nodes.map((n) => n.target.join(' ')).join('; ')})`),
    [],
    `accessibility of ${what}`,
  );
  log(`${what}: no serious accessibility violation (${result.passes.length} rules passed)`);
}

async function signIn(who) {
  await page.goto(`${base}/`);
  // Wait for the page to settle on one of its two faces before acting.
  const signOut = page.getByRole('button', { name: 'Sign out' });
  await page.getByLabel('API key').or(signOut).waitFor();
  if (await signOut.isVisible()) await signOut.click();
  await page.getByLabel('API key').fill(keys[who]);
  await page.getByRole('button', { name: 'Sign in', exact: true }).click();
  await page.getByTestId('signed-in-as').filter({ hasText: who }).waitFor();
  log(`signed in as ${who}`);
}

async function submitFromPage(request) {
  await page.goto(`${base}/#/workflows`);
  await page.getByRole('textbox', { name: 'Request' }).fill(request);
  await page.getByRole('button', { name: 'Submit', exact: true }).click();
  await page.waitForURL(/#\/workflows\/[0-9a-f-]{36}$/);
  const id = page.url().split('/').pop();
  log(`submitted ${JSON.stringify(request)} from the page: ${id}`);
  return id;
}

async function stateIs(state, scope = page.getByTestId('workflow-state')) {
  await scope.locator(`[data-state="${state}"]`).waitFor();
}

async function run() {
  // The sign-in page, then the dashboard, live.
  await page.goto(`${base}/`);
  await page.getByLabel('API key').waitFor();
  await accessible('the sign-in page');
  await shot('01-sign-in');
  await page.getByLabel('API key').fill('alk_not-a-key');
  await page.getByRole('button', { name: 'Sign in', exact: true }).click();
  await page.getByRole('alert').waitFor();
  log(`a wrong key is refused: ${await page.getByRole('alert').innerText()}`);

  await signIn('ada');

  // Submit from the page and watch the timeline reach COMPLETED live.
  const completed = await submitFromPage(ENGLISH);
  await stateIs('COMPLETED');
  const timeline = page.getByTestId('timeline').locator('li');
  assert.ok((await timeline.count()) >= 4, 'the timeline shows the agents’ decisions');
  for (const agent of ['sena', 'lubit', 'gitcode', 'rune']) {
    assert.ok((await page.getByTestId('timeline').innerText()).toLowerCase().includes(agent), `${agent} in the timeline`);
  }
  assert.ok((await page.getByTestId('subtasks').locator('tbody tr').count()) >= 1, 'subtasks shown');
  log(`${completed} reached COMPLETED live with ${await timeline.count()} decisions`);
  await accessible('the workflow page');
  await shot('03-workflow-completed');

  const korean = await submitFromPage(KOREAN);
  await stateIs('COMPLETED');
  await page.getByText(KOREAN).first().waitFor();
  log(`the Korean request ${korean} completed and reads as written`);

  // The dashboard counts them, live.
  await page.goto(`${base}/#/`);
  await page.locator('[data-testid="live"][data-live="true"]').waitFor();
  // A workflow submitted elsewhere (by a client of the API) moves the
  // dashboard's figures as its events arrive over the subscription.
  const response = await fetch(`${base}/graphql`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${keys.ada}` },
    body: JSON.stringify({ query: 'mutation($r: String!) { submitWorkflow(request: $r) { id } }', variables: { r: ENGLISH } }),
  });
  assert.equal(response.status, 200);
  await page.waitForFunction(() => {
    const recent = document.querySelector('[data-testid="recent"]');
    return Number(recent?.dataset.events) >= 5 && Number(recent?.dataset.ended) >= 1;
  });
  await page.waitForFunction(
    () => Number(document.querySelector('[data-testid="state-counts"] [data-state="COMPLETED"]')?.textContent) >= 3,
  );
  log(`the dashboard followed a workflow submitted elsewhere live: ${await page.getByTestId('recent').innerText()}`);
  await accessible('the dashboard');
  await shot('02-dashboard');

  // An escalation: the submitter may not decide its own (four eyes)…
  const escalated = await submitFromPage(ESCALATES);
  await stateIs('AWAITING_HUMAN');
  await page.goto(`${base}/#/inbox`);
  const card = page.locator(`[data-workflow="${escalated}"]`);
  await card.getByLabel('Comment').fill('I asked for it myself');
  await card.getByRole('button', { name: 'Approve' }).click();
  const refusal = await card.getByRole('alert').innerText();
  assert.match(refusal, /FORBIDDEN|four eyes|submit/i, 'the submitter’s own approval is refused');
  log(`four eyes: ${refusal}`);

  // …another operator approves it from the inbox, and the timeline names her.
  await signIn('grace');
  await page.goto(`${base}/#/inbox`);
  await card.waitFor();
  await accessible('the escalation inbox');
  await shot('04-inbox');
  await card.getByLabel('Comment').fill('두 번 확인했습니다: the notes are archived elsewhere.');
  await card.getByRole('button', { name: 'Approve' }).click();
  await card.waitFor({ state: 'detached' });
  await page.goto(`${base}/#/workflows/${escalated}`);
  await page.getByTestId('timeline').locator('[data-actor-kind="human"]', { hasText: 'grace' }).waitFor();
  assert.match(await page.getByTestId('timeline').innerText(), /human\.approve by grace/);
  // The approval let it go on: it ran, and ended (this request names no
  // tool, so its one subtask fails; what matters here is who approved).
  await page.getByTestId('workflow-state').locator('[data-state]').filter({ hasNotText: 'AWAITING' }).waitFor();
  await page.getByText('Ended.').waitFor();
  const after = await page.getByTestId('workflow-state').innerText();
  log(`grace approved ${escalated}; the timeline names her; the workflow went on and ended ${after}`);
  await shot('05-workflow-approved');

  // The replay: step back to an earlier event and see the earlier state.
  await signIn('alan');
  await page.goto(`${base}/#/replay/${completed}`);
  await page.getByTestId('verification').filter({ hasText: 'verifies' }).waitFor();
  const slider = page.getByLabel(/^Event \d+ of \d+$/);
  const steps = Number(await slider.getAttribute('max')) + 1;
  await stateIs('COMPLETED', page.getByTestId('replay-state'));
  await slider.focus();
  await page.keyboard.press('Home');
  await stateIs('SUBMITTED', page.getByTestId('replay-state'));
  assert.match(await page.getByTestId('replay-event').locator('h2').innerText(), /WorkflowSubmitted/);
  await page.getByRole('button', { name: 'Next' }).click();
  await page.getByRole('button', { name: 'Next' }).click();
  const third = await page.getByTestId('replay-state').innerText();
  assert.doesNotMatch(third, /COMPLETED/, 'the third event’s state is not the final one');
  log(`replay of ${steps} events stepped back to the first (SUBMITTED) and forward by keyboard and buttons`);
  await accessible('the replay page');
  await shot('06-replay');

  // Exports, the signed digest and the receipt.
  const [jsonl] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: 'Export JSONL' }).click()]);
  const lines = readFileSync(await jsonl.path(), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  assert.equal(lines.length, steps);
  assert.ok(lines.every((l) => l.chain === 'verified' && /^[0-9a-f]{64}$/.test(l.hash)));
  const [csv] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: 'Export CSV' }).click()]);
  assert.equal(readFileSync(await csv.path(), 'utf8').trim().split('\r\n').length, steps + 1);
  const [digest] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: 'Download signed digest' }).click()]);
  const digestPath = join(artifacts, 'digest.json');
  await digest.saveAs(digestPath);
  const signed = JSON.parse(readFileSync(digestPath, 'utf8'));
  assert.ok(signed.root && signed.signature, 'the digest carries a root and a signature');
  const [receipt] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: 'Download receipt' }).click()]);
  const receiptPath = join(artifacts, 'receipt.json');
  await receipt.saveAs(receiptPath);
  const proved = JSON.parse(readFileSync(receiptPath, 'utf8'));
  assert.equal(proved.format, 'agentledger-receipt-1');
  assert.equal(proved.events.length, steps, 'the receipt holds every event of the workflow');
  assert.match(proved.checkpoint, /\n— /, 'the receipt carries a signed checkpoint');
  log(`exported ${lines.length} JSONL lines and a CSV; digest saved to ${digestPath}; receipt of ${proved.events.length} events to ${receiptPath}`);

  // Tamper with one stored event as the database owner: the replay flags it.
  const tampered = lines[2].position;
  execFileSync('psql', [env('ADMIN_DATABASE_URL'), '-qc',
    'ALTER TABLE events DISABLE TRIGGER USER; ' +
    `UPDATE events SET payload = jsonb_set(payload, '{tampered}', 'true') WHERE global_position = ${tampered}; ` +
    'ALTER TABLE events ENABLE TRIGGER USER;']);
  log(`tampered with the event at position ${tampered}`);
  await page.reload();
  await page.getByTestId('verification').filter({ hasText: `Tampering detected at position ${tampered}` }).waitFor();
  await slider.focus();
  await page.keyboard.press('Home');
  await page.getByRole('button', { name: 'Next' }).click();
  await page.getByRole('button', { name: 'Next' }).click();
  assert.equal(await page.getByTestId('replay-event').getAttribute('data-chain'), 'broken');
  await page.getByRole('button', { name: 'Previous' }).click();
  assert.equal(await page.getByTestId('replay-event').getAttribute('data-chain'), 'verified');
  log('the replay flags the altered event and still trusts the one before it');
  await page.getByRole('button', { name: 'Next' }).click();
  await shot('07-replay-tampered');

  // A phone's width: nothing wider than the screen.
  await page.setViewportSize({ width: 390, height: 844 });
  for (const [name, path] of [['08-phone-dashboard', '/#/'], ['09-phone-workflow', `/#/workflows/${korean}`]]) {
    await page.goto(`${base}${path}`);
    await page.locator('h1').waitFor();
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `${name}: the page is ${overflow}px wider than the phone`);
    await shot(name);
  }
  log('usable at 390 px: no horizontal overflow');

  // Sign-in at the OpenID Connect issuer: authorization code with PKCE.
  await page.setViewportSize({ width: 1280, height: 900 });
  await page.goto(`${base}/#/inbox`);
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.getByRole('button', { name: `Sign in with ${env('OIDC_ISSUER_HOST')}` }).click();
  await page.getByTestId('signed-in-as').filter({ hasText: 'hana (SSO)' }).waitFor();
  assert.equal(new URL(page.url()).search, '', 'the code and state leave the address bar');
  assert.equal(new URL(page.url()).hash, '#/inbox', 'back on the page the sign-in started from');
  const stored = await page.evaluate(() => Object.keys(sessionStorage));
  assert.deepEqual(stored, ['agentledger.credential'], 'only the session credential is kept');
  assert.deepEqual(await page.evaluate(() => Object.keys(localStorage)), [], 'nothing in localStorage');
  assert.match(await page.locator('.who').innerText(), /operator/);
  log('signed in at the OpenID Connect issuer with PKCE; only the access token is kept, for the session');
  await shot('10-signed-in-with-oidc');

  assert.deepEqual(consoleErrors.filter((e) => !/status of 4\d\d/.test(e)), [], 'no script errors in the page');
}

try {
  await run();
  log('all console checks passed');
} catch (e) {
  await shot('failure').catch(() => {});
  console.error(e);
  process.exitCode = 1;
} finally {
  await browser.close();
}
