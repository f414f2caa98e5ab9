//! GraphQL over WebSocket with authentication: the caller comes from the
//! upgrade request's headers or, when they carry no credential, from the
//! `connection_init` payload. A connection that cannot authenticate is
//! closed with 4401 (`graphql-transport-ws`; the legacy `graphql-ws`
//! protocol gets a `connection_error`), one whose credential holds no role
//! that may subscribe with 4403.

use std::sync::{Arc, Mutex};

use async_graphql::http::{WebSocket as Protocol, WebSocketProtocols, WsMessage};
use async_graphql::Data;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{SinkExt, StreamExt};

use crate::auth::{Access, AuthError, Authenticator, Principal};
use crate::AgentledgerSchema;

/// Close codes of graphql-transport-ws for a refused connection.
const CLOSE_UNAUTHENTICATED: u16 = 4401;
const CLOSE_FORBIDDEN: u16 = 4403;

/// Serves one WebSocket until either side closes it.
pub(crate) async fn serve(
    socket: WebSocket,
    schema: AgentledgerSchema,
    protocol: WebSocketProtocols,
    caller: Option<Principal>,
    auth: Arc<Authenticator>,
) {
    let (mut sink, stream) = socket.split();
    let input = stream
        .take_while(|message| futures::future::ready(message.is_ok()))
        .filter_map(|message| {
            futures::future::ready(match message {
                Ok(message @ (Message::Text(_) | Message::Binary(_))) => Some(message.into_data()),
                _ => None,
            })
        });
    // The library closes a refused `connection_init` with 1002; the code
    // the protocol gives the reason is set here and swapped in below.
    let refused: Arc<Mutex<Option<u16>>> = Arc::default();
    let on_init = {
        let refused = refused.clone();
        move |payload: serde_json::Value| async move {
            let principal = match caller {
                Some(principal) => Ok(principal),
                None => auth.authenticate_init(&payload).await,
            };
            let (code, message) = match principal {
                Ok(principal) if Access::Read.allows(principal.roles) => {
                    let mut data = Data::default();
                    data.insert(principal);
                    return Ok(data);
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
            *refused.lock().expect("refusal lock") = Some(code);
            Err(async_graphql::Error::new(message))
        }
    };
    let messages = Protocol::new(schema, input, protocol)
        .on_connection_init(on_init)
        .map(|message| match message {
            WsMessage::Text(text) => Message::Text(text.into()),
            WsMessage::Close(code, reason) => {
                let code = match *refused.lock().expect("refusal lock") {
                    Some(refusal) if code == 1002 => refusal,
                    _ => code,
                };
                Message::Close(Some(CloseFrame {
                    code,
                    reason: reason.into(),
                }))
            }
        });
    futures::pin_mut!(messages);
    while let Some(message) = messages.next().await {
        if sink.send(message).await.is_err() {
            break;
        }
    }
}
