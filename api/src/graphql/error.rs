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
    BadInput,
    NotFound,
    Conflict,
    Internal,
}

impl Code {
    fn as_str(self) -> &'static str {
        match self {
            Self::BadInput => "BAD_INPUT",
            Self::NotFound => "NOT_FOUND",
            Self::Conflict => "CONFLICT",
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
        RuntimeError::KeyReused | RuntimeError::Superseded => error(Code::Conflict, e.to_string()),
        RuntimeError::Store(e) => from_store(e),
        other => internal(&other),
    }
}

/// A store error, mapped to its code.
pub fn from_store(e: StoreError) -> async_graphql::Error {
    match e {
        StoreError::BadInput(why) => bad_input(why),
        StoreError::Conflict { .. } | StoreError::IdempotencyMismatch { .. } => {
            error(Code::Conflict, e.to_string())
        }
        other => internal(&other),
    }
}

/// A read model error: always internal to the client.
pub fn from_read(e: ReadError) -> async_graphql::Error {
    internal(&e)
}

/// Logs `e` and returns a generic `INTERNAL` error.
pub fn internal(e: &dyn std::fmt::Display) -> async_graphql::Error {
    tracing::error!(error = %e, "request failed");
    error(Code::Internal, "internal error; it has been logged")
}
