//! Read models of agentledger: workflow status, audit trail and agent
//! metrics, computed from `$all` by pure functions ([`model`]) and kept in
//! PostgreSQL ([`postgres`]) or in memory ([`memory`]) behind one query trait
//! ([`ReadModels`]). A PostgreSQL projection writes its rows and its
//! checkpoint in one transaction, runs on one process at a time (an
//! advisory-lock lease, fenced by a token in the checkpoint row) and can be
//! rebuilt from position 0 into fresh tables swapped in atomically.
//!
//! Depends on `agentledger-domain` and `agentledger-eventstore`. Must never
//! append events, or take a time from anywhere but the events themselves.

pub mod memory;
pub mod model;
pub mod postgres;
pub mod query;

pub use memory::InMemoryReadModels;
pub use model::{AgentRole, Fact};
pub use postgres::PostgresReadModels;
pub use query::{lag, AuditFilter, ReadError, ReadModels, WorkflowCursor, PROJECTIONS};
