// The console: sign-in, the frame around every page, and the routes
// (wouter, over the address's hash, so the server serves one page).

import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { Link, Route, Router, Switch } from 'wouter-preact';
import { useHashLocation } from 'wouter-preact/use-hash-location';

import { consoleConfig, credential, gql, onSessionChange, signIn, signOut } from './api.js';
import { finishSignIn, startSignIn } from './oidc.js';
import { ErrorMessage, html, Loading } from './ui.js';
import { Dashboard } from './pages/dashboard.js';
import { Workflows } from './pages/workflows.js';
import { WorkflowPage } from './pages/workflow.js';
import { Inbox } from './pages/inbox.js';
import { Replay } from './pages/replay.js';
import './style.css';

const ME = `{ me { subject name tenant roles method } }`;

function SignIn({ config, error, setError }) {
  const [key, setKey] = useState('');
  const submit = (e) => {
    e.preventDefault();
    setError(null);
    signIn(key.trim());
  };
  const oidc = async () => {
    try {
      await startSignIn(config.oidc);
    } catch (e) {
      setError(e);
    }
  };
  return html`
    <main id="main" class="signin">
      <h1>agentledger</h1>
      <p>Every agent decision, recorded and verifiable. Sign in to follow workflows, decide escalations and audit the ledger.</p>
      <${ErrorMessage} error=${error} />
      <form onSubmit=${submit}>
        <label for="api-key">API key</label>
        <input id="api-key" name="api-key" type="password" autocomplete="off" required
          value=${key} onInput=${(e) => setKey(e.currentTarget.value)} />
        <p class="hint">Kept for this browser session only.</p>
        <button type="submit">Sign in</button>
      </form>
      ${config?.oidc && html`
        <p>or</p>
        <button type="button" onClick=${oidc}>Sign in with ${config.oidc.name}</button>`}
    </main>`;
}

function Frame({ me, children }) {
  const links = [
    ['/', 'Dashboard'],
    ['/workflows', 'Workflows'],
    ['/inbox', 'Inbox'],
    ['/replay', 'Audit replay'],
  ];
  return html`
    <a class="skip" href="#main" onClick=${(e) => { e.preventDefault(); document.getElementById('main')?.focus(); }}>Skip to content</a>
    <header>
      <span class="brand">agentledger</span>
      <nav aria-label="Main">
        <ul>
          ${links.map(([href, label]) => html`<li><${Link} href=${href}>${label}<//></li>`)}
        </ul>
      </nav>
      <div class="who">
        <span data-testid="signed-in-as">${me.name}</span>
        <span class="muted"> · ${me.tenant} · ${me.roles.join(', ')}</span>
        <button type="button" class="link" onClick=${signOut}>Sign out</button>
      </div>
    </header>
    <main id="main" tabindex="-1">${children}</main>`;
}

function App() {
  const [config, setConfig] = useState(null);
  const [me, setMe] = useState(null);
  const [error, setError] = useState(null);
  const [signedIn, setSignedIn] = useState(credential() !== null);
  const [checking, setChecking] = useState(true);

  useEffect(() => onSessionChange(setSignedIn), []);
  useEffect(() => {
    (async () => {
      const config = await consoleConfig().catch(() => ({ oidc: null }));
      setConfig(config);
      // Authentication is off (dev): every caller is `anonymous`.
      if (config.authentication === 'off' && credential() === null) signIn('');
      try {
        if (config.oidc) {
          const token = await finishSignIn(config.oidc);
          if (token) signIn(token);
        }
      } catch (e) {
        setError(e);
      }
      setChecking(false);
    })();
  }, []);
  useEffect(() => {
    if (!signedIn) {
      setMe(null);
      return;
    }
    gql(ME)
      .then((data) => setMe(data.me))
      .catch((e) => {
        setError(e);
        signOut();
      });
  }, [signedIn]);

  if (checking) return html`<${Loading} />`;
  if (!signedIn) return html`<${SignIn} config=${config} error=${error} setError=${setError} />`;
  if (!me) return html`<${Loading} what="Signing in" />`;
  return html`
    <${Router} hook=${useHashLocation}>
      <${Frame} me=${me}>
        <${Switch}>
          <${Route} path="/"><${Dashboard} me=${me} /><//>
          <${Route} path="/workflows"><${Workflows} me=${me} /><//>
          <${Route} path="/workflows/:id">${(params) => html`<${WorkflowPage} me=${me} id=${params.id} />`}<//>
          <${Route} path="/inbox"><${Inbox} me=${me} /><//>
          <${Route} path="/replay">${() => html`<${Replay} me=${me} />`}<//>
          <${Route} path="/replay/:id">${(params) => html`<${Replay} me=${me} id=${params.id} />`}<//>
          <${Route}><h1>Not found</h1><p>No page here. <${Link} href="/">Back to the dashboard<//>.</p><//>
        <//>
      <//>
    <//>`;
}

render(html`<${App} />`, document.getElementById('app'));
