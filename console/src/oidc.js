// Sign-in through the deployment's OpenID Connect issuer: the
// authorization-code flow with PKCE (oauth4webapi). The verifier and state
// wait in sessionStorage for the redirect back, and are removed on return;
// the access token becomes the session's credential.

import * as oauth from 'oauth4webapi';

const PENDING = 'agentledger.oidc';

function options(issuer) {
  // A loopback issuer over plain HTTP (a local IdP in development) is
  // allowed; anything else must be HTTPS.
  const loopback = ['localhost', '127.0.0.1', '[::1]'].includes(issuer.hostname);
  return loopback ? { [oauth.allowInsecureRequests]: true } : {};
}

async function discover(config) {
  const issuer = new URL(config.issuer);
  const response = await oauth.discoveryRequest(issuer, options(issuer));
  return oauth.processDiscoveryResponse(issuer, response);
}

function redirectUri() {
  return `${location.origin}/`;
}

/** Leaves for the issuer's sign-in page. */
export async function startSignIn(config) {
  const server = await discover(config);
  const verifier = oauth.generateRandomCodeVerifier();
  const state = oauth.generateRandomState();
  sessionStorage.setItem(PENDING, JSON.stringify({ verifier, state, back: location.hash }));
  const url = new URL(server.authorization_endpoint);
  url.searchParams.set('client_id', config.clientId);
  url.searchParams.set('redirect_uri', redirectUri());
  url.searchParams.set('response_type', 'code');
  url.searchParams.set('scope', config.scope);
  url.searchParams.set('code_challenge', await oauth.calculatePKCECodeChallenge(verifier));
  url.searchParams.set('code_challenge_method', 'S256');
  url.searchParams.set('state', state);
  location.assign(url.href);
}

/**
 * On the way back from the issuer (`?code=…&state=…`): exchanges the code
 * for an access token and returns it, with the page address it left from;
 * null when this page load is not a return.
 */
export async function finishSignIn(config) {
  const here = new URL(location.href);
  if (!here.searchParams.has('state')) return null;
  const pending = JSON.parse(sessionStorage.getItem(PENDING) ?? 'null');
  sessionStorage.removeItem(PENDING);
  history.replaceState(null, '', `/${pending?.back ?? ''}`);
  if (!pending) throw new Error('The sign-in was not started from this browser session.');
  const server = await discover(config);
  const client = { client_id: config.clientId };
  const params = oauth.validateAuthResponse(server, client, here, pending.state);
  const issuer = new URL(config.issuer);
  const response = await oauth.authorizationCodeGrantRequest(
    server,
    client,
    oauth.None(),
    params,
    redirectUri(),
    pending.verifier,
    options(issuer),
  );
  const result = await oauth.processAuthorizationCodeResponse(server, client, response);
  return result.access_token;
}
