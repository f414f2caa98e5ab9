//! GraphQL over WebSocket with authentication: the caller comes from the
//! upgrade request's headers or, when they carry no credential, from the
//! `connection_init` payload. A connection that cannot authenticate is
//! closed with 4401 (`graphql-transport-ws`; the legacy `graphql-ws`
//! protocol gets a `connection_error`), one whose credential holds no role
//! that may subscribe with 4403. Every operation on the socket passes the
//! access table like a request over HTTP, and the credential is checked
//! again every [`RECHECK_EVERY`]: a revoked key or an expired token closes
//! the socket with 4401.
//!
//! Limits: `connection_init` within `init_timeout` (else 4408); at most
//! `connections_per_credential` sockets per credential (else 4429); at most
//! `subscriptions_per_connection` subscriptions at once and the
//! credential's rate of operations on one socket (else the operation gets
//! `RATE_LIMITED`); a ping every `ping_interval`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_graphql::http::{WebSocket as Protocol, WebSocketProtocols, WsMessage};
use async_graphql::{Data, ErrorExtensions, Executor};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt};

use crate::auth::access::ShapeLimits;
use crate::auth::{Access, AuthError, Authenticator, Principal};
use crate::graphql::budget::Meter;
use crate::limits::{ConnectionSlot, Limiters, OpenCount};
use crate::AgentledgerSchema;

/// Close codes of graphql-transport-ws for a refused connection.
const CLOSE_UNAUTHENTICATED: u16 = 4401;
const CLOSE_FORBIDDEN: u16 = 4403;
const CLOSE_INIT_TIMEOUT: u16 = 4408;
const CLOSE_TOO_MANY: u16 = 4429;

/// How often an open socket's credential is checked again. With the key
/// cache's second, a revoked key ends its sockets within two seconds.
const RECHECK_EVERY: Duration = Duration::from_millis(500);

/// The schema as one socket sees it: every operation authorized for the
/// socket's caller, subscriptions counted against the socket's cap,
/// operations against its rate.
#[derive(Clone)]
struct SocketExecutor {
    schema: AgentledgerSchema,
    /// The caller, once `connection_init` authenticated it.
    principal: Arc<Mutex<Option<Principal>>>,
    shape: ShapeLimits,
    open: OpenCount,
    max_open: usize,
    rate: Arc<Option<governor::DefaultDirectRateLimiter>>,
    /// Bytes one response (or subscription message) may take.
    budget: usize,
}

fn refused(code: &'static str, message: &str) -> async_graphql::Response {
    async_graphql::Response::from_errors(vec![async_graphql::Error::new(message)
        .extend_with(|_, e| e.set("code", code))
        .into_server_error(Default::default())])
}

impl SocketExecutor {
    /// The request as the socket's caller may make it, or the refusal.
    fn authorize(
        &self,
        request: async_graphql::Request,
    ) -> Result<async_graphql::Request, Box<async_graphql::Response>> {
        if self
            .rate
            .as_ref()
            .as_ref()
            .is_some_and(|r| r.check().is_err())
        {
            return Err(Box::new(refused(
                "RATE_LIMITED",
                "too many operations on this connection; slow down",
            )));
        }
        let principal = self.principal.lock().expect("principal lock").clone();
        match principal {
            Some(principal) => crate::auth::authorize(request, &principal, self.shape),
            None => Err(Box::new(refused(
                "UNAUTHENTICATED",
                "send connection_init first",
            ))),
        }
    }
}

impl Executor for SocketExecutor {
    async fn execute(&self, request: async_graphql::Request) -> async_graphql::Response {
        match self.authorize(request) {
            Ok(request) => {
                let (request, meter) = Meter::attach(request, self.budget);
                meter.settle_exactly(self.schema.execute(request).await)
            }
            Err(refusal) => *refusal,
        }
    }

    fn execute_stream(
        &self,
        request: async_graphql::Request,
        session_data: Option<Arc<Data>>,
    ) -> BoxStream<'static, async_graphql::Response> {
        let request = match self.authorize(request) {
            Ok(request) => request,
            Err(refusal) => return futures::stream::once(async { *refusal }).boxed(),
        };
        let Some(place) = self.open.take(self.max_open) else {
            let message = format!(
                "at most {} subscriptions at once on one connection",
                self.max_open
            );
            return futures::stream::once(async move { refused("RATE_LIMITED", &message) }).boxed();
        };
        let (request, meter) = Meter::attach(request, self.budget);
        self.schema
            .execute_stream_with_session_data(request, session_data.unwrap_or_default())
            .map(move |response| {
                // The place is given back when the subscription ends.
                let _held = &place;
                meter.settle_exactly(response)
            })
            .boxed()
    }
}

/// What one connection knows of its caller.
#[derive(Default)]
struct Caller {
    principal: Arc<Mutex<Option<Principal>>>,
    /// What it authenticated with, to check again while the socket is open.
    credential: Mutex<Option<String>>,
    /// Counts against the credential's sockets while the connection lives.
    slot: Mutex<Option<ConnectionSlot>>,
    /// The close code a refused `connection_init` gets.
    refusal: Mutex<Option<u16>>,
}

impl Caller {
    fn initialised(&self) -> bool {
        self.principal.lock().expect("principal lock").is_some()
    }
}

/// Serves one WebSocket until either side closes it. `principal` and
/// `credential` are the upgrade request's, when its headers carried one.
pub(crate) async fn serve(
    socket: WebSocket,
    schema: AgentledgerSchema,
    protocol: WebSocketProtocols,
    (principal, credential): (Option<Principal>, Option<String>),
    auth: Arc<Authenticator>,
    limiters: Arc<Limiters>,
) {
    let config = limiters.config().clone();
    let (mut sink, stream) = socket.split();
    let input = stream
        .take_while(|message| futures::future::ready(message.is_ok()))
        .filter_map(|message| {
            futures::future::ready(match message {
                Ok(message @ (Message::Text(_) | Message::Binary(_))) => Some(message.into_data()),
                _ => None,
            })
        });
    let caller = Arc::new(Caller {
        credential: Mutex::new(credential),
        ..Caller::default()
    });
    let on_init = {
        let (caller, auth, limiters) = (caller.clone(), auth.clone(), limiters.clone());
        move |payload: serde_json::Value| async move {
            let found = match principal {
                Some(principal) => Ok(principal),
                None => {
                    *caller.credential.lock().expect("credential lock") =
                        Authenticator::credential_in_init(&payload);
                    auth.authenticate_init(&payload).await
                }
            };
            let (code, message) = match found {
                // Readers follow workflows; agent workers wait for tasks.
                Ok(principal)
                    if Access::Read.allows(principal.roles)
                        || Access::Work.allows(principal.roles) =>
                {
                    match limiters.open_connection(&principal.subject) {
                        Some(slot) => {
                            *caller.slot.lock().expect("slot lock") = Some(slot);
                            *caller.principal.lock().expect("principal lock") =
                                Some(principal.clone());
                            let mut data = Data::default();
                            data.insert(principal);
                            return Ok(data);
                        }
                        None => (
                            CLOSE_TOO_MANY,
                            format!(
                                "this credential has {} connections open already",
                                limiters.config().connections_per_credential
                            ),
                        ),
                    }
                }
                Ok(_) => (
                    CLOSE_FORBIDDEN,
                    "Forbidden: this credential has no role that may subscribe".to_string(),
                ),
                Err(e @ AuthError::Unauthenticated(_)) => {
                    (CLOSE_UNAUTHENTICATED, format!("Unauthorized: {e}"))
                }
                Err(e @ AuthError::Unavailable(_)) => (1013, e.to_string()),
            };
            *caller.refusal.lock().expect("refusal lock") = Some(code);
            Err(async_graphql::Error::new(message))
        }
    };
    let limits = schema
        .data::<crate::graphql::Services>()
        .map(|s| s.limits.clone())
        .unwrap_or_default();
    let executor = SocketExecutor {
        shape: limits.shape,
        budget: limits.max_response_bytes,
        schema,
        principal: caller.principal.clone(),
        open: OpenCount::default(),
        max_open: config.subscriptions_per_connection,
        rate: Arc::new(limiters.per_socket()),
    };
    let messages = {
        let caller = caller.clone();
        Protocol::new(executor, input, protocol)
            .on_connection_init(on_init)
            .map(move |message| match message {
                WsMessage::Text(text) => Message::Text(text.into()),
                WsMessage::Close(code, reason) => {
                    // The library closes a refused `connection_init` with
                    // 1002; the protocol's code for the reason goes out.
                    let code = match *caller.refusal.lock().expect("refusal lock") {
                        Some(refusal) if code == 1002 => refusal,
                        _ => code,
                    };
                    Message::Close(Some(CloseFrame {
                        code,
                        reason: reason.into(),
                    }))
                }
            })
    };
    futures::pin_mut!(messages);
    let init_deadline = tokio::time::sleep(config.init_timeout);
    tokio::pin!(init_deadline);
    let mut ping = tokio::time::interval(config.ping_interval);
    ping.tick().await;
    let mut recheck = tokio::time::interval(RECHECK_EVERY);
    recheck.tick().await;
    loop {
        let message = tokio::select! {
            message = messages.next() => match message {
                Some(message) => message,
                None => break,
            },
            _ = &mut init_deadline, if !caller.initialised() => close(
                CLOSE_INIT_TIMEOUT,
                "Connection initialisation timeout".into(),
            ),
            _ = ping.tick() => Message::Ping(Default::default()),
            _ = recheck.tick(), if caller.initialised() => {
                let presented = caller.credential.lock().expect("credential lock").clone();
                match auth.authenticate(presented.as_deref()).await {
                    // The database being away is no reason to drop callers.
                    Ok(_) | Err(AuthError::Unavailable(_)) => continue,
                    Err(e @ AuthError::Unauthenticated(_)) => {
                        close(CLOSE_UNAUTHENTICATED, format!("Unauthorized: {e}"))
                    }
                }
            }
        };
        let closing = matches!(message, Message::Close(_));
        if sink.send(message).await.is_err() || closing {
            break;
        }
    }
}

fn close(code: u16, reason: String) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}
