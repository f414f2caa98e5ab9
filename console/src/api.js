// The console's one way to the server: GraphQL over HTTP for queries and
// mutations, graphql-ws (the graphql-transport-ws protocol) for
// subscriptions. The credential lives in sessionStorage only: it is gone
// when the browser session ends, and never written anywhere else.

import { createClient } from 'graphql-ws';

const CREDENTIAL = 'agentledger.credential';

let socket = null;
const listeners = new Set();

/** The session's credential: null when signed out, '' where none is needed. */
export function credential() {
  return sessionStorage.getItem(CREDENTIAL);
}

export function signIn(secret) {
  sessionStorage.setItem(CREDENTIAL, secret);
  resetSocket();
  listeners.forEach((f) => f(true));
}

export function signOut() {
  sessionStorage.removeItem(CREDENTIAL);
  resetSocket();
  listeners.forEach((f) => f(false));
}

/** Calls `f(signedIn)` whenever the credential changes; returns an unsubscribe. */
export function onSessionChange(f) {
  listeners.add(f);
  return () => listeners.delete(f);
}

function resetSocket() {
  if (socket) {
    // Disposing a socket still connecting (signing out or in while a page
    // subscribes) rejects with its close event. Nothing waits for it, and
    // the pages learn of the close from their subscriptions' sinks.
    Promise.resolve(socket.dispose()).catch(() => {});
    socket = null;
  }
}

/** An error the server answered with: `code` is the GraphQL error code. */
export class ApiError extends Error {
  constructor(message, code) {
    super(message);
    this.code = code;
  }
}

function authorization() {
  const secret = credential();
  return secret ? { authorization: `Bearer ${secret}` } : {};
}

/** Runs one GraphQL operation; its `data`, or an ApiError. */
export async function gql(query, variables = {}) {
  let response;
  try {
    response = await fetch('/graphql', {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...authorization() },
      body: JSON.stringify({ query, variables }),
    });
  } catch {
    throw new ApiError('The server cannot be reached.', 'UNAVAILABLE');
  }
  if (response.status === 401) {
    signOut();
    throw new ApiError('The credential was not accepted: sign in again.', 'UNAUTHENTICATED');
  }
  const body = await response.json().catch(() => null);
  const errors = body?.errors ?? (body?.error ? [body.error] : []);
  if (errors.length > 0) {
    const code = errors[0].extensions?.code ?? errors[0].code;
    throw new ApiError(errors.map((e) => e.message).join(' '), code);
  }
  if (!response.ok || !body?.data) {
    throw new ApiError(`The server answered ${response.status}.`, 'UNAVAILABLE');
  }
  return body.data;
}

function client() {
  if (!socket) {
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    socket = createClient({
      url: `${scheme}://${location.host}/graphql/ws`,
      connectionParams: () => authorization(),
      lazy: true,
      // A server restart or a dropped connection: reconnect and resubscribe.
      retryAttempts: 1000,
      shouldRetry: () => credential() !== null,
    });
  }
  return socket;
}

/**
 * Subscribes to one operation: `next(data)` on every result, `error(err)`
 * once on failure. Returns a function that ends the subscription.
 */
export function subscribe(query, variables, { next, error = () => {}, complete = () => {} }) {
  return client().subscribe(
    { query, variables },
    {
      next: (result) => {
        if (result.errors?.length) {
          const e = result.errors[0];
          error(new ApiError(e.message, e.extensions?.code));
        } else {
          next(result.data);
        }
      },
      error: (e) => error(e instanceof Error ? e : new ApiError(e?.reason || 'The live connection closed.', 'UNAVAILABLE')),
      complete,
    },
  );
}

/** Calls `f(connected)` as the live connection opens and closes. */
export function onLiveConnection(f) {
  const opened = client().on('connected', () => f(true));
  const closed = client().on('closed', () => f(false));
  return () => (opened(), closed());
}

/** What the server tells the console about itself (sign-in methods). */
export async function consoleConfig() {
  const response = await fetch('/console/config.json');
  if (!response.ok) return { oidc: null };
  return response.json();
}
