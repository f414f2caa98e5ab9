//! Errors as GraphQL errors with a stable `extensions.code` (design §5).
//! The client sees the code and a short message; internal detail is logged
//! once, here.

use agentledger_agents::RuntimeError;
use agentledger_domain::workflow::DomainError;
use agentledger_eventstore::StoreError;
use agentledger_projections::ReadError;
use async_graphql::ErrorExtensions;

/// The codes clients can rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The input breaks a documented rule; nothing was written. Fix it.
    BadInput,
    /// No such thing in the caller's tenant.
    NotFound,
    /// The state moved on (or a key was reused); read again and decide.
    Conflict,
    /// No credential, or not a valid one (HTTP 401, WebSocket 4401).
    Unauthenticated,
    /// A valid credential without the role or right for this (WebSocket 4403).
    Forbidden,
    /// Too many requests; wait as `Retry-After` says.
    RateLimited,
    /// The database (or identity provider) cannot be reached now; the
    /// request did not take effect or may be retried safely.
    Unavailable,
    /// A bug or corruption; logged.
    Internal,
}

impl Code {
    /// Every code, as documented in docs/security.md and the README.
    pub const ALL: [Code; 8] = [
        Code::BadInput,
        Code::NotFound,
        Code::Conflict,
        Code::Unauthenticated,
        Code::Forbidden,
        Code::RateLimited,
        Code::Unavailable,
        Code::Internal,
    ];

    /// The code as sent in `extensions.code`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadInput => "BAD_INPUT",
            Self::NotFound => "NOT_FOUND",
            Self::Conflict => "CONFLICT",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::Forbidden => "FORBIDDEN",
            Self::RateLimited => "RATE_LIMITED",
            Self::Unavailable => "UNAVAILABLE",
            Self::Internal => "INTERNAL",
        }
    }
}

/// An error for a client.
pub fn error(code: Code, message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message.into()).extend_with(|_, e| e.set("code", code.as_str()))
}

/// `BAD_INPUT` with `message`.
pub fn bad_input(message: impl Into<String>) -> async_graphql::Error {
    error(Code::BadInput, message)
}

/// A runtime error, mapped to its code.
pub fn from_runtime(e: RuntimeError) -> async_graphql::Error {
    match e {
        RuntimeError::Rejected(DomainError::BadInput(why)) => bad_input(why),
        RuntimeError::Rejected(DomainError::NotFound) => error(Code::NotFound, "no such workflow"),
        RuntimeError::Rejected(e @ DomainError::InvalidTransition { .. }) => {
            error(Code::Conflict, e.to_string())
        }
        RuntimeError::KeyReused | RuntimeError::Superseded | RuntimeError::Moved { .. } => {
            error(Code::Conflict, e.to_string())
        }
        RuntimeError::SelfDecision => error(Code::Forbidden, e.to_string()),
        RuntimeError::TaskLost(why) => error(Code::Conflict, why),
        RuntimeError::InvalidDecision(invalid) => async_graphql::Error::new(invalid.to_string())
            .extend_with(|_, e| {
                e.set("code", Code::BadInput.as_str());
                e.set("path", invalid.path.as_str());
                e.set("schemaPath", invalid.schema_path.as_str());
            }),
        RuntimeError::Store(e) => from_store(e),
        RuntimeError::Queue(agentledger_agents::queue::QueueError::Held(_)) => error(
            Code::Unavailable,
            "a submission with this idempotency key is being recorded, or the node that took \
             it stopped before recording it: send it again in a few seconds",
        ),
        RuntimeError::Queue(e) => {
            tracing::warn!(error = %e, "task queue unavailable");
            error(
                Code::Unavailable,
                "the task queue cannot be reached now; retry",
            )
        }
        other => internal(&other),
    }
}

/// A store error, mapped to its code.
pub fn from_store(e: StoreError) -> async_graphql::Error {
    match e {
        StoreError::BadInput(why) => bad_input(why),
        StoreError::Conflict { .. }
        | StoreError::IdempotencyMismatch { .. }
        | StoreError::Contended { .. } => error(Code::Conflict, e.to_string()),
        StoreError::Unavailable(_) | StoreError::Database(_) | StoreError::Closed => {
            tracing::warn!(error = %e, "event store unavailable");
            error(
                Code::Unavailable,
                "the database cannot be reached now; retrying is safe",
            )
        }
        other => internal(&other),
    }
}

/// A read model error.
pub fn from_read(e: ReadError) -> async_graphql::Error {
    match e {
        ReadError::Unavailable(_) => {
            tracing::warn!(error = %e, "read models unavailable");
            error(
                Code::Unavailable,
                "the read models cannot be reached now; retry",
            )
        }
        other => internal(&other),
    }
}

/// Logs `e` and returns a generic `INTERNAL` error.
pub fn internal(e: &dyn std::fmt::Display) -> async_graphql::Error {
    tracing::error!(error = %e, "request failed");
    error(Code::Internal, "internal error; it has been logged")
}

/// The documented code of every error variant of every crate, as one
/// table: matches without a wildcard, so a new variant does not compile
/// until it is given its code here (and in the variant's doc). The tests
/// check that the mapping functions above send exactly these.
#[cfg(test)]
mod table {
    use agentledger_agents::RuntimeError;
    use agentledger_domain::workflow::DomainError;
    use agentledger_eventstore::StoreError;
    use agentledger_projections::ReadError;

    use super::*;

    fn of_store(e: &StoreError) -> Code {
        match e {
            StoreError::Conflict { .. }
            | StoreError::IdempotencyMismatch { .. }
            | StoreError::Contended { .. } => Code::Conflict,
            StoreError::BadInput(_) => Code::BadInput,
            StoreError::Database(_) | StoreError::Unavailable(_) | StoreError::Closed => {
                Code::Unavailable
            }
            StoreError::Corrupt { .. } => Code::Internal,
        }
    }

    fn of_runtime(e: &RuntimeError) -> Code {
        match e {
            RuntimeError::Rejected(DomainError::BadInput(_)) => Code::BadInput,
            RuntimeError::Rejected(DomainError::NotFound) => Code::NotFound,
            RuntimeError::Rejected(DomainError::InvalidTransition { .. }) => Code::Conflict,
            RuntimeError::Store(e) => of_store(e),
            RuntimeError::Queue(agentledger_agents::queue::QueueError::Unavailable(_))
            | RuntimeError::Queue(agentledger_agents::queue::QueueError::Held(_)) => {
                Code::Unavailable
            }
            RuntimeError::Superseded | RuntimeError::KeyReused | RuntimeError::Moved { .. } => {
                Code::Conflict
            }
            RuntimeError::SelfDecision => Code::Forbidden,
            RuntimeError::Corrupt(_) => Code::Internal,
            RuntimeError::InvalidDecision(_) => Code::BadInput,
            RuntimeError::TaskLost(_) => Code::Conflict,
        }
    }

    fn of_read(e: &ReadError) -> Code {
        match e {
            ReadError::Unavailable(_) => Code::Unavailable,
            // A mutation whose read models lag answers `pending` instead.
            ReadError::Corrupt(_) | ReadError::Timeout(_) => Code::Internal,
        }
    }

    fn sent(e: async_graphql::Error) -> String {
        let extensions = e.extensions.expect("every error carries a code");
        match extensions.get("code") {
            Some(async_graphql::Value::String(code)) => code.clone(),
            other => panic!("code {other:?}"),
        }
    }

    fn stores() -> Vec<StoreError> {
        let stream = agentledger_eventstore::StreamId::new("workflow-x").unwrap();
        vec![
            StoreError::Conflict {
                stream: stream.clone(),
                expected: agentledger_eventstore::ExpectedVersion::NoStream,
                actual: Some(1),
            },
            StoreError::IdempotencyMismatch {
                stream,
                event_id: uuid::Uuid::nil(),
            },
            StoreError::Contended { attempts: 3 },
            StoreError::BadInput("x".into()),
            StoreError::Unavailable("pool".into()),
            StoreError::Corrupt {
                position: 1,
                reason: "x".into(),
            },
            StoreError::Closed,
        ]
    }

    #[test]
    fn every_variant_is_sent_with_its_documented_code() {
        for e in stores() {
            let expected = of_store(&e).as_str();
            assert_eq!(sent(from_store(e)), expected);
        }
        let runtimes = || {
            let mut all: Vec<RuntimeError> =
                stores().into_iter().map(RuntimeError::Store).collect();
            all.extend([
                RuntimeError::Rejected(DomainError::BadInput("x".into())),
                RuntimeError::Rejected(DomainError::NotFound),
                RuntimeError::Rejected(DomainError::InvalidTransition {
                    command: "cancel",
                    state: agentledger_domain::workflow::WorkflowState::Completed,
                }),
                RuntimeError::Queue(agentledger_agents::queue::QueueError::Unavailable(
                    "x".into(),
                )),
                RuntimeError::Queue(agentledger_agents::queue::QueueError::Held(
                    uuid::Uuid::nil(),
                )),
                RuntimeError::Superseded,
                RuntimeError::KeyReused,
                RuntimeError::Moved {
                    expected: 1,
                    actual: 2,
                },
                RuntimeError::SelfDecision,
                RuntimeError::Corrupt("x".into()),
                RuntimeError::InvalidDecision(agentledger_agents::decision::InvalidDecision {
                    path: "/risk".into(),
                    schema_path: "/properties/risk/maximum".into(),
                    message: "2 is greater than 1".into(),
                }),
                RuntimeError::TaskLost("gone".into()),
            ]);
            all
        };
        for (e, same) in runtimes().into_iter().zip(runtimes()) {
            let expected = of_runtime(&same).as_str();
            assert_eq!(sent(from_runtime(e)), expected, "{same}");
        }
        for e in [
            ReadError::Unavailable("x".into()),
            ReadError::Corrupt("x".into()),
            ReadError::Timeout(1),
        ] {
            let expected = of_read(&e).as_str();
            assert_eq!(sent(from_read(e)), expected);
        }
    }

    #[test]
    fn every_code_is_documented() {
        let docs = concat!(
            include_str!("../../../README.md"),
            include_str!("../../../docs/security.md")
        );
        for code in Code::ALL {
            assert!(
                docs.contains(code.as_str()),
                "{} is not documented",
                code.as_str()
            );
        }
    }
}
